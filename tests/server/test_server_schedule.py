"""Clinicians' availability hours (`medrelay.server.availability.schedule`): validation, the CLI
syntax, the evaluation rules, and a sweep over every UTC-offset transition from 2000 to 2037 in
Europe/Moscow, Asia/Novosibirsk, Europe/Berlin, America/New_York and Australia/Lord_Howe (plus
America/Sao_Paulo, whose transitions are at midnight, and Pacific/Apia, which skipped a whole day
in 2011), checked against an independent oracle. No clock is read: every instant is passed in.

The oracle turns a schedule into a plain sorted list of instant intervals (every interval of
every open day through `local_to_instant_ms`, merged) and answers by bisection. It reuses
`local_to_instant_ms`, which is checked separately: against hand-checked instants, and near every
transition against a brute force over the wall clock (the first instant at which the clock reads
the time or later)."""

from __future__ import annotations

import bisect
import datetime
import functools
from dataclasses import dataclass
from typing import Final
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.protocol.hours import MAX_SPEC_LENGTH
from medrelay.server.availability.schedule import (
    MAX_INTERVALS,
    MINUTES_PER_DAY,
    Absence,
    Availability,
    Interval,
    Schedule,
    ScheduleError,
    evaluate,
    format_intervals,
    local_to_instant_ms,
    next_opening,
    parse_interval_spec,
)

EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
MS: Final = datetime.timedelta(milliseconds=1)
MINUTE: Final = 60_000
HOUR: Final = 60 * MINUTE
DAY: Final = datetime.timedelta(days=1)

SWEEP_ZONES: Final = (
    "Europe/Moscow",
    "Asia/Novosibirsk",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
)
# Transitions at local midnight (spring-forward 00:00 -> 01:00, fall-back 00:00 -> 23:00 of the
# day before), and the day Samoa skipped (2011-12-30 does not exist in Apia).
EXTRA_ZONES: Final = ("America/Sao_Paulo", "Pacific/Apia")

BERLIN: Final = "Europe/Berlin"
# A week of June 2024 in Berlin, far from any transition: 2024-06-03 is a Monday.
MON: Final = datetime.date(2024, 6, 3)


def to_ms(moment: datetime.datetime) -> int:
    return (moment - EPOCH) // MS


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return to_ms(datetime.datetime(year, month, day, hour, minute, tzinfo=datetime.UTC))


def local(zone: str, day: datetime.date, hhmm: str, fold: int = 0) -> int:
    """An unambiguous local time as an instant, straight from zoneinfo."""
    hour, minute = map(int, hhmm.split(":"))
    return to_ms(
        datetime.datetime(
            day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(zone), fold=fold
        )
    )


def berlin(day_offset: int, hhmm: str) -> int:
    """An instant in the June 2024 Berlin week: days after Monday 2024-06-03, at HH:MM."""
    return local(BERLIN, MON + datetime.timedelta(days=day_offset), hhmm)


def wall(instant: int, zone: ZoneInfo) -> datetime.datetime:
    return (EPOCH + instant * MS).astimezone(zone).replace(tzinfo=None)


def hours(
    spec: str,
    zone: str = BERLIN,
    *,
    absences: tuple[Absence, ...] = (),
    holidays: frozenset[datetime.date] = frozenset(),
    until: int | None = None,
) -> Schedule:
    return Schedule(zone, parse_interval_spec(spec), absences, holidays, until)


def state(schedule: Schedule, at: int, horizon_days: int = 400) -> tuple[bool, int | None]:
    result = evaluate(schedule, at, horizon_days=horizon_days)
    return result.open_now, result.changes_at_ms


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weekday", "start", "end", "message"),
    [
        (7, 0, 60, "weekday"),
        (-1, 0, 60, "weekday"),
        (True, 0, 60, "weekday"),
        (0, -1, 60, "start"),
        (0, 1440, 1440, "start"),
        (0, 0, 0, "end"),
        (0, 0, 1441, "end"),
        (0, 600, 600, "must end after it starts"),
        (0, 600, 540, "must end after it starts"),
    ],
)
def test_interval_rejects_bad_ranges(weekday: int, start: int, end: int, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        Interval(weekday, start, end)


def test_interval_rejects_non_integers() -> None:
    with pytest.raises(ScheduleError, match="start"):
        Interval(0, 9.5, 600)  # type: ignore[arg-type]


def test_interval_accepts_the_extremes() -> None:
    assert Interval(6, 0, MINUTES_PER_DAY).end_minute == 1440
    assert Interval(0, 1439, 1440).start_minute == 1439


def test_absence_validation() -> None:
    day = datetime.date(2024, 6, 3)
    for reason in ("vacation", "sick", "other"):
        assert Absence(day, day, reason).reason == reason
    with pytest.raises(ScheduleError, match=r"ends .* before it starts"):
        Absence(day, day - DAY, "sick")
    with pytest.raises(ScheduleError, match="unknown absence reason 'holiday'"):
        Absence(day, day, "holiday")
    with pytest.raises(ScheduleError, match="must be dates"):
        Absence(datetime.datetime(2024, 6, 3, 12), day, "sick")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Nowhere/City",
        "Europe/Berlin ",
        "../etc/passwd",
        "Europe/../Europe/Berlin",
        "/etc/localtime",
        "./UTC",
        "Europe//Berlin",
        "UTC\x00",
        "America",  # a directory of the database
        "zone1970.tab",  # a file of the database that is not a zone
        "tzdata.zi",
        "a" * 300,
    ],
)
def test_schedule_rejects_unknown_time_zones(name: str) -> None:
    with pytest.raises(ScheduleError, match="time zone"):
        Schedule(name, ())


@pytest.mark.parametrize("name", [*SWEEP_ZONES, *EXTRA_ZONES, "UTC", "Etc/GMT-14"])
def test_schedule_accepts_iana_names(name: str) -> None:
    assert Schedule(name, ()).time_zone == name


def test_schedule_validation() -> None:
    interval = Interval(0, 540, 1020)
    with pytest.raises(ScheduleError, match="intervals must be a tuple"):
        Schedule(BERLIN, [interval])  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="too many intervals"):
        Schedule(BERLIN, (interval,) * (MAX_INTERVALS + 1))
    assert len(Schedule(BERLIN, (interval,) * MAX_INTERVALS).intervals) == MAX_INTERVALS
    with pytest.raises(ScheduleError, match="absences must be a tuple"):
        Schedule(BERLIN, (), (interval,))  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="holidays must be a frozenset of dates"):
        Schedule(BERLIN, (), (), frozenset({datetime.datetime(2024, 6, 3)}))
    with pytest.raises(ScheduleError, match="holidays must be a frozenset of dates"):
        Schedule(BERLIN, (), (), {MON})  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="available_until_ms"):
        Schedule(BERLIN, (), available_until_ms=True)
    with pytest.raises(ScheduleError, match="available_until_ms"):
        Schedule(BERLIN, (), available_until_ms=1.5)  # type: ignore[arg-type]


