"""Store functions for care links: which patient may write to which clinician, and until when.

A registrar, doctor or admin links a patient to a clinician (doctor or nurse) after an in-person
visit: the link records the visit date (an ISO date, never in the future), who created it, and
when it ends (`ends_at`, after now; by default `DEFAULT_LINK_DAYS` later). It can be ended early
(`ended_at`, `ended_by`); an ended link is never reopened: renewing it is a new link, so the
table is the pair's history. What the links mean for a request (`relationship_of`) and who may
create or end them (`decide`) is `medrelay.server.policy`'s; this module only reads and writes
rows, refusing bad input with a `CareLinkError` (one line, usernames only) before it writes
anything, so nothing is ever half-created.

Concurrency: creating or ending a link first locks the patient's account row (FOR UPDATE on
PostgreSQL; SQLite has one writer), so two operators cannot both create "the" active link of a
pair.
"""

from __future__ import annotations

import datetime
import re
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.crypto.certificates import Role
from medrelay.server.policy import (
    LinkSpan,
    PairState,
    Relationship,
    RequestType,
    Standing,
    authorize,
    last_day,
    pair_state,
    relationship_of,
    utc_date,
)
from medrelay.server.storage.schema import accounts, care_links, on_call_shifts

DEFAULT_LINK_DAYS: Final = 365
CLINICIAN_ROLES: Final = frozenset({Role.DOCTOR.value, Role.NURSE.value})
DAY_MS: Final = 24 * 3600 * 1000
# No clinic time zone is configured (yet): a visit date is "not in the future" if it is not
# after the newest calendar date anywhere on Earth now (UTC+14).
_FURTHEST_ZONE_AHEAD_MS: Final = 14 * 3600 * 1000
_ISO_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


class CareLinkError(ValueError):
    """A care-link operation refused for its input; the message is one line for the person."""


class UnknownAccount(CareLinkError):
    pass


class WrongRole(CareLinkError):
    pass


class AccountClosed(CareLinkError):
    pass


class InvalidDate(CareLinkError):
    pass


class LinkExists(CareLinkError):
    pass


class NoActiveLink(CareLinkError):
    pass


class NotAllowed(CareLinkError):
    """The policy table does not let the actor do this."""


@dataclass(frozen=True, slots=True)
class CareLink:
    pk: int
    patient: str
    clinician: str
    visit_date: str
    created_ms: int
    created_by: str
    ends_ms: int
    ended_ms: int | None
    """Set when the link was ended early."""
    ended_by: str | None

    @property
    def span(self) -> LinkSpan:
        end = self.ends_ms if self.ended_ms is None else min(self.ends_ms, self.ended_ms)
        return LinkSpan(self.created_ms, end)

    def state(self, now_ms: int) -> Relationship:
        return relationship_of((self.span,), now_ms).relationship


def parse_visit_date(text: str, now_ms: int) -> datetime.date:
    """The visit date of `text` (YYYY-MM-DD), which must not be in the future."""
    if _ISO_DATE.fullmatch(text) is None:
        raise InvalidDate(f"visit date {text!r} is not a date in the form YYYY-MM-DD")
    try:
        visit = datetime.date.fromisoformat(text)
    except ValueError:
        raise InvalidDate(f"visit date {text!r} is not a valid calendar date") from None
    latest = utc_date(now_ms + _FURTHEST_ZONE_AHEAD_MS)
    if visit.isoformat() > latest:
        raise InvalidDate(f"visit date {text} is in the future; a link follows an in-person visit")
    return visit


def end_of_day_ms(text: str) -> int:
    """When the date `text` (YYYY-MM-DD) is over: 00:00 UTC of the next day. A link "until"
    a date is in force through that whole day (no clinic time zone is configured yet)."""
    if _ISO_DATE.fullmatch(text) is None:
        raise InvalidDate(f"end date {text!r} is not a date in the form YYYY-MM-DD")
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise InvalidDate(f"end date {text!r} is not a valid calendar date") from None
    start = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
    return int(start.timestamp() * 1000) + DAY_MS


# --- reads --------------------------------------------------------------------------------------

