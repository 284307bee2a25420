"""Availability through the relay with the SQL store on a fake clock: held messages reach the
clinician at the opening in order and once, one signed automatic reply per off-hours window,
the urgent path to the on-call clinician, and what is never held."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from relay_harness import FakeClient, Relay
from store_worlds import SqlWorld, postgres_world, sqlite_world

from medrelay.crypto.certificates import ClinicKeyPurpose, issue_clinic_key_certificate
from medrelay.crypto.keys import SigningKey
from medrelay.crypto.notices import ClinicNotice, NoticeKind
from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.transparency import ClinicTrust
from medrelay.protocol.messages import (
    Deliver,
    DeliveredItem,
    Error,
    Message,
    OutboundEnvelope,
    Send,
    Sent,
)
from medrelay.server.admin import remove_holiday_audited_txn, set_holiday_audited_txn
from medrelay.server.availability.offhours import AvailabilityConfig, OffHours, OffHoursPolicy
from medrelay.server.availability.schedule import Interval
from medrelay.server.policy import Relationship
from medrelay.server.storage import availability as availability_store
from medrelay.server.storage import care as care_store
from medrelay.server.storage.schema import accounts

ZONE = "Europe/Berlin"
CLINIC = "clinic.test"


def _at(day: int, hour: int, minute: int = 0) -> float:
    """Seconds since the epoch of a wall-clock time in Berlin, November 2026."""
    return datetime.datetime(2026, 11, day, hour, minute, tzinfo=ZoneInfo(ZONE)).timestamp()


class World:
    def __init__(self, sql: SqlWorld, policy: OffHoursPolicy = OffHoursPolicy.HOLD) -> None:
        rng = seeded_rng(b"clinic keys")
        self.root = SigningKey.generate(rng)
        self.issuing = SigningKey.generate(rng)
        cert = issue_clinic_key_certificate(
            self.root,
            clinic_id=CLINIC,
            purpose=ClinicKeyPurpose.ISSUING,
            key=self.issuing.verify_key,
            not_before_ms=0,
            not_after_ms=2**62,
            serial=1,
        )
        self.trust = ClinicTrust.build(CLINIC, self.root.verify_key, [cert])
        self.offhours = OffHours(
            clinic_id=CLINIC,
            config=AvailabilityConfig(time_zone=ZONE, policy=policy, release_check_s=3600),
            issuing_key=lambda: self.issuing,
        )
        self.sql = sql
        self.relay = Relay(sql, offhours=self.offhours)
        self.relay.clock.advance(_at(23, 21) - self.relay.clock.seconds())  # Monday 21:00
        for name, role in (
            ("doc", "doctor"),
            ("oncall", "doctor"),
            ("nurse", "nurse"),
            ("pat", "patient"),
        ):
            self.relay.account(name, role)
        sql.run(
            lambda conn: conn.execute(
                sa.update(accounts)
                .where(accounts.c.username.in_(["doc", "oncall"]))
                .values(department="cardiology")
            )
        )
        now_ms = int(self.relay.clock.seconds() * 1000)
        sql.add_care_link("pat", "doc", start_ms=now_ms - 1000, ends_ms=now_ms + 10**10)
        # Mon-Fri 09:00-17:00 in Berlin.
        hours = tuple(Interval(day, 9 * 60, 17 * 60) for day in range(5))
        sql.run(
            availability_store.set_schedule_txn,
            self.pk("doc"),
            now_ms,
            time_zone=ZONE,
            hours=hours,
            autoreply="Back at {reads_at}. Emergencies: {emergency}.",
        )
        sql.run(availability_store.set_schedule_txn, self.pk("nurse"), now_ms, hours=hours)
        # Started like the server does: the release check runs now and at each next opening.
        self.relay.service.startService()
        self.relay.settle()

    def pk(self, username: str) -> int:
        return self.sql.run(availability_store.accounts_txn, [username])[username].pk

    def now_ms(self) -> int:
        return int(self.relay.clock.seconds() * 1000)

    def advance_to(self, seconds: float) -> None:
        self.relay.clock.advance(seconds - self.relay.clock.seconds())
        self.relay.settle()


def _sql(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> SqlWorld:
    if backend == "sqlite":
        return sqlite_world(request.getfixturevalue("sqlite_relay_template"), tmp_path)
    return postgres_world(request.getfixturevalue("postgres_relay_url"))


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    sql = _sql(request, tmp_path, request.param)
    try:
        yield World(sql)
    finally:
        sql.close()


def _send(
    client: FakeClient, message_id: bytes, targets: list[tuple[str, str]], *, urgent: bool = False
) -> int:
    rid = client.rid()
    client.send(
        Send(
            rid=rid,
            message_id=message_id,
            envelopes=tuple(OutboundEnvelope(u, d, b"sealed " + message_id) for u, d in targets),
            urgent=urgent or None,
        )
    )
    return rid


def _items(messages: list[Message]) -> list[DeliveredItem]:
    return [item for m in messages if isinstance(m, Deliver) for item in m.items]


def _answers(messages: list[Message]) -> list[Sent | Error]:
    return [m for m in messages if isinstance(m, Sent | Error)]


def test_held_at_night_delivered_at_opening_in_order_once(world: World) -> None:
    doc_device = world.relay.device("doc", "d1")
    pat_device = world.relay.device("pat", "p1")
    doctor = world.relay.online(doc_device)
    patient = world.relay.online(pat_device)
    for n in range(3):
        _send(patient, bytes([n]) * 16, [("doc", "d1")])
        world.relay.settle()
    sent = _answers(patient.take())
    assert all(isinstance(s, Sent) and s.held for s in sent)
    assert isinstance(sent[0], Sent)
    assert sent[0].reads_at_ms == int(_at(24, 9) * 1000)  # Tuesday 09:00 Berlin
    assert _items(doctor.take()) == []
    world.advance_to(_at(24, 8, 59))
    assert _items(doctor.take()) == []
    world.advance_to(_at(24, 9))
    delivered = _items(doctor.take())
    assert [i.message_id for i in delivered] == [bytes([n]) * 16 for n in range(3)]
    assert all(set(i.flags or ()) == {"after_hours", "held"} for i in delivered)
    doctor.ack([i.seq for i in delivered])
    world.advance_to(_at(24, 10))
    assert _items(doctor.take()) == []
    assert world.sql.run(availability_store.held_counts_txn) == 0


def test_a_holiday_closes_the_day_and_its_removal_is_seen_at_the_next_check(
    world: World,
) -> None:
    """A holiday on Tuesday holds Monday night's message until Wednesday's opening. Removed on
    Tuesday morning (`admin holiday remove` on a running server), the message goes out at the
    relay's next periodic check of held messages (release_check_s: an hour here), not before."""
    tuesday = datetime.date(2026, 11, 24)
    world.sql.run(set_holiday_audited_txn, day=tuesday, name="Clinic day", now_ms=world.now_ms())
    doctor = world.relay.online(world.relay.device("doc", "d1"))
    patient = world.relay.online(world.relay.device("pat", "p1"))
    _send(patient, b"\x0a" * 16, [("doc", "d1")])
    world.relay.settle()
    (sent,) = _answers(patient.take())
    assert isinstance(sent, Sent) and sent.held
    assert sent.reads_at_ms == int(_at(25, 9) * 1000)  # Wednesday 09:00: Tuesday is closed
    world.advance_to(_at(24, 10, 30))
    assert _items(doctor.take()) == []
    world.sql.run(remove_holiday_audited_txn, day=tuesday, now_ms=world.now_ms())
    world.advance_to(_at(24, 10, 59))
    assert _items(doctor.take()) == []
    world.advance_to(_at(24, 11))
    assert [i.message_id for i in _items(doctor.take())] == [b"\x0a" * 16]


