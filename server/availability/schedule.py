"""Clinicians' availability hours: is a clinician open at an instant, and until when?

A `Schedule` is weekly opening hours (`Interval`s) in the local wall-clock time of an IANA time
zone, plus absences, clinic holidays and an "available now until ..." override. `evaluate` says
whether the schedule is open at an instant and when that changes; `next_opening` gives the first
open instant. Everything is pure: instants (integer milliseconds since the Unix epoch, UTC) are
passed in, nothing reads a clock. `parse_interval_spec` and `format_intervals` are the CLI syntax.

Semantics:
- An interval is open on the instants in [start, end), start and end being local wall-clock
  times of its day; end 24:00 is the next day's 00:00.
- Wall-clock time -> instant: the first instant at which the local clock reads that time or
  later. So a time that does not exist (a spring-forward gap) maps to the transition instant
  (02:30 on a day where 02:00 jumps to 03:00 opens at 03:00), and a time that occurs twice (a
  fall-back) maps to its first occurrence, for starts and ends alike. No offset size is assumed
  (Lord Howe shifts by 30 minutes; Moscow and Novosibirsk changed offsets without DST).
- An absence closes the whole local days first_day..last_day; a holiday its whole local day.
  Intervals of a closed day do not exist (one ending at 24:00 before a closed day does not
  spill into it).
- Intervals that overlap or touch merge into one open stretch, also across midnight (Sunday
  24:00 -> Monday 00:00 too) when both days are open.
- The override (`available_until_ms`) opens every instant before it, whatever the hours,
  absences and holidays say; when the hours are open as it ends, the stretch continues.
- `evaluate(at)` looks at the local days from the day before the local date of `at` to
  `horizon_days` days after it. `changes_at_ms` is the end of the current open stretch or the
  next opening, or None when that lies beyond the end of the last of those days (never, or too
  far away to say).
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from medrelay.protocol.hours import HoursSyntaxError, format_hours, parse_hours
from medrelay.protocol.messages import HoursInterval

MINUTES_PER_DAY: Final = 1440
MAX_INTERVALS: Final = 100
MAX_HORIZON_DAYS: Final = 36_600
ABSENCE_REASONS: Final = frozenset({"vacation", "sick", "other"})

_MAX_ZONE_NAME: Final = 64
# IANA names: letters, digits, "_", "+", "-" in "/"-separated parts. Nothing else reaches the
# file system (no "..", no absolute paths, no NUL).
_ZONE_NAME: Final = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_ONE_MS: Final = datetime.timedelta(milliseconds=1)
_ONE_DAY: Final = datetime.timedelta(days=1)
_EPOCH_ORDINAL: Final = datetime.date(1970, 1, 1).toordinal()
_MS_PER_MINUTE: Final = 60_000
# Instants `evaluate` accepts: far enough from the ends of `datetime` for the day arithmetic.
_MIN_MS: Final = (datetime.datetime(1900, 1, 1, tzinfo=datetime.UTC) - _EPOCH) // _ONE_MS
_MAX_MS: Final = (datetime.datetime(9000, 1, 1, tzinfo=datetime.UTC) - _EPOCH) // _ONE_MS


class ScheduleError(ValueError):
    """Bad schedule input; the message is suitable for a user."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_date(value: object) -> bool:
    return isinstance(value, datetime.date) and not isinstance(value, datetime.datetime)


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@dataclass(frozen=True, slots=True)
class Interval:
    """Open hours on one weekday: [start_minute, end_minute) after local midnight."""

    weekday: int  # 0 = Monday ... 6 = Sunday (datetime.weekday())
    start_minute: int  # 0..1439
    end_minute: int  # start_minute < end_minute <= 1440 (1440 = the midnight ending the day)

    def __post_init__(self) -> None:
        if not _is_int(self.weekday) or not 0 <= self.weekday <= 6:
            raise ScheduleError(f"weekday must be 0 (Monday) to 6 (Sunday), not {self.weekday!r}")
        if not _is_int(self.start_minute) or not 0 <= self.start_minute < MINUTES_PER_DAY:
            raise ScheduleError(
                f"start must be a minute of the day, 0 to {MINUTES_PER_DAY - 1}, "
                f"not {self.start_minute!r}"
            )
        if not _is_int(self.end_minute) or not 0 < self.end_minute <= MINUTES_PER_DAY:
            raise ScheduleError(
                f"end must be a minute of the day, 1 to {MINUTES_PER_DAY}, not {self.end_minute!r}"
            )
        if self.end_minute <= self.start_minute:
            raise ScheduleError(
                f"interval {_hhmm(self.start_minute)}-{_hhmm(self.end_minute)} must end after "
                "it starts (split an overnight interval at midnight)"
            )


@dataclass(frozen=True, slots=True)
class Absence:
    """The clinician is away on the whole local days first_day..last_day (both included)."""

    first_day: datetime.date
    last_day: datetime.date
    reason: str  # "vacation" | "sick" | "other"

    def __post_init__(self) -> None:
        if not _is_date(self.first_day) or not _is_date(self.last_day):
            raise ScheduleError("an absence's first and last days must be dates")
        if self.last_day < self.first_day:
            raise ScheduleError(
                f"absence ends ({self.last_day.isoformat()}) before it starts "
                f"({self.first_day.isoformat()})"
            )
        if self.reason not in ABSENCE_REASONS:
            raise ScheduleError(
                f"unknown absence reason {self.reason!r} (expected one of "
                f"{', '.join(sorted(ABSENCE_REASONS))})"
            )


