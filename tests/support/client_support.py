"""Helpers and fixtures of the client tests on the fake relay world. A test module uses the
fixtures by naming them at module level (`world = client_world`, `pair = engine_pair`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from medrelay.clients.cli.app import EngineApi, Interrupted
from medrelay.clients.cli.main import cli
from medrelay.clients.engine.client import Engine, open_engine
from medrelay.clients.engine.enrollment import enroll
from medrelay.clients.engine.linking import LinkUi, join_link
from medrelay.clients.engine.store import ProfileInfo, inline_runner, read_public_info
from medrelay.clients.engine.testing import TEST_PASSPHRASE, TEST_SERVER_URL, ClientWorld
from medrelay.clients.engine.views import MessageView, NoticeView

_T = TypeVar("_T")


def inbox(world: ClientWorld, engine: Engine) -> list[MessageView | NoticeView]:
    """Sync the engine with the relay, then what is new (marked as read)."""
    world.run(engine.sync())
    return world.run(engine.unread())


@pytest.fixture(name="world")
def client_world(tmp_path: Path) -> ClientWorld:
    return ClientWorld(tmp_path)


@pytest.fixture(name="pair")
def engine_pair(world: ClientWorld) -> Iterator[tuple[Engine, Engine]]:
    """alice and bob, enrolled doctors, their engines open (closed afterwards)."""
    world.enroll("alice")
    world.enroll("bob")
    alice, bob = world.open("alice"), world.open("bob")
    yield alice, bob
    world.run(alice.close())
    world.run(bob.close())


class WorldApp:
    """The CLI's App over a ClientWorld: engines on the fake relay, time on the fake clock.
    `run` gives up after `max_steps` ticks as if the user pressed Ctrl-C."""

    def __init__(self, world: ClientWorld, max_steps: int = 400) -> None:
        self.world = world
        self.max_steps = max_steps

    def run(self, main: Callable[[], Deferred[_T]]) -> _T:
        results: list[object] = []
        main().addBoth(results.append)
        world = self.world
        for _ in range(self.max_steps):
            world.relay.pump()
            if results:
                break
            world.clock.advance(0.1)
        else:
            raise Interrupted()
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[return-value]

    def open_engine(self, profile_dir: Path, passphrase: str) -> Deferred[EngineApi]:
        world = self.world
        return open_engine(
            profile_dir,
            passphrase,
            reactor=world.clock,
            clock=world.clock,
            rng=world.rng,
            runner=inline_runner,
            http=world.relay.http,
            dialer=world.relay.dialer,
        )  # type: ignore[return-value]

    def read_info(self, profile_dir: Path) -> Deferred[ProfileInfo]:
        return read_public_info(profile_dir, runner=inline_runner)

    def enroll(
        self, profile_dir: Path, passphrase: str, server_url: str, username: str, code: str
    ) -> Deferred[ProfileInfo]:
        world = self.world
        return enroll(
            profile_dir=profile_dir,
            passphrase=passphrase,
            server_url=server_url,
            username=username,
            code=code,
            http=world.relay.http,
            clock=world.clock,
            rng=world.rng,
            runner=inline_runner,
            seal_params=world.seal_params,
        )

    def link(
        self, profile_dir: Path, passphrase: str, server_url: str, code: str, ui: LinkUi
    ) -> Deferred[ProfileInfo]:
        world = self.world
        return join_link(
            profile_dir=profile_dir,
            passphrase=passphrase,
            server_url=server_url,
            code=code,
            http=world.relay.http,
            clock=world.clock,
            rng=world.rng,
            runner=inline_runner,
            ui=ui,
            seal_params=world.seal_params,
        )

    def timeout(self, d: Deferred[_T], seconds: float) -> Deferred[_T]:
        return d.addTimeout(seconds, self.world.clock)


# --- the CLI through click's CliRunner -----------------------------------------------------


def medrelay(
    app: Any, world: ClientWorld, user: str, *args: str, passphrase: str | None = TEST_PASSPHRASE,
    stdin: str | None = None,
) -> Result:  # fmt: skip
    env = {"MEDRELAY_PASSPHRASE": passphrase} if passphrase is not None else {}
    command = [args[0], *args[1:], "--profile", str(world.profile_dir(user))]
    if args[0] == "attachment":
        command = [*args, "--profile", str(world.profile_dir(user))]
    return CliRunner().invoke(cli, command, obj=app, env=env, input=stdin)


def enrolled(app: WorldApp, world: ClientWorld, *users: str) -> None:
    for user in users:
        world.relay.add_user(user, f"CODE-{user}")
        result = medrelay(app, world, user, "enroll", TEST_SERVER_URL, user, f"CODE-{user}")
        assert result.exit_code == 0, result.stderr


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    return lines[0]
