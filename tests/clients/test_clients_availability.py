"""The engine's side of clinicians' hours against the fake relay: signed clinic notices checked
before they are shown, urgent messages addressed to the clinician on call (and re-addressed when
the roster changed), flags on received messages, schedules and the roster, and the profile
upgrade that made room for them. No network, no threads, fake time."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_support import inbox

from medrelay.clients.engine.availability import AbsenceView, ScheduleChange
from medrelay.clients.engine.client import Engine
from medrelay.clients.engine.errors import RemoteError
from medrelay.clients.engine.store import database_path, find_messages_txn
from medrelay.clients.engine.testing import ClientWorld, FakeAvailability
from medrelay.clients.engine.views import (
    KIND_AUTO_REPLY,
    KIND_FAILED,
    KIND_URGENT_ROUTED,
    KIND_URGENT_UNROUTED,
    MessageView,
    NoticeView,
)
from medrelay.crypto.content import SignedContent
from medrelay.crypto.keys import SigningKey
from medrelay.crypto.notices import NoticeKind
from medrelay.crypto.rng import seeded_rng
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.hours import parse_hours
from medrelay.protocol.messages import Send

AWAY = FakeAvailability(open_now=False, changes_at_ms=1_800_000_000_000)


@pytest.fixture
def world(tmp_path: Path) -> ClientWorld:
    return ClientWorld(tmp_path)


@pytest.fixture
def people(world: ClientWorld) -> Iterator[tuple[Engine, Engine, Engine]]:
    """A patient, their doctor and a colleague who can be on call, engines open."""
    for user in ("patient", "doctor", "oncall"):
        world.enroll(user)
    engines = (world.open("patient"), world.open("doctor"), world.open("oncall"))
    yield engines
    for engine in engines:
        world.run(engine.close())


def notices(items: list[MessageView | NoticeView]) -> list[NoticeView]:
    return [i for i in items if isinstance(i, NoticeView)]


def sends(world: ClientWorld, user: str) -> list[Send]:
    return [m for m in world.relay.client_frames(user) if isinstance(m, Send)]


def test_a_message_outside_hours_brings_one_verified_automatic_reply(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    patient, doctor, _ = people
    world.relay.availability["doctor"] = AWAY
    sent = world.run(patient.send_message("doctor", "my pressure is 150/95"))
    assert sent.reads_at_ms == AWAY.changes_at_ms and sent.on_call is None
    world.run(patient.sync())
    (reply,) = world.run(patient.clinic_notices(sent.message_id))
    assert (reply.kind, reply.user_id, reply.message_id) == (
        KIND_AUTO_REPLY,
        "doctor",
        sent.message_id,
    )
    assert reply.clinic is not None
    assert reply.clinic.reads_at_ms == AWAY.changes_at_ms
    assert reply.clinic.emergency_numbers == ("103", "112")
    assert world.run(patient.unread()) == []  # taken by clinic_notices: shown once

    (received,) = inbox(world, doctor)
    assert isinstance(received, MessageView) and received.flags == ("after_hours",)
    # Kept across a restart of the engine, flags and notice alike.
    stored = world.run(doctor.history())
    assert stored[0].flags == ("after_hours",)


def test_a_notice_not_signed_by_the_clinic_is_never_shown_as_the_clinics(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    patient, _, _ = people
    world.relay.notice_key = SigningKey.generate(seeded_rng(b"a forger"))
    world.relay.availability["doctor"] = AWAY
    sent = world.run(patient.send_message("doctor", "hello"))
    (item,) = notices(inbox(world, patient))
    assert item.kind == KIND_FAILED and item.clinic is None
    assert "SECURITY WARNING" in item.reason and "not the clinic's" in item.reason
    assert world.run(patient.clinic_notices(sent.message_id)) == []


def test_a_notice_for_another_patient_or_an_unknown_message_is_refused(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    patient, _, _ = people
    relay = world.relay
    sent = world.run(patient.send_message("doctor", "hello"))
    # Signed by the clinic, but for someone else (replayed from another patient's queue).
    relay.push_notice(
        "patient", "doctor", sent.message_id, NoticeKind.AUTO_REPLY, AWAY, recipient="doctor"
    )
    # Signed for this patient, but about a message they never sent to that clinician.
    relay.push_notice("patient", "oncall", sent.message_id, NoticeKind.AUTO_REPLY, AWAY)
    relay.push_notice("patient", "doctor", bytes(16), NoticeKind.AUTO_REPLY, AWAY)
    # Naming an on-call clinician the urgent message never went to.
    other = world.run(patient.send_message("doctor", "and another thing"))
    elsewhere = FakeAvailability(open_now=False, on_call="oncall")
    relay.push_notice("patient", "doctor", other.message_id, NoticeKind.URGENT_ROUTED, elsewhere)
    failed = notices(inbox(world, patient))
    assert [n.kind for n in failed] == [KIND_FAILED] * 4
    assert "addressed to another user" in failed[0].reason
    assert all("did not send" in n.reason for n in failed[1:3])
    assert "naming oncall as on call" in failed[3].reason


def test_an_urgent_message_is_signed_for_and_encrypted_to_the_clinician_on_call(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    patient, doctor, oncall = people
    world.relay.availability["doctor"] = FakeAvailability(open_now=False, on_call="oncall")
    sent = world.run(patient.send_message("doctor", "chest pain", urgent=True))
    assert sent.on_call == "oncall"
    (frame,) = sends(world, "patient")
    assert frame.urgent is True
    assert {e.user for e in frame.envelopes} == {"doctor", "oncall"}
    (received,) = inbox(world, oncall)
    assert isinstance(received, MessageView)
    assert received.text == "chest pain" and received.flags == ("urgent",)
    (copy,) = inbox(world, doctor)
    assert isinstance(copy, MessageView) and set(copy.flags) == {"urgent", "after_hours"}
    (routed,) = notices(inbox(world, patient))
    assert routed.kind == KIND_URGENT_ROUTED
    assert routed.clinic is not None and routed.clinic.on_call == "oncall"
    # The on-call clinician's answer stays in the patient's thread with the doctor.
    world.run(oncall.send_message("patient", "call 103 now"))
    (answer,) = inbox(world, patient)
    assert isinstance(answer, MessageView) and answer.text == "call 103 now"


def test_an_urgent_message_is_readdressed_when_the_roster_changed(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    """The client asked who is on call; the roster changed before its send arrived: the relay
    refuses with on_call_changed, and the queued message is signed again for whoever is on
    call now, under the same id, and delivered."""
    patient, _, oncall = people
    state = FakeAvailability(open_now=False, on_call=None)
    world.relay.availability["doctor"] = state

    def roster_changes() -> None:
        state.on_call = "oncall"

    world.relay.after_availability = roster_changes
    sent = world.run(patient.send_message("doctor", "cannot breathe", urgent=True))
    assert sent.on_call == "oncall"
    first, second = sends(world, "patient")
    assert first.message_id == second.message_id == sent.message_id
    assert {e.user for e in first.envelopes} == {"doctor"}
    assert {e.user for e in second.envelopes} == {"doctor", "oncall"}
    (received,) = inbox(world, oncall)
    assert isinstance(received, MessageView) and received.text == "cannot breathe"
    (own,) = world.run(patient.history())
    assert own.message_id == sent.message_id and own.status == "sent"
    rows = world.run(
        patient.profile.db.run_interaction(
            "own", find_messages_txn, patient.profile.sealer, sent.message_id
        )
    )
    (stored,) = rows
    assert SignedContent.decode(stored.signed_content).content.recipients == ("doctor", "oncall")


def test_an_urgent_message_with_nobody_on_call_tells_to_call_the_emergency_numbers(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    patient, _, _ = people
    world.relay.availability["doctor"] = FakeAvailability(open_now=False)
    sent = world.run(patient.send_message("doctor", "bleeding", urgent=True))
    assert sent.on_call is None
    world.run(patient.sync())
    (notice,) = world.run(patient.clinic_notices(sent.message_id))
    assert notice.kind == KIND_URGENT_UNROUTED
    assert notice.clinic is not None and notice.clinic.emergency_numbers == ("103", "112")


def test_an_urgent_message_to_an_available_clinician_goes_to_them_alone(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    patient, _, _ = people
    world.relay.availability["doctor"] = FakeAvailability(open_now=True, on_call="oncall")
    world.run(patient.send_message("doctor", "dizzy", urgent=True))
    (frame,) = sends(world, "patient")
    assert {e.user for e in frame.envelopes} == {"doctor"} and frame.urgent is True


def test_schedules_and_the_roster_through_the_engine(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    _, doctor, _ = people
    shown = world.run(
        doctor.set_schedule(
            "doctor",
            ScheduleChange(
                time_zone="Asia/Novosibirsk",
                hours=parse_hours("mon-fri 09:00-17:00"),
                absences=(AbsenceView("2026-12-28", "2027-01-08", "vacation"),),
                autoreply="Back on {reads_at}",
            ),
        )
    )
    assert shown.time_zone == "Asia/Novosibirsk" and len(shown.hours) == 5
    assert shown.absences == (AbsenceView("2026-12-28", "2027-01-08", "vacation"),)
    assert shown.autoreply == "Back on {reads_at}"
    assert world.run(doctor.availability("doctor")).scheduled is True

    (shift,) = world.run(doctor.roster_add("oncall", "cardiology", 1_000, 2_000))
    assert (shift.clinician, shift.department, shift.starts_ms) == ("oncall", "cardiology", 1_000)
    assert world.run(doctor.roster()) == [shift]
    assert world.run(doctor.roster_remove(shift.shift_id)) == []
    with pytest.raises(RemoteError) as caught:
        world.run(doctor.roster_remove(shift.shift_id))
    assert caught.value.code is ErrorCode.NOT_FOUND


def test_a_profile_of_schema_1_is_upgraded_when_opened(world: ClientWorld) -> None:
    world.enroll("patient")
    path = database_path(world.profile_dir("patient"))
    with sqlite3.connect(path) as conn:  # as medrelay before this change left it
        conn.execute("ALTER TABLE messages DROP COLUMN flags")
        conn.execute("ALTER TABLE notices DROP COLUMN detail")
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    conn.close()
    engine = world.open("patient")
    try:
        assert world.run(engine.history()) == []
    finally:
        world.run(engine.close())
    with sqlite3.connect(path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        columns = {row[1] for row in conn.execute("PRAGMA table_info(notices)")}
    conn.close()
    assert version == (2,) and "detail" in columns


def test_a_damaged_stored_notice_shows_plainly_instead_of_breaking_the_inbox(
    world: ClientWorld, people: tuple[Engine, Engine, Engine]
) -> None:
    patient, _, _ = people
    world.relay.availability["doctor"] = AWAY
    world.run(patient.send_message("doctor", "hello"))
    world.run(patient.sync())
    with sqlite3.connect(database_path(world.profile_dir("patient"))) as conn:
        conn.execute("UPDATE notices SET detail = x'00'")
    conn.close()
    (notice,) = notices(world.run(patient.unread()))
    assert notice.kind == KIND_AUTO_REPLY and notice.clinic is None
    assert notice.reason.startswith("doctor is away")