def test_schedules_compare_and_hash_by_their_fields() -> None:
    a = hours("mon-fri 09:00-17:00", holidays=frozenset({MON}))
    b = hours("mon-fri 09:00-17:00", holidays=frozenset({MON}))
    assert a == b
    assert hash(a) == hash(b)
    assert a != hours("mon-fri 09:00-17:00")
    assert "_week" not in repr(a)


@pytest.mark.parametrize(
    ("at", "horizon_days", "message"),
    [
        (0, -1, "horizon_days"),
        (0, 1_000_000, "horizon_days"),
        (-(10**13), 1, "out of range"),
        (10**15, 1, "out of range"),
    ],
)
def test_evaluate_rejects_bad_arguments(at: int, horizon_days: int, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        evaluate(hours("mon 09:00-10:00"), at, horizon_days=horizon_days)
    with pytest.raises(ScheduleError, match=message):
        next_opening(hours("mon 09:00-10:00"), at, horizon_days=horizon_days)


def test_local_to_instant_rejects_bad_minutes() -> None:
    for minute in (-1, 1441):
        with pytest.raises(ScheduleError, match="minute"):
            local_to_instant_ms(MON, minute, ZoneInfo(BERLIN))


# --- the CLI syntax -----------------------------------------------------------------------


def test_parse_a_week() -> None:
    parsed = parse_interval_spec("mon-fri 09:00-13:00,14:00-18:00; sat 10:00-12:00")
    expected = [
        Interval(day, start, end) for day in range(5) for start, end in ((540, 780), (840, 1080))
    ]
    assert parsed == (*expected, Interval(5, 600, 720))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("mon 09:00-17:00", [(0, 540, 1020)]),
        ("MON 9:00-17:00", [(0, 540, 1020)]),
        (
            "  Tue , Thu   8:30 - 12:15 , 13:00-24:00  ",
            [(1, 510, 735), (1, 780, 1440), (3, 510, 735), (3, 780, 1440)],
        ),
        ("mon,wed 10:00-11:00", [(0, 600, 660), (2, 600, 660)]),
        ("sat-sun 00:00-24:00", [(5, 0, 1440), (6, 0, 1440)]),
        ("fri-mon 10:00-11:00", [(0, 600, 660), (4, 600, 660), (5, 600, 660), (6, 600, 660)]),
        ("wed-wed 10:00-11:00", [(2, 600, 660)]),
        ("mon 22:00-06:00", [(0, 1320, 1440), (1, 0, 360)]),
        ("sun 22:00-06:00", [(0, 0, 360), (6, 1320, 1440)]),
        ("sat-sun 20:00-08:00", [(0, 0, 480), (5, 1200, 1440), (6, 0, 480), (6, 1200, 1440)]),
        ("fri 22:00-00:00", [(4, 1320, 1440)]),
        ("mon 23:59-00:01", [(0, 1439, 1440), (1, 0, 1)]),
        # repeats collapse; overlaps are kept (they merge when evaluated)
        ("mon 09:00-10:00; mon 09:00-10:00,09:30-11:00", [(0, 540, 600), (0, 570, 660)]),
        ("mon-sun 00:00-24:00", [(d, 0, 1440) for d in range(7)]),
    ],
)
def test_parse_interval_spec(spec: str, expected: list[tuple[int, int, int]]) -> None:
    assert parse_interval_spec(spec) == tuple(Interval(*i) for i in expected)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no hours given"),
        ("  \n ", "no hours given"),
        ("x" * (MAX_SPEC_LENGTH + 1), "too long"),
        ("mon 09:00-17:00;", "group 2 is empty"),
        ("; mon 09:00-17:00", "group 1 is empty"),
        ("mon", "group 1 .*no times"),
        ("09:00-17:00", "no days before the times"),
        ("mox 09:00-17:00", "unknown day 'mox'"),
        ("monday 09:00-17:00", "unknown day 'monday'"),
        ("mon-fri-sat 09:00-10:00", "bad day range 'mon-fri-sat'"),
        ("mon,,tue 09:00-10:00", "empty day name"),
        ("mon, 09:00-10:00", "empty day name"),
        ("-fri 09:00-10:00", "unknown day ''"),
        ("mon 25:00-26:00", "bad time '25:00'"),
        ("mon 9:5-10:00", "bad time '9:5'"),
        ("mon 09:60-10:00", "bad time '09:60'"),
        ("mon 09:00-24:01", "bad time '24:01'"),
        ("mon 123:00-130:00", "bad time '123:00'"),
        ("mon 0900-1000", "bad time '0900'"),
        ("mon 09.00-10.00", "bad time '09.00'"),
        ("mon 09:00-1x:00", "bad time '1x:00'"),
        ("mon 24:00-01:00", "cannot start at 24:00"),
        ("mon 09:00-09:00", "empty time range '09:00-09:00'"),
        ("mon 00:00-00:00", "empty time range"),
        ("mon 09:00", "bad time range '09:00'"),
        ("mon 09:00-10:00-11:00", "bad time range"),
        ("mon 09:00-10:00,", "empty time range"),
        ("mon 09:00-10:00,,11:00-12:00", "empty time range"),
        ("mon \u0669:00-10:00", "unknown day"),  # an Arabic-Indic nine is not a digit here
        ("mon 09:00-10:00; tue 10:00-1x:00", "group 2 .*bad time"),
        ("mon 09:00-17:00; sat 10:00-12:00; sun x 1:00-2:00", "group 3 .*unknown day 'sunx'"),
    ],
)
def test_parse_rejects_malformed_specs(spec: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_interval_spec(spec)


def test_parse_bounds_the_number_of_intervals() -> None:
    ranges = ",".join(f"{h:02d}:00-{h:02d}:30" for h in range(14))
    assert len(parse_interval_spec("mon-sun " + ranges)) == 98
    with pytest.raises(ScheduleError, match="too many intervals"):
        parse_interval_spec("mon-sun " + ranges + ",20:00-21:00")
    # overnight ranges count twice
    overnight = ",".join(f"{h:02d}:00-{h:02d}:30" for h in range(6)) + ",23:00-01:00"
    assert len(parse_interval_spec("mon-sun " + overnight)) == 56
    more = ",".join(f"{h:02d}:00-{h:02d}:30" for h in range(6, 12))
    assert len(parse_interval_spec(f"mon-sun {overnight}; mon-sun {more}")) == 98
    with pytest.raises(ScheduleError, match="too many intervals"):
        parse_interval_spec(f"mon-sun {overnight}; mon-sun {more},12:00-13:00")


def test_parse_accepts_the_longest_spec() -> None:
    spec = "mon 09:00-10:00" + " " * (MAX_SPEC_LENGTH - 15)
    assert parse_interval_spec(spec) == (Interval(0, 540, 600),)


def test_format_intervals() -> None:
    assert format_intervals(()) == "no hours"
    assert (
        format_intervals(parse_interval_spec("mon-fri 09:00-13:00,14:00-18:00; sat 10:00-12:00"))
        == "Mon-Fri 09:00-13:00, 14:00-18:00; Sat 10:00-12:00"
    )
    assert format_intervals(parse_interval_spec("mon,wed 09:00-10:00; tue,thu 09:00-10:00")) == (
        "Mon-Thu 09:00-10:00"
    )
    assert format_intervals(parse_interval_spec("mon,wed,fri 09:00-10:00")) == (
        "Mon 09:00-10:00; Wed 09:00-10:00; Fri 09:00-10:00"
    )
    assert format_intervals((Interval(6, 1320, 1440), Interval(0, 0, 5))) == (
        "Mon 00:00-00:05; Sun 22:00-24:00"
    )
    # sorted and without repeats, whatever the order given
    shuffled = (Interval(2, 600, 660), Interval(0, 60, 120), Interval(2, 0, 30))
    assert format_intervals(shuffled + shuffled) == "Mon 01:00-02:00; Wed 00:00-00:30, 10:00-11:00"


@pytest.mark.parametrize(
    "spec",
    [
        "mon-fri 09:00-13:00,14:00-18:00; sat 10:00-12:00",
        "sun 22:00-06:00",
        "mon-sun 00:00-24:00",
        "tue 23:59-24:00; wed 00:00-00:01",
        "fri-tue 7:15-8:45,08:30-09:00,22:00-03:00",
        "thu 00:00-00:01",
    ],
)
def test_format_parse_round_trip(spec: str) -> None:
    parsed = parse_interval_spec(spec)
    text = format_intervals(parsed)
    assert parse_interval_spec(text) == parsed
    assert format_intervals(parse_interval_spec(text)) == text


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 6), st.integers(0, MINUTES_PER_DAY - 1), st.integers(1, MINUTES_PER_DAY)
        ).filter(lambda t: t[1] < t[2]),
        max_size=MAX_INTERVALS,
    )
)
def test_format_parse_round_trip_of_any_intervals(raw: list[tuple[int, int, int]]) -> None:
    intervals = tuple(Interval(*r) for r in raw)
    text = format_intervals(intervals)
    if not intervals:
        assert text == "no hours"
    elif len(text) > MAX_SPEC_LENGTH:  # 13 characters an interval: about 75 fit
        with pytest.raises(ScheduleError, match="too long"):
            parse_interval_spec(text)
    else:
        canonical = sorted(set(intervals), key=lambda i: (i.weekday, i.start_minute, i.end_minute))
        assert parse_interval_spec(text) == tuple(canonical)


