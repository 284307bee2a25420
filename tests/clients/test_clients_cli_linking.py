"""`medrelay devices link` and `medrelay link` through click's CliRunner: each command runs the
real engine against the fake relay while the other device runs in the same fake world, so a
whole link happens inside one test. The digits, the question, JSON progress lines, a no, the
test-only `--yes-if-sas`, and one-line errors (unknown, malformed code, server down)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result
from client_support import WorldApp
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from medrelay.clients.cli.main import cli
from medrelay.clients.engine.linking import LinkCheck, LinkCode, LinkResult, LinkUi
from medrelay.clients.engine.store import ProfileInfo
from medrelay.clients.engine.testing import (
    TEST_PASSPHRASE,
    TEST_SERVER_URL,
    ClientWorld,
    ScriptedLinkUi,
)

_T = TypeVar("_T")
SEED = b"cli linking tests"


class LinkApp(WorldApp):
    """The CLI's App over a ClientWorld. When a command's engine shows a link code, the new
    device (`partner_ui`) joins with it in the same world; `partner` is its Deferred."""

    def __init__(self, world: ClientWorld, partner_ui: ScriptedLinkUi | None = None) -> None:
        super().__init__(world, max_steps=3000)
        self.partner_ui = partner_ui or ScriptedLinkUi()
        self.partner: Deferred[ProfileInfo] | None = None

    def open_engine(self, profile_dir: Path, passphrase: str) -> Deferred[Any]:
        d = super().open_engine(profile_dir, passphrase)
        return d.addCallback(lambda engine: _WithPartner(engine, self._start_partner))

    def _start_partner(self, code: LinkCode) -> None:
        self.partner = self.link(
            self.world.profile_dir("alice", "laptop"),
            TEST_PASSPHRASE,
            code.server_url,
            code.code,
            self.partner_ui,
        )

    def partner_outcome(self) -> ProfileInfo | Exception:
        assert self.partner is not None
        results: list[object] = []
        self.partner.addBoth(results.append)
        for _ in range(100):
            if results:
                break
            self.world.relay.pump()
            self.world.clock.advance(0.1)
        result = results[0]
        if isinstance(result, Failure):
            assert isinstance(result.value, Exception)
            return result.value
        assert isinstance(result, ProfileInfo)
        return result


class _WithPartner:
    """An engine whose link code also starts the partner device."""

    def __init__(self, engine: Any, start: Callable[[LinkCode], None]) -> None:
        self._engine = engine
        self._start = start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def link_device(self, ui: LinkUi) -> Deferred[LinkResult]:
        start = self._start

        class Shown:
            def show_code(self, code: LinkCode) -> None:
                ui.show_code(code)
                start(code)

            def status(self, text: str) -> None:
                ui.status(text)

            def confirm(self, check: LinkCheck) -> Deferred[bool]:
                return ui.confirm(check)

        result: Deferred[LinkResult] = self._engine.link_device(Shown())
        return result


def new_world(tmp_path: Path) -> ClientWorld:
    world = ClientWorld(tmp_path / "profiles", seed=SEED)
    world.enroll("alice")
    return world


@pytest.fixture
def world(tmp_path: Path) -> ClientWorld:
    return new_world(tmp_path)


def medrelay(
    app: LinkApp,
    profile: Path,
    *args: str,
    stdin: str | None = None,
    passphrase: str = TEST_PASSPHRASE,
) -> Result:
    env = {"MEDRELAY_PASSPHRASE": passphrase}
    command = [*args, "--profile", str(profile)]
    return CliRunner().invoke(cli, command, obj=app, env=env, input=stdin)


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[-1]


def final_error(result: Result) -> str:
    """The error after progress lines: the last line of standard error."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medrelay: ")
    return last


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- on the existing device: medrelay devices link ----------------------------------------------


@pytest.mark.parametrize("command", [["devices", "link"], ["link"]])
def test_link_commands_have_help_with_profile_and_json_but_hide_the_test_option(
    command: list[str],
) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "--profile" in result.stdout and "--json" in result.stdout
    assert "--yes-if-sas" not in result.stdout
    assert "six digits" in result.stdout