def test_one_signed_auto_reply_per_window(world: World) -> None:
    world.relay.device("doc", "d1")
    patient = world.relay.online(world.relay.device("pat", "p1"))
    for n in range(3):
        _send(patient, bytes([n + 1]) * 16, [("doc", "d1")])
        world.relay.settle()
    notices = [i for i in _items(patient.take()) if i.kind == "notice"]
    assert len(notices) == 1
    assert notices[0].ciphertext is not None
    notice = ClinicNotice.decode(notices[0].ciphertext)
    notice.verify(world.trust, recipient="pat")
    assert notice.kind is NoticeKind.AUTO_REPLY
    assert notice.reads_at_ms == int(_at(24, 9) * 1000)
    assert notice.emergency_numbers == ("103", "112")
    assert "Back at Tue 24 Nov 09:00" in notice.text
    # The next night is another window: one more reply.
    world.advance_to(_at(24, 18))
    _send(patient, b"\x09" * 16, [("doc", "d1")])
    world.relay.settle()
    assert len([i for i in _items(patient.take()) if i.kind == "notice"]) == 1
    assert world.relay.counter("medrelay_auto_replies_total") == 2


def test_messages_between_clinicians_and_to_patients_are_never_held(world: World) -> None:
    doctor = world.relay.online(world.relay.device("doc", "d1"))
    nurse = world.relay.online(world.relay.device("nurse", "n1"))
    patient = world.relay.online(world.relay.device("pat", "p1"))
    _send(doctor, b"\x01" * 16, [("nurse", "n1")])
    _send(nurse, b"\x02" * 16, [("doc", "d1")])
    _send(doctor, b"\x03" * 16, [("pat", "p1")])
    world.relay.settle()
    assert [i.message_id for i in _items(nurse.take())] == [b"\x01" * 16]
    assert [i.message_id for i in _items(doctor.take()) if i.kind == "msg"] == [b"\x02" * 16]
    assert [i.kind for i in _items(patient.take())] == ["msg"]  # no notice either way


