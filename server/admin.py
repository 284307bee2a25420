"""Administrative operations run by the `medrelay-server` command line, outside the server process.

They run synchronously (no reactor is running), yet every SQL statement still goes through
`Database.run_interaction`, on the synchronous runner. They reach the same database as `serve`
(same configuration, same defaults), and may run while the server is up: SQLite transactions
start with `BEGIN IMMEDIATE` and wait for the server's writer (busy timeout) instead of failing.
Before touching accounts, the database is migrated and its durability checked, exactly as at
server start, so `admin add-user` on a fresh checkout works before the first `serve`.

Each action writes its audit record (`medrelay.server.audit`) in the transaction that does it,
refusals included.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from medrelay.crypto.certificates import Role
from medrelay.crypto.passwords import PasswordHasher
from medrelay.crypto.rng import Rng
from medrelay.server import audit
from medrelay.server.clinic import ensure_private_directory
from medrelay.server.config import Config
from medrelay.server.enrollment import check_profile, new_enrollment_code, normalize_code
from medrelay.server.policy import Relationship, last_day
from medrelay.server.storage import accounts, care
from medrelay.server.storage import availability as availability_store
from medrelay.server.storage.database import (
    Database,
    SynchronousRunner,
    check_durability,
    open_database,
)
from medrelay.server.storage.errors import AccountExists, StorageError
from medrelay.server.storage.migrate import current_revision, head_revision, upgrade_to_head
from medrelay.server.text import has_unprintable

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
        created = resolved(
            database.run_interaction(
                "admin_add_user",
                add_user_txn,
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
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None
    if not created:
        raise AdminError(f"an account named {username!r} already exists")
    return NewAccount(username, role, code, expires_ms)


def reset_code(
    database: Database,
    *,
    username: str,
    now_ms: int,
    code_ttl_hours: int,
    hasher: PasswordHasher,
    rng: Rng,
) -> NewAccount:
    """A new one-time code for an account that has not enrolled yet (a lost or expired slip);
    the previous code stops working. An enrolled account is refused: its new devices are
    linked from an existing one, and a lost last device means revoking and re-creating it."""
    code = new_enrollment_code(rng)
    code_hash = hasher.hash(normalize_code(code), rng)
    expires_ms = now_ms + code_ttl_hours * 3600 * 1000
    try:
        outcome = resolved(
            database.run_interaction(
                "admin_reset_code",
                _reset_code_txn,
                username=username,
                code_hash=code_hash,
                now_ms=now_ms,
                expires_ms=expires_ms,
            )
        )
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None
    if isinstance(outcome, str):
        raise AdminError(outcome)
    return NewAccount(username, outcome, code, expires_ms)


def _reset_code_txn(
    conn: Connection, /, *, username: str, code_hash: str, now_ms: int, expires_ms: int
) -> Role | str:
    """The account's role after replacing its code, or the reason it was refused (audited
    either way, in this transaction)."""
    account = accounts.get_account_txn(conn, username)
    refusal = None
    if account is None:
        refusal = f"there is no account named {username!r}"
    elif not account.active:
        refusal = f"the account {username} is revoked"
    elif account.enrolled:
        refusal = (
            f"{username} has already enrolled; link a new device from an existing one "
            "(medrelay devices link), or revoke the account and create a new one"
        )
    else:
        accounts.replace_enrollment_code_txn(
            conn, account.pk, code_hash=code_hash, now_ms=now_ms, expires_ms=expires_ms
        )
    audit.append_audit_txn(
        conn,
        actor=audit.OPERATOR,
        action=audit.AuditAction.ENROLLMENT_CODE_ISSUE,
        target=_audit_name(username),
        result=audit.AuditResult.OK if refusal is None else audit.AuditResult.REFUSED,
        now_ms=now_ms,
    )
    if refusal is not None or account is None:
        return refusal or "no account"
    return Role(account.role)


def add_user_txn(
    conn: Connection,
    /,
    *,
    username: str,
    role: str,
    now_ms: int,
    actor: str = audit.OPERATOR,
    **fields: Any,
) -> bool:
    """Create the account and its audit record in one transaction. A taken username writes
    only a "refused" record (committed: the attempt is audited) and returns False. `actor` is
    the staff member acting over the protocol, or the operator on the host."""
    try:
        accounts.create_account_txn(conn, username=username, role=role, now_ms=now_ms, **fields)
    except AccountExists:
        result, detail = audit.AuditResult.REFUSED, "username taken"
    else:
        result, detail = audit.AuditResult.OK, f"role={role}"
    audit.append_audit_txn(
        conn,
        actor=actor,
        action=audit.AuditAction.ACCOUNT_CREATE,
        target=username,
        result=result,
        now_ms=now_ms,
        detail=detail,
    )
    return result is audit.AuditResult.OK


# --- audit log ----------------------------------------------------------------------------------


AUDIT_RECORDS_PER_TRANSACTION: Final = 5000
"""Replay the audit log in short transactions: on SQLite each one holds the write lock, and a
running server must not wait for a whole replay."""


def verify_audit(
    database: Database, *, anchor: audit.AuditAnchor | None = None
) -> audit.AuditVerification:
    """Replay the whole audit chain (see `audit.verify_audit_txn`), in short transactions."""
    replay = audit.AuditReplay(anchor=anchor)
    try:
        resolved(database.run_interaction("admin_audit_verify", replay.start_txn))
        while not resolved(
            database.run_interaction(
                "admin_audit_verify", replay.step_txn, max_records=AUDIT_RECORDS_PER_TRANSACTION
            )
        ):
            pass
        return resolved(database.run_interaction("admin_audit_verify", replay.finish_txn))
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None


def list_audit(
    database: Database,
    *,
    since_ms: int | None,
    until_ms: int | None,
    actor: str | None,
    action: str | None,
    target: str | None,
    limit: int,
) -> list[audit.AuditEntry]:
    """The newest `limit` audit records matching every filter given, oldest first."""
    try:
        return resolved(
            database.run_interaction(
                "admin_audit_show",
                audit.list_audit_txn,
                since_ms=since_ms,
                until_ms=until_ms,
                actor=actor,
                action=action,
                target=target,
                limit=limit,
            )
        )
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None


# --- care links ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkView:
    """A care link and its state at the time of the command."""

    link: care.CareLink
    state: Relationship


def _audit_name(name: str) -> str:
    """`name` if an audit record can carry it (it is whatever the operator typed), else ""."""
    try:
        return audit.check_target(name)
    except ValueError:
        return ""


def audited_link_txn(
    conn: Connection,
    /,
    *,
    action: audit.AuditAction,
    actor: str = audit.OPERATOR,
    patient: str,
    clinician: str,
    now_ms: int,
    change: Callable[[Connection], care.CareLink],
) -> care.CareLink | care.CareLinkError:
    """Run `change` and append its audit record, in one transaction. A refusal rolls back only
    the change and is recorded as "refused" (the attempt is audited) and returned. `actor` is
    the staff member acting over the protocol, or the operator on the host."""
    outcome: care.CareLink | care.CareLinkError
    detail = f"clinician={_audit_name(clinician) or '?'}"
    try:
        with conn.begin_nested():
            outcome = change(conn)
    except care.CareLinkError as exc:
        outcome, result = exc, audit.AuditResult.REFUSED
        # The reason as a fixed word (UnknownAccount -> unknown_account), never the input.
        words = "".join(f"_{c.lower()}" if c.isupper() else c for c in type(exc).__name__)
        detail += f"; reason={words.lstrip('_')}"
    else:
        result = audit.AuditResult.OK
        if action is audit.AuditAction.LINK_CREATE:
            detail += f"; visit={outcome.visit_date}; until={last_day(outcome.ends_ms)}"
    audit.append_audit_txn(
        conn,
        actor=actor,
        action=action,
        target=_audit_name(patient),
        result=result,
        now_ms=now_ms,
        detail=detail,
    )
    return outcome


def _run_link_action(database: Database, desc: str, **kwargs: Any) -> care.CareLink:
    try:
        outcome = resolved(database.run_interaction(desc, audited_link_txn, **kwargs))
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None
    if isinstance(outcome, care.CareLinkError):
        raise AdminError(str(outcome))
    return outcome


def link(
    database: Database,
    *,
    patient: str,
    clinician: str,
    visit_date: str,
    until: str | None,
    now_ms: int,
) -> LinkView:
    """Link `patient` to `clinician` after an in-person visit on `visit_date`, through the day
    `until` (default: `care.DEFAULT_LINK_DAYS` from now); audited as link_create."""
    try:
        ends_ms = care.end_of_day_ms(until) if until is not None else None
    except care.CareLinkError as exc:
        raise AdminError(str(exc)) from None

    def create(conn: Connection) -> care.CareLink:
        return care.create_link_txn(
            conn,
            patient=patient,
            clinician=clinician,
            visit_date=visit_date,
            created_by=audit.OPERATOR,
            actor_role=Role.ADMIN,
            now_ms=now_ms,
            ends_ms=ends_ms,
        )

    created = _run_link_action(
        database,
        "admin_link",
        action=audit.AuditAction.LINK_CREATE,
        patient=patient,
        clinician=clinician,
        now_ms=now_ms,
        change=create,
    )
    return LinkView(created, created.state(now_ms))


def unlink(database: Database, *, patient: str, clinician: str, now_ms: int) -> LinkView:
    """End the pair's active care link now (messages already sent are still delivered);
    audited as link_end."""

    def end(conn: Connection) -> care.CareLink:
        return care.end_link_txn(
            conn,
            patient=patient,
            clinician=clinician,
            ended_by=audit.OPERATOR,
            actor_role=Role.ADMIN,
            now_ms=now_ms,
        )

    ended = _run_link_action(
        database,
        "admin_unlink",
        action=audit.AuditAction.LINK_END,
        patient=patient,
        clinician=clinician,
        now_ms=now_ms,
        change=end,
    )
    return LinkView(ended, ended.state(now_ms))


def links(database: Database, *, username: str, now_ms: int) -> list[LinkView]:
    """Every care link of a patient or clinician, oldest first, with its state now."""
    try:
        found = resolved(database.run_interaction("admin_links", care.links_txn, username))
    except care.CareLinkError as exc:
        raise AdminError(str(exc)) from None
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None
    return [LinkView(item, item.state(now_ms)) for item in found]


# --- holidays -----------------------------------------------------------------------------------

MAX_HOLIDAY_NAME_CHARS: Final = 100
_ISO_DAY: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class Holiday:
    day: datetime.date
    name: str


def parse_holiday_day(text: str) -> datetime.date:
    """The day `text` names, exactly YYYY-MM-DD (AdminError otherwise)."""
    if _ISO_DAY.fullmatch(text) is None:
        raise AdminError(f"date {text!r} is not a date in the form YYYY-MM-DD")
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise AdminError(f"date {text!r} is not a valid calendar date") from None


def check_holiday_name(name: str) -> str:
    """`name` without surrounding spaces: 1 to MAX_HOLIDAY_NAME_CHARS characters, none of them
    control or formatting characters (AdminError otherwise). It is shown to the operator only,
    never sent to clients or written to the audit log."""
    name = name.strip()
    if not name:
        raise AdminError("the holiday's name must not be empty")
    if len(name) > MAX_HOLIDAY_NAME_CHARS:
        raise AdminError(f"the holiday's name is longer than {MAX_HOLIDAY_NAME_CHARS} characters")
    if has_unprintable(name):
        raise AdminError("the holiday's name contains control characters")
    return name


def set_holiday_audited_txn(
    conn: Connection, /, *, day: datetime.date, name: str, now_ms: int, actor: str = audit.OPERATOR
) -> bool:
    """Add (or rename) the holiday on `day` with its audit record; True if it replaced one."""
    replaced = availability_store.holiday_txn(conn, day) is not None
    availability_store.set_holiday_txn(conn, day, name)
    audit.append_audit_txn(
        conn,
        actor=actor,
        action=audit.AuditAction.HOLIDAY_SET,
        target="",
        result=audit.AuditResult.OK,
        now_ms=now_ms,
        detail=f"day={day.isoformat()}",
    )
    return replaced


def remove_holiday_audited_txn(
    conn: Connection, /, *, day: datetime.date, now_ms: int, actor: str = audit.OPERATOR
) -> str | None:
    """Remove the holiday on `day` with its audit record; returns its name, or None when there
    was none (audited as refused)."""
    name = availability_store.holiday_txn(conn, day)
    removed = availability_store.remove_holiday_txn(conn, day)
    audit.append_audit_txn(
        conn,
        actor=actor,
        action=audit.AuditAction.HOLIDAY_REMOVE,
        target="",
        result=audit.AuditResult.OK if removed else audit.AuditResult.REFUSED,
        now_ms=now_ms,
        detail=f"day={day.isoformat()}" + ("" if removed else "; reason=not_found"),
    )
    return name if removed else None


def add_holiday(database: Database, *, day: datetime.date, name: str, now_ms: int) -> bool:
    """Close `day` for every clinician with hours (see `check_holiday_name` for `name`); True
    if it renamed a holiday already on that day. Audited as holiday_set."""
    name = check_holiday_name(name)
    try:
        return resolved(
            database.run_interaction(
                "admin_holiday_add", set_holiday_audited_txn, day=day, name=name, now_ms=now_ms
            )
        )
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None


def remove_holiday(database: Database, *, day: datetime.date, now_ms: int) -> Holiday:
    """Open `day` again; AdminError if it is not a holiday. Audited as holiday_remove, refusals
    included."""
    try:
        name = resolved(
            database.run_interaction(
                "admin_holiday_remove", remove_holiday_audited_txn, day=day, now_ms=now_ms
            )
        )
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None
    if name is None:
        raise AdminError(f"there is no holiday on {day.isoformat()}")
    return Holiday(day, name)


def holidays(database: Database) -> list[Holiday]:
    """Every holiday, in date order."""
    try:
        found = resolved(
            database.run_interaction("admin_holidays", availability_store.holidays_txn)
        )
    except StorageError as exc:
        raise AdminError(f"database: {exc}") from None
    return [Holiday(day, name) for day, name in sorted(found.items())]
