"""The gateway on fake time: record requests are verified, mirrored through the durable outbox
(once, across restarts), retried with backoff, and answered with receipts; tampered bundles and
permanent refusals become failed receipts with a clear one-line reason."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest
from record_world import DOCTOR, MINUTE, NURSE, PATIENT, REVOKED_AT, SECRET_TEXT, T0
from records_world import (
    VISIT_ID,
    FakeEngine,
    World,
    blob_content,
)
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from medrelay.clients.engine.record_messages import (
    KIND_CONSENT,
    KIND_RECORD_RECEIPT,
    RecordReceipt,
)
from medrelay.clients.records.api import LiveRevocations
from medrelay.clients.records.gateway import Backoff, RecordsGateway
from medrelay.clients.records.outbox import Outbox
from medrelay.clients.records.sinks import DeliveryError, DirectorySink, write_atomically
from medrelay.crypto.content import SignedContent
from medrelay.crypto.records import RecordBundle
from medrelay.crypto.rng import Rng


class FlakySink:
    """Fails `failures` times (temporary, or permanent), then writes like DirectorySink."""

    name = "flaky"

    def __init__(self, inner: DirectorySink, failures: int = 0, permanent: bool = False) -> None:
        self.inner = inner
        self.failures = failures
        self.permanent = permanent
        self.calls = 0

    def deliver(self, mirror_id: str, bundle: bytes) -> Deferred[list[str]]:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            return fail(
                DeliveryError("the FHIR server refused the Bundle: HTTP 422", permanent=True)
                if self.permanent
                else DeliveryError("the FHIR server did not answer (TimeoutError)", permanent=False)
            )
        return self.inner.deliver(mirror_id, bundle)


class Setup:
    def __init__(self, rng: Rng, tmp_path: Path, failures: int = 0, permanent: bool = False):
        self.world = World(rng)
        self.engine = FakeEngine(self.world)
        self.clock = Clock()
        self.clock.advance(T0 / 1000 + 3 * 3600)
        self.tmp_path = tmp_path
        self.directory = DirectorySink(tmp_path / "records")
        self.sink = FlakySink(self.directory, failures, permanent)
        self.outbox = Outbox(tmp_path / "data" / "outbox.sqlite3")
        self.gateway = self.new_gateway()

    def new_gateway(self) -> RecordsGateway:
        return RecordsGateway(
            self.engine,
            self.outbox,
            self.sink,
            clock=self.clock,
            jitter=lambda: 0.0,
            backoff=Backoff(base_s=10, cap_s=600),
            receipt_backoff=Backoff(base_s=5, cap_s=60),
        )

    def restart(self) -> None:
        self.gateway.stop()
        self.outbox.close()
        self.outbox = Outbox(self.tmp_path / "data" / "outbox.sqlite3")
        self.gateway = self.new_gateway()
        self.gateway.start()

    def receipts(self) -> list[tuple[tuple[str, ...], bytes, RecordReceipt]]:
        out = []
        for recipients, thread, kind, text in self.engine.sent:
            assert kind == KIND_RECORD_RECEIPT
            out.append((recipients, thread, RecordReceipt.decode(text)))
        return out

    def files(self) -> list[Path]:
        return sorted((self.tmp_path / "records").glob("*.json"))


@pytest.fixture
def setup(rng: Rng, tmp_path: Path) -> Setup:
    return Setup(rng, tmp_path)


def test_a_valid_record_is_saved_and_both_parties_get_the_receipt(setup: Setup) -> None:
    messages = setup.world.exchange()
    bundle = setup.world.bundle(messages)
    setup.engine.deliver_bundle(bundle)
    setup.gateway.start()
    (path,) = setup.files()
    saved = json.loads(path.read_bytes())
    assert saved["resourceType"] == "Bundle"
    assert SECRET_TEXT in path.read_text()
    ((recipients, thread, receipt),) = setup.receipts()
    assert set(recipients) == {DOCTOR, PATIENT}
    assert thread == setup.world.thread_id
    assert receipt.saved
    assert receipt.visit_id == VISIT_ID
    assert receipt.records[0].startswith("Encounter/")
    assert setup.outbox.counts()["mirrors"]["delivered"] == 1
    # The attachment itself is in the record, not only its description.
    (descriptor,) = messages[2].content.attachments
    assert base64.b64encode(blob_content(descriptor)).decode() in path.read_text()


def test_a_replayed_request_and_a_restart_save_nothing_twice(setup: Setup) -> None:
    bundle = setup.world.bundle(setup.world.exchange())
    setup.engine.deliver_bundle(bundle)
    setup.gateway.start()
    first = setup.files()[0].read_bytes()
    setup.restart()  # the same message is not handled again
    assert len(setup.engine.sent) == 1
    setup.engine.deliver_bundle(bundle)  # the doctor sends the same bundle again
    setup.gateway.poll()
    assert setup.files()[0].read_bytes() == first
    assert len(setup.files()) == 1
    assert setup.outbox.counts()["mirrors"] == {"pending": 0, "delivered": 1, "failed": 0}
    receipts = setup.receipts()
    assert len(receipts) == 2
    assert receipts[0][2] == receipts[1][2]  # the replay gets the same saved receipt


def test_a_sink_down_for_a_while_is_retried_with_backoff_and_delivers_once(
    rng: Rng, tmp_path: Path
) -> None:
    setup = Setup(rng, tmp_path, failures=3)
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()))
    setup.gateway.start()
    assert setup.sink.calls == 1
    assert setup.files() == []
    setup.clock.advance(9.9)
    assert setup.sink.calls == 1
    setup.clock.advance(0.1)  # 10 s after the first failure
    assert setup.sink.calls == 2
    setup.clock.advance(19.9)
    assert setup.sink.calls == 2
    setup.clock.advance(0.1)  # then 20 s
    assert setup.sink.calls == 3
    setup.clock.advance(40)  # then 40 s: delivered
    assert setup.sink.calls == 4
    assert len(setup.files()) == 1
    assert [r.saved for _, _, r in setup.receipts()] == [True]
    setup.clock.advance(3600)
    assert setup.sink.calls == 4


def test_a_restart_while_the_sink_is_down_loses_nothing(rng: Rng, tmp_path: Path) -> None:
    setup = Setup(rng, tmp_path, failures=2)
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()))
    setup.gateway.start()
    assert setup.outbox.counts()["mirrors"]["pending"] == 1
    setup.restart()  # drained at start: the second attempt
    assert setup.sink.calls == 2
    setup.clock.advance(600)
    assert len(setup.files()) == 1
    assert len(setup.receipts()) == 1
    assert setup.outbox.counts()["intake"]["handled"] == 1


def test_a_receipt_that_cannot_be_sent_survives_a_restart(setup: Setup) -> None:
    setup.engine.send_failures = 100
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()))
    setup.gateway.start()
    assert setup.outbox.counts()["receipts"]["pending"] == 1
    setup.restart()
    setup.engine.send_failures = 0
    setup.clock.advance(60)
    assert [r.saved for _, _, r in setup.receipts()] == [True]
    assert setup.outbox.counts()["receipts"] == {"pending": 0, "sent": 1}


def test_a_permanent_refusal_becomes_a_failed_receipt(rng: Rng, tmp_path: Path) -> None:
    setup = Setup(rng, tmp_path, failures=1, permanent=True)
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()))
    setup.gateway.start()
    ((recipients, _, receipt),) = setup.receipts()
    assert set(recipients) == {DOCTOR, PATIENT}
    assert not receipt.saved
    assert receipt.reason == "the FHIR server refused the Bundle: HTTP 422"
    setup.clock.advance(3600)
    assert setup.sink.calls == 1
    assert setup.outbox.counts()["mirrors"]["failed"] == 1


def test_a_visit_lookup_that_fails_for_now_is_tried_again(setup: Setup) -> None:
    setup.engine.visit_failures = 2
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()))
    setup.gateway.start()
    assert setup.receipts() == []
    setup.clock.advance(10)
    assert setup.receipts() == []
    setup.clock.advance(10)
    assert [r.saved for _, _, r in setup.receipts()] == [True]


# --- refused bundles ----------------------------------------------------------------------------


def refused(setup: Setup, match: str) -> str:
    setup.gateway.start()
    assert setup.files() == []
    ((recipients, _, receipt),) = setup.receipts()
    assert recipients == (DOCTOR,)
    assert not receipt.saved
    assert receipt.reason is not None
    assert match in receipt.reason, receipt.reason
    assert SECRET_TEXT not in receipt.reason
    assert "\n" not in receipt.reason
    assert setup.outbox.counts()["intake"]["handled"] == 1
    return receipt.reason


def replace_message(bundle: RecordBundle, index: int, data: bytes) -> RecordBundle:
    messages = list(bundle.messages)
    messages[index] = data
    return dataclasses.replace(bundle, messages=tuple(messages))


def test_an_edited_message_is_refused(setup: Setup) -> None:
    bundle = setup.world.bundle(setup.world.exchange())
    signed = SignedContent.decode(bundle.messages[1])
    edited = dataclasses.replace(signed.content, text="Stop all medication")
    forged = SignedContent(edited, signed.signature).encode()
    setup.engine.deliver_bundle(replace_message(bundle, 1, forged))
    refused(setup, "does not verify")


def test_a_message_removed_from_the_middle_is_refused(setup: Setup) -> None:
    world = setup.world
    messages = [
        world.send(PATIENT, DOCTOR, 1),
        world.send(DOCTOR, PATIENT, 2),
        world.send(DOCTOR, PATIENT, 3),
        world.send(DOCTOR, PATIENT, 4),
    ]
    del messages[2]
    setup.engine.deliver_bundle(world.bundle(messages))
    refused(setup, "missing between")


def test_a_forged_signature_is_refused(setup: Setup) -> None:
    bundle = setup.world.bundle(setup.world.exchange())
    signed = SignedContent.decode(bundle.messages[0])
    forged = SignedContent(signed.content, bytes(64)).encode()
    setup.engine.deliver_bundle(replace_message(bundle, 0, forged))
    refused(setup, "does not verify")


def test_a_revoked_devices_message_after_the_revocation_is_refused(setup: Setup) -> None:
    world = setup.world
    minutes_after = (REVOKED_AT - T0) // MINUTE + 5
    messages = [
        world.send(PATIENT, DOCTOR, 1),
        world.send(DOCTOR, PATIENT, minutes_after, device_id="laptop"),
    ]
    setup.engine.deliver_bundle(world.bundle(messages))
    refused(setup, "revoked")


def test_a_revocation_in_the_live_log_after_the_checkpoint_is_refused(setup: Setup) -> None:
    setup.engine.live[DOCTOR] = LiveRevocations(devices={"phone": T0 + 3 * MINUTE})
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()))
    refused(setup, "revoked before it was sent (live log)")


def test_a_bundle_not_sent_by_the_visits_clinician_is_refused(setup: Setup) -> None:
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()), sender=NURSE)
    setup.gateway.start()
    ((recipients, _, receipt),) = setup.receipts()
    assert recipients == (NURSE,)
    assert receipt.reason is not None
    assert "not sent by the visit's clinician" in receipt.reason


def test_a_header_that_differs_from_the_servers_visit_is_refused(setup: Setup) -> None:
    bundle = setup.world.bundle(setup.world.exchange())
    setup.engine.visits[VISIT_ID] = setup.world.server_visit(
        bundle, indication="J06", opened_ms=T0 - 1
    )
    setup.engine.deliver_bundle(bundle)
    refused(setup, "differs from the server's visit in: indication, opening time")


def test_an_open_visit_is_refused(setup: Setup) -> None:
    bundle = setup.world.bundle(setup.world.exchange())
    setup.engine.visits[VISIT_ID] = setup.world.server_visit(bundle, closed_ms=None)
    setup.engine.deliver_bundle(bundle)
    refused(setup, "not closed")


def test_explicit_consent_needs_the_patients_consent_message(setup: Setup) -> None:
    bundle = setup.world.bundle(setup.world.exchange())
    setup.engine.visits[VISIT_ID] = setup.world.server_visit(bundle, consent="explicit")
    setup.engine.deliver_bundle(bundle)
    refused(setup, "explicit consent")


def test_explicit_consent_given_in_the_thread_is_saved(setup: Setup) -> None:
    world = setup.world
    messages = [
        world.send(PATIENT, DOCTOR, 1, kind=KIND_CONSENT, text="I agree"),
        world.send(DOCTOR, PATIENT, 2),
    ]
    bundle = world.bundle(messages)
    setup.engine.visits[VISIT_ID] = world.server_visit(bundle, consent="explicit")
    setup.engine.deliver_bundle(bundle)
    setup.gateway.start()
    assert [r.saved for _, _, r in setup.receipts()] == [True]


def test_an_attachment_the_relay_no_longer_has_is_refused(setup: Setup) -> None:
    messages = setup.world.exchange()
    bundle = setup.world.bundle(messages)
    (descriptor,) = messages[2].content.attachments
    setup.engine.gone_blobs.add(descriptor.blob_id)
    setup.engine.deliver_bundle(bundle)
    refused(setup, "attachment 0 of message 2")


def test_an_attachment_that_cannot_be_fetched_now_is_tried_again(setup: Setup) -> None:
    setup.engine.download_failures = 1
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()))
    setup.gateway.start()
    assert setup.receipts() == []
    setup.clock.advance(10)
    assert [r.saved for _, _, r in setup.receipts()] == [True]


def test_attachments_heavier_than_a_record_may_carry_are_refused(setup: Setup) -> None:
    setup.gateway.max_attachment_bytes = 1024
    setup.engine.deliver_bundle(setup.world.bundle(setup.world.exchange()))
    refused(setup, "more than the 0 MiB a record may carry")


def test_garbage_instead_of_a_bundle_is_refused(setup: Setup) -> None:
    setup.engine.deliver_bundle(b"not a bundle")
    refused(setup, "does not decode")


def test_the_directory_sink_writes_atomically_and_rewrites_the_same_file(tmp_path: Path) -> None:
    sink = DirectorySink(tmp_path / "out")
    results: list[list[str]] = []
    bundle = b'{"resourceType":"Bundle","entry":[]}'
    sink.deliver("abc", bundle).addCallback(results.append)
    sink.deliver("abc", bundle).addCallback(results.append)
    assert results == [[], []]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["abc.json"]
    assert (tmp_path / "out" / "abc.json").read_bytes() == bundle
    with pytest.raises(ValueError, match="mirror id"):
        sink.deliver("../escape", bundle)


def test_an_interrupted_write_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.json"
    write_atomically(target, b"old")

    def broken(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    backoff = Backoff(base_s=5, cap_s=60, jitter=0.5)
    assert [backoff.delay_s(n, 0.0) for n in range(1, 6)] == [5, 10, 20, 40, 60]
    assert backoff.delay_s(2, 1.0) == 5
