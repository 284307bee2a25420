"""Store functions for availability: schedules, absences, holidays, the on-call roster, held
messages and the bookkeeping of automatic replies and first replies.

Every function runs inside the caller's transaction (`*_txn`). Held messages move into the
delivery queue only through `release_due_txn`, which the group commit runs: every queue insert
goes through the one writer, so queue seqs commit in order.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.server.availability.schedule import Absence, Interval, Schedule, ScheduleError
from medrelay.server.storage import queue as queue_store
from medrelay.server.storage.schema import (
    absences,
    accounts,
    auto_replies,
    awaiting_replies,
    devices,
    held_items,
    holidays,
    on_call_shifts,
    queue_items,
    schedules,
)

_CHUNK: Final = 500


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """One account's stored settings (hours None: never set)."""

    account_pk: int
    time_zone: str | None = None
    hours: tuple[Interval, ...] | None = None
    autoreply: str | None = None
    available_until_ms: int | None = None
    absences: tuple[Absence, ...] = ()


@dataclass(frozen=True, slots=True)
class AccountInfo:
    pk: int
    username: str
    role: str
    department: str | None
    active: bool


def accounts_txn(conn: Connection, names: Collection[str]) -> dict[str, AccountInfo]:
    found: dict[str, AccountInfo] = {}
    ordered = sorted(set(names))
    for start in range(0, len(ordered), _CHUNK):
        rows = conn.execute(
            sa.select(
                accounts.c.pk,
                accounts.c.username,
                accounts.c.role,
                accounts.c.department,
                accounts.c.status,
            ).where(accounts.c.username.in_(ordered[start : start + _CHUNK]))
        )
        for pk, username, role, department, status in rows:
            found[username] = AccountInfo(int(pk), username, role, department, status == "active")
    return found


def encode_hours(intervals: Iterable[Interval]) -> str:
    return json.dumps([[i.weekday, i.start_minute, i.end_minute] for i in intervals])


def _decode_hours(text: str | None) -> tuple[Interval, ...] | None:
    if text is None:
        return None
    return tuple(Interval(int(d), int(s), int(e)) for d, s, e in json.loads(text))


def schedules_txn(conn: Connection, account_pks: Collection[int]) -> dict[int, ScheduleRecord]:
    """The stored settings of these accounts (absent: nothing was ever set)."""
    pks = sorted(set(account_pks))
    away: dict[int, list[Absence]] = {}
    found: dict[int, ScheduleRecord] = {}
    for start in range(0, len(pks), _CHUNK):
        chunk = pks[start : start + _CHUNK]
        for pk, first, last, reason in conn.execute(
            sa.select(
                absences.c.account_pk, absences.c.first_day, absences.c.last_day, absences.c.reason
            )
            .where(absences.c.account_pk.in_(chunk))
            .order_by(absences.c.first_day)
        ):
            away.setdefault(int(pk), []).append(
                Absence(
                    datetime.date.fromisoformat(first), datetime.date.fromisoformat(last), reason
                )
            )
        for row in conn.execute(sa.select(schedules).where(schedules.c.account_pk.in_(chunk))):
            found[int(row.account_pk)] = ScheduleRecord(
                account_pk=int(row.account_pk),
                time_zone=row.time_zone,
                hours=_decode_hours(row.hours),
                autoreply=row.autoreply,
                available_until_ms=row.available_until,
            )
    for pk, spans in away.items():
        record = found.get(pk, ScheduleRecord(pk))
        found[pk] = ScheduleRecord(
            record.account_pk,
            record.time_zone,
            record.hours,
            record.autoreply,
            record.available_until_ms,
            tuple(spans),
        )
    return found


def holidays_txn(conn: Connection) -> dict[datetime.date, str]:
    return {
        datetime.date.fromisoformat(day): name
        for day, name in conn.execute(sa.select(holidays.c.day, holidays.c.name))
    }


def to_schedule(
    record: ScheduleRecord | None, clinic_zone: str, closed_days: Collection[datetime.date]
) -> Schedule | None:
    """The schedule to evaluate, or None for a clinician who never set hours (always open)."""
    if record is None or record.hours is None:
        return None
    return Schedule(
        time_zone=record.time_zone or clinic_zone,
        intervals=record.hours,
        absences=record.absences,
        holidays=frozenset(closed_days),
        available_until_ms=record.available_until_ms,
    )


