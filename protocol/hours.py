"""Weekly hours as people type and read them, shared by the CLI and the server's tools:
"mon-fri 09:00-13:00,14:00-18:00; sat 10:00-12:00" <-> `HoursInterval`s (docs/protocol.md §17).

Pure text handling: what the hours mean (time zones, absences, holidays) is the server's
schedule evaluator's business (medrelay.server.availability.schedule).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from medrelay.protocol.limits import MAX_HOURS_INTERVALS
from medrelay.protocol.messages import HoursInterval

MINUTES_PER_DAY: Final = 1440
MAX_SPEC_LENGTH: Final = 1000
DAY_NAMES: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_TIME: Final = re.compile(r"([0-9]{1,2}):([0-9]{2})")


class HoursSyntaxError(ValueError):
    """Hours that do not parse; the message says where and is suitable for a user."""


def _quote(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def hhmm(minute: int) -> str:
    """A minute of the day as HH:MM (1440 is 24:00)."""
    return f"{minute // 60:02d}:{minute % 60:02d}"


def parse_time(text: str, where: str = "time") -> int:
    """HH:MM (or H:MM, 00:00 to 23:59, or 24:00) as minutes after midnight."""
    match = _TIME.fullmatch(text.strip())
    if match is None:
        raise HoursSyntaxError(f"{where}: bad time {_quote(text)} (expected HH:MM, e.g. 09:30)")
    hour, minute = int(match[1]), int(match[2])
    if minute > 59 or hour > 24 or (hour == 24 and minute != 0):
        raise HoursSyntaxError(f"{where}: bad time {_quote(text)} (00:00 to 23:59, or 24:00)")
    return hour * 60 + minute


def _parse_days(text: str, where: str) -> list[int]:
    days: list[int] = []
    for item in "".join(text.split()).lower().split(","):
        if not item:
            raise HoursSyntaxError(f"{where}: empty day name in {_quote(text)} (stray ','?)")
        ends = item.split("-")
        if len(ends) > 2:
            raise HoursSyntaxError(f"{where}: bad day range {_quote(item)} (expected e.g. mon-fri)")
        numbers: list[int] = []
        for name in ends:
            if name not in DAY_NAMES:
                raise HoursSyntaxError(
                    f"{where}: unknown day {_quote(name)} (expected {', '.join(DAY_NAMES)})"
                )
            numbers.append(DAY_NAMES.index(name))
        first, last = numbers[0], numbers[-1]
        # a range wraps around the week end: fri-mon is fri, sat, sun, mon
        days.extend((first + k) % 7 for k in range((last - first) % 7 + 1))
    return days


def _parse_range(text: str, where: str) -> tuple[int, int]:
    item = "".join(text.split())
    if not item:
        raise HoursSyntaxError(f"{where}: empty time range (stray ','?)")
    ends = item.split("-")
    if len(ends) != 2:
        raise HoursSyntaxError(
            f"{where}: bad time range {_quote(item)} (expected e.g. 09:00-17:00)"
        )
    start, end = parse_time(ends[0], where), parse_time(ends[1], where)
    if start == MINUTES_PER_DAY:
        raise HoursSyntaxError(f"{where}: a time range cannot start at 24:00 ({_quote(item)})")
    if start == end:
        raise HoursSyntaxError(f"{where}: empty time range {_quote(item)}")
    return start, end


def parse_hours(text: str) -> tuple[HoursInterval, ...]:
    """Parse e.g. "mon-fri 09:00-13:00,14:00-18:00; sat 10:00-12:00": groups separated by ";",
    each days (mon..sun, ranges like mon-fri or fri-mon, lists like mon,wed) then time ranges
    HH:MM-HH:MM (or H:MM) separated by ","; day names are case-insensitive, spaces ignored.
    An end of 24:00 is midnight; an end before the start (22:00-06:00) is overnight, into the
    next weekday. Returns the intervals sorted, without repeats (overlaps are kept)."""
    if len(text) > MAX_SPEC_LENGTH:
        raise HoursSyntaxError(
            f"hours are too long ({len(text)} characters; at most {MAX_SPEC_LENGTH})"
        )
    if not text.strip():
        raise HoursSyntaxError("no hours given (e.g. mon-fri 09:00-17:00)")
    intervals: set[tuple[int, int, int]] = set()
    count = 0
    for number, group in enumerate(text.split(";"), start=1):
        where = f"group {number} ({_quote(group.strip())})"
        if not group.strip():
            raise HoursSyntaxError(f"group {number} is empty (stray ';'?)")
        digit = next((i for i, c in enumerate(group) if c in "0123456789"), None)
        if digit is None:
            raise HoursSyntaxError(f"{where}: no times (expected e.g. mon-fri 09:00-17:00)")
        if not group[:digit].strip():
            raise HoursSyntaxError(f"{where}: no days before the times (expected e.g. mon-fri)")
        days = _parse_days(group[:digit], where)
        ranges = [_parse_range(item, where) for item in group[digit:].split(",")]
        for weekday in days:
            for start, end in ranges:
                pieces = [(weekday, start, end)]
                if end < start:  # overnight: to midnight, then on into the next weekday
                    pieces = [(weekday, start, MINUTES_PER_DAY)]
                    if end > 0:
                        pieces.append(((weekday + 1) % 7, 0, end))
                count += len(pieces)
                if count > MAX_HOURS_INTERVALS:
                    raise HoursSyntaxError(f"too many intervals (at most {MAX_HOURS_INTERVALS})")
                intervals.update(pieces)
    return tuple(HoursInterval(*piece) for piece in sorted(intervals))


def format_hours(intervals: Iterable[HoursInterval]) -> str:
    """Human-readable and parseable: "Mon-Fri 09:00-13:00, 14:00-18:00; Sat 10:00-12:00"
    (sorted, repeats dropped, not merged; consecutive days with the same times share a group);
    "no hours" for none."""
    by_day: dict[int, set[tuple[int, int]]] = {}
    for interval in intervals:
        by_day.setdefault(interval.day, set()).add((interval.start, interval.end))
    if not by_day:
        return "no hours"
    groups: list[tuple[int, int, list[tuple[int, int]]]] = []  # first day, last day, times
    for day in sorted(by_day):
        times = sorted(by_day[day])
        if groups and groups[-1][1] == day - 1 and groups[-1][2] == times:
            groups[-1] = (groups[-1][0], day, times)
        else:
            groups.append((day, day, times))

    def days(first: int, last: int) -> str:
        name = DAY_NAMES[first].capitalize()
        return name if first == last else f"{name}-{DAY_NAMES[last].capitalize()}"

    return "; ".join(
        days(first, last) + " " + ", ".join(f"{hhmm(start)}-{hhmm(end)}" for start, end in times)
        for first, last, times in groups
    )
