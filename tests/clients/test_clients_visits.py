"""Visits and the medical record on the fake relay: opening tells the patient in the visit's
thread, consent and the conclusion travel in it, closing is safe to retry, and `save_record`
sends the records account a bundle that verifies with nothing but the clinic's root key."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from client_support import client_world, inbox

from medrelay.clients.engine.client import Engine
from medrelay.clients.engine.errors import ClientError, LocalCode, RemoteError
from medrelay.clients.engine.record_messages import (
    INDICATION_UNSPECIFIED,
    KIND_CONCLUSION,
    KIND_CONSENT,
    KIND_RECORD_BUNDLE,
    KIND_RECORD_RECEIPT,
    KIND_VISIT_OPENED,
    RECORD_BUNDLE_MEDIA_TYPE,
    RecordReceipt,
    RecordRequest,
)
from medrelay.clients.engine.store import database_path
from medrelay.clients.engine.testing import ClientWorld
from medrelay.clients.engine.views import MessageView, NoticeView, OutgoingFile, VisitView
from medrelay.crypto.certificates import Role
from medrelay.crypto.content import KIND_TEXT
from medrelay.crypto.records import RecordBundle, VerifiedRecord, verify_record_bundle
from medrelay.protocol.errors import ErrorCode

RESULTS = "test-results"
RESULTS_NAME = "Interpreting test results after ordered diagnostics"

World = tuple[ClientWorld, Engine, Engine, Engine]
world = client_world


@pytest.fixture
def clinic(world: ClientWorld) -> Iterator[World]:
    """A doctor and a patient with a care link, and the records account; engines open."""
    world.enroll("doctor")
    world.enroll("patient", role=Role.PATIENT)
    world.enroll("records", role=Role.RECORDS)
    world.relay.care_links.add(("patient", "doctor"))
    engines = [world.open(user) for user in ("doctor", "patient", "records")]
    yield world, engines[0], engines[1], engines[2]
    for engine in engines:
        world.run(engine.close())


def messages(items: list[MessageView | NoticeView]) -> list[MessageView]:
    assert all(isinstance(i, MessageView) for i in items), items
    return [i for i in items if isinstance(i, MessageView)]


def tick(world: ClientWorld, seconds: float = 5.0) -> None:
    world.clock.advance(seconds)


def open_talk_close(world: ClientWorld, doctor: Engine, patient: Engine) -> VisitView:
    visit = world.run(doctor.open_visit("patient", RESULTS))
    tick(world)
    world.run(patient.send_message("doctor", "The results came, what do they mean?"))
    tick(world)
    world.run(doctor.send_message("patient", "Nothing worrying; keep the same dose."))
    tick(world)
    closed = world.run(
        doctor.close_visit(
            visit.visit_id,
            "Results normal; continue treatment.",
            [OutgoingFile("plan.txt", "text/plain", b"same dose")],
        )
    )
    tick(world)
    inbox(world, patient)
    inbox(world, doctor)
    return closed


def received_bundle(world: ClientWorld, records: Engine) -> tuple[MessageView, RecordBundle]:
    (message,) = messages(inbox(world, records))
    assert message.kind == KIND_RECORD_BUNDLE
    (saved,) = world.run(records.attachments(message.message_id))
    assert saved.media_type == RECORD_BUNDLE_MEDIA_TYPE
    return message, RecordBundle.decode(saved.data)


def verified(world: ClientWorld, bundle: RecordBundle) -> VerifiedRecord:
    return verify_record_bundle(
        bundle, clinic_id=world.clinic.clinic_id, root_key=world.clinic.root.verify_key
    )


def test_open_tells_the_patient_in_the_visit_thread(clinic: World) -> None:
    world, doctor, patient, _ = clinic
    visit = world.run(doctor.open_visit("patient", RESULTS))
    assert visit.is_open and visit.indication_name == RESULTS_NAME
    assert (visit.patient, visit.clinician, visit.consent) == ("patient", "doctor", "notice")
    (notice,) = messages(inbox(world, patient))
    assert notice.kind == KIND_VISIT_OPENED and notice.thread_id == visit.thread_id
    assert visit.visit_id in notice.text and RESULTS_NAME in notice.text
    assert "medical record" in notice.text and "consent" not in notice.text
    # Replies land in the visit's thread, both ways.
    reply = world.run(patient.send_message("doctor", "Thank you"))
    (received,) = messages(inbox(world, doctor))
    assert received.message_id == reply.message_id and received.thread_id == visit.thread_id
    listed = world.run(doctor.visits())
    assert [v.visit_id for v in listed.visits] == [visit.visit_id]
    assert RESULTS in {i.code for i in listed.indications}
    assert world.run(patient.visits(open_only=True)).visits[0].visit_id == visit.visit_id


def test_open_is_refused_without_a_care_link_or_for_an_unknown_indication(
    clinic: World,
) -> None:
    world, doctor, _, _ = clinic
    world.relay.care_links.clear()
    with pytest.raises(RemoteError) as refused:
        world.run(doctor.open_visit("patient", RESULTS))
    assert refused.value.code is ErrorCode.FORBIDDEN and "care link" in refused.value.message
    world.relay.care_links.add(("patient", "doctor"))
    with pytest.raises(RemoteError) as bad:
        world.run(doctor.open_visit("patient", "astrology"))
    assert bad.value.code is ErrorCode.INVALID_FIELD


def test_close_sends_the_conclusion_then_closes(clinic: World) -> None:
    world, doctor, patient, _ = clinic
    visit = world.run(doctor.open_visit("patient", RESULTS))
    tick(world)
    closed = world.run(doctor.close_visit(visit.visit_id, "All normal."))
    assert not closed.is_open and closed.conclusion is not None
    shown = messages(inbox(world, patient))
    assert [m.kind for m in shown] == [KIND_VISIT_OPENED, KIND_CONCLUSION]
    assert shown[1].message_id == closed.conclusion and shown[1].thread_id == visit.thread_id
    # Closing again is harmless: the same visit, no second conclusion.
    again = world.run(doctor.close_visit(visit.visit_id.lower(), "Other words."))
    assert again.conclusion == closed.conclusion
    assert messages(inbox(world, patient)) == []


def test_close_is_safe_to_retry_after_a_failure_between_the_steps(clinic: World) -> None:
    world, doctor, patient, _ = clinic
    visit = world.run(doctor.open_visit("patient", RESULTS))
    tick(world)
    world.run(doctor.visits())  # the next visit request is `visit_close`
    world.relay.refuse_next_visit = ErrorCode.SERVER_BUSY
    original = doctor.visit_book.get

    async def get_then_fail_close(visit_id: str) -> VisitView:
        found = await original(visit_id)
        world.relay.refuse_next_visit = ErrorCode.SERVER_BUSY
        return found

    doctor.visit_book.get = get_then_fail_close  # type: ignore[method-assign]
    with pytest.raises(RemoteError):
        world.run(doctor.close_visit(visit.visit_id, "All normal."))
    doctor.visit_book.get = original  # type: ignore[method-assign]
    assert world.relay.visits[visit.visit_id].closed_ms is None
    closed = world.run(doctor.close_visit(visit.visit_id, "All normal."))
    conclusions = [m for m in messages(inbox(world, patient)) if m.kind == KIND_CONCLUSION]
    assert [m.message_id for m in conclusions] == [closed.conclusion]


def test_only_the_clinician_closes_and_only_the_patient_consents(clinic: World) -> None:
    world, doctor, patient, _ = clinic
    visit = world.run(doctor.open_visit("patient", RESULTS))
    with pytest.raises(ClientError, match="only the visit's clinician"):
        world.run(patient.close_visit(visit.visit_id, "I close it"))
    with pytest.raises(ClientError, match="only the visit's patient"):
        world.run(doctor.consent_to_visit(visit.visit_id))


def test_save_record_sends_a_bundle_that_verifies(clinic: World) -> None:
    world, doctor, patient, records = clinic
    visit = open_talk_close(world, doctor, patient)
    saved = world.run(doctor.save_record(visit=visit.visit_id))
    assert (saved.visit_id, saved.messages, saved.thread_id) == (
        visit.visit_id,
        4,
        visit.thread_id,
    )
    message, bundle = received_bundle(world, records)
    assert message.sender_user == "doctor" and message.thread_id != visit.thread_id
    assert RecordRequest.decode(message.text).visit_id == visit.visit_id
    (attachment,) = message.attachments
    assert attachment.file_name == f"{visit.visit_id}.mrb"
    record = verified(world, bundle)
    assert record.thread_id == visit.thread_id
    assert record.visit.conclusion_message_id == visit.conclusion
    assert [m.content.kind for m in record.messages] == [
        KIND_VISIT_OPENED,
        KIND_TEXT,
        KIND_TEXT,
        KIND_CONCLUSION,
    ]
    # The gateway's view: polling in profile order, the bundle message's attachment count.
    (polled,) = world.run(records.received_after(0))
    assert (polled.kind, polled.attachments, polled.sender_user) == (
        KIND_RECORD_BUNDLE,
        1,
        "doctor",
    )
    assert world.run(records.received_after(polled.row_id)) == []


def test_a_receipt_from_records_is_shown_to_both(clinic: World) -> None:
    world, doctor, patient, records = clinic
    visit = open_talk_close(world, doctor, patient)
    world.run(doctor.save_record(visit=visit.visit_id))
    received_bundle(world, records)
    receipt = RecordReceipt(visit.visit_id, "saved", "ab" * 32, ("Encounter/e1",))
    world.run(
        records.send_in_thread(
            ["patient", "doctor"], visit.thread_id, KIND_RECORD_RECEIPT, receipt.encode()
        )
    )
    for engine in (doctor, patient):
        (shown,) = messages(inbox(world, engine))
        assert shown.kind == KIND_RECORD_RECEIPT and shown.thread_id == visit.thread_id
        assert shown.receipt is not None and shown.receipt.saved
        assert shown.receipt.summary == receipt.summary()
    # A later doctor's message in the visit's thread still chains after the conclusion.
    world.run(doctor.send_message("patient", "One more thing"))
    (late,) = messages(inbox(world, patient))
    assert late.thread_id == visit.thread_id


def test_receipts_not_from_records_or_malformed_show_as_failed(clinic: World) -> None:
    world, doctor, patient, records = clinic
    visit = world.run(doctor.open_visit("patient", RESULTS))
    inbox(world, patient)
    forged = RecordReceipt(visit.visit_id, "saved", "cd" * 32, ("Encounter/x",)).encode()
    world.run(doctor.send_in_thread(["patient"], visit.thread_id, KIND_RECORD_RECEIPT, forged))
    world.run(records.send_in_thread(["patient"], visit.thread_id, KIND_RECORD_RECEIPT, "{oops"))
    shown = messages(inbox(world, patient))
    assert [m.receipt for m in shown] == [None, None]
    assert "not the records gateway" in (shown[0].receipt_error or "")
    assert "malformed" in (shown[1].receipt_error or "")


def test_save_record_refuses_an_open_visit(clinic: World) -> None:
    world, doctor, _, _ = clinic
    visit = world.run(doctor.open_visit("patient", RESULTS))
    with pytest.raises(ClientError, match="close it first") as refused:
        world.run(doctor.save_record(visit=visit.visit_id))
    assert refused.value.code is LocalCode.RECORD_REFUSED


def test_explicit_consent_is_required_before_saving(clinic: World) -> None:
    world, doctor, patient, records = clinic
    world.relay.consent_mode = "explicit"
    first = world.run(doctor.open_visit("patient", RESULTS))
    (notice,) = messages(inbox(world, patient))
    assert f"medrelay visit consent {first.visit_id}" in notice.text
    tick(world)
    closed = world.run(doctor.close_visit(first.visit_id, "Normal."))
    with pytest.raises(ClientError, match="has not agreed") as refused:
        world.run(doctor.save_record(visit=closed.visit_id))
    assert refused.value.code is LocalCode.RECORD_REFUSED
    with pytest.raises(ClientError, match="closed"):
        world.run(patient.consent_to_visit(first.visit_id))
    # A second visit, with consent this time.
    second = world.run(doctor.open_visit("patient", RESULTS))
    inbox(world, patient)
    tick(world)
    world.run(patient.consent_to_visit(second.visit_id))
    (consent,) = messages(inbox(world, doctor))
    assert consent.kind == KIND_CONSENT and consent.thread_id == second.thread_id
    tick(world)
    world.run(doctor.close_visit(second.visit_id, "Normal."))
    tick(world)
    world.run(doctor.save_record(visit=second.visit_id))
    _, bundle = received_bundle(world, records)
    assert KIND_CONSENT in [m.content.kind for m in verified(world, bundle).messages]


def test_thread_export_saves_a_time_range(clinic: World) -> None:
    world, doctor, patient, records = clinic
    start = doctor.now_ms()
    world.run(patient.send_message("doctor", "A question"))
    tick(world)
    world.run(doctor.send_message("patient", "An answer"))
    tick(world)
    inbox(world, doctor)
    end = doctor.now_ms()
    tick(world)
    world.run(doctor.send_message("patient", "After the range"))
    saved = world.run(doctor.save_record(with_user="patient", from_ms=start, to_ms=end))
    assert saved.messages == 2 and saved.visit_id.startswith("thread-")
    _, bundle = received_bundle(world, records)
    record = verified(world, bundle)
    assert record.visit.indication_code == INDICATION_UNSPECIFIED
    assert (record.visit.opened_ms, record.visit.closed_ms) == (start, end)
    assert [m.content.text for m in record.messages] == ["A question", "An answer"]
    with pytest.raises(ClientError, match="only doctors and nurses"):
        world.run(patient.save_record(with_user="doctor", from_ms=start, to_ms=end))
    with pytest.raises(ClientError, match="not a patient"):
        world.run(doctor.save_record(with_user="records", from_ms=start, to_ms=end))


def test_a_record_that_does_not_verify_here_is_not_sent(clinic: World) -> None:
    world, doctor, _, records = clinic
    visit = world.run(doctor.open_visit("patient", RESULTS))
    tick(world)
    gone = world.run(doctor.send_message("patient", "First advice"))
    tick(world)
    world.run(doctor.send_message("patient", "Second advice"))
    tick(world)
    world.run(doctor.close_visit(visit.visit_id, "Done."))
    tick(world)
    # This device lost a message in the middle: the chain of previous hashes shows the gap.
    with sqlite3.connect(database_path(world.profile_dir("doctor"))) as conn:
        conn.execute("DELETE FROM messages WHERE message_id = ?", (gone.message_id,))
    conn.close()
    with pytest.raises(ClientError, match="does not verify on this device") as refused:
        world.run(doctor.save_record(visit=visit.visit_id))
    assert refused.value.code is LocalCode.RECORD_REFUSED and "missing" in refused.value.message
    assert messages(inbox(world, records)) == []
