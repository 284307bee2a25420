"""`Database.run_interaction` and the engine setup: one transaction per call, commit on return,
rollback on exception, errors mapped to `DatabaseUnavailable` only when the database cannot serve,
deadlock retries, metrics on the injected registry, the SQLite connection settings (WAL, FULL,
BEGIN IMMEDIATE) and URL handling. All but the last test use the synchronous runner (no threads);
the last runs the real thread pool on the global reactor under pytest-twisted."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.python.failure import Failure

from medrelay.server.storage.database import (
    MAX_ATTEMPTS,
    Database,
    SynchronousRunner,
    T,
    ThreadPoolRunner,
    ThreadReactor,
    make_engine,
    open_database,
)
from medrelay.server.storage.errors import DatabaseUnavailable, StorageConfigError


class _NoThreads:
    def callFromThread(self, callable: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        raise AssertionError("the synchronous runner must not use the reactor")


def _outcome(d: Deferred[T]) -> T | Failure:
    """The result of an already-fired Deferred (fails the test if it has not fired)."""
    outcome: list[T | Failure] = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    return outcome[0]


def _value(d: Deferred[T]) -> T:
    result = _outcome(d)
    if isinstance(result, Failure):
        result.raiseException()
    assert not isinstance(result, Failure)
    return result


def _failure(d: Deferred[Any]) -> BaseException:
    result = _outcome(d)
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    assert result.value is not None
    return result.value


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "relay.db"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def db(db_path: Path, registry: CollectorRegistry) -> Iterator[Database]:
    database = open_database(
        f"sqlite:///{db_path}", _NoThreads(), registry=registry, runner=SynchronousRunner()
    )
    _value(
        database.run_interaction(
            "setup",
            lambda conn: conn.exec_driver_sql("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"),
        )
    )
    yield database
    database.close()


def _insert(conn: Connection, k: int, v: str) -> int:
    conn.execute(sa.text("INSERT INTO t (k, v) VALUES (:k, :v)"), {"k": k, "v": v})
    return k


def _count(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one())


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# --- the synchronous runner ---------------------------------------------------------------------


def test_result_is_delivered_at_once_from_the_calling_thread(db: Database) -> None:
    """With the synchronous runner fn runs immediately in this thread, gets the extra args, and
    the Deferred has already fired with its result when run_interaction returns."""
    threads: list[int] = []

    def fn(conn: Connection, k: int, *, v: str) -> int:
        threads.append(threading.get_ident())
        return _insert(conn, k, v)

    assert _value(db.run_interaction("insert", fn, 1, v="one")) == 1
    assert threads == [threading.get_ident()]


def test_commit_on_return_and_rollback_on_exception(db: Database) -> None:
    """A returning fn is committed (visible to a new connection); a raising fn is rolled back
    entirely and its own exception is delivered through the Deferred."""
    _value(db.run_interaction("insert", _insert, 1, "one"))

    class Boom(Exception):
        pass

    def insert_then_fail(conn: Connection) -> None:
        _insert(conn, 2, "two")
        raise Boom

    assert isinstance(_failure(db.run_interaction("insert", insert_then_fail)), Boom)
    assert _count(db) == 1


def test_sql_errors_are_not_mistaken_for_unavailability(db: Database) -> None:
    """A bug (SQL error, constraint violation) reaches the caller as the SQLAlchemy error, not
    as server_busy."""
    error = _failure(db.run_interaction("bad", lambda c: c.exec_driver_sql("SELECT * FROM nope")))
    assert isinstance(error, sa_exc.OperationalError)
    _value(db.run_interaction("insert", _insert, 1, "one"))
    assert isinstance(
        _failure(db.run_interaction("insert", _insert, 1, "again")), sa_exc.IntegrityError
    )


@pytest.mark.parametrize("desc", ["", "Has Capitals", "user:dr.ivanova", "x" * 65, "1abc"])
def test_desc_must_be_a_fixed_operation_name(db: Database, desc: str) -> None:
    """desc becomes a metric label, so anything that looks like data is refused up front."""
    with pytest.raises(ValueError, match="desc"):
        db.run_interaction(desc, _insert, 1, "one")


def test_metrics_go_to_the_injected_registry(db: Database, registry: CollectorRegistry) -> None:
    """Each transaction is observed by operation on the injected registry, never the global
    one."""
    _value(db.run_interaction("insert", _insert, 1, "one"))
    _value(db.run_interaction("insert", _insert, 2, "two"))
    name = "medrelay_db_transaction_seconds_count"
    assert _sample(registry, name, operation="insert") == 2
    assert _sample(registry, "medrelay_db_wait_seconds_count") is not None
    assert REGISTRY.get_sample_value(name, {"operation": "insert"}) is None


def _deadlock() -> sa_exc.OperationalError:
    class Orig(Exception):
        sqlstate = "40P01"

    return sa_exc.OperationalError("UPDATE devices", {}, Orig("deadlock detected"))


def test_deadlocked_transaction_is_run_again(db: Database, registry: CollectorRegistry) -> None:
    """A transaction PostgreSQL aborts for a deadlock runs again in a new transaction (the first
    attempt's writes are rolled back); retries are counted."""
    calls: list[int] = []

    def flaky(conn: Connection) -> int:
        calls.append(1)
        _insert(conn, len(calls), "x")
        if len(calls) == 1:
            raise _deadlock()
        return len(calls)

    assert _value(db.run_interaction("flaky", flaky)) == 2
    assert _count(db) == 1
    name = "medrelay_db_transaction_failures_total"
    assert _sample(registry, name, operation="flaky", reason="retried") == 1


def test_persistent_deadlocks_end_as_unavailable(db: Database, registry: CollectorRegistry) -> None:
    """After MAX_ATTEMPTS the caller gets DatabaseUnavailable (server_busy: retry later)."""
    calls: list[int] = []

    def always(conn: Connection) -> None:
        calls.append(1)
        raise _deadlock()

    assert isinstance(_failure(db.run_interaction("stuck", always)), DatabaseUnavailable)
    assert len(calls) == MAX_ATTEMPTS
    name = "medrelay_db_transaction_failures_total"
    assert _sample(registry, name, operation="stuck", reason="unavailable") == 1


def test_locked_sqlite_beyond_the_busy_timeout_is_unavailable(db_path: Path) -> None:
    """While another process holds the write lock past the busy timeout, a transaction fails
    with DatabaseUnavailable instead of a driver error."""
    db = open_database(
        f"sqlite:///{db_path}", _NoThreads(), runner=SynchronousRunner(), busy_timeout_ms=20
    )
    _value(db.run_interaction("setup", lambda c: c.exec_driver_sql("CREATE TABLE t (k INTEGER)")))
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        error = _failure(db.run_interaction("insert", lambda c: c.exec_driver_sql("SELECT 1")))
        assert isinstance(error, DatabaseUnavailable)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert _value(db.run_interaction("after", lambda c: c.exec_driver_sql("SELECT 1").scalar()))
    db.close()


def test_failed_commit_is_unavailable_and_stores_nothing(db: Database) -> None:
    """If COMMIT itself fails (here: an injected I/O error) the caller gets DatabaseUnavailable
    and nothing was stored: no acknowledgement can follow an uncommitted write (D1)."""
    io_error = sqlite3.OperationalError("disk I/O error")
    io_error.sqlite_errorcode = 10  # SQLITE_IOERR
    io_error.sqlite_errorname = "SQLITE_IOERR"

    @event.listens_for(db.engine, "commit")
    def _fail_commit(conn: Connection) -> None:
        raise sa_exc.OperationalError("COMMIT", {}, io_error)

    assert isinstance(_failure(db.run_interaction("insert", _insert, 1, "x")), DatabaseUnavailable)
    event.remove(db.engine, "commit", _fail_commit)
    assert _count(db) == 0


def test_closed_database_refuses_work(db: Database) -> None:
    """After close() (idempotent) every interaction fails with DatabaseUnavailable."""
    db.close()
    db.close()
    assert isinstance(_failure(db.run_interaction("insert", _insert, 1, "x")), DatabaseUnavailable)


def test_service_starts_and_stops_the_runner(db_path: Path) -> None:
    """As an IService child the database starts its runner with the service and stops it (and
    closes connections) when the service stops."""
    events: list[str] = []

    class Recording(SynchronousRunner):
        def start(self) -> None:
            events.append("start")

        def stop(self) -> None:
            events.append("stop")

    db = open_database(f"sqlite:///{db_path}", _NoThreads(), runner=Recording())
    db.startService()
    assert db.running
    db.stopService()
    assert events == ["start", "stop"] and not db.running


# --- SQLite connection setup --------------------------------------------------------------------


def test_sqlite_connections_are_durable_and_write_immediately(db: Database, db_path: Path) -> None:
    """Every connection runs WAL, synchronous=FULL, foreign keys and the busy timeout, and a
    transaction holds the write lock from its start (BEGIN IMMEDIATE): another writer cannot
    begin until it ends. SAVEPOINTs work inside it."""
    assert db_path.parent.is_dir()

    def inspect(conn: Connection) -> tuple[Any, ...]:
        settings = tuple(
            conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        )
        other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
        with conn.begin_nested() as savepoint:
            _insert(conn, 1, "rolled back")
            savepoint.rollback()
        with conn.begin_nested():
            _insert(conn, 2, "kept")
        return settings

    assert _value(db.run_interaction("inspect", inspect)) == ("wal", 2, 1, 5000)
    assert _count(db) == 1


def test_url_forms() -> None:
    """postgresql:// and postgres:// use psycopg 3; other schemes and drivers are refused with
    a message that never repeats the password."""
    for url in ("postgresql://u:pw@h/db", "postgres://u:pw@h/db", "postgresql+psycopg://u@h/db"):
        engine = make_engine(url)
        assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
        engine.dispose()
    for url in ("mysql://u:secretpw@h/db", "postgresql+psycopg2://u:secretpw@h/db", "::"):
        with pytest.raises(StorageConfigError) as refused:
            make_engine(url)
        assert "secretpw" not in str(refused.value)


# --- the real thread pool -----------------------------------------------------------------------


def test_thread_pool_runs_sqlite_work_on_one_worker_thread(tmp_path: Path) -> Deferred[None]:
    """On the real reactor, SQLite work runs on exactly one worker thread (not the reactor's),
    results and errors arrive on the reactor thread, and close() stops the pool.

    (pytest-twisted waits for the returned Deferred with the reactor running.)"""
    from twisted.internet import reactor

    # The global reactor's static type omits IReactorFromThreads, which every reactor provides.
    db = open_database(f"sqlite:///{tmp_path / 'relay.db'}", cast(ThreadReactor, reactor))
    reactor_thread = threading.get_ident()
    seen: list[int] = []
    delivered_on: list[int] = []

    def work(conn: Connection, n: int) -> int:
        seen.append(threading.get_ident())
        return int(conn.exec_driver_sql(f"SELECT {n}").scalar_one())

    def note(result: int) -> int:
        delivered_on.append(threading.get_ident())
        return result

    async def body() -> None:
        db.start()
        try:
            results = await gatherResults(
                [db.run_interaction("work", work, n).addCallback(note) for n in range(8)]
            )
            assert results == list(range(8))
            assert delivered_on == [reactor_thread] * 8
            assert len(set(seen)) == 1 and reactor_thread not in seen
            with pytest.raises(ZeroDivisionError):
                await db.run_interaction("fail", lambda conn: 1 // 0)
            await db.check_durability()
        finally:
            db.close()
        assert isinstance(_failure(db.run_interaction("late", work, 1)), DatabaseUnavailable)

    return ensureDeferred(body())


def test_stopped_thread_pool_runner_refuses_work() -> None:
    """A stopped runner fails new work at once instead of queueing it forever."""
    runner = ThreadPoolRunner.create(_NoThreads(), 1, "test")
    runner.start()
    runner.stop()
    assert runner.threads == 1
    assert isinstance(_failure(runner.run(lambda: 1)), DatabaseUnavailable)


def test_a_new_sqlite_database_and_its_wal_are_private_to_the_owner(tmp_path: Path) -> None:
    """The file holds account names and who writes to whom: mode 0600, WAL and SHM alike."""
    path = tmp_path / "data" / "medrelay.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    for file in (path, path.with_name("medrelay.db-wal"), path.with_name("medrelay.db-shm")):
        assert file.exists() and (file.stat().st_mode & 0o777) == 0o600, file
    engine.dispose()


def test_database_errors_never_carry_the_statements_values(tmp_path: Path) -> None:
    """Failures are logged (`_log.failure`): a SQL error's text must not hold usernames,
    ciphertext or token digests, only the statement's shape."""
    engine = make_engine(f"sqlite:///{tmp_path / 'values.db'}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (name TEXT PRIMARY KEY)")
            conn.execute(sa.text("INSERT INTO t VALUES (:n)"), {"n": "dr.canary"})
        with pytest.raises(sa_exc.IntegrityError) as caught, engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (:n)"), {"n": "dr.canary"})
        assert "dr.canary" not in str(caught.value)
        assert "hidden" in str(caught.value)
    finally:
        engine.dispose()