def test_devices_link_shows_the_code_and_the_digits_and_links_on_yes(world: ClientWorld) -> None:
    app = LinkApp(world)
    result = medrelay(app, world.profile_dir("alice"), "devices", "link", stdin="y\n")
    assert result.exit_code == 0, result.stderr
    info = app.partner_outcome()
    assert isinstance(info, ProfileInfo)
    (check,) = app.partner_ui.checks
    assert f"    medrelay link {TEST_SERVER_URL} " in result.stdout
    assert f"Both screens must show the same digits: {check.display}" in result.stdout
    assert f"Do both screens show {check.display}? [y/N]" in result.stderr
    assert "waiting for the new device to join..." in result.stderr
    assert result.stdout.strip().endswith(f"linked device {info.device_id} to alice")
    assert len(world.relay.users["alice"].devices) == 2


def test_devices_link_json_progress_is_one_object_per_line(world: ClientWorld) -> None:
    app = LinkApp(world)
    result = medrelay(app, world.profile_dir("alice"), "devices", "link", "--json", stdin="y\n")
    assert result.exit_code == 0, result.stderr
    lines = json_lines(result)
    events = [line["event"] for line in lines]
    assert events[0] == "code" and events[-1] == "linked"
    assert events.count("sas") == 1 and set(events) == {"code", "status", "sas", "linked"}
    code, sas, done = lines[0], next(x for x in lines if x["event"] == "sas"), lines[-1]
    assert code["command"] == f"medrelay link {TEST_SERVER_URL} {code['code']}"
    assert code["expires"].endswith("Z")
    (check,) = app.partner_ui.checks
    assert (sas["sas"], sas["display"], sas["user"]) == (check.sas, check.display, "alice")
    assert (done["user"], done["device"]) == ("alice", sas["device"])


def test_devices_link_answered_no_adds_nothing(world: ClientWorld) -> None:
    app = LinkApp(world)
    result = medrelay(app, world.profile_dir("alice"), "devices", "link", stdin="n\n")
    assert "refused on this device" in final_error(result)
    assert len(world.relay.users["alice"].devices) == 1
    partner = app.partner_outcome()
    assert isinstance(partner, Exception) and "cancelled" in str(partner)


def test_no_answer_at_all_is_a_no(world: ClientWorld) -> None:
    app = LinkApp(world)
    result = medrelay(app, world.profile_dir("alice"), "devices", "link")  # stdin at its end
    assert "refused on this device" in final_error(result)
    assert len(world.relay.users["alice"].devices) == 1


def test_yes_if_sas_answers_no_to_other_digits(world: ClientWorld) -> None:
    app = LinkApp(world)
    profile = world.profile_dir("alice")
    result = medrelay(app, profile, "devices", "link", "--yes-if-sas", "000 000", "--json")
    (sas,) = [x for x in json_lines(result) if x["event"] == "sas"]
    assert sas["sas"] != "000000"
    assert f"this device shows {sas['display']}, not the digits given" in result.stderr
    assert result.exit_code == 1 and "refused on this device" in result.stderr
    assert len(world.relay.users["alice"].devices) == 1


def test_yes_if_sas_answers_yes_only_to_the_digits_shown(tmp_path: Path) -> None:
    """A fake world is deterministic: a first run learns the digits, a second identical run is
    answered with them (on the command line, then from standard input)."""
    first = LinkApp(new_world(tmp_path / "learn"))
    profile = first.world.profile_dir("alice")
    learned = medrelay(first, profile, "devices", "link", "--json", stdin="n\n")
    (sas,) = [x for x in json_lines(learned) if x["event"] == "sas"]
    for n, (value, stdin) in enumerate([(sas["display"], None), ("-", f"{sas['sas']}\n")]):
        app = LinkApp(new_world(tmp_path / f"answer-{n}"))
        profile = app.world.profile_dir("alice")
        result = medrelay(app, profile, "devices", "link", "--yes-if-sas", value, stdin=stdin)
        assert result.exit_code == 0, result.stderr
        assert isinstance(app.partner_outcome(), ProfileInfo)


def test_yes_if_sas_must_be_six_digits(world: ClientWorld) -> None:
    app = LinkApp(world)
    result = medrelay(app, world.profile_dir("alice"), "devices", "link", "--yes-if-sas", "12")
    assert result.exit_code == 2
    assert "six digits" in result.stderr
    assert app.partner is None