# --- evaluation rules (June 2024 in Berlin, far from any transition) ---------------------


def test_office_hours() -> None:
    s = hours("mon-fri 09:00-17:00")
    assert state(s, berlin(0, "08:59")) == (False, berlin(0, "09:00"))
    assert state(s, berlin(0, "09:00")) == (True, berlin(0, "17:00"))
    assert state(s, berlin(0, "17:00") - 1) == (True, berlin(0, "17:00"))
    assert state(s, berlin(0, "17:00")) == (False, berlin(1, "09:00"))
    assert state(s, berlin(4, "17:00")) == (False, berlin(7, "09:00"))  # Friday -> Monday
    assert state(s, berlin(5, "12:00")) == (False, berlin(7, "09:00"))
    assert next_opening(s, berlin(0, "10:00")) == berlin(0, "10:00")
    assert next_opening(s, berlin(0, "10:00") + 1) == berlin(0, "10:00") + 1
    assert next_opening(s, berlin(0, "17:00")) == berlin(1, "09:00")
    assert evaluate(s, berlin(0, "08:00")) == Availability(False, berlin(0, "09:00"))


def test_overlapping_and_touching_intervals_merge() -> None:
    s = hours("mon 09:00-12:00,12:00-14:00,13:00-15:00,08:00-08:30; mon 15:00-15:30")
    assert state(s, berlin(0, "08:15")) == (True, berlin(0, "08:30"))
    assert state(s, berlin(0, "08:30")) == (False, berlin(0, "09:00"))
    for hhmm in ("09:00", "11:59", "12:00", "14:30", "15:10"):
        assert state(s, berlin(0, hhmm)) == (True, berlin(0, "15:30"))
    assert state(s, berlin(0, "15:30")) == (False, berlin(7, "08:00"))


def test_a_contained_interval_does_not_shorten_the_stretch() -> None:
    s = hours("mon 09:00-17:00,10:00-11:00")
    assert state(s, berlin(0, "10:30")) == (True, berlin(0, "17:00"))


def test_merging_across_midnight() -> None:
    s = hours("mon 20:00-24:00; tue 00:00-02:00")
    assert state(s, berlin(0, "21:00")) == (True, berlin(1, "02:00"))
    assert state(s, berlin(1, "00:00")) == (True, berlin(1, "02:00"))
    assert state(s, berlin(1, "01:59")) == (True, berlin(1, "02:00"))
    assert state(s, berlin(1, "02:00")) == (False, berlin(7, "20:00"))
    assert state(s, berlin(0, "19:00")) == (False, berlin(0, "20:00"))
    # the same as one overnight range
    assert hours("mon 20:00-02:00").intervals == s.intervals


def test_hours_to_midnight_then_later_hours_the_next_day() -> None:
    s = hours("mon 20:00-24:00; tue 09:00-10:00")
    assert state(s, berlin(0, "21:00")) == (True, berlin(1, "00:00"))
    assert state(s, berlin(1, "00:00")) == (False, berlin(1, "09:00"))
    s = hours("mon 20:00-24:00; tue 00:00-01:00,09:00-10:00")
    assert state(s, berlin(0, "21:00")) == (True, berlin(1, "01:00"))


def test_merging_across_several_midnights() -> None:
    s = hours("mon 20:00-24:00; tue-wed 00:00-24:00; thu 00:00-06:00")
    assert state(s, berlin(0, "21:00")) == (True, berlin(3, "06:00"))
    assert state(s, berlin(2, "12:00")) == (True, berlin(3, "06:00"))