_patient = accounts.alias("patient")
_clinician = accounts.alias("clinician")
_LINKS: Final = sa.select(
    care_links.c.pk,
    _patient.c.username,
    _clinician.c.username,
    care_links.c.visit_date,
    care_links.c.created_at,
    care_links.c.created_by,
    care_links.c.ends_at,
    care_links.c.ended_at,
    care_links.c.ended_by,
).select_from(
    care_links.join(_patient, _patient.c.pk == care_links.c.patient_pk).join(
        _clinician, _clinician.c.pk == care_links.c.clinician_pk
    )
)


_CHUNK: Final = 500
"""Bound values per IN list, well under SQLite's variable limit."""
_SPANS: Final = (
    sa.select(
        _patient.c.username,
        _clinician.c.username,
        care_links.c.created_at,
        care_links.c.ends_at,
        care_links.c.ended_at,
    )
    .select_from(
        care_links.join(_patient, _patient.c.pk == care_links.c.patient_pk).join(
            _clinician, _clinician.c.pk == care_links.c.clinician_pk
        )
    )
    .where(_patient.c.username.in_(sa.bindparam("names", expanding=True)))
)


def _link(row: Any) -> CareLink:
    pk, patient, clinician, visit, created, created_by, ends, ended, ended_by = row
    return CareLink(
        pk=int(pk),
        patient=str(patient),
        clinician=str(clinician),
        visit_date=str(visit),
        created_ms=int(created),
        created_by=str(created_by),
        ends_ms=int(ends),
        ended_ms=None if ended is None else int(ended),
        ended_by=None if ended_by is None else str(ended_by),
    )


@dataclass(frozen=True, slots=True)
class _Account:
    pk: int
    username: str
    role: str
    status: str

    @property
    def active(self) -> bool:
        return self.status == "active"


def _account(conn: Connection, username: str, *, lock: bool = False) -> _Account:
    query = sa.select(accounts.c.pk, accounts.c.username, accounts.c.role, accounts.c.status).where(
        accounts.c.username == username
    )
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise UnknownAccount(f"no account named {username!r}")
    return _Account(int(row.pk), row.username, row.role, row.status)


def _pair_links(conn: Connection, patient_pk: int, clinician_pk: int) -> list[CareLink]:
    rows = conn.execute(
        _LINKS.where(
            care_links.c.patient_pk == patient_pk, care_links.c.clinician_pk == clinician_pk
        ).order_by(care_links.c.created_at, care_links.c.pk)
    )
    return [_link(row) for row in rows]


def links_txn(conn: Connection, username: str) -> list[CareLink]:
    """Every care link (active, planned to end, or ended) of a patient or a clinician, oldest
    first."""
    account = _account(conn, username)
    if account.role == Role.PATIENT.value:
        column = care_links.c.patient_pk
    elif account.role in CLINICIAN_ROLES:
        column = care_links.c.clinician_pk
    else:
        raise WrongRole(
            f"{username} is a {account.role}; only patients, doctors and nurses have care links"
        )
    rows = conn.execute(
        _LINKS.where(column == account.pk).order_by(care_links.c.created_at, care_links.c.pk)
    )
    return [_link(row) for row in rows]


def pair_spans_txn(
    conn: Connection, patients: Collection[str], others: Collection[str]
) -> dict[tuple[str, str], list[LinkSpan]]:
    """(patient, clinician) -> spans of their links, for every patient in `patients` and
    clinician in `others`: what a batch of sends needs, read once."""
    if not patients or not others:
        return {}
    spans: dict[tuple[str, str], list[LinkSpan]] = defaultdict(list)
    others_set = set(others)
    patient_names = sorted(set(patients))
    for start in range(0, len(patient_names), _CHUNK):
        rows = conn.execute(_SPANS, {"names": patient_names[start : start + _CHUNK]})
        for patient, clinician, created, ends, ended in rows:
            if clinician in others_set:
                end = ends if ended is None else min(ends, ended)
                spans[(patient, clinician)].append(LinkSpan(int(created), int(end)))
    return dict(spans)