class Unset:
    """A field `set_schedule_txn` leaves as it is."""


UNSET: Final = Unset()


def set_schedule_txn(
    conn: Connection,
    account_pk: int,
    now_ms: int,
    *,
    time_zone: str | Unset | None = UNSET,
    hours: tuple[Interval, ...] | Unset | None = UNSET,
    autoreply: str | Unset | None = UNSET,
    available_until_ms: int | Unset | None = UNSET,
    absence_list: tuple[Absence, ...] | Unset = UNSET,
) -> None:
    values: dict[str, Any] = {"updated_at": now_ms}
    if not isinstance(time_zone, Unset):
        values["time_zone"] = time_zone
    if not isinstance(hours, Unset):
        values["hours"] = None if hours is None else encode_hours(hours)
    if not isinstance(autoreply, Unset):
        values["autoreply"] = autoreply
    if not isinstance(available_until_ms, Unset):
        values["available_until"] = available_until_ms
    exists = conn.execute(
        sa.select(schedules.c.account_pk).where(schedules.c.account_pk == account_pk)
    ).first()
    if exists is None:
        conn.execute(sa.insert(schedules).values(account_pk=account_pk, **values))
    else:
        conn.execute(
            sa.update(schedules).where(schedules.c.account_pk == account_pk).values(**values)
        )
    if not isinstance(absence_list, Unset):
        conn.execute(sa.delete(absences).where(absences.c.account_pk == account_pk))
        if absence_list:
            conn.execute(
                sa.insert(absences),
                [
                    {
                        "account_pk": account_pk,
                        "first_day": a.first_day.isoformat(),
                        "last_day": a.last_day.isoformat(),
                        "reason": a.reason,
                    }
                    for a in absence_list
                ],
            )


# --- holidays -----------------------------------------------------------------------------------


def holiday_txn(conn: Connection, day: datetime.date) -> str | None:
    """The name of the holiday on `day`, or None."""
    name = conn.execute(
        sa.select(holidays.c.name).where(holidays.c.day == day.isoformat())
    ).scalar()
    return None if name is None else str(name)


def set_holiday_txn(conn: Connection, day: datetime.date, name: str) -> None:
    conn.execute(sa.delete(holidays).where(holidays.c.day == day.isoformat()))
    conn.execute(sa.insert(holidays).values(day=day.isoformat(), name=name))


def remove_holiday_txn(conn: Connection, day: datetime.date) -> bool:
    return conn.execute(sa.delete(holidays).where(holidays.c.day == day.isoformat())).rowcount > 0


# --- the on-call roster -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shift:
    pk: int
    clinician: str
    clinician_pk: int
    department: str
    starts_ms: int
    ends_ms: int


_SHIFTS: Final = sa.select(
    on_call_shifts.c.pk,
    accounts.c.username,
    on_call_shifts.c.clinician_pk,
    on_call_shifts.c.department,
    on_call_shifts.c.starts_at,
    on_call_shifts.c.ends_at,
).select_from(on_call_shifts.join(accounts, on_call_shifts.c.clinician_pk == accounts.c.pk))


def _shift(row: Any) -> Shift:
    return Shift(int(row[0]), row[1], int(row[2]), row[3], int(row[4]), int(row[5]))


def add_shift_txn(
    conn: Connection,
    clinician_pk: int,
    department: str,
    starts_ms: int,
    ends_ms: int,
    *,
    now_ms: int,
    created_by: str,
) -> int:
    result = conn.execute(
        sa.insert(on_call_shifts)
        .values(
            clinician_pk=clinician_pk,
            department=department,
            starts_at=starts_ms,
            ends_at=ends_ms,
            created_at=now_ms,
            created_by=created_by,
        )
        .returning(on_call_shifts.c.pk)
    )
    return int(result.scalar_one())


