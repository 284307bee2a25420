"""The RelayStore conformance suite, care-link cases: inside one group commit, each recipient of a
send is judged by the policy table with its care-link relationship and account state, and
`standing` answers what `bundle_get`/`devices_get` are judged by; the same against every
implementation (in memory, SQLite, PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from store_worlds import StoreWorld, result

from medrelay.crypto.certificates import Role
from medrelay.protocol.errors import ErrorCode
from medrelay.server.policy import PairState, Relationship, Standing, last_day
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.service import send_digest
from medrelay.server.relay.store import (
    DeviceRecord,
    Envelope,
    SendAccepted,
    SendOutcome,
    SendRequest,
    WriteBatch,
    WriteLimits,
)

DAY = 86_400_000
NOW = 1_800_000_000_000
LIMITS = WriteLimits(ttl_ms=3_600_000, queue_cap=100)


def request(sender: DeviceRecord, n: int, *targets: DeviceRecord) -> SendRequest:
    envelopes = tuple(Envelope(t.username, t.device_id, b"c%d" % n) for t in targets)
    return SendRequest(
        sender=sender,
        message_id=n.to_bytes(16, "big"),
        envelopes=envelopes,
        digest=send_digest(envelopes),
    )


def apply(world: StoreWorld, *sends: SendRequest, now_ms: int = NOW) -> tuple[SendOutcome, ...]:
    return result(world.store.apply_writes(WriteBatch(sends=sends), now_ms, LIMITS)).sends


@dataclass
class Clinic:
    patient: DeviceRecord
    doctor: DeviceRecord
    nurse: DeviceRecord
    other_patient: DeviceRecord
    records: DeviceRecord


@pytest.fixture
def clinic(world: StoreWorld) -> Clinic:
    """A patient linked to the doctor (active), not to the nurse; another patient; the records
    gateway."""
    for name, role in [
        ("pat", "patient"),
        ("dr", "doctor"),
        ("nurse", "nurse"),
        ("pat2", "patient"),
        ("rec", "records"),
    ]:
        world.add_account(name, role)
    devices = [
        world.add_device(name, "d1", signing_key=bytes([i]) * 32)
        for i, name in enumerate(["pat", "dr", "nurse", "pat2", "rec"], start=1)
    ]
    world.add_care_link("pat", "dr", start_ms=NOW - 10 * DAY, ends_ms=NOW + 30 * DAY)
    return Clinic(*devices)


def refusal(outcome: SendOutcome) -> RelayError:
    assert isinstance(outcome, RelayError), outcome
    return outcome


def test_an_active_link_lets_both_sides_write(world: StoreWorld, clinic: Clinic) -> None:
    there = apply(world, request(clinic.patient, 1, clinic.doctor))
    back = apply(world, request(clinic.doctor, 2, clinic.patient))
    assert isinstance(there[0], SendAccepted) and isinstance(back[0], SendAccepted)


def test_without_a_link_a_patient_and_a_clinician_cannot_write(
    world: StoreWorld, clinic: Clinic
) -> None:
    (to_nurse,) = apply(world, request(clinic.patient, 1, clinic.nurse))
    (from_nurse,) = apply(world, request(clinic.nurse, 2, clinic.patient))
    assert refusal(to_nurse).code is ErrorCode.FORBIDDEN
    assert refusal(to_nurse).message.startswith("you have no care link with nurse;")
    assert refusal(from_nurse).message.startswith("you have no care link with pat;")
    assert world.queue_of(clinic.nurse.pk) == []


def test_an_early_end_refuses_new_sends_and_keeps_what_was_queued(
    world: StoreWorld, clinic: Clinic
) -> None:
    (before,) = apply(world, request(clinic.patient, 1, clinic.doctor), now_ms=NOW - DAY)
    assert isinstance(before, SendAccepted)
    world.end_care_link("pat", "dr", NOW - DAY // 2)
    (after,) = apply(world, request(clinic.patient, 2, clinic.doctor))
    assert refusal(after).code is ErrorCode.FORBIDDEN
    ended_on = last_day(NOW - DAY // 2)
    assert refusal(after).message == (
        f"your care link with dr ended on {ended_on}; ask the clinic's front desk to renew it"
    )
    assert [i.message_id for i in world.queue_of(clinic.doctor.pk)] == [(1).to_bytes(16, "big")]


def test_a_link_ends_by_itself_at_its_end(world: StoreWorld, clinic: Clinic) -> None:
    (late,) = apply(world, request(clinic.doctor, 1, clinic.patient), now_ms=NOW + 30 * DAY)
    assert refusal(late).code is ErrorCode.FORBIDDEN and "ended on" in refusal(late).message


def test_a_renewed_link_works_again(world: StoreWorld, clinic: Clinic) -> None:
    world.end_care_link("pat", "dr", NOW - DAY)
    world.add_care_link("pat", "dr", start_ms=NOW - 1000, ends_ms=NOW + DAY)
    (again,) = apply(world, request(clinic.patient, 1, clinic.doctor))
    assert isinstance(again, SendAccepted)


def test_patients_never_write_to_patients_nor_to_records(world: StoreWorld, clinic: Clinic) -> None:
    world.add_care_link("pat", "nurse", start_ms=NOW - DAY, ends_ms=NOW + DAY)
    (to_patient,) = apply(world, request(clinic.patient, 1, clinic.other_patient))
    (to_records,) = apply(world, request(clinic.patient, 2, clinic.records))
    assert refusal(to_patient).code is ErrorCode.FORBIDDEN
    assert refusal(to_records).code is ErrorCode.FORBIDDEN


def test_records_write_to_clinicians_and_patients_and_clinicians_to_records(
    world: StoreWorld, clinic: Clinic
) -> None:
    """The records gateway posts its receipts into visit threads, which the patient reads too
    (without a care link of its own); patients still never write to it."""
    (to_doctor,) = apply(world, request(clinic.records, 1, clinic.doctor))
    (to_patient,) = apply(world, request(clinic.records, 2, clinic.patient))
    (from_nurse,) = apply(world, request(clinic.nurse, 3, clinic.records))
    assert isinstance(to_doctor, SendAccepted) and isinstance(from_nurse, SendAccepted)
    assert isinstance(to_patient, SendAccepted)


def test_one_refused_recipient_refuses_the_send_and_not_the_batch(
    world: StoreWorld, clinic: Clinic
) -> None:
    mixed = request(clinic.doctor, 1, clinic.patient, clinic.other_patient)
    fine = request(clinic.doctor, 2, clinic.nurse)
    refused, accepted = apply(world, mixed, fine)
    assert refusal(refused).message.startswith("you have no care link with pat2;")
    assert isinstance(accepted, SendAccepted)
    assert world.queue_of(clinic.patient.pk) == []


def test_a_closed_account_cannot_be_written_to(world: StoreWorld, clinic: Clinic) -> None:
    world.revoke_account("dr")
    (closed,) = apply(world, request(clinic.patient, 1, clinic.doctor))
    assert refusal(closed).code is ErrorCode.UNKNOWN_USER
    assert refusal(closed).message == "the account dr is closed; it cannot be reached"


def test_standing_reports_role_and_relationship(world: StoreWorld, clinic: Clinic) -> None:
    def standing(requester: str, username: str, now_ms: int = NOW) -> Standing | None:
        return result(world.store.standing(requester, username, now_ms))

    assert standing("pat", "dr") == Standing("dr", Role.DOCTOR, PairState(Relationship.ACTIVE))
    assert standing("dr", "pat") == Standing("pat", Role.PATIENT, PairState(Relationship.ACTIVE))
    assert standing("pat", "nurse") == Standing("nurse", Role.NURSE, PairState(Relationship.NONE))
    assert standing("nurse", "dr") == Standing("dr", Role.DOCTOR, PairState(Relationship.NONE))
    assert standing("pat", "ghost") is None
    ended = NOW + 30 * DAY
    assert standing("pat", "dr", ended) == Standing(
        "dr", Role.DOCTOR, PairState(Relationship.ENDED, ended)
    )
    world.revoke_account("pat2")
    assert standing("dr", "pat2") == Standing("pat2", Role.PATIENT, PairState(Relationship.REVOKED))
