"""Fixtures shared by the whole suite."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from medrelay.crypto.rng import Rng, seeded_rng

# The suite is a gate, so hypothesis draws the same examples on every run ("ci", the default): a
# lucky draw never fails one landing and passes the next. HYPOTHESIS_PROFILE=explore draws fresh
# examples for a bug hunt; bench/fuzz_protocol.py is the long-running explorer for the codec.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the long tests (marked `slow`: real processes, real time) first. pytest-xdist hands
    the first tests out round-robin, so they start at once on different workers and the many
    short ones fill in around them, instead of one worker finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def rng() -> Rng:
    """A deterministic random source: tests are reproducible, and never use the system CSPRNG."""
    return seeded_rng(b"medrelay tests")


def load_known_answers() -> dict[str, Any]:
    with (DATA / "known_answers.json").open() as f:
        data: dict[str, Any] = json.load(f)
    return data


@pytest.fixture(scope="session")
def known_answers() -> dict[str, Any]:
    """tests/data/known_answers.json (RFC, libsignal, libsodium and Merkle vectors)."""
    return load_known_answers()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


# -- relay stores: the same relay tests run against every RelayStore implementation ---------

from collections.abc import Iterator  # noqa: E402

from store_worlds import (  # noqa: E402
    NO_POSTGRES,
    POSTGRES_URL,
    STORE_KINDS,
    MemoryWorld,
    SqlWorld,
    StoreWorld,
    postgres_schema,
    postgres_world,
    sqlite_template,
    sqlite_world,
)


@pytest.fixture(scope="session")
def sqlite_relay_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sqlite_template(tmp_path_factory.mktemp("relay-template"))


@pytest.fixture(scope="session")
def postgres_relay_url() -> Iterator[str]:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    with postgres_schema() as url:
        yield url


@pytest.fixture(params=STORE_KINDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreWorld]:
    """An empty relay store of each kind: in memory, SQLite, PostgreSQL (when configured)."""
    if request.param == "memory":
        yield MemoryWorld()
        return
    sql: SqlWorld
    if request.param == "sqlite":
        sql = sqlite_world(request.getfixturevalue("sqlite_relay_template"), tmp_path)
    else:
        sql = postgres_world(request.getfixturevalue("postgres_relay_url"))
    yield sql
    sql.close()
