"""The audit records of availability changes over the protocol (`AvailabilityService` on the
SQL stores, a fake clock, no threads): schedule_set by the clinician and by an admin, naming the
fields set and never their values; roster_add and roster_remove with the shift; a change the
policy table forbids recorded as refused while nothing changes; invalid input recorded not at
all; and a chain that still verifies."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from store_worlds import SqlWorld, postgres_world, result, sqlite_world
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from medrelay.crypto.keys import SigningKey
from medrelay.crypto.rng import seeded_rng
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.messages import (
    AbsenceSpan,
    Availability,
    HoursInterval,
    Message,
    Roster,
    RosterAdd,
    RosterRemove,
    ScheduleSet,
)
from medrelay.server import audit
from medrelay.server.availability.offhours import AvailabilityConfig, OffHours
from medrelay.server.availability.service import AvailabilityService, schedule_fields
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.store import DeviceRecord
from medrelay.server.storage import availability as availability_store
from medrelay.server.storage.schema import accounts

ZONE = "Europe/Berlin"
NOW_S = datetime.datetime(2026, 11, 23, 8, 0, tzinfo=datetime.UTC).timestamp()
NOW_MS = int(NOW_S * 1000)
HOUR_MS = 3_600_000
SECRET_REPLY = "Gone fishing at the lake house; call my wife"

Row = tuple[str, str, str, str, str]


class World:
    def __init__(self, sql: SqlWorld) -> None:
        self.sql = sql
        self.clock = Clock()
        self.clock.advance(NOW_S)
        issuing = SigningKey.generate(seeded_rng(b"issuing"))
        self.service = AvailabilityService(
            database=sql.db,
            clock=self.clock,
            offhours=OffHours(
                clinic_id="clinic.test",
                config=AvailabilityConfig(time_zone=ZONE),
                issuing_key=lambda: issuing,
            ),
        )
        self.changes = 0
        self.service.set_changed(self._changed)
        self.devices: dict[str, DeviceRecord] = {}
        for name, role in (
            ("doc", "doctor"),
            ("oncall", "doctor"),
            ("nurse", "nurse"),
            ("pat", "patient"),
            ("desk", "registrar"),
            ("boss", "admin"),
        ):
            sql.add_account(name, role)
            self.devices[name] = sql.add_device(name, "d1", signing_key=bytes(32))
        sql.run(
            lambda conn: conn.execute(
                sa.update(accounts)
                .where(accounts.c.username.in_(["doc", "oncall"]))
                .values(department="cardiology")
            )
        )

    def _changed(self) -> None:
        self.changes += 1

    def ask(self, who: str, message: ScheduleSet | RosterAdd | RosterRemove) -> Message:
        return result(self.service.handle(self.devices[who], message))

    def refused(self, who: str, message: ScheduleSet | RosterAdd | RosterRemove) -> RelayError:
        d: Deferred[Message] = self.service.handle(self.devices[who], message)
        outcome: list[object] = []
        d.addBoth(outcome.append)
        (failure,) = outcome
        assert isinstance(failure, Failure), failure
        assert isinstance(failure.value, RelayError), failure.value
        return failure.value

    def records(self) -> list[Row]:
        entries = self.sql.run(audit.list_audit_txn, limit=1000)
        return [
            (e.record.actor, e.record.action, e.record.target, e.record.result, e.record.detail)
            for e in entries
        ]

    def pk(self, username: str) -> int:
        return self.sql.run(availability_store.accounts_txn, [username])[username].pk

    def shifts(self) -> list[availability_store.Shift]:
        return self.sql.run(availability_store.shifts_txn, 0, 100)


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "sqlite":
        sql = sqlite_world(request.getfixturevalue("sqlite_relay_template"), tmp_path)
    else:
        sql = postgres_world(request.getfixturevalue("postgres_relay_url"))
    try:
        yield World(sql)
    finally:
        sql.close()


WEEKDAYS = tuple(HoursInterval(day, 9 * 60, 17 * 60) for day in range(5))


# --- schedule_set -------------------------------------------------------------------------------


def test_a_clinician_changing_their_schedule_is_audited_by_field_never_by_value(
    world: World,
) -> None:
    answer = world.ask(
        "doc",
        ScheduleSet(
            rid=1,
            user="doc",
            hours=WEEKDAYS,
            autoreply=SECRET_REPLY,
            absences=(AbsenceSpan("2026-12-01", "2026-12-05", "sick"),),
        ),
    )
    assert isinstance(answer, Availability) and answer.scheduled
    assert world.records() == [
        ("doc", "schedule_set", "doc", "ok", "fields=hours,autoreply,absences"),
    ]
    assert world.changes == 1
    every_field = " ".join(" ".join(row) for row in world.records())
    assert "fishing" not in every_field and "sick" not in every_field
    assert "09:00" not in every_field and "2026-12-01" not in every_field


def test_an_admin_changing_a_clinicians_schedule_is_audited_under_the_admin(world: World) -> None:
    world.ask(
        "boss",
        ScheduleSet(rid=1, user="doc", time_zone="Asia/Novosibirsk", available_until_ms=NOW_MS + 1),
    )
    world.ask("boss", ScheduleSet(rid=2, user="nurse", hours=WEEKDAYS, autoreply=""))
    assert world.records() == [
        ("boss", "schedule_set", "doc", "ok", "fields=tz,until"),
        ("boss", "schedule_set", "nurse", "ok", "fields=hours,autoreply"),
    ]


def test_a_patient_setting_their_time_zone_is_audited(world: World) -> None:
    world.ask("pat", ScheduleSet(rid=1, user="pat", time_zone="Asia/Yekaterinburg"))
    assert world.records() == [("pat", "schedule_set", "pat", "ok", "fields=tz")]


@pytest.mark.parametrize("who", ["pat", "nurse", "desk"])
def test_a_forbidden_schedule_change_is_audited_as_refused_and_changes_nothing(
    world: World, who: str
) -> None:
    error = world.refused(who, ScheduleSet(rid=1, user="doc", hours=WEEKDAYS))
    assert error.code is ErrorCode.FORBIDDEN
    assert world.records() == [
        (who, "schedule_set", "doc", "refused", "fields=hours; reason=forbidden"),
    ]
    assert world.sql.run(availability_store.schedules_txn, [world.pk("doc")]) == {}
    assert world.changes == 0


def test_invalid_input_and_unknown_users_are_answered_but_not_audited(world: World) -> None:
    bad_zone = world.refused("doc", ScheduleSet(rid=1, user="doc", time_zone="Mars/Olympus"))
    assert bad_zone.code is ErrorCode.INVALID_FIELD
    late = world.refused("doc", ScheduleSet(rid=2, user="doc", available_until_ms=NOW_MS - 1))
    assert late.code is ErrorCode.INVALID_FIELD
    ghost = world.refused("boss", ScheduleSet(rid=3, user="ghost", hours=WEEKDAYS))
    assert ghost.code is ErrorCode.UNKNOWN_USER
    assert world.records() == []
    assert world.changes == 0


def test_schedule_fields_names_what_was_set() -> None:
    assert schedule_fields(ScheduleSet(rid=1, user="doc")) == "fields=none"
    everything = ScheduleSet(
        rid=1,
        user="doc",
        time_zone=ZONE,
        hours=(),
        autoreply="",
        available_until_ms=0,
        absences=(),
    )
    assert schedule_fields(everything) == "fields=tz,hours,autoreply,until,absences"


# --- the roster ---------------------------------------------------------------------------------


def _add(world: World, who: str, department: str = "cardiology") -> Message:
    return world.ask(
        who,
        RosterAdd(
            rid=1,
            clinician="oncall",
            department=department,
            starts_ms=NOW_MS - HOUR_MS,
            ends_ms=NOW_MS + 8 * HOUR_MS,
        ),
    )


def test_roster_add_and_remove_are_audited_with_the_shift(world: World) -> None:
    roster = _add(world, "desk", " cardiology ")
    assert isinstance(roster, Roster)
    (shift,) = roster.shifts
    removed = world.ask("boss", RosterRemove(rid=2, shift=shift.shift))
    assert isinstance(removed, Roster) and removed.shifts == ()
    assert world.records() == [
        (
            "desk",
            "roster_add",
            "oncall",
            "ok",
            f"shift={shift.shift}; from=2026-11-23T07:00:00Z; to=2026-11-23T16:00:00Z; "
            "department=cardiology",
        ),
        ("boss", "roster_remove", "oncall", "ok", f"shift={shift.shift}"),
    ]
    assert world.changes == 2
    missing = world.refused("desk", RosterRemove(rid=3, shift=shift.shift))
    assert missing.code is ErrorCode.NOT_FOUND
    assert len(world.records()) == 2


def test_forbidden_roster_changes_are_audited_as_refused_and_change_nothing(
    world: World,
) -> None:
    added = world.refused(
        "doc",
        RosterAdd(
            rid=1,
            clinician="oncall",
            department="cardiology",
            starts_ms=NOW_MS,
            ends_ms=NOW_MS + HOUR_MS,
        ),
    )
    assert added.code is ErrorCode.FORBIDDEN
    roster = _add(world, "desk")
    assert isinstance(roster, Roster)
    (shift,) = roster.shifts
    removed = world.refused("nurse", RosterRemove(rid=2, shift=shift.shift))
    assert removed.code is ErrorCode.FORBIDDEN
    assert [s.pk for s in world.shifts()] == [shift.shift]
    records = world.records()
    assert records[0] == ("doc", "roster_add", "oncall", "refused", "reason=forbidden")
    assert records[1][:4] == ("desk", "roster_add", "oncall", "ok")
    assert records[2] == (
        "nurse",
        "roster_remove",
        "",
        "refused",
        f"shift={shift.shift}; reason=forbidden",
    )
    assert world.changes == 1


@pytest.mark.parametrize(
    ("department", "problem"),
    [
        ("Ward\x1b[2J3", "department: control characters are not allowed"),
        ("Ward\n3", "department: control characters are not allowed"),
        ("Ward \u202e3", "department: control characters are not allowed"),
        ("x" * 201, "department: longer than 200 characters"),
        ("   ", "department: must not be empty"),
    ],
)
def test_a_department_the_audit_log_could_not_carry_is_refused(
    world: World, department: str, problem: str
) -> None:
    error = world.refused(
        "desk",
        RosterAdd(
            rid=1,
            clinician="oncall",
            department=department,
            starts_ms=NOW_MS,
            ends_ms=NOW_MS + HOUR_MS,
        ),
    )
    assert (error.code, error.message) == (ErrorCode.INVALID_FIELD, problem)
    assert world.shifts() == []
    assert world.records() == []


def test_the_chain_verifies_after_availability_changes_and_refusals(world: World) -> None:
    world.ask("doc", ScheduleSet(rid=1, user="doc", hours=WEEKDAYS, autoreply=SECRET_REPLY))
    world.refused("pat", ScheduleSet(rid=2, user="doc", hours=()))
    roster = _add(world, "desk")
    assert isinstance(roster, Roster)
    world.refused("doc", RosterRemove(rid=3, shift=roster.shifts[0].shift))
    world.ask("desk", RosterRemove(rid=4, shift=roster.shifts[0].shift))
    verification = world.sql.run(audit.verify_audit_txn)
    assert verification.intact, verification.problem
    assert verification.count == 5
    shown = world.sql.run(audit.list_audit_txn, action=audit.AuditAction.ROSTER_REMOVE)
    assert [e.record.result for e in shown] == ["refused", "ok"]