def test_merging_across_sunday_to_monday() -> None:
    s = hours("sun 20:00-24:00; mon 00:00-08:00")
    assert state(s, berlin(6, "21:00")) == (True, berlin(7, "08:00"))
    assert state(s, berlin(7, "07:00")) == (True, berlin(7, "08:00"))
    assert state(s, berlin(7, "08:00")) == (False, berlin(13, "20:00"))
    assert hours("sun 20:00-08:00").intervals == s.intervals


def test_always_open_never_changes_within_the_horizon() -> None:
    s = hours("mon-sun 00:00-24:00")
    assert state(s, berlin(2, "12:00")) == (True, None)
    assert next_opening(s, berlin(2, "12:00")) == berlin(2, "12:00")
    # ... until a holiday
    holiday = MON + datetime.timedelta(days=10)
    s = hours("mon-sun 00:00-24:00", holidays=frozenset({holiday}))
    assert state(s, berlin(2, "12:00")) == (True, berlin(10, "00:00"))
    assert state(s, berlin(10, "00:00")) == (False, berlin(11, "00:00"))


def test_no_hours_never_open() -> None:
    s = Schedule(BERLIN, ())
    assert state(s, berlin(0, "12:00")) == (False, None)
    assert next_opening(s, berlin(0, "12:00")) is None


def test_a_holiday_closes_its_whole_local_day_and_nothing_spills_into_it() -> None:
    tuesday = MON + DAY
    s = hours("mon 20:00-24:00; tue 00:00-02:00,09:00-12:00", holidays=frozenset({tuesday}))
    assert state(s, berlin(0, "21:00")) == (True, berlin(1, "00:00"))
    assert state(s, berlin(1, "00:00")) == (False, berlin(7, "20:00"))
    assert state(s, berlin(1, "10:00")) == (False, berlin(7, "20:00"))
    assert next_opening(s, berlin(0, "23:59")) == berlin(0, "23:59")
    # a holiday the day before does not close the next day's early hours
    s = hours("mon 20:00-24:00; tue 00:00-02:00", holidays=frozenset({MON}))
    assert state(s, berlin(0, "21:00")) == (False, berlin(1, "00:00"))
    assert state(s, berlin(1, "01:00")) == (True, berlin(1, "02:00"))


def test_absences_close_whole_days() -> None:
    away = Absence(MON + DAY, MON + 3 * DAY, "vacation")  # Tuesday to Thursday
    s = hours("mon-fri 09:00-17:00", absences=(away,))
    assert state(s, berlin(0, "10:00")) == (True, berlin(0, "17:00"))
    assert state(s, berlin(0, "17:00")) == (False, berlin(4, "09:00"))
    assert state(s, berlin(2, "12:00")) == (False, berlin(4, "09:00"))
    assert next_opening(s, berlin(1, "00:00")) == berlin(4, "09:00")
    # overlapping absences, and a one-day sick leave
    sick = Absence(MON + 4 * DAY, MON + 4 * DAY, "sick")
    other = Absence(MON + 3 * DAY, MON + 7 * DAY, "other")
    s = hours("mon-fri 09:00-17:00", absences=(away, sick, other))
    assert state(s, berlin(0, "17:00")) == (False, berlin(8, "09:00"))


def test_an_absence_ends_an_open_stretch_at_midnight() -> None:
    s = hours("mon-sun 00:00-24:00", absences=(Absence(MON + DAY, MON + DAY, "sick"),))
    assert state(s, berlin(0, "12:00")) == (True, berlin(1, "00:00"))
    assert state(s, berlin(1, "12:00")) == (False, berlin(2, "00:00"))


def test_override_opens_whatever_the_hours_say() -> None:
    until = berlin(0, "20:00")
    s = hours("mon-fri 09:00-17:00", until=until)
    assert state(s, berlin(0, "18:00")) == (True, until)
    assert state(s, until - 1) == (True, until)
    assert state(s, until) == (False, berlin(1, "09:00"))
    # with no hours at all
    s = Schedule(BERLIN, (), available_until_ms=until)
    assert state(s, berlin(0, "18:00")) == (True, until)
    assert state(s, until) == (False, None)
    assert next_opening(s, until - 1) == until - 1
    assert next_opening(s, until) is None


@pytest.mark.parametrize(
    ("until", "expected_end"),
    [
        ("08:59", "08:59"),  # ends before the hours start: a gap
        ("09:00", "17:00"),  # touches the hours: one stretch
        ("10:00", "17:00"),  # overlaps them
        ("17:00", "17:00"),
        ("18:00", "18:00"),  # outlasts them
    ],
)
def test_override_merges_with_the_hours(until: str, expected_end: str) -> None:
    s = hours("mon-fri 09:00-17:00", until=berlin(0, until))
    assert state(s, berlin(0, "08:00")) == (True, berlin(0, expected_end))


def test_override_continues_through_merged_hours_and_midnight() -> None:
    s = hours("mon 22:00-24:00; tue 00:00-03:00", until=berlin(0, "23:00"))
    assert state(s, berlin(0, "12:00")) == (True, berlin(1, "03:00"))


def test_override_opens_on_holidays_and_absences() -> None:
    s = hours(
        "mon-fri 09:00-17:00",
        holidays=frozenset({MON}),
        absences=(Absence(MON + DAY, MON + DAY, "sick"),),
        until=berlin(1, "12:00"),
    )
    assert state(s, berlin(0, "10:00")) == (True, berlin(1, "12:00"))
    assert state(s, berlin(1, "12:00")) == (False, berlin(2, "09:00"))


def test_override_in_the_past_is_ignored() -> None:
    s = hours("mon-fri 09:00-17:00", until=berlin(-30, "12:00"))
    assert state(s, berlin(0, "08:00")) == (False, berlin(0, "09:00"))


def test_override_beyond_the_horizon() -> None:
    s = hours("mon 09:00-10:00", until=berlin(30, "12:00"))
    assert state(s, berlin(0, "08:00"), horizon_days=10) == (True, None)
    assert state(s, berlin(0, "08:00"), horizon_days=30) == (True, berlin(30, "12:00"))


def test_the_horizon() -> None:
    s = hours("wed 10:00-11:00")
    at = berlin(0, "12:00")  # Monday
    assert state(s, at, horizon_days=0) == (False, None)
    assert state(s, at, horizon_days=1) == (False, None)
    assert state(s, at, horizon_days=2) == (False, berlin(2, "10:00"))
    assert next_opening(s, at, horizon_days=1) is None
    # an opening at the midnight ending the horizon is beyond it; a stretch reaching it too
    s = hours("tue 23:00-24:00; wed 00:00-01:00")
    assert state(s, at, horizon_days=1) == (False, berlin(1, "23:00"))
    assert state(s, berlin(1, "23:30"), horizon_days=0) == (True, None)
    assert state(s, berlin(1, "23:30"), horizon_days=1) == (True, berlin(2, "01:00"))
    assert state(hours("wed 00:00-01:00"), at, horizon_days=1) == (False, None)
    assert state(hours("wed 00:00-01:00"), at, horizon_days=2) == (False, berlin(2, "00:00"))


