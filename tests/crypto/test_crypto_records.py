"""Record bundles: a doctor-patient thread with its log evidence verifies from the clinic root key
alone, round-trips through its encoding, and every tampering or omission is named."""

from __future__ import annotations

import dataclasses

import pytest
from record_world import (
    CLINIC,
    DOCTOR,
    NURSE,
    PATIENT,
    REVOKED_AT,
    SECRET_TEXT,
    T0,
    World,
    attachment,
)

from medrelay.crypto.certificates import (
    issue_device_certificate,
    verify_device,
)
from medrelay.crypto.content import (
    LogView,
    SignedContent,
    content_hash,
    new_message_id,
    new_thread_id,
)
from medrelay.crypto.errors import MalformedEncoding, ProofError
from medrelay.crypto.identity import DeviceIdentity, DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.records import (
    MAX_RECORD_BUNDLE_BYTES,
    RecordBundle,
    RevocationTimes,
    revocation_times,
    verify_record_bundle,
)
from medrelay.crypto.rng import Rng
from medrelay.crypto.transparency import (
    EventKind,
    LogEvent,
    issue_revocation,
)


@pytest.fixture
def world(rng: Rng) -> World:
    return World(rng)


def exchange(world: World) -> list[SignedContent]:
    """Patient, doctor, patient (with an attachment), doctor, doctor."""
    return [
        world.send(PATIENT, DOCTOR, 1),
        world.send(DOCTOR, PATIENT, 2),
        world.send(PATIENT, DOCTOR, 3, attachments=(attachment(world.rng),)),
        world.send(DOCTOR, PATIENT, 4),
        world.send(DOCTOR, PATIENT, 5),
    ]


def rejected(world: World, bundle: RecordBundle, match: str) -> str:
    with pytest.raises(ProofError, match=match) as info:
        world.verify(bundle)
    reason = str(info.value)
    assert "\n" not in reason
    assert SECRET_TEXT not in reason
    return reason


# --- the valid case ---------------------------------------------------------------------------


def test_a_doctor_patient_exchange_verifies_with_only_the_root_key(world: World) -> None:
    messages = exchange(world)
    conclusion = messages[-1].content.message_id
    bundle = world.bundle(messages, visit=world.visit(conclusion_message_id=conclusion))
    record = verify_record_bundle(bundle, clinic_id=CLINIC, root_key=world.root.verify_key)
    assert [m.content for m in record.messages] == [s.content for s in messages]
    assert [m.content_hash for m in record.messages] == [content_hash(s.content) for s in messages]
    assert [m.sender_device_id for m in record.messages] == ["phone"] * 5
    assert [m.sender.user_id for m in record.messages] == [PATIENT, DOCTOR, PATIENT, DOCTOR, DOCTOR]
    assert record.messages[2].content.attachments == messages[2].content.attachments
    assert record.visit.conclusion_message_id == conclusion
    assert record.thread_id == world.thread_id
    assert record.checkpoint.size == len(world.leaves)


def test_the_encoding_round_trips_and_the_decoded_bundle_verifies(world: World) -> None:
    bundle = world.bundle(exchange(world))
    data = bundle.encode()
    decoded = RecordBundle.decode(data)
    assert decoded == bundle
    assert decoded.encode() == data
    record = verify_record_bundle(decoded, clinic_id=CLINIC, root_key=world.root.verify_key)
    assert len(record.messages) == 5


def test_the_builder_orders_messages_by_sent_time(world: World) -> None:
    messages = exchange(world)
    bundle = world.bundle(list(reversed(messages)))
    assert bundle.messages == tuple(m.encode() for m in messages)


def test_an_open_visit_accepts_any_later_message(world: World) -> None:
    messages = [world.send(PATIENT, DOCTOR, 1), world.send(DOCTOR, PATIENT, 10_000)]
    world.verify(world.bundle(messages, visit=world.visit(closed_ms=None)))
    rejected(
        world, world.bundle(messages), r"message 1 \(id [0-9a-f]{32}\) was sent outside the visit"
    )


def test_repr_of_a_bundle_carries_no_message_text(world: World) -> None:
    assert SECRET_TEXT not in repr(world.bundle(exchange(world)))


# --- messages that were changed, removed, forged or misplaced --------------------------------


def test_an_edited_message_fails_its_signature(world: World) -> None:
    messages = exchange(world)
    bundle = world.bundle(messages)
    data = bundle.messages[1]
    at = data.index(b"150/95")
    edited = data[:at] + b"160/95" + data[at + 6 :]
    tampered = dataclasses.replace(
        bundle, messages=(*bundle.messages[:1], edited, *bundle.messages[2:])
    )
    message_id = messages[1].content.message_id.hex()
    rejected(world, tampered, rf"^message 1 \(id {message_id}\) signature does not verify$")