def test_devices_without_a_subcommand_still_lists(world: ClientWorld) -> None:
    result = medrelay(LinkApp(world), world.profile_dir("alice"), "devices", "--json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)) == 1


# --- on the new device: medrelay link SERVER CODE -----------------------------------------------


def start_existing(world: ClientWorld, ui: ScriptedLinkUi) -> tuple[Deferred[LinkResult], str]:
    """Start a link on alice's enrolled device and pump until it shows its code."""
    codes: list[LinkCode] = []
    ui.on_code = codes.append
    engine = world.open("alice")
    pending = engine.link_device(ui)
    while not codes:
        world.relay.pump()
        world.clock.advance(0.1)
    return pending, codes[0].code


def settle(world: ClientWorld, d: Deferred[LinkResult]) -> LinkResult | Exception:
    try:
        return world.run(d)
    except Exception as exc:
        return exc


def test_link_joins_shows_the_digits_and_becomes_a_device(world: ClientWorld) -> None:
    existing = ScriptedLinkUi()
    pending, code = start_existing(world, existing)
    laptop = world.profile_dir("alice", "laptop")
    result = medrelay(LinkApp(world), laptop, "link", TEST_SERVER_URL, code, stdin="y\n")
    assert result.exit_code == 0, result.stderr
    linked = settle(world, pending)
    assert isinstance(linked, LinkResult)
    (check,) = existing.checks
    assert f"Both screens must show the same digits: {check.display}" in result.stdout
    assert f"Do both screens show {check.display}? [y/N]" in result.stderr
    assert f"this device is now {linked.device_id} of alice at clinic clinic.test" in result.stdout
    assert result.stdout.count("  enrolled ") == 2 and "(this device)" in result.stdout
    assert "NOT ADDED" not in result.stdout
    whoami = medrelay(LinkApp(world), laptop, "whoami", "--json")
    assert json.loads(whoami.stdout)["device"] == linked.device_id


def test_link_json_ends_with_the_new_device_and_its_verified_device_list(
    world: ClientWorld,
) -> None:
    pending, code = start_existing(world, ScriptedLinkUi())
    laptop = world.profile_dir("alice", "laptop")
    result = medrelay(
        LinkApp(world), laptop, "link", TEST_SERVER_URL, code.lower(), "--json", stdin="y\n"
    )
    assert result.exit_code == 0, result.stderr
    lines = json_lines(result)
    assert [x["event"] for x in lines if x["event"] != "status"] == ["sas", "linked"]
    done = lines[-1]
    assert (done["user"], done["clinic"], done["profile"]) == ("alice", "clinic.test", str(laptop))
    assert len(done["devices"]) == 2 and all(d["added_by_you"] for d in done["devices"])
    assert isinstance(settle(world, pending), LinkResult)


def test_link_answered_no_writes_no_profile(world: ClientWorld) -> None:
    pending, code = start_existing(world, ScriptedLinkUi())
    laptop = world.profile_dir("alice", "laptop")
    result = medrelay(LinkApp(world), laptop, "link", TEST_SERVER_URL, code, stdin="\n")
    assert "refused on this device" in final_error(result)
    assert not laptop.exists() or not any(laptop.iterdir())
    failed = settle(world, pending)
    assert isinstance(failed, Exception) and "cancelled on the other device" in str(failed)
    assert len(world.relay.users["alice"].devices) == 1


@pytest.mark.parametrize(
    ("code", "expected"),
    [("0000-0000", "not_found"), ("7K2M", "invalid_argument"), ("7K2M-Q9XW-", None)],
)
def test_link_with_a_bad_code_is_one_clear_error(
    world: ClientWorld, code: str, expected: str | None
) -> None:
    laptop = world.profile_dir("alice", "laptop")
    result = medrelay(LinkApp(world), laptop, "link", TEST_SERVER_URL, code, "--json")
    assert result.exit_code == 1, result.output
    error = json.loads(result.stderr)["error"]
    assert error["code"] == (expected or "not_found")
    assert not (laptop / "profile.sqlite3").exists()


def test_link_to_a_server_that_is_down_is_one_clear_error(world: ClientWorld) -> None:
    world.relay.down = True
    laptop = world.profile_dir("alice", "laptop")
    result = medrelay(LinkApp(world), laptop, "link", TEST_SERVER_URL, "7K2M-Q9XW")
    assert "cannot connect" in one_line_error(result)


def test_link_refuses_an_empty_passphrase(world: ClientWorld) -> None:
    laptop = world.profile_dir("alice", "laptop")
    result = medrelay(LinkApp(world), laptop, "link", TEST_SERVER_URL, "7K2M-Q9XW", passphrase="")
    assert "empty passphrase" in one_line_error(result)