def test_closed_for_longer_than_the_horizon() -> None:
    away = Absence(MON, MON + datetime.timedelta(days=500), "other")
    s = hours("mon-fri 09:00-17:00", absences=(away,))
    assert state(s, berlin(0, "10:00")) == (False, None)
    assert state(s, berlin(0, "10:00"), horizon_days=501) == (False, berlin(501, "09:00"))


def test_the_day_before_is_looked_at() -> None:
    """At 00:30 on Tuesday, the stretch began on Monday."""
    s = hours("mon 22:00-24:00; tue 00:00-01:00")
    assert state(s, berlin(1, "00:30"), horizon_days=0) == (True, berlin(1, "01:00"))


def test_schedule_in_utc_and_in_a_fixed_offset() -> None:
    day = datetime.date(2030, 1, 7)  # a Monday
    s = Schedule("UTC", parse_interval_spec("mon 09:00-17:00"))
    assert state(s, utc(2030, 1, 7, 8)) == (False, utc(2030, 1, 7, 9))
    s = Schedule("Etc/GMT-14", parse_interval_spec("mon 09:00-17:00"))  # UTC+14
    assert local_to_instant_ms(day, 540, ZoneInfo("Etc/GMT-14")) == utc(2030, 1, 6, 19)
    assert state(s, utc(2030, 1, 6, 19)) == (True, utc(2030, 1, 7, 3))


# --- local wall-clock time -> instant, hand-checked ---------------------------------------


@pytest.mark.parametrize(
    ("zone", "day", "hhmm", "expected_utc"),
    [
        # Berlin, spring forward 2021-03-28 02:00 CET -> 03:00 CEST (01:00 UTC)
        (BERLIN, "2021-03-28", "01:59", "2021-03-28T00:59"),
        (BERLIN, "2021-03-28", "02:00", "2021-03-28T01:00"),
        (BERLIN, "2021-03-28", "02:30", "2021-03-28T01:00"),
        (BERLIN, "2021-03-28", "02:59", "2021-03-28T01:00"),
        (BERLIN, "2021-03-28", "03:00", "2021-03-28T01:00"),
        (BERLIN, "2021-03-28", "03:01", "2021-03-28T01:01"),
        # Berlin, fall back 2021-10-31 03:00 CEST -> 02:00 CET (01:00 UTC): first occurrence
        (BERLIN, "2021-10-31", "01:59", "2021-10-30T23:59"),
        (BERLIN, "2021-10-31", "02:00", "2021-10-31T00:00"),
        (BERLIN, "2021-10-31", "02:30", "2021-10-31T00:30"),
        (BERLIN, "2021-10-31", "02:59", "2021-10-31T00:59"),
        (BERLIN, "2021-10-31", "03:00", "2021-10-31T02:00"),
        # New York, spring forward 2021-03-14 02:00 EST -> 03:00 EDT (07:00 UTC)
        ("America/New_York", "2021-03-14", "01:59", "2021-03-14T06:59"),
        ("America/New_York", "2021-03-14", "02:30", "2021-03-14T07:00"),
        ("America/New_York", "2021-03-14", "03:00", "2021-03-14T07:00"),
        # New York, fall back 2021-11-07 02:00 EDT -> 01:00 EST (06:00 UTC)
        ("America/New_York", "2021-11-07", "00:59", "2021-11-07T04:59"),
        ("America/New_York", "2021-11-07", "01:00", "2021-11-07T05:00"),
        ("America/New_York", "2021-11-07", "01:30", "2021-11-07T05:30"),
        ("America/New_York", "2021-11-07", "02:00", "2021-11-07T07:00"),
        # Lord Howe, +10:30 -> +11 on 2021-10-03 at 02:00 -> 02:30 (2021-10-02 15:30 UTC)
        ("Australia/Lord_Howe", "2021-10-03", "01:59", "2021-10-02T15:29"),
        ("Australia/Lord_Howe", "2021-10-03", "02:00", "2021-10-02T15:30"),
        ("Australia/Lord_Howe", "2021-10-03", "02:15", "2021-10-02T15:30"),
        ("Australia/Lord_Howe", "2021-10-03", "02:29", "2021-10-02T15:30"),
        ("Australia/Lord_Howe", "2021-10-03", "02:30", "2021-10-02T15:30"),
        ("Australia/Lord_Howe", "2021-10-03", "02:31", "2021-10-02T15:31"),
        # Lord Howe, +11 -> +10:30 on 2021-04-04 at 02:00 -> 01:30 (2021-04-03 15:00 UTC)
        ("Australia/Lord_Howe", "2021-04-04", "01:29", "2021-04-03T14:29"),
        ("Australia/Lord_Howe", "2021-04-04", "01:30", "2021-04-03T14:30"),
        ("Australia/Lord_Howe", "2021-04-04", "01:45", "2021-04-03T14:45"),
        ("Australia/Lord_Howe", "2021-04-04", "02:00", "2021-04-03T15:30"),
        # Moscow, +3 -> +4 for good on 2011-03-27 at 02:00 -> 03:00 (2011-03-26 23:00 UTC)
        ("Europe/Moscow", "2011-03-27", "01:59", "2011-03-26T22:59"),
        ("Europe/Moscow", "2011-03-27", "02:30", "2011-03-26T23:00"),
        ("Europe/Moscow", "2011-03-27", "03:00", "2011-03-26T23:00"),
        # Moscow, +4 -> +3 on 2014-10-26 at 02:00 -> 01:00 (2014-10-25 22:00 UTC)
        ("Europe/Moscow", "2014-10-26", "00:59", "2014-10-25T20:59"),
        ("Europe/Moscow", "2014-10-26", "01:00", "2014-10-25T21:00"),
        ("Europe/Moscow", "2014-10-26", "01:30", "2014-10-25T21:30"),
        ("Europe/Moscow", "2014-10-26", "02:00", "2014-10-25T23:00"),
        # Novosibirsk, +6 -> +7 on 2016-07-24 at 02:00 -> 03:00 (2016-07-23 20:00 UTC)
        ("Asia/Novosibirsk", "2016-07-24", "01:59", "2016-07-23T19:59"),
        ("Asia/Novosibirsk", "2016-07-24", "02:00", "2016-07-23T20:00"),
        ("Asia/Novosibirsk", "2016-07-24", "02:30", "2016-07-23T20:00"),
        ("Asia/Novosibirsk", "2016-07-24", "03:00", "2016-07-23T20:00"),
        # Novosibirsk, +7 -> +6 on 2014-10-26 at 02:00 -> 01:00 (2014-10-25 19:00 UTC)
        ("Asia/Novosibirsk", "2014-10-26", "01:30", "2014-10-25T18:30"),
        ("Asia/Novosibirsk", "2014-10-26", "02:00", "2014-10-25T20:00"),
        # Sao Paulo, spring forward at midnight 2018-11-04 00:00 -> 01:00 (03:00 UTC)
        ("America/Sao_Paulo", "2018-11-04", "00:00", "2018-11-04T03:00"),
        ("America/Sao_Paulo", "2018-11-03", "24:00", "2018-11-04T03:00"),
        ("America/Sao_Paulo", "2018-11-04", "00:30", "2018-11-04T03:00"),
        ("America/Sao_Paulo", "2018-11-04", "01:00", "2018-11-04T03:00"),
        # Sao Paulo, fall back 2019-02-17 00:00 -> 2019-02-16 23:00 (02:00 UTC)
        ("America/Sao_Paulo", "2019-02-16", "23:30", "2019-02-17T01:30"),
        ("America/Sao_Paulo", "2019-02-16", "24:00", "2019-02-17T03:00"),
        ("America/Sao_Paulo", "2019-02-17", "00:00", "2019-02-17T03:00"),
        # Apia skipped 2011-12-30: 2011-12-29 24:00 (-10) -> 2011-12-31 00:00 (+14), 10:00 UTC
        ("Pacific/Apia", "2011-12-29", "23:59", "2011-12-30T09:59"),
        ("Pacific/Apia", "2011-12-30", "00:00", "2011-12-30T10:00"),
        ("Pacific/Apia", "2011-12-30", "12:00", "2011-12-30T10:00"),
        ("Pacific/Apia", "2011-12-30", "24:00", "2011-12-30T10:00"),
        ("Pacific/Apia", "2011-12-31", "00:01", "2011-12-30T10:01"),
    ],
)
def test_local_to_instant_hand_checked(zone: str, day: str, hhmm: str, expected_utc: str) -> None:
    hour, minute = map(int, hhmm.split(":"))
    got = local_to_instant_ms(datetime.date.fromisoformat(day), hour * 60 + minute, ZoneInfo(zone))
    expected = to_ms(datetime.datetime.fromisoformat(expected_utc).replace(tzinfo=datetime.UTC))
    assert got == expected