def test_a_message_removed_from_the_middle_of_a_senders_chain_is_named(world: World) -> None:
    messages = exchange(world)
    del messages[3]  # the doctor's minute-4 message: minute 5 names it as previous_hash
    reason = rejected(world, world.bundle(messages), "previous_hash does not match")
    assert reason.startswith(f"a message of {DOCTOR} is missing between message 1")
    assert messages[3].content.message_id.hex() in reason


def test_the_first_message_of_each_sender_may_point_before_the_range(world: World) -> None:
    messages = exchange(world)
    world.verify(world.bundle(messages[2:]))  # both senders' first messages point outside


def test_a_signature_by_an_uncertified_key_is_refused(world: World) -> None:
    real = world.devices[DOCTOR, "phone"]
    impostor_key = SigningKey.generate(world.rng)
    impostor = DeviceKeys(
        DeviceIdentity(
            DOCTOR,
            "phone",
            impostor_key.verify_key,
            real.identity.dh_key,
            real.identity.certificate_hash,
        ),
        impostor_key,
        real.dh_key,
    )
    world.devices[DOCTOR, "phone"] = impostor
    messages = [world.send(PATIENT, DOCTOR, 1), world.send(DOCTOR, PATIENT, 2)]
    rejected(world, world.bundle(messages), r"^message 1 \(id [0-9a-f]+\) signature does not")


def test_a_device_whose_certificate_is_not_in_the_log_is_refused(world: World) -> None:
    identity = SigningKey.generate(world.rng)
    signing, dh = SigningKey.generate(world.rng), DHPrivateKey.generate(world.rng)
    cert = issue_device_certificate(
        identity,
        user_id=DOCTOR,
        device_id="rogue",
        signing_key=signing.verify_key,
        dh_key=dh.public_key,
        created_at_ms=T0,
    )
    rogue_user = dataclasses.replace(world.user_certs[DOCTOR], identity_key=identity.verify_key)
    world.devices[DOCTOR, "rogue"] = DeviceKeys(verify_device(rogue_user, cert), signing, dh)
    messages = [world.send(DOCTOR, PATIENT, 2, device_id="rogue")]
    rejected(world, world.bundle(messages), f"device the log never certified for {DOCTOR}")


def test_a_revoked_device_is_accepted_before_and_refused_after_its_revocation(
    world: World,
) -> None:
    before = world.send(DOCTOR, PATIENT, 29, device_id="laptop")
    world.verify(world.bundle([before]))
    after = world.send(DOCTOR, PATIENT, 30, device_id="laptop")
    reason = rejected(world, world.bundle([before, after]), "sent after its device was revoked")
    assert reason.startswith(f"message 1 (id {after.content.message_id.hex()}) from {DOCTOR}")


def test_a_backdated_message_whose_log_view_shows_the_revocation_is_refused(
    world: World,
) -> None:
    view = LogView(world.revocation_leaf + 1, bytes(32))
    backdated = world.send(DOCTOR, PATIENT, 10, device_id="laptop", log_view=view)
    rejected(world, world.bundle([backdated]), "already includes leaf")
    honest = world.send(
        DOCTOR, PATIENT, 11, device_id="laptop", log_view=LogView(world.revocation_leaf, bytes(32))
    )
    world.verify(world.bundle([honest]))


def test_a_message_after_its_users_account_was_revoked_is_refused(world: World) -> None:
    revocation = issue_revocation(
        world.issuing, user_id=PATIENT, device_id="", revoked_at_ms=REVOKED_AT
    )
    world.append(EventKind.USER_REVOKED, PATIENT, revocation.encode())
    early = world.send(PATIENT, DOCTOR, 29)
    world.verify(world.bundle([early]))
    late = world.send(PATIENT, DOCTOR, 31)
    rejected(world, world.bundle([early, late]), f"from {PATIENT} sent after its user was revoked")


def test_a_checkpoint_older_than_a_messages_log_view_is_refused(world: World) -> None:
    ahead = world.send(DOCTOR, PATIENT, 2, log_view=LogView(len(world.leaves) + 1, bytes(32)))
    rejected(world, world.bundle([ahead]), "saw a larger log than the bundle's checkpoint")