def remove_shift_txn(conn: Connection, shift_pk: int) -> Shift | None:
    row = conn.execute(_SHIFTS.where(on_call_shifts.c.pk == shift_pk)).first()
    if row is None:
        return None
    conn.execute(sa.delete(on_call_shifts).where(on_call_shifts.c.pk == shift_pk))
    return _shift(row)


def shifts_txn(conn: Connection, after_ms: int, limit: int) -> list[Shift]:
    rows = conn.execute(
        _SHIFTS.where(on_call_shifts.c.ends_at > after_ms)
        .order_by(on_call_shifts.c.starts_at, on_call_shifts.c.pk)
        .limit(limit)
    )
    return [_shift(row) for row in rows]


def on_call_txn(conn: Connection, department: str, now_ms: int) -> Shift | None:
    """Who is on call for `department` now: of the shifts in force, the one that started last
    (a relief takes over from the shift it overlaps), only active accounts with a device that
    can receive. (An on-call clinician nobody can reach is nobody: the patient is told to call
    the emergency numbers rather than that their urgent message reached someone.)"""
    reachable = (
        sa.select(devices.c.pk)
        .where(
            devices.c.account_pk == on_call_shifts.c.clinician_pk, devices.c.revoked_at.is_(None)
        )
        .exists()
    )
    row = conn.execute(
        _SHIFTS.where(
            on_call_shifts.c.department == department,
            on_call_shifts.c.starts_at <= now_ms,
            on_call_shifts.c.ends_at > now_ms,
            accounts.c.status == "active",
            reachable,
        )
        .order_by(on_call_shifts.c.starts_at.desc(), on_call_shifts.c.pk.desc())
        .limit(1)
    ).first()
    return _shift(row) if row is not None else None


# --- automatic replies and first replies --------------------------------------------------------


def first_auto_reply_txn(
    conn: Connection, patient_pk: int, clinician_pk: int, window_end_ms: int, now_ms: int
) -> bool:
    """Record an automatic reply for this window; False if one was already sent."""
    key = (
        auto_replies.c.patient_pk == patient_pk,
        auto_replies.c.clinician_pk == clinician_pk,
        auto_replies.c.window_end == window_end_ms,
    )
    if conn.execute(sa.select(auto_replies.c.created_at).where(*key)).first() is not None:
        return False
    conn.execute(
        sa.insert(auto_replies).values(
            patient_pk=patient_pk,
            clinician_pk=clinician_pk,
            window_end=window_end_ms,
            created_at=now_ms,
        )
    )
    return True


def awaiting_reply_txn(conn: Connection, patient_pk: int, clinician_pk: int, now_ms: int) -> None:
    """The patient wrote: remember when, unless an earlier message is still unanswered."""
    key = (
        awaiting_replies.c.patient_pk == patient_pk,
        awaiting_replies.c.clinician_pk == clinician_pk,
    )
    if conn.execute(sa.select(awaiting_replies.c.since).where(*key)).first() is None:
        conn.execute(
            sa.insert(awaiting_replies).values(
                patient_pk=patient_pk, clinician_pk=clinician_pk, since=now_ms
            )
        )


def replied_txn(conn: Connection, patient_pk: int, clinician_pk: int) -> int | None:
    """The clinician wrote to the patient: when the oldest unanswered message was sent."""
    key = (
        awaiting_replies.c.patient_pk == patient_pk,
        awaiting_replies.c.clinician_pk == clinician_pk,
    )
    since = conn.execute(sa.select(awaiting_replies.c.since).where(*key)).scalar()
    if since is None:
        return None
    conn.execute(sa.delete(awaiting_replies).where(*key))
    return int(since)


# --- held messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldEnvelope:
    clinician_pk: int
    device_pk: int
    peer_user: str
    peer_device: str
    message_id: bytes
    created_ms: int
    sender_device_pk: int
    ciphertext: bytes
    flags: int


def hold_txn(conn: Connection, rows: Sequence[HeldEnvelope]) -> None:
    if not rows:
        return
    conn.execute(
        sa.insert(held_items),
        [
            {
                "clinician_pk": r.clinician_pk,
                "device_pk": r.device_pk,
                "peer_user": r.peer_user,
                "peer_device": r.peer_device,
                "message_id": r.message_id,
                "created_at": r.created_ms,
                "sender_device_pk": r.sender_device_pk,
                "size": len(r.ciphertext),
                "ciphertext": r.ciphertext,
                "flags": r.flags,
            }
            for r in rows
        ],
    )


