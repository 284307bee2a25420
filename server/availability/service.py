"""Availability requests over the protocol: `availability_get`, `schedule_set` and the on-call
roster (`roster_add`, `roster_remove`, `roster_get`).

Each request is one transaction that applies the policy table (`medrelay.server.policy`) to the
requester and target and refuses bad input with `invalid_field` before it writes anything. A
schedule or roster change asks the relay to re-check held messages at once: a clinician who
declares themselves available, or whose hours now include the present, gets what was waiting.

Every change appends its audit record (`schedule_set`, `roster_add`, `roster_remove`) in its own
transaction; a change the policy table forbids is recorded as refused (the attempt commits, the
change does not), as refused care-link changes are. Invalid input is answered but not recorded.
The record names the fields a schedule change set, never their values: an automatic reply's
text, absences and hours stay out of the audit log.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from typing import Final

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from medrelay.crypto.certificates import Role
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import MAX_ROSTER_SHIFTS
from medrelay.protocol.messages import (
    AbsenceSpan,
    Availability,
    AvailabilityGet,
    HoursInterval,
    Message,
    Roster,
    RosterAdd,
    RosterGet,
    RosterRemove,
    RosterShift,
    ScheduleSet,
)
from medrelay.server import audit
from medrelay.server.availability.offhours import OffHours
from medrelay.server.availability.schedule import Absence, Interval, Schedule, ScheduleError
from medrelay.server.enrollment import MAX_PROFILE_FIELD_CHARS
from medrelay.server.policy import Relationship, RequestType, authorize, authorize_standing
from medrelay.server.relay.errors import RelayError, unknown_user
from medrelay.server.relay.store import DeviceRecord
from medrelay.server.storage import availability as store
from medrelay.server.storage import care as care_store
from medrelay.server.storage.database import Database
from medrelay.server.text import has_unprintable

_CLINICIANS: Final = frozenset({Role.DOCTOR.value, Role.NURSE.value})
MAX_OVERRIDE_MS: Final = 24 * 3600 * 1000
""""Available now until ..." reaches at most a day ahead."""
MAX_SHIFT_MS: Final = 14 * 24 * 3600 * 1000


def _invalid(field: str, problem: str) -> RelayError:
    return RelayError(ErrorCode.INVALID_FIELD, f"{field}: {problem}")


def _account(conn: Connection, username: str) -> store.AccountInfo:
    found = store.accounts_txn(conn, [username]).get(username)
    if found is None or not found.active:
        raise unknown_user(username)
    return found


def _check(
    conn: Connection, device: DeviceRecord, request: RequestType, target: str, now: int
) -> None:
    if target == device.username:
        role = Role(device.role)
        refused = authorize(
            request, role, role, Relationship.NONE, target_name=target, own_account=True
        )
    else:
        standing = care_store.standing_txn(conn, device.username, target, now)
        if standing is None:
            raise unknown_user(target)
        refused = authorize_standing(request, Role(device.role), standing)
    if refused is not None:
        raise refused


def availability_txn(
    conn: Connection,
    device: DeviceRecord,
    user: str,
    rid: int,
    offhours: OffHours,
    *,
    now: int,
) -> Availability:
    _check(conn, device, RequestType.AVAILABILITY_GET, user, now)
    account = _account(conn, user)
    if account.role not in _CLINICIANS:
        raise RelayError(
            ErrorCode.INVALID_FIELD, f"{user} is a {account.role}; only clinicians keep hours"
        )
    viewer = store.accounts_txn(conn, [device.username]).get(device.username)
    records = store.schedules_txn(conn, [account.pk] + ([viewer.pk] if viewer else []))
    record = records.get(account.pk)
    clinic_zone = offhours.config.time_zone
    try:
        schedule = store.to_schedule(record, clinic_zone, store.holidays_txn(conn).keys())
    except ScheduleError:
        schedule = None
    state = offhours.availability(schedule, now)
    on_call = None
    if not state.open_now and account.department:
        shift = store.on_call_txn(conn, account.department, now)
        if shift is not None and shift.clinician != user:
            on_call = shift.clinician
    viewer_record = records.get(viewer.pk) if viewer else None
    owner_or_admin = device.username == user or device.role == Role.ADMIN.value
    return Availability(
        rid=rid,
        user=user,
        time_zone=(record.time_zone if record else None) or clinic_zone,
        viewer_time_zone=(viewer_record.time_zone if viewer_record else None) or clinic_zone,
        hours=tuple(
            HoursInterval(i.weekday, i.start_minute, i.end_minute)
            for i in (record.hours if record and record.hours else ())
        ),
        absences=tuple(
            AbsenceSpan(a.first_day.isoformat(), a.last_day.isoformat(), a.reason)
            for a in (record.absences if record else ())
        ),
        open_now=state.open_now,
        policy=offhours.config.policy.value,
        emergency=offhours.config.emergency_numbers,
        scheduled=schedule is not None,
        changes_at_ms=state.changes_at_ms,
        available_until_ms=(
            record.available_until_ms
            if record and record.available_until_ms and record.available_until_ms > now
            else None
        ),
        department=account.department,
        on_call=on_call,
        autoreply=record.autoreply if record and owner_or_admin else None,
    )


def _date(field: str, text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise _invalid(field, f"{text!r} is not a date (YYYY-MM-DD)") from None


def schedule_set_txn(
    conn: Connection, device: DeviceRecord, message: ScheduleSet, offhours: OffHours, now: int
) -> Availability:
    _check(conn, device, RequestType.SCHEDULE_SET, message.user, now)
    account = _account(conn, message.user)
    clinician = account.role in _CLINICIANS
    if not clinician and (
        message.hours is not None
        or message.autoreply is not None
        or message.available_until_ms is not None
        or message.absences is not None
    ):
        raise _invalid("schedule", f"{message.user} is a {account.role}: only a time zone applies")
    time_zone: str | store.Unset = store.UNSET
    hours: tuple[Interval, ...] | store.Unset = store.UNSET
    autoreply: str | store.Unset | None = store.UNSET
    available_until: int | store.Unset | None = store.UNSET
    absence_list: tuple[Absence, ...] | store.Unset = store.UNSET
    if message.time_zone is not None:
        try:
            Schedule(time_zone=message.time_zone, intervals=())
        except ScheduleError as exc:
            raise _invalid("tz", str(exc)) from None
        time_zone = message.time_zone
    if message.hours is not None:
        try:
            hours = tuple(Interval(h.day, h.start, h.end) for h in message.hours)
        except ScheduleError as exc:
            raise _invalid("hours", str(exc)) from None
    if message.autoreply is not None:
        text = message.autoreply.strip()
        if any(ord(c) < 32 and c != "\n" for c in text):
            raise _invalid("autoreply", "control characters are not allowed")
        autoreply = text or None
    if message.available_until_ms is not None:
        until = message.available_until_ms
        if until and not now < until <= now + MAX_OVERRIDE_MS:
            raise _invalid("until", "must be within the next 24 hours (0 clears it)")
        available_until = until or None
    if message.absences is not None:
        spans: list[Absence] = []
        for span in message.absences:
            try:
                spans.append(
                    Absence(_date("from", span.first), _date("to", span.last), span.reason)
                )
            except ScheduleError as exc:
                raise _invalid("absences", str(exc)) from None
        absence_list = tuple(spans)
    store.set_schedule_txn(
        conn,
        account.pk,
        now,
        time_zone=time_zone,
        hours=hours,
        autoreply=autoreply,
        available_until_ms=available_until,
        absence_list=absence_list,
    )
    audit.append_audit_txn(
        conn,
        actor=device.username,
        action=audit.AuditAction.SCHEDULE_SET,
        target=message.user,
        result=audit.AuditResult.OK,
        now_ms=now,
        detail=schedule_fields(message),
    )
    if not clinician:
        return _patient_answer(conn, device, message, offhours)
    return availability_txn(conn, device, message.user, message.rid, offhours, now=now)


def schedule_fields(message: ScheduleSet) -> str:
    """The audit detail of a schedule change: which fields it set (by their protocol names),
    never their values."""
    present = (
        ("tz", message.time_zone),
        ("hours", message.hours),
        ("autoreply", message.autoreply),
        ("until", message.available_until_ms),
        ("absences", message.absences),
    )
    return "fields=" + (",".join(name for name, value in present if value is not None) or "none")


def _patient_answer(
    conn: Connection, device: DeviceRecord, message: ScheduleSet, offhours: OffHours
) -> Availability:
    """A non-clinician's answer: only the zone means anything."""
    account = _account(conn, message.user)
    record = store.schedules_txn(conn, [account.pk]).get(account.pk)
    zone = (record.time_zone if record else None) or offhours.config.time_zone
    return Availability(
        rid=message.rid,
        user=message.user,
        time_zone=zone,
        viewer_time_zone=zone,
        hours=(),
        absences=(),
        open_now=True,
        policy=offhours.config.policy.value,
        emergency=offhours.config.emergency_numbers,
        scheduled=False,
    )