def test_a_message_of_another_thread_is_refused(world: World) -> None:
    messages = exchange(world)
    stray = world.send(DOCTOR, PATIENT, 6, thread_id=new_thread_id(world.rng))
    rejected(world, world.bundle([*messages, stray]), r"^message 5 .* belongs to another thread$")


def test_a_message_from_a_third_party_is_refused(world: World) -> None:
    messages = exchange(world)
    nurse = world.send(NURSE, PATIENT, 6, device_id="tablet")
    rejected(
        world,
        world.bundle([*messages, nurse]),
        rf"^message 5 .* is from {NURSE}, who is not the visit's patient or clinician",
    )
    rejected(
        world,
        world.bundle(messages, users=(DOCTOR, PATIENT, NURSE)),
        f"evidence for {NURSE}, who is not in the visit",
    )


def test_a_message_not_addressed_to_the_other_participant_is_refused(world: World) -> None:
    aside = world.send(DOCTOR, NURSE, 2)
    rejected(world, world.bundle([aside]), f"from {DOCTOR} is not addressed to {PATIENT}")


def test_messages_out_of_order_are_refused(world: World) -> None:
    bundle = world.bundle(exchange(world))
    swapped = (bundle.messages[1], bundle.messages[0], *bundle.messages[2:])
    rejected(world, dataclasses.replace(bundle, messages=swapped), r"^message 1 .* out of order")


def test_a_repeated_message_is_refused(world: World) -> None:
    bundle = world.bundle(exchange(world))
    repeated = (*bundle.messages, bundle.messages[-1])
    rejected(world, dataclasses.replace(bundle, messages=repeated), r"^message 5 .* twice$")


def test_a_participant_with_the_wrong_role_is_refused(world: World) -> None:
    messages = [world.send(PATIENT, DOCTOR, 1)]
    swapped = world.visit(patient=DOCTOR, clinician=PATIENT)
    rejected(world, world.bundle(messages, visit=swapped), "certified as patient, not a clinician")


def test_a_conclusion_outside_the_bundle_is_refused(world: World) -> None:
    visit = world.visit(conclusion_message_id=new_message_id(world.rng))
    rejected(world, world.bundle(exchange(world), visit=visit), "conclusion message .* not in")


def test_a_sender_without_log_evidence_is_refused(world: World) -> None:
    rejected(
        world,
        world.bundle(exchange(world), users=(DOCTOR,)),
        rf"^message 0 .* has no log evidence for {PATIENT}$",
    )


# --- the log evidence -------------------------------------------------------------------------


def test_a_checkpoint_signed_by_another_key_is_refused(world: World) -> None:
    bundle = world.bundle(exchange(world))
    forged = world.checkpoint_note(SigningKey.generate(world.rng)).encode()
    rejected(
        world,
        dataclasses.replace(bundle, checkpoint_note=forged),
        "^the checkpoint does not verify",
    )


def test_an_event_with_a_missing_or_wrong_inclusion_proof_is_refused(world: World) -> None:
    bundle = world.bundle(exchange(world))
    doctor = bundle.evidence[0]
    first = doctor.events[0]
    for broken in (
        dataclasses.replace(first, proof=()),
        dataclasses.replace(first, proof=(bytes(32), *first.proof[1:])),
        dataclasses.replace(first, leaf_index=first.leaf_index + 1),
    ):
        evidence = dataclasses.replace(doctor, events=(broken, *doctor.events[1:]))
        rejected(
            world,
            dataclasses.replace(bundle, evidence=(evidence, *bundle.evidence[1:])),
            rf"^log event 0 of {DOCTOR} .* not included in the checkpoint",
        )


def test_an_event_left_out_of_a_users_chain_is_refused(world: World) -> None:
    bundle = world.bundle(exchange(world))
    doctor = bundle.evidence[0]
    evidence = dataclasses.replace(doctor, events=(doctor.events[0], *doctor.events[2:]))
    rejected(
        world,
        dataclasses.replace(bundle, evidence=(evidence, *bundle.evidence[1:])),
        "an event is missing or repeated",
    )


def test_a_withheld_revocation_cannot_be_hidden_by_dropping_the_log_view(world: World) -> None:
    """Honest limit: a log proves inclusion, not absence. Without the revocation event the
    laptop's late message passes the pure check; this pins that the revocation event is what
    makes the difference (the gateway checks the live log for trailing events)."""
    late = world.send(DOCTOR, PATIENT, 40, device_id="laptop")
    bundle = world.bundle([late])
    rejected(world, bundle, "sent after its device was revoked")
    doctor = bundle.evidence[0]
    trimmed = dataclasses.replace(doctor, events=doctor.events[:-1])
    world.verify(dataclasses.replace(bundle, evidence=(trimmed, *bundle.evidence[1:])))


