"""Store functions for teleconsultation visits: open, close, look up and list.

Every function runs inside the caller's transaction (`*_txn`, through `Database.run_interaction`).
Who may do what, and the refusals, are `medrelay.server.visits`'; this module only reads and
writes rows. Opening a visit first locks the patient's account row (`account_txn(lock=True)`:
FOR UPDATE on PostgreSQL; SQLite has one writer), so two concurrent requests cannot both open
"the" open visit of a pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.server.storage.schema import accounts, visits


@dataclass(frozen=True, slots=True)
class VisitAccount:
    pk: int
    username: str
    role: str
    active: bool


@dataclass(frozen=True, slots=True)
class VisitRecord:
    """A visit as stored, with its people's usernames."""

    visit_id: str
    thread_id: bytes
    patient: str
    clinician: str
    indication: str
    consent: str
    opened_ms: int
    closed_ms: int | None = None
    conclusion_id: bytes | None = None

    @property
    def is_open(self) -> bool:
        return self.closed_ms is None


def account_txn(conn: Connection, username: str, *, lock: bool = False) -> VisitAccount | None:
    """The account named `username` (None: no such account); `lock` locks its row."""
    query = sa.select(accounts.c.pk, accounts.c.username, accounts.c.role, accounts.c.status).where(
        accounts.c.username == username
    )
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        return None
    return VisitAccount(int(row.pk), row.username, row.role, row.status == "active")


_patient = accounts.alias("visit_patient")
_clinician = accounts.alias("visit_clinician")
_VISITS: Final = sa.select(
    visits.c.visit_id,
    visits.c.thread_id,
    _patient.c.username,
    _clinician.c.username,
    visits.c.indication,
    visits.c.consent,
    visits.c.opened_at,
    visits.c.closed_at,
    visits.c.conclusion_id,
).select_from(
    visits.join(_patient, _patient.c.pk == visits.c.patient_pk).join(
        _clinician, _clinician.c.pk == visits.c.clinician_pk
    )
)
_NEWEST_FIRST: Final = (visits.c.opened_at.desc(), visits.c.visit_id.desc())


def _visit(row: Any) -> VisitRecord:
    visit_id, thread, patient, clinician, indication, consent, opened, closed, conclusion = row
    return VisitRecord(
        visit_id=str(visit_id),
        thread_id=bytes(thread),
        patient=str(patient),
        clinician=str(clinician),
        indication=str(indication),
        consent=str(consent),
        opened_ms=int(opened),
        closed_ms=None if closed is None else int(closed),
        conclusion_id=None if conclusion is None else bytes(conclusion),
    )


def visit_txn(conn: Connection, visit_id: str, *, lock: bool = False) -> VisitRecord | None:
    """The visit `visit_id`; `lock` locks its row (not its people's) until the transaction
    ends."""
    query = _VISITS.where(visits.c.visit_id == visit_id)
    if lock:
        query = query.with_for_update(of=visits)
    row = conn.execute(query).first()
    return None if row is None else _visit(row)


def open_visit_of_pair_txn(
    conn: Connection, patient_pk: int, clinician_pk: int
) -> VisitRecord | None:
    """The pair's open visit (the newest, should there ever be more than one)."""
    row = conn.execute(
        _VISITS.where(
            visits.c.patient_pk == patient_pk,
            visits.c.clinician_pk == clinician_pk,
            visits.c.closed_at.is_(None),
        )
        .order_by(*_NEWEST_FIRST)
        .limit(1)
    ).first()
    return None if row is None else _visit(row)


def free_ids_txn(
    conn: Connection, candidates: Sequence[tuple[str, bytes]]
) -> tuple[str, bytes] | None:
    """The first (visit id, thread id) pair of `candidates` that no visit uses yet."""
    if not candidates:
        return None
    taken_ids = set(
        conn.execute(
            sa.select(visits.c.visit_id).where(visits.c.visit_id.in_([c[0] for c in candidates]))
        ).scalars()
    )
    taken_threads = {
        bytes(t)
        for t in conn.execute(
            sa.select(visits.c.thread_id).where(visits.c.thread_id.in_([c[1] for c in candidates]))
        ).scalars()
    }
    for visit_id, thread_id in candidates:
        if visit_id not in taken_ids and thread_id not in taken_threads:
            return visit_id, thread_id
    return None


def insert_visit_txn(
    conn: Connection,
    *,
    visit_id: str,
    thread_id: bytes,
    patient_pk: int,
    clinician_pk: int,
    indication: str,
    consent: str,
    opened_ms: int,
) -> None:
    conn.execute(
        sa.insert(visits).values(
            visit_id=visit_id,
            thread_id=thread_id,
            patient_pk=patient_pk,
            clinician_pk=clinician_pk,
            indication=indication,
            consent=consent,
            opened_at=opened_ms,
            closed_at=None,
            conclusion_id=None,
        )
    )


def close_visit_txn(conn: Connection, visit_id: str, closed_ms: int, conclusion_id: bytes) -> bool:
    """Close the visit if it is open; False if it is not (closed meanwhile, or no such visit)."""
    result = conn.execute(
        sa.update(visits)
        .where(visits.c.visit_id == visit_id, visits.c.closed_at.is_(None))
        .values(closed_at=closed_ms, conclusion_id=conclusion_id)
    )
    return result.rowcount == 1


def visits_of_txn(
    conn: Connection, account_pk: int, *, open_only: bool = False, limit: int
) -> list[VisitRecord]:
    """The visits of an account as patient or clinician, newest first, at most `limit`."""
    query = _VISITS.where(
        sa.or_(visits.c.patient_pk == account_pk, visits.c.clinician_pk == account_pk)
    )
    if open_only:
        query = query.where(visits.c.closed_at.is_(None))
    return [_visit(row) for row in conn.execute(query.order_by(*_NEWEST_FIRST).limit(limit))]


__all__ = [
    "VisitAccount",
    "VisitRecord",
    "account_txn",
    "close_visit_txn",
    "free_ids_txn",
    "insert_visit_txn",
    "open_visit_of_pair_txn",
    "visit_txn",
    "visits_of_txn",
]