def standing_txn(conn: Connection, requester: str, target: str, now_ms: int) -> Standing | None:
    """The target user as the policy sees it from `requester`, or None without such an
    account."""
    row = conn.execute(
        sa.select(accounts.c.role, accounts.c.status).where(accounts.c.username == target)
    ).first()
    if row is None:
        return None
    if row.status != "active":
        return Standing(target, Role(row.role), PairState(Relationship.REVOKED))
    # Links exist only between a patient and a clinician: for any other pair this finds none.
    pair = {requester, target}
    state = pair_state(pair_spans_txn(conn, pair, pair), requester, target, now_ms)
    if (
        state.relationship is not Relationship.ACTIVE
        and row.role in CLINICIAN_ROLES
        and _on_call_for_txn(conn, requester, target, now_ms)
    ):
        # During the shift, a patient reaches the on-call clinician of their care team's
        # departments as if linked: needed to encrypt an urgent message to them.
        state = PairState(Relationship.ACTIVE)
    return Standing(target, Role(row.role), state)


def _on_call_for_txn(conn: Connection, patient: str, clinician: str, now_ms: int) -> bool:
    """Whether `clinician` is on call now for the department of a clinician with whom
    `patient` (if a patient) has an active care link."""
    linked = accounts.alias("linked")
    patient_pk = (
        sa.select(accounts.c.pk)
        .where(accounts.c.username == patient, accounts.c.role == Role.PATIENT.value)
        .scalar_subquery()
    )
    departments = (
        sa.select(linked.c.department)
        .select_from(care_links.join(linked, care_links.c.clinician_pk == linked.c.pk))
        .where(
            care_links.c.patient_pk == patient_pk,
            care_links.c.created_at <= now_ms,
            care_links.c.ends_at > now_ms,
            care_links.c.ended_at.is_(None),
            linked.c.department.is_not(None),
        )
    )
    shift = (
        sa.select(on_call_shifts.c.pk)
        .select_from(on_call_shifts.join(accounts, on_call_shifts.c.clinician_pk == accounts.c.pk))
        .where(
            accounts.c.username == clinician,
            on_call_shifts.c.starts_at <= now_ms,
            on_call_shifts.c.ends_at > now_ms,
            on_call_shifts.c.department.in_(departments),
        )
        .limit(1)
    )
    return conn.execute(shift).first() is not None


def relationship_txn(conn: Connection, a: str, b: str, now_ms: int) -> Relationship:
    """The relationship of `a` with target `b` at `now_ms`: REVOKED when b's account is
    closed, else from their care links (either may be the patient)."""
    standing = standing_txn(conn, a, b, now_ms)
    if standing is None:
        raise UnknownAccount(f"no account named {b!r}")
    return standing.state.relationship


# --- writes -------------------------------------------------------------------------------------


def _linked_pair(conn: Connection, patient: str, clinician: str) -> tuple[_Account, _Account]:
    """Both accounts, checked for their roles and status, the patient's row locked."""
    patient_account = _account(conn, patient, lock=True)
    if patient_account.role != Role.PATIENT.value:
        raise WrongRole(f"{patient} is a {patient_account.role}, not a patient")
    clinician_account = _account(conn, clinician)
    if clinician_account.role not in CLINICIAN_ROLES:
        raise WrongRole(
            f"{clinician} is a {clinician_account.role}; care links are with doctors and nurses"
        )
    for account in (patient_account, clinician_account):
        if not account.active:
            raise AccountClosed(f"the account {account.username} is closed")
    return patient_account, clinician_account


def _check_actor(
    conn: Connection,
    request: RequestType,
    *,
    actor: str,
    actor_role: Role,
    patient: str,
    now_ms: int,
) -> None:
    standing = standing_txn(conn, actor, patient, now_ms)
    if standing is None:  # pragma: no cover - checked by _linked_pair
        raise UnknownAccount(f"no account named {patient!r}")
    refused = authorize(
        request,
        actor_role,
        standing.role,
        standing.state.relationship,
        target_name=patient,
        ended_ms=standing.state.ended_ms,
        own_account=actor == patient,
    )
    if refused is not None:
        raise NotAllowed(refused.message)