def _shifts(conn: Connection, rid: int, after: int) -> Roster:
    return Roster(
        rid=rid,
        shifts=tuple(
            RosterShift(s.pk, s.clinician, s.department, s.starts_ms, s.ends_ms)
            for s in store.shifts_txn(conn, after, MAX_ROSTER_SHIFTS)
        ),
    )


def roster_add_txn(conn: Connection, device: DeviceRecord, message: RosterAdd, now: int) -> Roster:
    _check(conn, device, RequestType.ROSTER_EDIT, message.clinician, now)
    account = _account(conn, message.clinician)
    if account.role not in _CLINICIANS:
        raise _invalid("clinician", f"{message.clinician} is a {account.role}, not a clinician")
    department = message.department.strip()
    if not department:
        raise _invalid("department", "must not be empty")
    if len(department) > MAX_PROFILE_FIELD_CHARS:
        raise _invalid("department", f"longer than {MAX_PROFILE_FIELD_CHARS} characters")
    if has_unprintable(department):
        raise _invalid("department", "control characters are not allowed")
    if not message.starts_ms < message.ends_ms:
        raise _invalid("ends", "a shift must end after it starts")
    if message.ends_ms <= now:
        raise _invalid("ends", "this shift is already over")
    if message.ends_ms - message.starts_ms > MAX_SHIFT_MS:
        raise _invalid("ends", "a shift lasts at most 14 days")
    shift = store.add_shift_txn(
        conn,
        account.pk,
        department,
        message.starts_ms,
        message.ends_ms,
        now_ms=now,
        created_by=device.username,
    )
    audit.append_audit_txn(
        conn,
        actor=device.username,
        action=audit.AuditAction.ROSTER_ADD,
        target=message.clinician,
        result=audit.AuditResult.OK,
        now_ms=now,
        # The department last: it is free text, and nothing after it can be mistaken for it.
        detail=(
            f"shift={shift}; from={audit.utc_text(message.starts_ms)}; "
            f"to={audit.utc_text(message.ends_ms)}; department={department}"
        ),
    )
    return _shifts(conn, message.rid, now)