def _load_zone(name: object) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise ScheduleError("a time zone is required (an IANA name such as Europe/Berlin)")
    if len(name) > _MAX_ZONE_NAME or not _ZONE_NAME.fullmatch(name):
        raise ScheduleError(f"unknown time zone {name[:_MAX_ZONE_NAME]!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # not found, not a TZif file (e.g. "zone1970.tab"), or a directory (e.g. "America")
        raise ScheduleError(f"unknown time zone {name!r}") from None


def _tuple_of(value: object, item: type[object]) -> bool:
    return isinstance(value, tuple) and all(isinstance(x, item) for x in value)


_Week = tuple[tuple[tuple[int, int], ...], ...]


def _weekly(intervals: tuple[Interval, ...]) -> _Week:
    """Per weekday, the intervals' [start, end) minutes, sorted, overlapping/touching merged."""
    week: list[tuple[tuple[int, int], ...]] = []
    for weekday in range(7):
        merged: list[tuple[int, int]] = []
        spans = sorted((i.start_minute, i.end_minute) for i in intervals if i.weekday == weekday)
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        week.append(tuple(merged))
    return tuple(week)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A clinician's weekly hours in `time_zone`, with absences, holidays and an override."""

    time_zone: str  # IANA name
    intervals: tuple[Interval, ...]  # any order; overlapping or touching intervals merge
    absences: tuple[Absence, ...] = ()
    holidays: frozenset[datetime.date] = frozenset()  # closed the whole local day
    available_until_ms: int | None = None  # open for every instant before it, whatever else
    # derived in __post_init__, so that evaluate does not redo them on every call
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    _week: _Week = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        zone = _load_zone(self.time_zone)
        if not _tuple_of(self.intervals, Interval):
            raise ScheduleError("intervals must be a tuple of Interval")
        if len(self.intervals) > MAX_INTERVALS:
            raise ScheduleError(
                f"too many intervals ({len(self.intervals)}; at most {MAX_INTERVALS})"
            )
        if not _tuple_of(self.absences, Absence):
            raise ScheduleError("absences must be a tuple of Absence")
        if not isinstance(self.holidays, frozenset) or not all(map(_is_date, self.holidays)):
            raise ScheduleError("holidays must be a frozenset of dates")
        if self.available_until_ms is not None and not _is_int(self.available_until_ms):
            raise ScheduleError("available_until_ms must be an integer number of milliseconds")
        object.__setattr__(self, "_zone", zone)
        object.__setattr__(self, "_week", _weekly(self.intervals))


@dataclass(frozen=True, slots=True)
class Availability:
    """Open now or not, and when that changes (None: not within the search horizon)."""

    open_now: bool
    changes_at_ms: int | None


def local_to_instant_ms(day: datetime.date, minute: int, zone: ZoneInfo) -> int:
    """The instant of local wall-clock time `minute` (0..1440; 1440 is the next day's 00:00) on
    `day` in `zone`: the first instant at which the local clock reads that time or later. A time
    in a spring-forward gap gives the transition instant, a repeated one its first occurrence."""
    if not _is_int(minute) or not 0 <= minute <= MINUTES_PER_DAY:
        raise ScheduleError(f"minute must be 0 to {MINUTES_PER_DAY}, not {minute!r}")
    if not _is_date(day):
        raise ScheduleError(f"day must be a date, not {day!r}")
    return _instant_ms(day, minute, zone)


def _offset_ms(aware: datetime.datetime) -> int:
    offset = aware.utcoffset()
    if offset is None:  # never for a ZoneInfo
        raise ScheduleError("time zone without an offset")
    return offset // _ONE_MS


# A pure function of its arguments; a server evaluates the same few days over and over.
@functools.lru_cache(maxsize=8192)
def _instant_ms(day: datetime.date, minute: int, zone: ZoneInfo) -> int:
    if minute == MINUTES_PER_DAY:
        day, minute = day + _ONE_DAY, 0
    local_ms = ((day.toordinal() - _EPOCH_ORDINAL) * MINUTES_PER_DAY + minute) * _MS_PER_MINUTE
    hour, minute = divmod(minute, 60)
    # The UTC offset in force before (fold=0) and after (fold=1) a transition at this wall time
    # (PEP 495); the same two offsets when there is none.
    offset_before = _offset_ms(
        datetime.datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)
    )
    offset_after = _offset_ms(
        datetime.datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone, fold=1)
    )
    if offset_before >= offset_after:
        # the time exists, once or (a fall-back) twice: its first occurrence
        return local_ms - offset_before
    # A spring-forward gap: read in the offset after it, the time lands before the transition;
    # in the offset before it, after. The answer is the first instant in (before, after] whose
    # clock reads the time or later: the transition.
    wall = datetime.datetime(day.year, day.month, day.day, hour, minute)
    before, after = local_ms - offset_after, local_ms - offset_before
    while after - before > 1:
        middle = (before + after) // 2
        if _wall(middle, zone) >= wall:
            after = middle
        else:
            before = middle
    return after