def create_link_txn(
    conn: Connection,
    *,
    patient: str,
    clinician: str,
    visit_date: str,
    created_by: str,
    actor_role: Role,
    now_ms: int,
    ends_ms: int | None = None,
    default_days: int = DEFAULT_LINK_DAYS,
) -> CareLink:
    """Link `patient` to `clinician` (a doctor or nurse) from now until `ends_ms` (default: the
    end of the UTC day `default_days` from now). `created_by` is the acting username (or
    "operator" for a server command) and `actor_role` its role, which the policy table must
    allow to create links.

    Refuses (CareLinkError, nothing written): unknown or closed accounts, wrong roles, a visit
    date that is malformed or in the future, an end not after now, an active link already in
    force for the pair."""
    parse_visit_date(visit_date, now_ms)
    if ends_ms is None:  # through the whole last day, like an explicit end date
        ends_ms = end_of_day_ms(utc_date(now_ms + default_days * DAY_MS))
    ends = ends_ms
    if ends <= now_ms:
        raise InvalidDate(f"the end date {last_day(ends)} is already over")
    patient_account, clinician_account = _linked_pair(conn, patient, clinician)
    _check_actor(
        conn,
        RequestType.LINK_CREATE,
        actor=created_by,
        actor_role=actor_role,
        patient=patient,
        now_ms=now_ms,
    )
    for link in _pair_links(conn, patient_account.pk, clinician_account.pk):
        if link.state(now_ms) is Relationship.ACTIVE:
            raise LinkExists(
                f"{patient} already has an active care link with {clinician} "
                f"(until {last_day(link.span.end_ms)}); end it before creating another"
            )
    pk = conn.execute(
        sa.insert(care_links)
        .values(
            patient_pk=patient_account.pk,
            clinician_pk=clinician_account.pk,
            visit_date=visit_date,
            created_at=now_ms,
            created_by=created_by,
            ends_at=ends,
            ended_at=None,
            ended_by=None,
        )
        .returning(care_links.c.pk)
    ).scalar_one()
    return CareLink(
        pk=int(pk),
        patient=patient,
        clinician=clinician,
        visit_date=visit_date,
        created_ms=now_ms,
        created_by=created_by,
        ends_ms=ends,
        ended_ms=None,
        ended_by=None,
    )


def end_link_txn(
    conn: Connection,
    *,
    patient: str,
    clinician: str,
    ended_by: str,
    actor_role: Role,
    now_ms: int,
) -> CareLink:
    """End the pair's active care link now. Messages already queued are not touched: they are
    still delivered. Refuses (CareLinkError, nothing written) without an active link."""
    patient_account, clinician_account = _linked_pair(conn, patient, clinician)
    _check_actor(
        conn,
        RequestType.LINK_END,
        actor=ended_by,
        actor_role=actor_role,
        patient=patient,
        now_ms=now_ms,
    )
    active = [
        link
        for link in _pair_links(conn, patient_account.pk, clinician_account.pk)
        if link.state(now_ms) is Relationship.ACTIVE
    ]
    if not active:
        raise NoActiveLink(f"{patient} has no active care link with {clinician}")
    conn.execute(
        sa.update(care_links)
        .where(care_links.c.pk.in_([link.pk for link in active]))
        .values(ended_at=now_ms, ended_by=ended_by)
    )
    last = active[-1]
    return CareLink(
        pk=last.pk,
        patient=last.patient,
        clinician=last.clinician,
        visit_date=last.visit_date,
        created_ms=last.created_ms,
        created_by=last.created_by,
        ends_ms=last.ends_ms,
        ended_ms=now_ms,
        ended_by=ended_by,
    )


__all__ = [
    "DEFAULT_LINK_DAYS",
    "AccountClosed",
    "CareLink",
    "CareLinkError",
    "InvalidDate",
    "LinkExists",
    "NoActiveLink",
    "NotAllowed",
    "UnknownAccount",
    "WrongRole",
    "create_link_txn",
    "end_link_txn",
    "end_of_day_ms",
    "links_txn",
    "pair_spans_txn",
    "parse_visit_date",
    "relationship_txn",
    "standing_txn",
]