def roster_remove_txn(
    conn: Connection, device: DeviceRecord, message: RosterRemove, now: int
) -> Roster:
    role = Role(device.role)
    refused = authorize(
        RequestType.ROSTER_EDIT, role, Role.DOCTOR, Relationship.NONE, target_name="the roster"
    )
    if refused is not None:
        raise refused
    removed = store.remove_shift_txn(conn, message.shift)
    if removed is None:
        raise RelayError(ErrorCode.NOT_FOUND, f"no on-call shift {message.shift}")
    audit.append_audit_txn(
        conn,
        actor=device.username,
        action=audit.AuditAction.ROSTER_REMOVE,
        target=removed.clinician,
        result=audit.AuditResult.OK,
        now_ms=now,
        detail=f"shift={removed.pk}",
    )
    return _shifts(conn, message.rid, now)


def roster_get_txn(conn: Connection, device: DeviceRecord, message: RosterGet, now: int) -> Roster:
    role = Role(device.role)
    refused = authorize(
        RequestType.ROSTER_GET, role, role, Relationship.NONE, target_name="", own_account=True
    )
    if refused is not None:
        raise refused
    return _shifts(conn, message.rid, message.after_ms if message.after_ms is not None else now)


def audited_change_txn(
    conn: Connection,
    change: Callable[[Connection], Message],
    /,
    *,
    device: DeviceRecord,
    action: audit.AuditAction,
    target: str,
    detail: str,
    now: int,
) -> Message | RelayError:
    """Run `change` (which audits what it does). If the policy table forbids it (`forbidden`),
    nothing it did is kept, the attempt is audited as refused, and the error is RETURNED, so
    that this transaction commits the record; other errors are raised (nothing is recorded)."""
    try:
        with conn.begin_nested():
            return change(conn)
    except RelayError as exc:
        if exc.code is not ErrorCode.FORBIDDEN:
            raise
        refusal = exc
    audit.append_audit_txn(
        conn,
        actor=device.username,
        action=action,
        target=target,
        result=audit.AuditResult.REFUSED,
        now_ms=now,
        detail=f"{detail}; reason=forbidden" if detail else "reason=forbidden",
    )
    return refusal


