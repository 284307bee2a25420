"""The one entry point through which SQL runs: `Database.run_interaction(desc, fn, ...)`.

Owns the SQLAlchemy `Engine` (how connections to SQLite or PostgreSQL are made and configured),
the thread(s) that transactions run on, the mapping of "the database cannot take this now" errors
to `DatabaseUnavailable`, the durability self-check the server refuses to start without, and the
`medrelay_db_*` metrics.

Model: Synapse's `DatabasePool.runInteraction` (synapse/storage/database.py). Every SQL statement
lives in a plain synchronous `*_txn(conn, ...)` function; `run_interaction` runs it in ONE
transaction on a worker thread (commit on return, rollback on exception) and hands the result or
the exception back through a Deferred that fires on the reactor thread. `desc` is a fixed operation
name used as the metrics label, never data.

How work reaches a thread is a `Runner`:
- `ThreadPoolRunner`: a `twisted.python.threadpool.ThreadPool`. SQLite gets exactly one worker
  (one writer in the process: no SQLITE_BUSY between our own threads); PostgreSQL a small pool.
- `SynchronousRunner`: runs `fn` at once in the calling thread and returns an already-fired
  Deferred. For unit tests (Synapse's threadless pool idea): no threads, deterministic.

SQLite connections are set up on every connect with `journal_mode=WAL`, `synchronous=FULL`,
`foreign_keys=ON` and a busy timeout, and every transaction starts with `BEGIN IMMEDIATE` (the
SQLAlchemy pysqlite recipe: the driver's own transaction handling is switched off and SQLAlchemy's
"begin" event emits the statement). An IMMEDIATE transaction takes the write lock when it starts,
so an admin CLI process writing to the same file makes us wait up to the busy timeout instead of
failing a transaction half way with SQLITE_BUSY (which a deferred transaction upgrading from read
to write cannot wait out). SAVEPOINTs work inside such transactions.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import StaticPool
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.threadpool import ThreadPool

from medrelay.server.storage.errors import DatabaseUnavailable, StorageConfigError

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT_MS: Final = 5000
POSTGRES_THREADS: Final = 4
"""Worker threads (and pooled connections) for PostgreSQL. SQLite always gets exactly one."""
POSTGRES_CONNECT_TIMEOUT_S: Final = 5
MAX_ATTEMPTS: Final = 3
"""A transaction PostgreSQL aborted for a deadlock or a serialization failure is run again, up to
this many attempts in all, before the caller sees `DatabaseUnavailable`."""
SQLITE_JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
"""After a checkpoint the WAL file is truncated to at most this size (soak target Q6)."""

_DESC: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class ThreadReactor(Protocol):
    """The part of the reactor a thread-pool runner needs (every real reactor has it)."""

    def callFromThread(  # noqa: N802 (Twisted's name)
        self, callable: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> None: ...


class Runner(Protocol):
    """Runs a no-argument function somewhere and delivers its outcome as a Deferred that fires on
    the reactor thread."""

    def run(self, fn: Callable[[], T]) -> Deferred[T]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class SynchronousRunner:
    """Runs `fn` immediately in the calling thread; the Deferred has already fired when returned.

    For unit tests: no threads and no reactor turns, so a test reads the result at once."""

    def run(self, fn: Callable[[], T]) -> Deferred[T]:
        try:
            result = fn()
        except BaseException:
            return fail()
        return succeed(result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class ThreadPoolRunner:
    """Runs functions on a Twisted `ThreadPool` and fires Deferreds through
    `reactor.callFromThread` (what `deferToThreadPool` does, typed for our reactor protocol).

    Work submitted before `start()` waits in the pool's queue; after `stop()` it is refused with
    `DatabaseUnavailable`."""

    def __init__(self, reactor: ThreadReactor, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._pool = pool
        self._stopped = False

    @classmethod
    def create(cls, reactor: ThreadReactor, threads: int, name: str) -> ThreadPoolRunner:
        return cls(reactor, ThreadPool(minthreads=threads, maxthreads=threads, name=name))

    @property
    def threads(self) -> int:
        return self._pool.max

    def run(self, fn: Callable[[], T]) -> Deferred[T]:
        if self._stopped:
            return fail(DatabaseUnavailable("the database is closed"))
        d: Deferred[T] = Deferred()

        def on_result(success: bool, result: Any) -> None:
            if success:
                self._reactor.callFromThread(d.callback, result)
            else:
                self._reactor.callFromThread(d.errback, result)

        self._pool.callInThreadWithCallback(on_result, fn)
        return d

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        # Waits for the transaction in progress (if any) to finish: it is never cut in half.
        self._stopped = True
        self._pool.stop()


# --- engines ------------------------------------------------------------------------------------


def _sqlite_url(url: URL) -> tuple[URL, bool]:
    """Normalise a SQLite URL; returns it and whether it names an in-memory database."""
    database = url.database
    if database in (None, "", ":memory:"):
        return url.set(drivername="sqlite+pysqlite", database=":memory:"), True
    return url.set(drivername="sqlite+pysqlite"), False


def make_engine(
    url: str | URL,
    *,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    pool_size: int = POSTGRES_THREADS,
) -> Engine:
    """An Engine for `url`, configured as the relay needs it.

    - `sqlite:///path` (relative to the working directory) or `sqlite:////abs/path`: the parent
      directory is created; every connection gets WAL, synchronous=FULL, foreign keys, the busy
      timeout and a WAL size limit, and every transaction is `BEGIN IMMEDIATE`. `sqlite://` is an
      in-memory database (one shared connection): fine for tests, refused by `check_durability`.
    - `postgresql://...` (or `postgres://`, `postgresql+psycopg://`): the psycopg 3 driver, a
      connection pool of `pool_size` (+2 overflow for admin work), a connect timeout and a liveness
      check on checkout so the relay recovers by itself when PostgreSQL comes back.
    """
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError:
        raise StorageConfigError("database URL is not a valid URL") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise StorageConfigError(f"database URL driver {parsed.drivername!r} is not supported")
        return _sqlite_engine(parsed, busy_timeout_ms)
    if backend in ("postgresql", "postgres"):
        if parsed.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise StorageConfigError(
                f"database URL driver {parsed.drivername!r} is not supported (use postgresql://)"
            )
        return _postgres_engine(parsed.set(drivername="postgresql+psycopg"), pool_size)
    raise StorageConfigError(
        f"database URL scheme {parsed.drivername!r} is not supported (use sqlite:/// or "
        "postgresql://)"
    )


def _sqlite_engine(url: URL, busy_timeout_ms: int) -> Engine:
    url, in_memory = _sqlite_url(url)
    if in_memory:
        engine = sa.create_engine(
            url,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
            hide_parameters=True,
        )
    else:
        path = Path(str(url.database)).expanduser().resolve()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create_private(path)
        engine = sa.create_engine(url, hide_parameters=True)
    install_sqlite_setup(engine, busy_timeout_ms=busy_timeout_ms)
    return engine


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only, before SQLite opens it: it holds
    account names and who writes to whom. SQLite gives the -wal and -shm files the permissions
    of the database file."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return


def install_sqlite_setup(engine: Engine, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
    """Install the per-connection pragmas and the `BEGIN IMMEDIATE` recipe on a SQLite engine."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # Hand transaction control to SQLAlchemy's "begin" event below (the driver would otherwise
        # emit a deferred BEGIN itself, and only before DML).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA journal_size_limit = {SQLITE_JOURNAL_SIZE_LIMIT}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _postgres_engine(url: URL, pool_size: int) -> Engine:
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return sa.create_engine(
        url,
        connect_args=connect_args,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        pool_timeout=10,
        hide_parameters=True,
    )


