"""Clinicians' hours, "available until", absences, automatic-reply templates and the on-call
roster, as requests to the relay (docs/protocol.md §17).

The relay decides who is open and who is on call; the client only asks and shows. What the
client must not take on the relay's word is the notice a patient gets when a message lands
outside hours: that is signed by the clinic and checked in `medrelay.clients.engine.messaging`.
"""

from __future__ import annotations

from dataclasses import dataclass

from medrelay.clients.engine.connection import Connector, expect
from medrelay.protocol.messages import (
    AbsenceSpan,
    Availability,
    AvailabilityGet,
    HoursInterval,
    Roster,
    RosterAdd,
    RosterGet,
    RosterRemove,
    RosterShift,
    ScheduleSet,
)


@dataclass(frozen=True, slots=True)
class AbsenceView:
    first: str
    """YYYY-MM-DD, the first local day away."""
    last: str
    reason: str
    """vacation, sick or other."""


@dataclass(frozen=True, slots=True)
class AvailabilityView:
    """A clinician's schedule as the relay evaluates it now."""

    user_id: str
    time_zone: str
    """The zone the hours are in (the clinician's own, or the clinic's)."""
    viewer_time_zone: str
    """The asking user's zone: show times in this one."""
    hours: tuple[HoursInterval, ...]
    absences: tuple[AbsenceView, ...]
    open_now: bool
    scheduled: bool
    """False: no hours were ever set, and the clinician counts as always available."""
    policy: str
    """What happens to a patient's message outside hours: hold or deliver-silently."""
    emergency_numbers: tuple[str, ...]
    changes_at_ms: int | None
    available_until_ms: int | None
    department: str | None
    on_call: str | None
    """While the clinician is away: who answers urgent messages for their department."""
    autoreply: str | None
    """The clinician's own automatic-reply template (shown only to them and admins)."""


@dataclass(frozen=True, slots=True)
class ShiftView:
    shift_id: int
    clinician: str
    department: str
    starts_ms: int
    ends_ms: int


def _view(answer: Availability) -> AvailabilityView:
    return AvailabilityView(
        user_id=answer.user,
        time_zone=answer.time_zone,
        viewer_time_zone=answer.viewer_time_zone,
        hours=answer.hours,
        absences=tuple(AbsenceView(a.first, a.last, a.reason) for a in answer.absences),
        open_now=answer.open_now,
        scheduled=answer.scheduled,
        policy=answer.policy,
        emergency_numbers=answer.emergency,
        changes_at_ms=answer.changes_at_ms,
        available_until_ms=answer.available_until_ms,
        department=answer.department,
        on_call=answer.on_call,
        autoreply=answer.autoreply,
    )


def _shifts(answer: Roster) -> list[ShiftView]:
    return [_shift(s) for s in answer.shifts]


def _shift(s: RosterShift) -> ShiftView:
    return ShiftView(s.shift, s.clinician, s.department, s.starts_ms, s.ends_ms)


async def get_availability(connector: Connector, user_id: str) -> AvailabilityView:
    answer = await connector.request(lambda rid: AvailabilityGet(rid=rid, user=user_id))
    return _view(expect(answer, Availability))


@dataclass(frozen=True, slots=True)
class ScheduleChange:
    """What to change in a schedule: None leaves a field as it is. `autoreply` "" and
    `available_until_ms` 0 clear them; `absences` replaces the whole list."""

    time_zone: str | None = None
    hours: tuple[HoursInterval, ...] | None = None
    autoreply: str | None = None
    available_until_ms: int | None = None
    absences: tuple[AbsenceView, ...] | None = None


async def set_schedule(
    connector: Connector, user_id: str, change: ScheduleChange
) -> AvailabilityView:
    absences = (
        None
        if change.absences is None
        else tuple(AbsenceSpan(a.first, a.last, a.reason) for a in change.absences)
    )
    answer = await connector.request(
        lambda rid: ScheduleSet(
            rid=rid,
            user=user_id,
            time_zone=change.time_zone,
            hours=change.hours,
            autoreply=change.autoreply,
            available_until_ms=change.available_until_ms,
            absences=absences,
        )
    )
    return _view(expect(answer, Availability))


async def roster_add(
    connector: Connector, clinician: str, department: str, starts_ms: int, ends_ms: int
) -> list[ShiftView]:
    answer = await connector.request(
        lambda rid: RosterAdd(
            rid=rid,
            clinician=clinician,
            department=department,
            starts_ms=starts_ms,
            ends_ms=ends_ms,
        )
    )
    return _shifts(expect(answer, Roster))


async def roster_remove(connector: Connector, shift_id: int) -> list[ShiftView]:
    answer = await connector.request(lambda rid: RosterRemove(rid=rid, shift=shift_id))
    return _shifts(expect(answer, Roster))


async def roster_list(connector: Connector, after_ms: int | None = None) -> list[ShiftView]:
    answer = await connector.request(lambda rid: RosterGet(rid=rid, after_ms=after_ms))
    return _shifts(expect(answer, Roster))