def held_counts_txn(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(held_items)).scalar_one())


def holding_clinicians_txn(conn: Connection) -> list[int]:
    return [
        int(pk)
        for pk in conn.execute(
            sa.select(held_items.c.clinician_pk).distinct().order_by(held_items.c.clinician_pk)
        ).scalars()
    ]


@dataclass(frozen=True, slots=True)
class ReleasedRow:
    """A held envelope now in the queue (seq assigned)."""

    seq: int
    device_pk: int
    item: queue_store.QueueItem
    flags: int


def release_txn(
    conn: Connection, clinician_pk: int, now_ms: int, expires_ms: int, held_flag: int
) -> list[ReleasedRow]:
    """Move a clinician's held envelopes into their devices' queues, oldest first; envelopes
    for devices revoked meanwhile are dropped. Locks the devices' rows first (pk order)."""
    rows = conn.execute(
        sa.select(held_items)
        .where(held_items.c.clinician_pk == clinician_pk)
        .order_by(held_items.c.pk)
    ).all()
    if not rows:
        return []
    device_pks = sorted({int(r.device_pk) for r in rows})
    live = {
        int(pk)
        for pk in conn.execute(
            sa.select(devices.c.pk)
            .where(devices.c.pk.in_(device_pks), devices.c.revoked_at.is_(None))
            .order_by(devices.c.pk)
            .with_for_update()
        ).scalars()
    }
    released: list[ReleasedRow] = []
    counts: dict[int, int] = {}
    for r in rows:
        if int(r.device_pk) not in live:
            continue
        flags = int(r.flags) | held_flag
        seq = conn.execute(
            sa.insert(queue_items)
            .values(
                device_pk=r.device_pk,
                kind=queue_store.MSG,
                peer_user=r.peer_user,
                peer_device=r.peer_device,
                message_id=r.message_id,
                created_at=r.created_at,
                expires_at=max(expires_ms, now_ms),
                sender_device_pk=r.sender_device_pk,
                size=r.size,
                ciphertext=r.ciphertext,
                flags=flags,
            )
            .returning(queue_items.c.seq)
        ).scalar_one()
        counts[int(r.device_pk)] = counts.get(int(r.device_pk), 0) + 1
        released.append(
            ReleasedRow(
                int(seq),
                int(r.device_pk),
                queue_store.QueueItem(
                    seq=int(seq),
                    kind=queue_store.MSG,
                    message_id=bytes(r.message_id),
                    time_ms=int(r.created_at),
                    peer_user=r.peer_user,
                    peer_device=r.peer_device,
                    ciphertext=bytes(r.ciphertext),
                ),
                flags,
            )
        )
    for pk, count in sorted(counts.items()):
        conn.execute(
            sa.update(devices)
            .where(devices.c.pk == pk)
            .values(queued_count=devices.c.queued_count + count)
        )
    conn.execute(sa.delete(held_items).where(held_items.c.clinician_pk == clinician_pk))
    return released


def due_clinicians_txn(
    conn: Connection,
    now_ms: int,
    clinic_zone: str,
    is_open: Callable[[Schedule | None, int], tuple[bool, int | None]],
) -> tuple[list[int], int | None]:
    """The clinicians holding messages whose hours are open now, and the earliest instant one
    of the others opens (None: none known)."""
    holding = holding_clinicians_txn(conn)
    if not holding:
        return [], None
    records = schedules_txn(conn, holding)
    closed_days = holidays_txn(conn).keys()
    due: list[int] = []
    next_at: int | None = None
    for pk in holding:
        try:
            schedule = to_schedule(records.get(pk), clinic_zone, closed_days)
        except ScheduleError:
            schedule = None  # a zone the database no longer knows: deliver rather than hold
        open_now, changes_at = is_open(schedule, now_ms)
        if open_now:
            due.append(pk)
        elif changes_at is not None:
            next_at = changes_at if next_at is None else min(next_at, changes_at)
    return due, next_at
