"""The visit store (`medrelay.server.storage.visits`) on SQLite and PostgreSQL (skipped without
MEDRELAY_TEST_POSTGRES_URL), through `Database.run_interaction` on the synchronous runner:
inserting, finding, closing once, listing newest first, the constraints the schema keeps, and
migration 0005 up and down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from store_worlds import SqlWorld, postgres_world, sqlite_world
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from medrelay.server.storage import visits as store
from medrelay.server.storage.database import make_engine
from medrelay.server.storage.migrate import (
    alembic_config,
    current_revision,
    head_revision,
    upgrade_to_head,
)
from medrelay.server.storage.schema import accounts, visits

NOW = 1_800_000_000_000
MINUTE = 60_000


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlWorld]:
    if request.param == "sqlite":
        sql = sqlite_world(request.getfixturevalue("sqlite_relay_template"), tmp_path)
    else:
        sql = postgres_world(request.getfixturevalue("postgres_relay_url"))
    for name, role in (("doc", "doctor"), ("doc2", "doctor"), ("pat", "patient")):
        sql.add_account(name, role)
    try:
        yield sql
    finally:
        sql.close()


def pk(world: SqlWorld, username: str) -> int:
    account = world.run(store.account_txn, username)
    assert account is not None
    return account.pk


def thread(n: int) -> bytes:
    return n.to_bytes(16, "big")


def add(
    world: SqlWorld, visit_id: str, n: int, *, clinician: str = "doc", opened_ms: int = NOW
) -> None:
    world.run(
        store.insert_visit_txn,
        visit_id=visit_id,
        thread_id=thread(n),
        patient_pk=pk(world, "pat"),
        clinician_pk=pk(world, clinician),
        indication="test-results",
        consent="notice",
        opened_ms=opened_ms,
    )


def failure_of(d: Deferred[object]) -> BaseException:
    outcome: list[object] = []
    d.addBoth(outcome.append)
    (failure,) = outcome
    assert isinstance(failure, Failure), failure
    assert failure.value is not None
    return failure.value


def test_accounts_are_found_with_role_and_status(world: SqlWorld) -> None:
    found = world.run(store.account_txn, "pat", lock=True)
    assert found is not None
    assert (found.username, found.role, found.active) == ("pat", "patient", True)
    assert world.run(store.account_txn, "nobody") is None


def test_a_visit_is_stored_found_and_closed_once(world: SqlWorld) -> None:
    add(world, "V00000001", 1)
    visit = world.run(store.visit_txn, "V00000001")
    assert visit == store.VisitRecord(
        visit_id="V00000001",
        thread_id=thread(1),
        patient="pat",
        clinician="doc",
        indication="test-results",
        consent="notice",
        opened_ms=NOW,
    )
    assert visit.is_open
    assert world.run(store.open_visit_of_pair_txn, pk(world, "pat"), pk(world, "doc")) == visit
    assert world.run(store.open_visit_of_pair_txn, pk(world, "pat"), pk(world, "doc2")) is None
    assert world.run(store.close_visit_txn, "V00000001", NOW + MINUTE, b"c" * 16)
    assert not world.run(store.close_visit_txn, "V00000001", NOW + 2 * MINUTE, b"d" * 16)
    closed = world.run(store.visit_txn, "V00000001", lock=True)
    assert closed is not None and not closed.is_open
    assert (closed.closed_ms, closed.conclusion_id) == (NOW + MINUTE, b"c" * 16)
    assert world.run(store.open_visit_of_pair_txn, pk(world, "pat"), pk(world, "doc")) is None
    assert world.run(store.visit_txn, "V99999999") is None
    assert not world.run(store.close_visit_txn, "V99999999", NOW, b"c" * 16)


def test_lists_are_newest_first_per_person_bounded_and_filtered(world: SqlWorld) -> None:
    add(world, "V00000001", 1, opened_ms=NOW)
    add(world, "V00000002", 2, clinician="doc2", opened_ms=NOW + MINUTE)
    add(world, "V00000003", 3, opened_ms=NOW + 2 * MINUTE)
    world.run(store.close_visit_txn, "V00000003", NOW + 3 * MINUTE, b"c" * 16)

    def ids(username: str, **options: object) -> list[str]:
        found = world.run(store.visits_of_txn, pk(world, username), **{"limit": 200, **options})
        return [v.visit_id for v in found]

    assert ids("pat") == ["V00000003", "V00000002", "V00000001"]
    assert ids("doc") == ["V00000003", "V00000001"]
    assert ids("doc2") == ["V00000002"]
    assert ids("doc", open_only=True) == ["V00000001"]
    assert ids("pat", limit=2) == ["V00000003", "V00000002"]


def test_free_ids_skip_taken_visit_and_thread_ids(world: SqlWorld) -> None:
    add(world, "V00000001", 1)
    candidates = [("V00000001", thread(9)), ("V00000002", thread(1)), ("V00000003", thread(3))]
    assert world.run(store.free_ids_txn, candidates) == ("V00000003", thread(3))
    assert world.run(store.free_ids_txn, candidates[:2]) is None
    assert world.run(store.free_ids_txn, []) is None


def test_the_schema_refuses_a_reused_thread_a_half_closed_visit_and_unknown_consent(
    world: SqlWorld,
) -> None:
    add(world, "V00000001", 1)
    with pytest.raises(sa.exc.IntegrityError):
        add(world, "V00000002", 1)

    def raw(**values: object) -> Deferred[object]:
        row = {
            "visit_id": "V0000000X",
            "thread_id": thread(7),
            "patient_pk": pk(world, "pat"),
            "clinician_pk": pk(world, "doc"),
            "indication": "test-results",
            "consent": "notice",
            "opened_at": NOW,
            **values,
        }
        return world.db.run_interaction(
            "test_setup", lambda conn: conn.execute(sa.insert(visits).values(**row))
        )

    assert isinstance(failure_of(raw(closed_at=NOW)), sa.exc.IntegrityError)
    assert isinstance(failure_of(raw(conclusion_id=b"c" * 16)), sa.exc.IntegrityError)
    assert isinstance(failure_of(raw(consent="silent")), sa.exc.IntegrityError)
    assert world.run(store.visit_txn, "V0000000X") is None


def test_migration_0005_goes_up_and_down_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = make_engine(url)
    try:
        config = alembic_config(engine)
        command.upgrade(config, "0004")
        assert not sa.inspect(engine).has_table("visits")
        command.upgrade(config, "0005")
        assert sa.inspect(engine).has_table("visits")
        assert {ix["name"] for ix in sa.inspect(engine).get_indexes("visits")} == {
            "ix_visits_patient_pk_opened_at",
            "ix_visits_clinician_pk_opened_at",
        }
        command.downgrade(config, "0004")
        assert not sa.inspect(engine).has_table("visits")
        assert sa.inspect(engine).has_table(accounts.name)
        upgrade_to_head(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