def _wall(instant_ms: int, zone: ZoneInfo) -> datetime.datetime:
    """The naive local wall-clock time of an instant."""
    return (_EPOCH + instant_ms * _ONE_MS).astimezone(zone).replace(tzinfo=None)


def _closed(schedule: Schedule, day: datetime.date) -> bool:
    return day in schedule.holidays or any(
        a.first_day <= day <= a.last_day for a in schedule.absences
    )


def _open_spans(
    schedule: Schedule, zone: ZoneInfo, first_day: datetime.date, last_day: datetime.date
) -> Iterator[tuple[int, int]]:
    """The non-empty [start, end) instants of the hours of the open days first..last, in order
    (the wall-clock -> instant mapping never decreases, so the order is the days' order).

    Hours that run to 24:00 into hours from 00:00 of the next open day are one span, converted
    to instants once: an always-open week costs one conversion, not two a day."""
    # (day, minute) where hours began that run on to the end of the previous day, if any
    run: tuple[datetime.date, int] | None = None
    day = first_day
    while day <= last_day:
        spans = schedule._week[day.weekday()]
        if spans and _closed(schedule, day):
            spans = ()
        # Per day the spans are sorted and merged: only the first may start at 00:00, only the
        # last end at 24:00.
        if run is not None and not (spans and spans[0][0] == 0):
            yield from _span(run, (day, 0), zone)  # the run ended at this day's midnight
            run = None
        for start_minute, end_minute in spans:
            begin = (day, start_minute) if run is None else run  # a run goes on from 00:00
            run = None
            if end_minute == MINUTES_PER_DAY:
                run = begin
            else:
                yield from _span(begin, (day, end_minute), zone)
        day += _ONE_DAY
    if run is not None:
        yield from _span(run, (day, 0), zone)


def _span(
    begin: tuple[datetime.date, int], end: tuple[datetime.date, int], zone: ZoneInfo
) -> Iterator[tuple[int, int]]:
    start_ms, end_ms = _instant_ms(*begin, zone), _instant_ms(*end, zone)
    if start_ms < end_ms:
        yield start_ms, end_ms


def evaluate(schedule: Schedule, at_ms: int, *, horizon_days: int = 400) -> Availability:
    """Whether `schedule` is open at `at_ms`, and when that next changes (module docstring)."""
    if not _is_int(at_ms) or not _MIN_MS <= at_ms <= _MAX_MS:
        raise ScheduleError(f"instant {at_ms!r} is out of range")
    if not _is_int(horizon_days) or not 0 <= horizon_days <= MAX_HORIZON_DAYS:
        raise ScheduleError(f"horizon_days must be 0 to {MAX_HORIZON_DAYS}, not {horizon_days!r}")
    zone = schedule._zone
    today = _wall(at_ms, zone).date()
    last_day = today + datetime.timedelta(days=horizon_days)
    horizon_end = _instant_ms(last_day, MINUTES_PER_DAY, zone)
    until = schedule.available_until_ms
    # The end of the open stretch containing at_ms; None while closed.
    stretch_end = until if until is not None and at_ms < until else None
    # From the day before: its hours end by today's midnight, at or before at_ms, so they cannot
    # hold at_ms; looking at them too costs little and needs no argument.
    for start, end in _open_spans(schedule, zone, today - _ONE_DAY, last_day):
        if stretch_end is not None:
            if start > stretch_end:
                break
            stretch_end = max(stretch_end, end)
        elif end <= at_ms:
            continue
        elif start <= at_ms:
            stretch_end = end
        else:
            return Availability(open_now=False, changes_at_ms=start)
    if stretch_end is None:
        return Availability(open_now=False, changes_at_ms=None)
    return Availability(
        open_now=True, changes_at_ms=None if stretch_end >= horizon_end else stretch_end
    )


def next_opening(schedule: Schedule, at_ms: int, *, horizon_days: int = 400) -> int | None:
    """The first instant >= at_ms at which `schedule` is open (at_ms itself if open then), or
    None if none within the horizon."""
    availability = evaluate(schedule, at_ms, horizon_days=horizon_days)
    return at_ms if availability.open_now else availability.changes_at_ms


# --- the CLI syntax (medrelay.protocol.hours, shared with the clients) -------------------------


def parse_interval_spec(text: str) -> tuple[Interval, ...]:
    """`medrelay.protocol.hours.parse_hours` as schedule intervals; errors as `ScheduleError`."""
    try:
        parsed = parse_hours(text)
    except HoursSyntaxError as exc:
        raise ScheduleError(str(exc)) from None
    return tuple(Interval(h.day, h.start, h.end) for h in parsed)


def format_intervals(intervals: tuple[Interval, ...]) -> str:
    """Human-readable and parseable, as `medrelay.protocol.hours.format_hours`."""
    return format_hours(HoursInterval(i.weekday, i.start_minute, i.end_minute) for i in intervals)