def test_urgent_reaches_the_on_call_clinician_at_once(world: World) -> None:
    world.relay.device("doc", "d1")
    on_call = world.relay.online(world.relay.device("oncall", "o1"))
    patient = world.relay.online(world.relay.device("pat", "p1"))
    now = world.now_ms()
    world.sql.run(
        availability_store.add_shift_txn,
        world.pk("oncall"),
        "cardiology",
        now - 3_600_000,
        now + 8 * 3_600_000,
        now_ms=now,
        created_by="registrar",
    )
    # While on call, the patient may fetch their keys (to encrypt to them), as if linked.
    standing = world.sql.run(care_store.standing_txn, "pat", "oncall", world.now_ms())
    assert standing is not None
    assert standing.state.relationship is Relationship.ACTIVE
    # Not addressing the on-call clinician is refused with a code the client acts on.
    _send(patient, b"\x05" * 16, [("doc", "d1")], urgent=True)
    world.relay.settle()
    (refused,) = _answers(patient.take())
    assert isinstance(refused, Error)
    assert refused.code == "on_call_changed"
    _send(patient, b"\x05" * 16, [("doc", "d1"), ("oncall", "o1")], urgent=True)
    world.relay.settle()
    messages = patient.take()
    (sent,) = _answers(messages)
    assert isinstance(sent, Sent)
    assert sent.on_call == "oncall"
    (routed,) = [i for i in _items(messages) if i.kind == "notice"]
    assert routed.ciphertext is not None
    notice = ClinicNotice.decode(routed.ciphertext)
    notice.verify(world.trust, recipient="pat")
    assert notice.kind is NoticeKind.URGENT_ROUTED
    assert notice.on_call == "oncall"
    # Only the clinician on call is in reach so: others of the department are not.
    later = world.sql.run(care_store.standing_txn, "pat", "nurse", world.now_ms())
    assert later is not None
    assert later.state.relationship is Relationship.NONE
    (got,) = _items(on_call.take())
    assert got.message_id == b"\x05" * 16
    assert set(got.flags or ()) == {"urgent"}
    # The on-call clinician can answer: the urgent message linked them to the patient.
    _send(on_call, b"\x06" * 16, [("pat", "p1")])
    world.relay.settle()
    assert isinstance(_answers(on_call.take())[0], Sent)
    assert world.relay.counter("medrelay_urgent_escalations_total", outcome="routed") == 1


def test_urgent_with_nobody_on_call_tells_the_patient_to_call(world: World) -> None:
    world.relay.device("doc", "d1")
    patient = world.relay.online(world.relay.device("pat", "p1"))
    _send(patient, b"\x07" * 16, [("doc", "d1")], urgent=True)
    world.relay.settle()
    messages = patient.take()
    (sent,) = _answers(messages)
    assert isinstance(sent, Sent)
    assert sent.on_call is None
    (item,) = [i for i in _items(messages) if i.kind == "notice"]
    assert item.ciphertext is not None
    notice = ClinicNotice.decode(item.ciphertext)
    assert notice.kind is NoticeKind.URGENT_UNROUTED
    assert "call 103 or 112 now" in notice.text


def test_an_on_call_clinician_without_a_device_counts_as_nobody(world: World) -> None:
    """A roster may name a clinician who has not enrolled yet: nobody could read an urgent
    message, so the patient is told at once to call the emergency numbers (and is never asked
    to address devices that do not exist)."""
    world.relay.device("doc", "d1")
    patient = world.relay.online(world.relay.device("pat", "p1"))
    now = world.now_ms()
    world.sql.run(
        availability_store.add_shift_txn,
        world.pk("oncall"),
        "cardiology",
        now - 3_600_000,
        now + 8 * 3_600_000,
        now_ms=now,
        created_by="registrar",
    )
    assert world.sql.run(availability_store.on_call_txn, "cardiology", now) is None
    _send(patient, b"\x0a" * 16, [("doc", "d1")], urgent=True)
    world.relay.settle()
    messages = patient.take()
    (sent,) = _answers(messages)
    assert isinstance(sent, Sent) and sent.on_call is None
    (item,) = [i for i in _items(messages) if i.kind == "notice"]
    assert item.ciphertext is not None
    assert ClinicNotice.decode(item.ciphertext).kind is NoticeKind.URGENT_UNROUTED
    # Once they enroll a device, they are on call.
    world.relay.device("oncall", "o1")
    shift = world.sql.run(availability_store.on_call_txn, "cardiology", world.now_ms())
    assert shift is not None and shift.clinician == "oncall"


def test_deliver_silently_flags_instead_of_holding(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    sql = _sql(request, tmp_path, "sqlite")
    try:
        world = World(sql, OffHoursPolicy.DELIVER_SILENTLY)
        doctor = world.relay.online(world.relay.device("doc", "d1"))
        patient = world.relay.online(world.relay.device("pat", "p1"))
        _send(patient, b"\x08" * 16, [("doc", "d1")])
        world.relay.settle()
        (item,) = _items(doctor.take())
        assert set(item.flags or ()) == {"after_hours"}
        (sent,) = _answers(patient.take())
        assert isinstance(sent, Sent)
        assert not sent.held
    finally:
        sql.close()