def test_a_wrong_clinic_id_or_root_key_is_refused(world: World) -> None:
    bundle = world.bundle(exchange(world))
    with pytest.raises(ProofError, match="names another clinic"):
        verify_record_bundle(bundle, clinic_id="clinic-b", root_key=world.root.verify_key)
    other_root = SigningKey.generate(world.rng).verify_key
    with pytest.raises(ProofError, match="clinic key certificate does not verify"):
        verify_record_bundle(bundle, clinic_id=CLINIC, root_key=other_root)


# --- the encoding -----------------------------------------------------------------------------


def test_every_truncation_of_a_valid_encoding_is_malformed(world: World) -> None:
    data = world.bundle(exchange(world)[:2]).encode()
    RecordBundle.decode(data)
    for length in range(len(data)):
        with pytest.raises(MalformedEncoding):
            RecordBundle.decode(data[:length])


def test_a_changed_byte_in_the_proven_part_is_refused_cleanly(world: World) -> None:
    """The gateway decodes bundles from the network: every single-bit change of a valid bundle
    after its visit header (a sample of positions across the thread id, checkpoint, keys,
    evidence and messages, every bit of each) is refused as malformed or as unproven, never
    accepted and never an exception of another kind. (The visit header is the builder's claim:
    the module docstring says who must vouch for it.)"""
    data = world.bundle(exchange(world)[:2]).encode()
    start = data.index(world.thread_id)
    step = max(1, (len(data) - start) // 300)
    positions = sorted({*range(start, len(data), step), len(data) - 1})
    for position in positions:
        for bit in range(8):
            changed = bytearray(data)
            changed[position] ^= 1 << bit
            try:
                bundle = RecordBundle.decode(bytes(changed))
            except MalformedEncoding:
                continue
            with pytest.raises(ProofError):
                world.verify(bundle)


def test_garbage_trailing_bytes_and_other_versions_are_malformed(world: World) -> None:
    data = world.bundle(exchange(world)[:2]).encode()
    for bad in (
        data + b"\x00",
        b"\x02" + data[1:],
        b"\xff" * 200,
        bytes(64),
        b"",
    ):
        with pytest.raises(MalformedEncoding):
            RecordBundle.decode(bad)
    with pytest.raises(MalformedEncoding, match="longer than"):
        RecordBundle.decode(bytes(MAX_RECORD_BUNDLE_BYTES + 1))


def test_a_bundle_with_no_messages_is_malformed(world: World) -> None:
    bundle = world.bundle(exchange(world)[:1])
    data, message = bundle.encode(), bundle.messages[0]
    # The message count (u16) sits just before the single message blob (u32 length prefix).
    cut = len(data) - len(message) - 4 - 2
    assert data[cut : cut + 2] == b"\x00\x01"
    with pytest.raises(MalformedEncoding, match="0 messages"):
        RecordBundle.decode(data[:cut] + b"\x00\x00")


def test_a_message_that_does_not_decode_is_a_proof_error(world: World) -> None:
    bundle = world.bundle(exchange(world))
    broken = dataclasses.replace(bundle, messages=(b"\x07" + bundle.messages[0][1:],))
    rejected(world, broken, "^message 0 does not decode")


def test_invalid_visits_are_refused_when_built(world: World) -> None:
    with pytest.raises(ValueError, match="close before"):
        world.visit(closed_ms=T0 - 1)
    with pytest.raises(ValueError, match="different users"):
        world.visit(clinician=PATIENT)
    with pytest.raises(ValueError, match="visit id"):
        world.visit(visit_id="bad\nid")


def _chain(world: World, user_id: str) -> list[LogEvent]:
    events = [LogEvent.decode(leaf) for leaf in world.leaves]
    return [event for event in events if event.subject == user_id]


def test_revocation_times_name_each_revoked_device_and_the_account(world: World) -> None:
    doctor = revocation_times(_chain(world, DOCTOR))
    assert doctor == RevocationTimes(None, {"laptop": REVOKED_AT})
    assert revocation_times(_chain(world, PATIENT)) == RevocationTimes(None, {})
    revocation = issue_revocation(
        world.issuing, user_id=PATIENT, device_id="", revoked_at_ms=REVOKED_AT + 5
    )
    world.append(EventKind.USER_REVOKED, PATIENT, revocation.encode())
    assert revocation_times(_chain(world, PATIENT)) == RevocationTimes(
        REVOKED_AT + 5, {"phone": REVOKED_AT + 5}
    )
