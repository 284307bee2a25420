"""Care relationships through the relay (fake clock, every store): a patient writes to a doctor
only while their care link is active; after it ends, new messages are refused with a clear error
while what was already queued still arrives; `bundle_get` follows the send rule, `devices_get`
also allows an ended link; a closed account is unknown to everyone."""

from __future__ import annotations

import pytest
from relay_harness import FakeClient, Relay
from store_worlds import StoreWorld, result
from twisted.internet.defer import Deferred, fail

from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.messages import (
    Bundle,
    BundleGet,
    Deliver,
    DeviceList,
    DevicesGet,
    Error,
    LogGet,
    Message,
    PrekeysLow,
    Sent,
)
from medrelay.server.policy import last_day
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.store import DeviceRecord

DAY_MS = 86_400_000


def only(messages: list[Message]) -> Message:
    assert len(messages) == 1, messages
    return messages[0]


def error_of(client: FakeClient) -> Error:
    answer = only(client.take())
    assert isinstance(answer, Error), answer
    return answer


def texts(client: FakeClient) -> list[bytes | None]:
    return [i.ciphertext for m in client.take() if isinstance(m, Deliver) for i in m.items]


@pytest.fixture
def relay(world: StoreWorld) -> Relay:
    """A patient linked to dr.ivanova since ten days, for thirty more; nurse.petrova is not
    linked to the patient."""
    relay = Relay(world)
    relay.account("petrov", "patient")
    relay.account("dr.ivanova", "doctor")
    relay.account("nurse.petrova", "nurse")
    now = relay.service.now_ms()
    world.add_care_link(
        "petrov", "dr.ivanova", start_ms=now - 10 * DAY_MS, ends_ms=now + 30 * DAY_MS
    )
    return relay


@pytest.fixture
def patient(relay: Relay) -> DeviceRecord:
    return relay.device("petrov", "phone")


@pytest.fixture
def doctor(relay: Relay) -> DeviceRecord:
    return relay.device("dr.ivanova", "laptop")


def send(relay: Relay, client: FakeClient, n: int, to: DeviceRecord) -> None:
    client.send_text(bytes([n]) * 16, [(to.username, to.device_id)], b"text %d" % n)
    relay.settle()


def test_a_patient_with_an_active_link_writes_and_the_doctor_answers(
    relay: Relay, patient: DeviceRecord, doctor: DeviceRecord
) -> None:
    pat, doc = relay.online(patient), relay.online(doctor)
    send(relay, pat, 1, doctor)
    assert isinstance(only(pat.take()), Sent)
    assert texts(doc) == [b"text 1"]
    send(relay, doc, 2, patient)
    assert isinstance(only(doc.take()), Sent)
    assert texts(pat) == [b"text 2"]


def test_after_the_link_ends_new_messages_are_refused_and_queued_ones_still_arrive(
    relay: Relay, world: StoreWorld, patient: DeviceRecord, doctor: DeviceRecord
) -> None:
    pat = relay.online(patient)
    send(relay, pat, 1, doctor)  # the doctor is offline: it waits in the queue
    assert isinstance(only(pat.take()), Sent)
    ended_ms = relay.service.now_ms()
    world.end_care_link("petrov", "dr.ivanova", ended_ms)
    relay.clock.advance(60)

    send(relay, pat, 2, doctor)
    error = error_of(pat)
    assert error.code == ErrorCode.FORBIDDEN
    assert error.message == (
        f"your care link with dr.ivanova ended on {last_day(ended_ms)}; "
        "ask the clinic's front desk to renew it"
    )
    doc = relay.online(doctor)
    relay.settle()
    assert texts(doc) == [b"text 1"]  # sent before the end: delivered as usual
    send(relay, doc, 3, patient)
    assert "your care link with petrov ended on" in error_of(doc).message


def test_a_link_that_reaches_its_end_date_refuses_new_messages(
    relay: Relay, patient: DeviceRecord, doctor: DeviceRecord
) -> None:
    pat = relay.online(patient)
    relay.clock.advance(31 * 86_400)
    send(relay, pat, 1, doctor)
    assert "ended on" in error_of(pat).message


def test_without_a_link_a_patient_is_refused(relay: Relay, patient: DeviceRecord) -> None:
    pat = relay.online(patient)
    nurse = relay.device("nurse.petrova", "tablet")
    send(relay, pat, 1, nurse)
    error = error_of(pat)
    assert error.code == ErrorCode.FORBIDDEN
    assert error.message.startswith("you have no care link with nurse.petrova;")
    assert relay.world.queue_of(nurse.pk) == []
    assert relay.counter("medrelay_sends_total", outcome="forbidden") == 1