# --- the oracle ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Oracle:
    """A schedule as a plain sorted list of disjoint open instant intervals over local days
    first_day..last_day, built independently of the module's evaluation."""

    zone: ZoneInfo
    first_day: datetime.date
    last_day: datetime.date
    starts: list[int]
    ends: list[int]

    @classmethod
    def of(cls, schedule: Schedule, first_day: datetime.date, last_day: datetime.date) -> Oracle:
        zone = ZoneInfo(schedule.time_zone)
        spans: list[tuple[int, int]] = []
        if schedule.available_until_ms is not None:
            spans.append((-(2**62), schedule.available_until_ms))
        day = first_day
        while day <= last_day:
            closed = day in schedule.holidays or any(
                a.first_day <= day <= a.last_day for a in schedule.absences
            )
            for i in schedule.intervals:
                if not closed and i.weekday == day.weekday():
                    start = local_to_instant_ms(day, i.start_minute, zone)
                    end = local_to_instant_ms(day, i.end_minute, zone)
                    if start < end:
                        spans.append((start, end))
            day += DAY
        starts: list[int] = []
        ends: list[int] = []
        for start, end in sorted(spans):
            if starts and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        return cls(zone, first_day, last_day, starts, ends)

    def is_open(self, at: int) -> bool:
        i = bisect.bisect_right(self.starts, at) - 1
        return i >= 0 and at < self.ends[i]

    def answer(self, at: int, horizon_days: int) -> tuple[bool, int | None]:
        """(open now, changes at) as `evaluate` must give them."""
        today = wall(at, self.zone).date()
        last_day = today + datetime.timedelta(days=horizon_days)
        assert self.first_day <= today - DAY
        assert last_day <= self.last_day
        horizon_end = local_to_instant_ms(last_day, MINUTES_PER_DAY, self.zone)
        i = bisect.bisect_right(self.starts, at) - 1
        if i >= 0 and at < self.ends[i]:
            return True, self.ends[i] if self.ends[i] < horizon_end else None
        if i + 1 < len(self.starts) and self.starts[i + 1] < horizon_end:
            return False, self.starts[i + 1]
        return False, None

    def boundaries(self) -> list[int]:
        return [b for b in self.starts + self.ends if abs(b) < 2**62]


def check(
    schedule: Schedule,
    oracle: Oracle,
    at: int,
    horizon_days: int,
    context: str,
    *,
    with_next_opening: bool = True,
) -> None:
    expected = oracle.answer(at, horizon_days)
    got = evaluate(schedule, at, horizon_days=horizon_days)
    assert (got.open_now, got.changes_at_ms) == expected, (context, at, wall(at, oracle.zone))
    if with_next_opening:
        opening = next_opening(schedule, at, horizon_days=horizon_days)
        assert opening == (at if expected[0] else expected[1]), (context, at)


def test_oracle_sanity() -> None:
    s = hours("mon 09:00-12:00,11:00-13:00; tue 00:00-01:00; mon 23:00-24:00")
    oracle = Oracle.of(s, MON - 7 * DAY, MON + 20 * DAY)
    assert oracle.answer(berlin(0, "10:00"), 5) == (True, berlin(0, "13:00"))
    assert oracle.answer(berlin(0, "23:30"), 5) == (True, berlin(1, "01:00"))
    assert oracle.answer(berlin(0, "13:00"), 5) == (False, berlin(0, "23:00"))
    assert oracle.answer(berlin(1, "01:00"), 5) == (False, None)
    assert oracle.answer(berlin(1, "01:00"), 6) == (False, berlin(7, "09:00"))


# --- UTC-offset transitions -------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    zone: str
    instant: int  # the first instant in the new offset
    old_offset: int  # ms
    new_offset: int  # ms

    @property
    def old_wall(self) -> datetime.datetime:
        """The wall clock at the transition, read in the old offset (02:00 spring, 03:00 fall)."""
        return (EPOCH + (self.instant + self.old_offset) * MS).replace(tzinfo=None)

    @property
    def new_wall(self) -> datetime.datetime:
        """The wall clock at the transition (03:00 spring, 02:00 fall)."""
        return (EPOCH + (self.instant + self.new_offset) * MS).replace(tzinfo=None)

    def __str__(self) -> str:
        return f"{self.zone} {self.old_wall.isoformat()} -> {self.new_wall.isoformat()}"