def run_audited_change(
    database: Database,
    desc: str,
    change: Callable[[Connection], Message],
    *,
    device: DeviceRecord,
    action: audit.AuditAction,
    target: str,
    detail: str,
    now: int,
) -> Deferred[Message]:
    """`audited_change_txn` in its own transaction: the answer, or the refusal raised once the
    transaction that audited it has committed."""
    answer: Deferred[Message | RelayError] = database.run_interaction(
        desc,
        audited_change_txn,
        change,
        device=device,
        action=action,
        target=target,
        detail=detail,
        now=now,
    )

    def settled(result: Message | RelayError) -> Message:
        if isinstance(result, RelayError):
            raise result  # audited as refused, and committed
        return result

    return answer.addCallback(settled)


AvailabilityRequest = AvailabilityGet | ScheduleSet | RosterAdd | RosterRemove | RosterGet


class AvailabilityService:
    def __init__(
        self,
        *,
        database: Database,
        clock: IReactorTime,
        offhours: OffHours,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._database = database
        self._clock = clock
        self.offhours = offhours
        self._changed = changed
        """Called after a schedule or roster change (the relay re-checks held messages)."""

    def set_changed(self, changed: Callable[[], None]) -> None:
        self._changed = changed

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def handle(self, device: DeviceRecord, message: AvailabilityRequest) -> Deferred[Message]:
        now = self.now_ms()
        if isinstance(message, AvailabilityGet):
            return self._database.run_interaction(
                "availability_get",
                availability_txn,
                device,
                message.user,
                message.rid,
                self.offhours,
                now=now,
            )
        change: Callable[[Connection], Message]
        if isinstance(message, ScheduleSet):
            change = functools.partial(
                schedule_set_txn, device=device, message=message, offhours=self.offhours, now=now
            )
            action, target, detail = (
                audit.AuditAction.SCHEDULE_SET,
                message.user,
                schedule_fields(message),
            )
        elif isinstance(message, RosterAdd):
            change = functools.partial(roster_add_txn, device=device, message=message, now=now)
            action, target, detail = audit.AuditAction.ROSTER_ADD, message.clinician, ""
        elif isinstance(message, RosterRemove):
            change = functools.partial(roster_remove_txn, device=device, message=message, now=now)
            action, target, detail = audit.AuditAction.ROSTER_REMOVE, "", f"shift={message.shift}"
        else:
            return self._database.run_interaction(
                "roster_get", roster_get_txn, device, message, now
            )
        answer = run_audited_change(
            self._database,
            message.TYPE,
            change,
            device=device,
            action=action,
            target=target,
            detail=detail,
            now=now,
        )

        def changed(result: Message) -> Message:
            self._changed()
            return result

        return answer.addCallback(changed)