def test_bundle_get_follows_the_send_rule_and_a_refusal_takes_no_prekey(
    relay: Relay, world: StoreWorld, patient: DeviceRecord, doctor: DeviceRecord
) -> None:
    nurse = relay.device("nurse.petrova", "tablet")
    now = relay.service.now_ms()
    assert result(relay.store.put_prekeys(nurse.pk, None, [b"otk-n"], now)) == 1
    pat = relay.online(patient)
    pat.send(BundleGet(rid=pat.rid(), user="nurse.petrova"))
    relay.settle()
    assert error_of(pat).code == ErrorCode.FORBIDDEN
    assert result(relay.store.one_time_prekey_count(nurse.pk)) == 1

    pat.send(BundleGet(rid=pat.rid(), user="dr.ivanova"))
    relay.settle()
    bundle = only(pat.take())
    assert isinstance(bundle, Bundle) and [d.device for d in bundle.devices] == ["laptop"]

    world.end_care_link("petrov", "dr.ivanova", relay.service.now_ms())
    relay.clock.advance(1)
    pat.send(BundleGet(rid=pat.rid(), user="dr.ivanova"))
    relay.settle()
    assert "ended on" in error_of(pat).message


def test_devices_get_is_allowed_with_an_ended_link_but_not_without_one(
    relay: Relay, world: StoreWorld, patient: DeviceRecord, doctor: DeviceRecord
) -> None:
    relay.device("nurse.petrova", "tablet")
    pat = relay.online(patient)
    world.end_care_link("petrov", "dr.ivanova", relay.service.now_ms())
    relay.clock.advance(1)
    pat.send(DevicesGet(rid=pat.rid(), user="dr.ivanova"))
    relay.settle()
    listing = only(pat.take())
    assert isinstance(listing, DeviceList) and [d.device for d in listing.devices] == ["laptop"]
    pat.send(DevicesGet(rid=pat.rid(), user="nurse.petrova"))
    relay.settle()
    assert error_of(pat).message.startswith("you have no care link with nurse.petrova;")


def test_clinicians_look_each_other_up_and_patients_themselves(
    relay: Relay, patient: DeviceRecord, doctor: DeviceRecord
) -> None:
    relay.device("petrov", "laptop")
    nurse = relay.online(relay.device("nurse.petrova", "tablet"))
    nurse.send(BundleGet(rid=nurse.rid(), user="dr.ivanova"))
    relay.settle()
    assert isinstance(only(nurse.take()), Bundle)
    pat = relay.online(patient)
    pat.send(DevicesGet(rid=pat.rid(), user="petrov"))
    pat.send(BundleGet(rid=pat.rid(), user="petrov"))
    relay.settle()
    # (its own bundle_get took a prekey of its own device: a prekeys_low notice may follow)
    answers = [m for m in pat.take() if not isinstance(m, PrekeysLow)]
    assert [type(m) for m in answers] == [DeviceList, Bundle]


def test_patients_cannot_reach_other_patients_at_all(relay: Relay, patient: DeviceRecord) -> None:
    relay.account("sidorov", "patient")
    other = relay.device("sidorov", "phone")
    pat = relay.online(patient)
    send(relay, pat, 1, other)
    assert error_of(pat).message == (
        "not allowed: patient accounts cannot write to patient accounts"
    )
    pat.send(DevicesGet(rid=pat.rid(), user="sidorov"))
    relay.settle()
    assert error_of(pat).code == ErrorCode.FORBIDDEN


def test_a_closed_account_is_unknown_to_everyone(
    relay: Relay, world: StoreWorld, patient: DeviceRecord, doctor: DeviceRecord
) -> None:
    pat = relay.online(patient)
    world.revoke_account("dr.ivanova")
    pat.send(DevicesGet(rid=pat.rid(), user="dr.ivanova"))
    relay.settle()
    error = error_of(pat)
    assert error.code == ErrorCode.UNKNOWN_USER
    assert error.message == "the account dr.ivanova is closed; it cannot be reached"
    send(relay, pat, 1, doctor)
    assert error_of(pat).code == ErrorCode.UNKNOWN_USER


class _AnsweringLog:
    """Stands in for the identity log: records who got an answer (refusing with a marker, so
    the test does not depend on the answer's format)."""

    def __init__(self) -> None:
        self.asked: list[str | None] = []

    def answer(self, message: LogGet) -> Deferred[Message]:
        self.asked.append(message.user)
        return fail(RelayError(ErrorCode.NOT_FOUND, "answered by the log"))


def test_log_get_follows_the_devices_get_rule(
    relay: Relay, world: StoreWorld, patient: DeviceRecord, doctor: DeviceRecord
) -> None:
    log = _AnsweringLog()
    relay.service.identity_log = log  # type: ignore[assignment]
    relay.device("nurse.petrova", "tablet")
    pat = relay.online(patient)
    world.end_care_link("petrov", "dr.ivanova", relay.service.now_ms())
    relay.clock.advance(1)
    for user in (None, "petrov", "dr.ivanova", "nurse.petrova"):
        pat.send(LogGet(rid=pat.rid(), sizes=(), user=user))
        relay.settle()
    assert [e.message for e in pat.take() if isinstance(e, Error)][-1].startswith(
        "you have no care link with nurse.petrova;"
    )
    assert log.asked == [None, "petrov", "dr.ivanova"]