def offset_ms(instant: int, zone: ZoneInfo) -> int:
    offset = (EPOCH + instant * MS).astimezone(zone).utcoffset()
    assert offset is not None
    return offset // MS


@functools.cache
def transitions(zone_name: str) -> tuple[Transition, ...]:
    """Every change of UTC offset from 2000-01-01 to 2037-12-31 (UTC), to the millisecond:
    sampled every 6 hours, then bisected."""
    zone = ZoneInfo(zone_name)
    step = 6 * HOUR
    found: list[Transition] = []
    previous, previous_offset = utc(2000, 1, 1), offset_ms(utc(2000, 1, 1), zone)
    for sample in range(previous + step, utc(2038, 1, 1), step):
        offset = offset_ms(sample, zone)
        if offset != previous_offset:
            low, high = previous, sample  # offset(low) is the old one, offset(high) the new
            while high - low > 1:
                middle = (low + high) // 2
                if offset_ms(middle, zone) == previous_offset:
                    low = middle
                else:
                    high = middle
            found.append(Transition(zone_name, high, previous_offset, offset))
        previous, previous_offset = sample, offset
    return tuple(found)


def test_transitions_found() -> None:
    counts = {zone: len(transitions(zone)) for zone in SWEEP_ZONES}
    # Berlin, New York and Lord Howe: two a year. Moscow and Novosibirsk: two a year to 2010,
    # the last spring-forward in March 2011 (kept as permanent summer time), back in October
    # 2014; Novosibirsk again +1 hour in July 2016.
    assert counts == {
        "Europe/Moscow": 24,
        "Asia/Novosibirsk": 25,
        "Europe/Berlin": 76,
        "America/New_York": 76,
        "Australia/Lord_Howe": 76,
    }
    moscow = {
        (t.instant, t.old_offset // MINUTE, t.new_offset // MINUTE)
        for t in transitions("Europe/Moscow")
    }
    assert (utc(2011, 3, 26, 23), 180, 240) in moscow
    assert (utc(2014, 10, 25, 22), 240, 180) in moscow
    novosibirsk = transitions("Asia/Novosibirsk")
    assert novosibirsk[-1].instant == utc(2016, 7, 23, 20)
    assert (novosibirsk[-1].old_offset, novosibirsk[-1].new_offset) == (6 * HOUR, 7 * HOUR)
    # Lord Howe shifts by half an hour
    assert {abs(t.new_offset - t.old_offset) for t in transitions("Australia/Lord_Howe")} == {
        30 * MINUTE
    }
    # Apia moved across the date line: +24 hours
    apia = {t.instant: t.new_offset - t.old_offset for t in transitions("Pacific/Apia")}
    assert apia[utc(2011, 12, 30, 10)] == 24 * HOUR
    for zone in SWEEP_ZONES + EXTRA_ZONES:
        for t in transitions(zone):
            assert t.instant % MINUTE == 0, t
            assert offset_ms(t.instant - 1, ZoneInfo(zone)) == t.old_offset
            assert offset_ms(t.instant, ZoneInfo(zone)) == t.new_offset


def brute_force_instants(t: Transition, walls: list[datetime.datetime]) -> list[int]:
    """For each wall time, the first instant (on the minute grid around the transition) at which
    the local clock reads that time or later, from the wall clock alone."""
    zone = ZoneInfo(t.zone)
    reach = 6 * HOUR + abs(t.new_offset - t.old_offset)
    grid = list(range(t.instant - reach, t.instant + reach + 1, MINUTE))
    highest: list[datetime.datetime] = []  # the latest wall-clock reading so far
    for instant in grid:
        reading = wall(instant, zone)
        highest.append(max(highest[-1], reading) if highest else reading)
    results = []
    for w in walls:
        i = bisect.bisect_left(highest, w)
        assert 0 < i < len(grid), (str(t), w)
        results.append(grid[i])
    return results


def wall_minutes(
    low: datetime.datetime, high: datetime.datetime, step: int
) -> list[datetime.datetime]:
    out = []
    w = low
    while w <= high:
        out.append(w)
        w += datetime.timedelta(minutes=step)
    return out


@pytest.mark.parametrize("zone_name", SWEEP_ZONES + EXTRA_ZONES)
def test_local_to_instant_matches_the_wall_clock_at_every_transition(zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    for t in transitions(zone_name):
        low, high = sorted((t.old_wall, t.new_wall))
        walls = wall_minutes(low - datetime.timedelta(hours=3), low, 10)
        walls += wall_minutes(low, high, 1 if high - low <= datetime.timedelta(hours=2) else 30)
        walls += wall_minutes(high, high + datetime.timedelta(hours=3), 10)
        expected = brute_force_instants(t, walls)
        for w, instant in zip(walls, expected, strict=True):
            minute = w.hour * 60 + w.minute
            assert local_to_instant_ms(w.date(), minute, zone) == instant, (str(t), w)
            if minute == 0:
                assert local_to_instant_ms(w.date() - DAY, 1440, zone) == instant


def wall_span(start: datetime.datetime, end: datetime.datetime) -> list[Interval]:
    """The weekly intervals covering the wall-clock span [start, end), split at midnights."""
    out: list[Interval] = []
    while start < end:
        midnight = datetime.datetime.combine(start.date() + DAY, datetime.time())
        piece_end = min(end, midnight)
        end_minute = (
            MINUTES_PER_DAY if piece_end == midnight else piece_end.hour * 60 + piece_end.minute
        )
        out.append(Interval(start.weekday(), start.hour * 60 + start.minute, end_minute))
        start = piece_end
    return out


def sweep_schedules(t: Transition) -> list[tuple[str, Schedule]]:
    """Schedules around one transition: intervals that surround it, start or end at the wall
    times of the gap or overlap (its first and last minute and its middle), lie inside it,
    straddle it overnight; with the override ending at it, absences and holidays."""
    low, high = sorted((t.old_wall, t.new_wall))  # the gap or the repeated wall times
    middle = low + (high - low) // 2
    middle -= datetime.timedelta(seconds=middle.second, microseconds=middle.microsecond)
    h = datetime.timedelta(hours=1)
    first_day = datetime.datetime.combine(low.date(), datetime.time())
    last_day = datetime.datetime.combine(high.date() + DAY, datetime.time())
    spans = {
        "whole days": (first_day, last_day),
        "ends at the start": (low - 3 * h, low),
        "ends at the end": (high - 3 * h, high),
        "ends inside": (middle - 3 * h, middle),
        "starts at the start": (low, low + 3 * h),
        "starts at the end": (high, high + 3 * h),
        "starts inside": (middle, middle + 3 * h),
        "inside": (low + datetime.timedelta(minutes=1), high - datetime.timedelta(minutes=1)),
        "overnight": (low - 6 * h, high + 6 * h),
    }
    out = [
        (name, Schedule(t.zone, tuple(wall_span(a, b)))) for name, (a, b) in spans.items() if a < b
    ]
    office = tuple(parse_interval_spec("mon-sun 09:00-17:00"))
    overnight = tuple(wall_span(*spans["overnight"]))
    out += [
        (
            "override to the transition",
            Schedule(t.zone, tuple(wall_span(high, high + 2 * h)), available_until_ms=t.instant),
        ),
        (
            "override past the transition",
            Schedule(
                t.zone, tuple(wall_span(low - 3 * h, low)), available_until_ms=t.instant + HOUR
            ),
        ),
        (
            "absence on the transition day",
            Schedule(t.zone, office + overnight, (Absence(low.date(), low.date(), "sick"),)),
        ),
        (
            "holiday the day before",
            Schedule(t.zone, office + overnight, holidays=frozenset({low.date() - DAY})),
        ),
    ]
    return out


@pytest.mark.parametrize("zone_name", SWEEP_ZONES + EXTRA_ZONES)
def test_every_transition_against_the_oracle(zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    horizon = 8
    for t in transitions(zone_name):
        low, high = sorted((t.old_wall, t.new_wall))
        window_start = local_to_instant_ms(low.date() - DAY, 0, zone)
        window_end = local_to_instant_ms(high.date() + 2 * DAY, 0, zone)
        grid = range(window_start, window_end + 1, 6 * HOUR)
        for name, schedule in sweep_schedules(t):
            oracle = Oracle.of(schedule, low.date() - 3 * DAY, high.date() + 12 * DAY)
            # every open stretch's start and end, and the transition: just before and at them
            edges = {t.instant - 1, t.instant, t.instant + 1}
            for b in oracle.boundaries():
                if window_start <= b <= window_end:
                    edges.update((b - 1, b))
            for at in sorted(edges):
                check(schedule, oracle, at, horizon, f"{t} {name}")
            for at in grid:
                check(schedule, oracle, at, horizon, f"{t} {name}", with_next_opening=False)


@pytest.mark.parametrize("zone_name", SWEEP_ZONES)
def test_absence_spanning_each_transition(zone_name: str) -> None:
    """Office hours, an absence from two days before the transition to the day after: closed
    throughout, and the next opening is 09:00 local on the far side, in the new offset."""
    zone = ZoneInfo(zone_name)
    office = parse_interval_spec("mon-sun 09:00-17:00")
    for t in transitions(zone_name):
        day = t.old_wall.date()
        away = Absence(day - 2 * DAY, day + DAY, "vacation")
        s = Schedule(zone_name, office, (away,))
        before = day - 3 * DAY
        back = local(zone_name, day + 2 * DAY, "09:00")
        assert offset_ms(back, zone) == t.new_offset
        assert state(s, local(zone_name, before, "16:59")) == (
            True,
            local(zone_name, before, "17:00"),
        )
        at = local(zone_name, before, "17:00")
        while at < back:
            assert state(s, at) == (False, back), (str(t), wall(at, zone))
            assert next_opening(s, at) == back
            at += 5 * HOUR + 7 * MINUTE
        for at in (t.instant - 1, t.instant, t.instant + 1, back - 1):
            assert state(s, at) == (False, back)
        assert state(s, back) == (True, local(zone_name, day + 2 * DAY, "17:00"))


@pytest.mark.parametrize("zone_name", SWEEP_ZONES)
def test_hold_spanning_each_transition(zone_name: str) -> None:
    """Closed overnight across a transition: the next opening is 09:00 local of the next day,
    which is the naive 16 hours after 17:00 corrected by the change of offset."""
    office = parse_interval_spec("mon-sun 09:00-17:00")
    s = Schedule(zone_name, office)
    for t in transitions(zone_name):
        evening = t.old_wall.date() - DAY  # every transition here is in the small hours
        closing = local(zone_name, evening, "17:00")
        opening = local(zone_name, evening + DAY, "09:00")
        assert closing < t.instant < opening, str(t)
        shift = t.new_offset - t.old_offset
        assert opening - closing == 16 * HOUR - shift
        for at in (closing, t.instant - 1, t.instant, t.instant + 1, opening - 1):
            assert state(s, at) == (False, opening), (str(t), at)
            assert next_opening(s, at) == opening
        assert state(s, opening) == (True, local(zone_name, evening + DAY, "17:00"))
        # the same with an override held until the transition, then hours
        held = Schedule(zone_name, office, available_until_ms=t.instant)
        assert state(held, closing) == (True, t.instant)
        assert state(held, t.instant) == (False, opening)


# --- random schedules against the oracle --------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Schedule, int, int]:
    zone_transitions = transitions(draw(st.sampled_from(SWEEP_ZONES + EXTRA_ZONES)))
    t = zone_transitions[draw(st.integers(0, len(zone_transitions) - 1))]
    at = t.instant + draw(st.integers(-3 * 24 * HOUR, 3 * 24 * HOUR))
    if draw(st.booleans()):
        at -= at % MINUTE
    day = wall(t.instant, ZoneInfo(t.zone)).date()
    # ends at 24:00 and starts at 00:00 often, and near the usual transition times
    minutes = st.integers(0, MINUTES_PER_DAY) | st.sampled_from(
        [0, 0, 60, 90, 120, 150, 180, 1380, 1410, 1440, 1440]
    )
    raw = draw(st.lists(st.tuples(st.integers(0, 6), minutes, minutes), max_size=6))
    intervals = tuple(Interval(d, min(a, b), max(a, b)) for d, a, b in raw if a != b)
    near = st.integers(-4, 4).map(lambda k: day + k * DAY)
    holidays = frozenset(draw(st.lists(near, max_size=2)))
    absences = tuple(
        Absence(first, first + k * DAY, "other")
        for first, k in draw(st.lists(st.tuples(near, st.integers(0, 3)), max_size=2))
    )
    until = draw(st.none() | st.integers(-2 * 24 * HOUR, 2 * 24 * HOUR).map(t.instant.__add__))
    schedule = Schedule(t.zone, intervals, absences, holidays, until)
    return schedule, at, draw(st.integers(0, 10))


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_random_schedules_near_transitions(scenario: tuple[Schedule, int, int]) -> None:
    schedule, at, horizon = scenario
    today = wall(at, ZoneInfo(schedule.time_zone)).date()
    oracle = Oracle.of(schedule, today - DAY, today + horizon * DAY)
    check(schedule, oracle, at, horizon, repr(schedule))
