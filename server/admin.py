"""Administrative operations run by the `medrelay-server` command line, outside the server process.

They run synchronously (no reactor is running), yet every SQL statement still goes through
`Database.run_interaction`, on the synchronous runner. They reach the same database as `serve`
(same configuration, same defaults), and may run while the server is up: SQLite transactions
start with `BEGIN IMMEDIATE` and wait for the server's writer (busy timeout) instead of failing.
Before touching accounts, the database is migrated and its durability checked, exactly as at
server start, so `admin add-user` on a fresh checkout works before the first `serve`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from medrelay.crypto.certificates import Role
from medrelay.crypto.passwords import PasswordHasher
from medrelay.crypto.rng import Rng
from medrelay.server.clinic import ensure_private_directory
from medrelay.server.config import Config
from medrelay.server.enrollment import check_profile, new_enrollment_code, normalize_code
from medrelay.server.storage import accounts
from medrelay.server.storage.database import (
    Database,
    SynchronousRunner,
    check_durability,
    open_database,
)
from medrelay.server.storage.errors import AccountExists, StorageError
from medrelay.server.storage.migrate import current_revision, head_revision, upgrade_to_head

_T = TypeVar("_T")


class AdminError(Exception):
    """An administrative command failed; the message is one line for the operator."""


class _NoThreads:
    """The reactor stand-in of a synchronous database: nothing is ever called from a thread."""

    def callFromThread(self, callable: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        raise AssertionError("the synchronous runner never calls back from a thread")


def resolved(d: Deferred[_T]) -> _T:
    """The result of an already-fired Deferred (the synchronous runner's), or its exception."""
    results: list[object] = []
    d.addBoth(results.append)
    if not results:  # pragma: no cover - the synchronous runner always fires at once
        raise AssertionError("the Deferred has not fired")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[return-value]


def open_admin_database(config: Config) -> Database:
    """The configured database, migrated to head and checked for durability."""
    try:
        database = open_database(
            config.storage.database_url, _NoThreads(), runner=SynchronousRunner()
        )
    except StorageError as exc:
        raise AdminError(f"storage.database_url: {exc}") from None
    try:
        ensure_private_directory(config.storage.data_dir)
        upgrade_to_head(database.engine)
        check_durability(database.engine)
    except StorageError as exc:
        database.close()
        raise AdminError(f"database: {exc}") from None
    except sa_exc.SQLAlchemyError as exc:
        database.close()
        raise AdminError(f"cannot open the database ({type(exc).__name__})") from None
    return database


def migrate(config: Config) -> tuple[str | None, str]:
    """Bring the database to the newest schema; returns (revision before, revision now)."""
    url = config.storage.database_url
    try:
        ensure_private_directory(config.storage.data_dir)
        before = current_revision(url)
        upgrade_to_head(url)
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None
    except sa_exc.SQLAlchemyError as exc:
        raise AdminError(f"cannot migrate the database ({type(exc).__name__})") from None
    return before, head_revision()


@dataclass(frozen=True, slots=True)
class NewAccount:
    username: str
    role: Role
    enrollment_code: str
    expires_ms: int

    def __repr__(self) -> str:
        return f"NewAccount({self.username!r}, {self.role.value}, <code>)"


def add_user(
    database: Database,
    *,
    username: str,
    role: Role,
    display_name: str,
    specialty: str | None,
    department: str | None,
    now_ms: int,
    code_ttl_hours: int,
    hasher: PasswordHasher,
    rng: Rng,
) -> NewAccount:
    """Create an active account with a one-time enrollment code (stored as an Argon2id hash,
    valid for `code_ttl_hours`, single use); returns the code to hand out."""
    try:
        check_profile(username, role, display_name, specialty, department)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    code = new_enrollment_code(rng)
    code_hash = hasher.hash(normalize_code(code), rng)
    expires_ms = now_ms + code_ttl_hours * 3600 * 1000
    try:
        resolved(
            database.run_interaction(
                "admin_add_user",
                accounts.create_account_txn,
                username=username,
                role=role.value,
                display_name=display_name,
                specialty=specialty or None,
                department=department or None,
                code_hash=code_hash,
                now_ms=now_ms,
                code_expires_ms=expires_ms,
            )
        )
    except AccountExists:
        raise AdminError(f"an account named {username!r} already exists") from None
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None
    return NewAccount(username, role, code, expires_ms)
