"""Staff requests over the protocol: the directory, creating accounts, and care links.

A registrar at the front desk creates a patient's account and links the patient to a clinician
after an in-person visit; an admin creates staff accounts; anyone looks people up in the
directory (a patient sees only their care team). Every request is decided by the one policy
table (`medrelay.server.policy`) and every change is audited in its own transaction, exactly as
the operator's admin commands are (they share the store functions).

The directory answers with user certificates, not bare names: the client verifies each one
against the transparency log before showing it, so a name in the directory is as trustworthy as
a key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime

from medrelay.crypto.certificates import Role
from medrelay.crypto.rng import Rng
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import MAX_DIRECTORY_ENTRIES
from medrelay.protocol.messages import (
    AccountCreate,
    AccountCreated,
    Directory,
    DirectoryEntry,
    DirectorySearch,
    LinkCreate,
    LinkEnd,
    LinkState,
)
from medrelay.server import audit
from medrelay.server.admin import add_user_txn, audited_link_txn
from medrelay.server.config import EnrollmentSection
from medrelay.server.enrollment import check_profile, new_enrollment_code, normalize_code
from medrelay.server.hashing import PasswordWorker
from medrelay.server.policy import (
    Decision,
    Relationship,
    RequestType,
    authorize,
    authorize_standing,
    decide,
)
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.store import DeviceRecord
from medrelay.server.storage import care
from medrelay.server.storage.database import Database
from medrelay.server.storage.schema import accounts, care_links

MAX_SCANNED: Final = 5000
"""Accounts a directory search looks at, at most (a clinic's staff is far fewer; patients are
found by registrars, who should type part of the name)."""


def _refused(message: str) -> RelayError:
    return RelayError(ErrorCode.FORBIDDEN, message)


def _invalid(field: str, problem: str) -> RelayError:
    return RelayError(ErrorCode.INVALID_FIELD, f"{field}: {problem}")


@dataclass(frozen=True, slots=True)
class _Candidate:
    username: str
    role: Role
    display_name: str
    specialty: str
    department: str
    certificate: bytes


def _matches(candidate: _Candidate, message: DirectorySearch) -> bool:
    """Case-insensitive substring matches (casefold: Cyrillic names too, which SQLite's LIKE
    would not fold)."""
    query = message.query.strip().casefold()
    names = (candidate.username.casefold(), candidate.display_name.casefold())
    if query and not any(query in name for name in names):
        return False
    for wanted, value in (
        (message.specialty, candidate.specialty),
        (message.department, candidate.department),
    ):
        if wanted is not None and wanted.strip().casefold() not in value.casefold():
            return False
    return True


def search_txn(
    conn: Connection, requester: DeviceRecord, message: DirectorySearch, now_ms: int
) -> list[DirectoryEntry]:
    """The enrolled, active accounts matching the search that the requester may see."""
    role = Role(requester.role)
    query = (
        sa.select(
            accounts.c.username,
            accounts.c.role,
            accounts.c.display_name,
            accounts.c.specialty,
            accounts.c.department,
            accounts.c.user_certificate,
        )
        .where(accounts.c.status == "active", accounts.c.user_certificate.is_not(None))
        .order_by(accounts.c.display_name, accounts.c.username)
        .limit(MAX_SCANNED)
    )
    if role is Role.PATIENT:
        # Only their care team can match: read just the clinicians linked to them.
        linked = sa.select(care_links.c.clinician_pk).where(
            care_links.c.patient_pk
            == sa.select(accounts.c.pk)
            .where(accounts.c.username == requester.username)
            .scalar_subquery()
        )
        query = query.where(
            sa.or_(accounts.c.pk.in_(linked), accounts.c.username == requester.username)
        )
    found: list[DirectoryEntry] = []
    for row in conn.execute(query):
        candidate = _Candidate(
            row.username,
            Role(row.role),
            row.display_name,
            row.specialty or "",
            row.department or "",
            bytes(row.user_certificate),
        )
        if not _matches(candidate, message):
            continue
        free = (
            decide(RequestType.DIRECTORY_SEARCH, role, candidate.role, Relationship.NONE)
            is Decision.ALLOWED
        )
        # Only a pair the table allows just with a care link costs a look at the links.
        if candidate.username != requester.username and not free:
            standing = care.standing_txn(conn, requester.username, candidate.username, now_ms)
            if standing is None or authorize_standing(RequestType.DIRECTORY_SEARCH, role, standing):
                continue
        found.append(DirectoryEntry(user=candidate.username, certificate=candidate.certificate))
        if len(found) == MAX_DIRECTORY_ENTRIES:
            break
    return found


class StaffService:
    """Answers directory_search, account_create, link_create and link_end."""

    def __init__(
        self,
        *,
        database: Database,
        worker: PasswordWorker,
        clock: IReactorTime,
        rng: Rng,
        enrollment: EnrollmentSection,
    ) -> None:
        self._database = database
        self._worker = worker
        self._clock = clock
        self._rng = rng
        self._enrollment = enrollment

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def search(self, device: DeviceRecord, message: DirectorySearch) -> Deferred[Directory]:
        d = self._database.run_interaction(
            "directory_search", search_txn, device, message, self.now_ms()
        )
        return d.addCallback(lambda entries: Directory(rid=message.rid, entries=tuple(entries)))

    def create_account(
        self, device: DeviceRecord, message: AccountCreate
    ) -> Deferred[AccountCreated]:
        return Deferred.fromCoroutine(self._create_account(device, message))

    async def _create_account(self, device: DeviceRecord, message: AccountCreate) -> AccountCreated:
        role = Role(message.role)
        request = (
            RequestType.ACCOUNT_CREATE_PATIENT
            if role is Role.PATIENT
            else RequestType.ACCOUNT_CREATE_STAFF
        )
        refused = authorize(
            request,
            Role(device.role),
            role,
            Relationship.NONE,
            target_name=message.user,
        )
        if refused is not None:
            raise refused
        try:
            check_profile(message.user, role, message.name, message.specialty, message.department)
        except ValueError as exc:
            raise _invalid("account_create", str(exc)) from None
        code = new_enrollment_code(self._rng)
        code_hash = await self._worker.hash(normalize_code(code), self._rng)
        now_ms = self.now_ms()
        expires_ms = now_ms + self._enrollment.code_ttl_hours * 3600 * 1000
        created = await self._database.run_interaction(
            "account_create",
            add_user_txn,
            username=message.user,
            role=role.value,
            display_name=message.name,
            specialty=message.specialty or None,
            department=message.department or None,
            code_hash=code_hash,
            now_ms=now_ms,
            code_expires_ms=expires_ms,
            actor=device.username,
        )
        if not created:
            raise _refused(f"an account named {message.user} already exists")
        return AccountCreated(rid=message.rid, user=message.user, code=code, expires_ms=expires_ms)

    def create_link(self, device: DeviceRecord, message: LinkCreate) -> Deferred[LinkState]:
        now_ms = self.now_ms()
        try:
            ends_ms = None if message.until is None else care.end_of_day_ms(message.until)
        except care.CareLinkError as exc:
            return fail(_invalid("link_create.until", str(exc)))

        def create(conn: Connection) -> care.CareLink:
            return care.create_link_txn(
                conn,
                patient=message.patient,
                clinician=message.clinician,
                visit_date=message.visit,
                created_by=device.username,
                actor_role=Role(device.role),
                now_ms=now_ms,
                ends_ms=ends_ms,
            )

        return self._link_change(device, audit.AuditAction.LINK_CREATE, message, now_ms, create)

    def end_link(self, device: DeviceRecord, message: LinkEnd) -> Deferred[LinkState]:
        now_ms = self.now_ms()

        def end(conn: Connection) -> care.CareLink:
            return care.end_link_txn(
                conn,
                patient=message.patient,
                clinician=message.clinician,
                ended_by=device.username,
                actor_role=Role(device.role),
                now_ms=now_ms,
            )

        return self._link_change(device, audit.AuditAction.LINK_END, message, now_ms, end)

    def _link_change(
        self,
        device: DeviceRecord,
        action: audit.AuditAction,
        message: LinkCreate | LinkEnd,
        now_ms: int,
        change: Callable[[Connection], care.CareLink],
    ) -> Deferred[LinkState]:
        """The change and its audit record in one transaction, as the admin commands do; a
        refusal is audited too and answered `forbidden` with the reason."""

        def answer(outcome: care.CareLink | care.CareLinkError) -> LinkState:
            if isinstance(outcome, care.CareLinkError):
                raise _refused(str(outcome))
            return LinkState(
                rid=message.rid,
                patient=outcome.patient,
                clinician=outcome.clinician,
                visit=outcome.visit_date,
                ends_ms=outcome.ends_ms,
                ended_ms=outcome.ended_ms,
            )

        d = self._database.run_interaction(
            action.value,
            audited_link_txn,
            action=action,
            actor=device.username,
            patient=message.patient,
            clinician=message.clinician,
            now_ms=now_ms,
            change=change,
        )
        return d.addCallback(answer)
