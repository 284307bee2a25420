"""Helpers and fixtures of the client tests on the fake relay world. A test module uses the
fixtures by naming them at module level (`world = client_world`, `pair = engine_pair`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from medrelay.clients.engine.client import Engine
from medrelay.clients.engine.testing import ClientWorld
from medrelay.clients.engine.views import MessageView, NoticeView


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