# --- error classification -----------------------------------------------------------------------

# Primary SQLite result codes meaning "cannot take this now", not "your SQL is wrong".
_SQLITE_UNAVAILABLE: Final = frozenset(
    {
        5,  # SQLITE_BUSY (still locked after the busy timeout)
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        8,  # SQLITE_READONLY
        10,  # SQLITE_IOERR
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
    }
)
# SQLSTATE classes: connection exception, insufficient resources (disk full, out of memory, too
# many connections), operator intervention (shutdown, cannot connect now), system error (I/O),
# transaction rollback (deadlock or serialization failure, once the retries are spent).
_PG_UNAVAILABLE_CLASSES: Final = frozenset({"08", "53", "57", "58", "40"})
_PG_RETRYABLE: Final = frozenset({"40001", "40P01"})


def _sqlstate(exc: sa_exc.DBAPIError) -> str | None:
    state = getattr(exc.orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_retryable(exc: BaseException) -> bool:
    """A PostgreSQL deadlock or serialization failure: the whole transaction may simply run
    again."""
    return isinstance(exc, sa_exc.DBAPIError) and _sqlstate(exc) in _PG_RETRYABLE


def is_unavailable(exc: BaseException) -> bool:
    """Whether a SQLAlchemy error means the database cannot serve us right now (as opposed to a
    bug such as an SQL error or a constraint violation)."""
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        return isinstance(code, int) and (code & 0xFF) in _SQLITE_UNAVAILABLE
    state = _sqlstate(exc)
    if state is None:
        # psycopg reports a failed connection attempt (refused, timed out, DNS) without a state.
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    return state[:2] in _PG_UNAVAILABLE_CLASSES


# --- durability ---------------------------------------------------------------------------------

_PG_DURABLE_SYNCHRONOUS_COMMIT: Final = frozenset({"on", "remote_apply", "remote_write", "local"})


def check_durability_txn(conn: Connection) -> None:
    """Refuse settings under which an acknowledged commit could be lost (notes D1/§1.7).

    SQLite: `journal_mode` must be WAL and `synchronous` FULL (2) or EXTRA (3); WAL with NORMAL can
    roll back the latest commits after a power loss. PostgreSQL: `fsync` must be on and
    `synchronous_commit` must wait for the local WAL flush (`on`, or `local`/`remote_write`/
    `remote_apply`, which all include it); `off` can lose acknowledged commits.
    """
    dialect = conn.dialect.name
    if dialect == "sqlite":
        journal = str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()
        if journal != "wal":
            raise StorageConfigError(
                f"SQLite journal_mode is {journal!r}; the relay needs 'wal' (an on-disk database "
                "file that allows WAL)"
            )
        synchronous = conn.exec_driver_sql("PRAGMA synchronous").scalar()
        if not isinstance(synchronous, int) or synchronous < 2:
            raise StorageConfigError(
                f"SQLite synchronous is {synchronous!r}; the relay needs 2 (FULL) so that a "
                "commit survives a power loss"
            )
    elif dialect == "postgresql":
        fsync = str(conn.exec_driver_sql("SHOW fsync").scalar())
        if fsync != "on":
            raise StorageConfigError(
                f"PostgreSQL fsync is {fsync!r}; the relay needs 'on' (set fsync = on)"
            )
        sync_commit = str(conn.exec_driver_sql("SHOW synchronous_commit").scalar())
        if sync_commit not in _PG_DURABLE_SYNCHRONOUS_COMMIT:
            raise StorageConfigError(
                f"PostgreSQL synchronous_commit is {sync_commit!r}; the relay needs 'on' "
                "(set synchronous_commit = on for its database or role)"
            )
    else:  # pragma: no cover - make_engine only builds the two
        raise StorageConfigError(f"unsupported database dialect {dialect!r}")


def check_durability(engine: Engine) -> None:
    """`check_durability_txn` run synchronously (at startup, before the reactor runs)."""
    try:
        with engine.begin() as conn:
            check_durability_txn(conn)
    except sa_exc.SQLAlchemyError as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable(f"database unavailable ({type(exc).__name__})") from exc
        raise


# --- the database -------------------------------------------------------------------------------


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.transaction_seconds = Histogram(
            "medrelay_db_transaction_seconds",
            "Time spent running one database transaction (all attempts), by operation.",
            ["operation"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.wait_seconds = Histogram(
            "medrelay_db_wait_seconds",
            "Time a transaction waited for a database thread before it started.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "medrelay_db_transaction_failures_total",
            "Transactions that failed for a database reason: reason is 'unavailable' (the "
            "caller got server_busy), 'retried' (aborted by a deadlock and run again) or 'error' "
            "(an unexpected database error).",
            ["operation", "reason"],
            registry=registry,
        )


class Database(Service):
    """A SQLAlchemy engine plus the runner its transactions execute on.

    Start it (`start()`, or as an `IService` child of the server) before relying on a thread-pool
    runner, and `close()` it at shutdown: that waits for the transaction in flight and closes the
    connections. `engine` is exposed for migrations and admin tools that run synchronously before
    the reactor starts; everything at run time goes through `run_interaction`.
    """

    def __init__(
        self,
        engine: Engine,
        reactor: ThreadReactor,
        *,
        runner: Runner | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.engine = engine
        self._reactor = reactor
        if runner is None:
            threads = 1 if engine.dialect.name == "sqlite" else POSTGRES_THREADS
            runner = ThreadPoolRunner.create(reactor, threads, "medrelay-db")
        self._runner = runner
        self._metrics = _Metrics(registry) if registry is not None else None
        self._closed = False

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        return self.engine.dialect.name

    def run_interaction(
        self,
        desc: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """Run `fn(conn, *args, **kwargs)` in one transaction on a database thread.

        Commits when `fn` returns, rolls back when it raises; the Deferred fires on the reactor
        thread with `fn`'s result, with `fn`'s own exception, or with `DatabaseUnavailable` when
        the database could not be reached, was locked past the busy timeout, was full or failed
        to commit (nothing was committed then, or - for a connection lost during COMMIT - the
        outcome is unknown, which is why sends are idempotent).

        If PostgreSQL aborts the transaction for a deadlock or a serialization failure, `fn` runs
        again in a new transaction (at most `MAX_ATTEMPTS` in all), so `fn` must not change
        anything outside the connection. Inside `fn`, a SAVEPOINT (`conn.begin_nested()`) may
        contain an expected refusal (a storage domain error); do not swallow SQLAlchemy errors
        there, or a deadlock cannot be retried.

        `desc` is a fixed operation name ([a-z][a-z0-9_]*, at most 64 characters): it labels the
        `medrelay_db_*` metrics and must never contain data.
        """
        if _DESC.fullmatch(desc) is None:
            raise ValueError("desc must be a short fixed operation name ([a-z][a-z0-9_]*)")
        if self._closed:
            return fail(DatabaseUnavailable("the database is closed"))
        queued_at = time.perf_counter()
        return self._runner.run(lambda: self._transaction(desc, queued_at, fn, args, kwargs))

    def _transaction(
        self,
        desc: str,
        queued_at: float,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        # perf_counter measures durations for metrics only; no domain decision reads it.
        started = time.perf_counter()
        metrics = self._metrics
        if metrics is not None:
            metrics.wait_seconds.observe(started - queued_at)
        attempt = 1
        try:
            while True:
                try:
                    with self.engine.begin() as conn:
                        return fn(conn, *args, **kwargs)
                except sa_exc.SQLAlchemyError as exc:
                    if is_retryable(exc) and attempt < MAX_ATTEMPTS:
                        attempt += 1
                        if metrics is not None:
                            metrics.failures.labels(desc, "retried").inc()
                        continue
                    if is_unavailable(exc):
                        if metrics is not None:
                            metrics.failures.labels(desc, "unavailable").inc()
                        raise DatabaseUnavailable(
                            f"database unavailable during {desc} ({type(exc).__name__})"
                        ) from exc
                    if metrics is not None:
                        metrics.failures.labels(desc, "error").inc()
                    raise
        finally:
            if metrics is not None:
                metrics.transaction_seconds.labels(desc).observe(time.perf_counter() - started)

    def check_durability(self) -> Deferred[None]:
        """`check_durability_txn` through `run_interaction`: fails with `StorageConfigError`
        naming the setting when commits would not be durable."""
        return self.run_interaction("check_durability", check_durability_txn)

    def start(self) -> None:
        self._runner.start()

    def close(self) -> None:
        """Stop the runner (after the transaction in flight) and close every connection.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._runner.stop()
        self.engine.dispose()

    def startService(self) -> None:  # noqa: N802 (IService)
        super().startService()  # type: ignore[no-untyped-call]
        self.start()

    def stopService(self) -> Deferred[object] | None:  # noqa: N802 (IService)
        super().stopService()  # type: ignore[no-untyped-call]
        self.close()
        return None


def open_database(
    url: str,
    reactor: ThreadReactor,
    *,
    registry: CollectorRegistry | None = None,
    runner: Runner | None = None,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
) -> Database:
    """A `Database` for `url` (see `make_engine` for the URL forms and connection settings).

    Without `runner`, transactions run on a thread pool (one thread for SQLite, `POSTGRES_THREADS`
    for PostgreSQL) that `start()`/`close()` (or the `IService` methods) start and stop. Nothing
    connects until the first transaction. Migrations and `check_durability` are separate steps
    (see `medrelay.server.storage.migrate`)."""
    engine = make_engine(url, busy_timeout_ms=busy_timeout_ms, pool_size=POSTGRES_THREADS)
    return Database(engine, reactor, runner=runner, registry=registry)
