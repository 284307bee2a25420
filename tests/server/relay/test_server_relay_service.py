"""The relay's behaviour on a fake clock with the in-memory store: handshake, login, sending,
delivery, acknowledgement, idempotency, device-set checks, caps, expiry, flow control and
backpressure."""

from __future__ import annotations

import pytest
from relay_harness import CLINIC, FakeClient, Relay
from store_worlds import StoreWorld
from twisted.internet.defer import Deferred

from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.frames import encode_frame
from medrelay.protocol.messages import (
    Auth,
    Authenticated,
    Deliver,
    DeliveredItem,
    DevicesGet,
    Error,
    Hello,
    ItemKind,
    Message,
    Resume,
    Sent,
)
from medrelay.server.relay.connection import _clip_utf8
from medrelay.server.relay.store import DeviceRecord, WriteBatch, WriteLimits, WriteResult


def delivered(messages: list[Message]) -> list[DeliveredItem]:
    return [item for m in messages if isinstance(m, Deliver) for item in m.items]


def errors(messages: list[Message]) -> list[Error]:
    return [m for m in messages if isinstance(m, Error)]


@pytest.fixture
def relay(world: StoreWorld) -> Relay:
    """A relay on each store implementation, with two doctors' accounts."""
    relay = Relay(world)
    relay.account("alice")
    relay.account("bob")
    return relay


# -- handshake and login ------------------------------------------------------------------


def test_hello_is_answered_with_version_clinic_challenge_and_limits(relay: Relay) -> None:
    welcome = relay.client().hello()
    assert welcome.version == 1
    assert welcome.clinic == CLINIC
    assert len(welcome.challenge) == 32
    assert welcome.limits.max_frame == relay.config.max_frame_size


def test_each_connection_gets_a_fresh_challenge(relay: Relay) -> None:
    assert relay.client().hello().challenge != relay.client().hello().challenge


def test_a_first_frame_other_than_hello_closes_the_connection(relay: Relay) -> None:
    client = relay.client()
    client.send(Resume(rid=1, token=b"t" * 32))
    (error,) = errors(client.take())
    assert error.code == ErrorCode.UNEXPECTED_MESSAGE
    assert client.transport.closed


def test_hello_without_a_common_version_is_refused(relay: Relay) -> None:
    client = relay.client()
    client.send(Hello(versions=(7,), agent="future"))
    (error,) = errors(client.take())
    assert error.code == ErrorCode.UNSUPPORTED_VERSION
    assert client.transport.closed


def test_login_with_the_device_key_returns_a_session_token(relay: Relay) -> None:
    device = relay.device("alice", "phone")
    messages = relay.client().login(device, relay.keys[("alice", "phone")])
    (answer,) = [m for m in messages if isinstance(m, Authenticated)]
    assert (answer.user, answer.device) == ("alice", "phone")
    assert answer.token is not None and len(answer.token) == 32


def test_login_with_another_devices_key_is_refused_and_closed(relay: Relay) -> None:
    device = relay.device("alice", "phone")
    relay.device("bob", "laptop")
    client = relay.client()
    messages = client.login(device, relay.keys[("bob", "laptop")])
    (error,) = errors(messages)
    assert error.code == ErrorCode.AUTH_FAILED
    assert client.transport.closed
    assert relay.counter("medrelay_auth_failures_total", reason="bad_signature") == 1


def test_unknown_device_and_bad_signature_get_the_same_answer(relay: Relay) -> None:
    """No oracle for which devices exist."""
    device = relay.device("alice", "phone")
    other_key = relay.keys[("alice", "phone")]
    relay.device("bob", "laptop")
    unknown = DeviceRecord(999, "alice", "tablet", "doctor", b"", b"")
    (bad_signature,) = errors(relay.client().login(device, relay.keys[("bob", "laptop")]))
    (no_such_device,) = errors(relay.client().login(unknown, other_key))
    assert (bad_signature.code, bad_signature.message) == (
        no_such_device.code,
        no_such_device.message,
    )
    assert bad_signature.code == ErrorCode.AUTH_FAILED


def test_a_signature_for_another_connections_challenge_is_refused(relay: Relay) -> None:
    device = relay.device("alice", "phone")
    key = relay.keys[("alice", "phone")]
    first = relay.client()
    challenge = first.hello().challenge
    second = relay.client()
    second.hello()
    second.send(
        Auth(
            rid=1,
            user="alice",
            device="phone",
            signature=key.sign(auth_transcript(challenge, CLINIC, "alice", "phone")),
        )
    )
    relay.settle()
    assert errors(second.take())[0].code == ErrorCode.AUTH_FAILED
    del device


def test_a_revoked_device_cannot_log_in(relay: Relay) -> None:
    device = relay.device("alice", "phone")
    relay.world.revoke_device("alice", "phone")
    messages = relay.client().login(device, relay.keys[("alice", "phone")])
    assert errors(messages)[0].code == ErrorCode.DEVICE_REVOKED


def test_resume_with_the_token_logs_in_without_a_signature(relay: Relay) -> None:
    device = relay.device("alice", "phone")
    messages = relay.client().login(device, relay.keys[("alice", "phone")])
    token = next(m for m in messages if isinstance(m, Authenticated)).token
    assert token is not None
    client = relay.client()
    client.hello()
    client.send(Resume(rid=5, token=token))
    relay.settle()
    (answer,) = [m for m in client.take() if isinstance(m, Authenticated)]
    assert answer.rid == 5 and answer.token is None


def test_resume_with_an_unknown_token_is_refused(relay: Relay) -> None:
    client = relay.client()
    client.hello()
    client.send(Resume(rid=5, token=b"\x01" * 32))
    relay.settle()
    (error,) = errors(client.take())
    assert (error.code, error.rid) == (ErrorCode.TOKEN_INVALID, 5)
    assert client.transport.closed


def test_resume_after_the_token_expired_is_refused(world: StoreWorld) -> None:
    relay = Relay(world, session_ttl_s=60)
    relay.account("alice")
    device = relay.device("alice", "phone")
    messages = relay.client().login(device, relay.keys[("alice", "phone")])
    token = next(m for m in messages if isinstance(m, Authenticated)).token
    assert token is not None
    relay.clock.advance(61)
    client = relay.client()
    client.hello()
    client.send(Resume(rid=1, token=token))
    relay.settle()
    assert errors(client.take())[0].code == ErrorCode.TOKEN_INVALID


def test_a_connection_that_does_not_log_in_in_time_is_closed(relay: Relay) -> None:
    client = relay.client()
    client.hello()
    relay.clock.advance(relay.config.auth_timeout_s + 0.1)
    assert client.transport.closed
    assert relay.counter("medrelay_auth_failures_total", reason="timeout") == 1


def test_requests_before_login_are_refused_but_the_connection_survives(relay: Relay) -> None:
    client = relay.client()
    client.hello()
    client.send(DevicesGet(rid=3, user="bob"))
    (error,) = errors(client.take())
    assert (error.code, error.rid) == (ErrorCode.NOT_AUTHENTICATED, 3)
    assert not client.transport.closed


def test_a_second_login_of_the_same_device_replaces_the_first(relay: Relay) -> None:
    device = relay.device("alice", "phone")
    first = relay.online(device)
    relay.online(device)
    assert errors(first.take())[-1].code == ErrorCode.SESSION_REPLACED
    assert first.transport.closed


# -- frames -------------------------------------------------------------------------------


def test_a_malformed_frame_gets_an_error_and_the_connection_survives(relay: Relay) -> None:
    client = relay.client()
    client.hello()
    client.send_raw(b"\x00\x00\x00\x01\xff")
    (error,) = errors(client.take())
    assert error.code == ErrorCode.MALFORMED_FRAME
    assert not client.transport.closed


def test_an_oversized_length_prefix_closes_before_login(relay: Relay) -> None:
    client = relay.client()
    client.send_raw((64 * 1024).to_bytes(4, "big"))
    (error,) = errors(client.take())
    assert error.code == ErrorCode.FRAME_TOO_LARGE
    assert client.transport.closed


def test_a_frame_split_across_transport_messages_is_refused(relay: Relay) -> None:
    client = relay.client()
    frame = encode_frame(Hello(versions=(1,), agent="x"))
    client.send_raw(frame[:3])
    assert errors(client.take())[0].code == ErrorCode.MALFORMED_FRAME
    assert client.transport.closed


# -- sending and delivery -----------------------------------------------------------------


def test_a_message_is_acknowledged_after_commit_and_pushed_to_the_online_recipient(
    relay: Relay,
) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    bob = relay.online(relay.device("bob", "laptop"))
    rid = alice.send_text(b"m" * 16, [("bob", "laptop")], b"sealed")
    assert alice.take() == []  # nothing is acknowledged before the group commit ran
    relay.settle()
    (sent,) = alice.take()
    assert isinstance(sent, Sent) and (sent.rid, sent.message_id) == (rid, b"m" * 16)
    (item,) = delivered(bob.take())
    assert (item.kind, item.user, item.device, item.ciphertext) == (
        ItemKind.MESSAGE, "alice", "phone", b"sealed",
    )  # fmt: skip


def test_an_acknowledged_item_is_deleted_and_not_delivered_again(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    bob_device = relay.device("bob", "laptop")
    bob = relay.online(bob_device)
    alice.send_text(b"m" * 16, [("bob", "laptop")])
    relay.settle()
    (item,) = delivered(bob.take())
    bob.ack([item.seq])
    relay.settle()
    assert relay.world.queue_of(bob_device.pk) == []
    assert delivered(relay.online(bob_device).take()) == []
    assert relay.counter("medrelay_envelopes_delivered_total") == 1


def test_an_unacknowledged_item_is_delivered_again_on_the_next_connection(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    bob_device = relay.device("bob", "laptop")
    bob = relay.online(bob_device)
    alice.send_text(b"m" * 16, [("bob", "laptop")])
    relay.settle()
    first = delivered(bob.take())
    bob.connection.connection_lost()
    again = relay.online(bob_device)
    relay.settle()
    assert delivered(again.take()) == first


def test_an_offline_recipient_gets_everything_in_order_on_login(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    bob_device = relay.device("bob", "laptop")
    for i in range(5):
        alice.send_text(bytes([i]) * 16, [("bob", "laptop")], f"c{i}".encode())
        relay.settle()
    bob = relay.online(bob_device)
    relay.settle()
    items = delivered(bob.take())
    assert [i.ciphertext for i in items] == [f"c{i}".encode() for i in range(5)]
    assert [i.seq for i in items] == sorted(i.seq for i in items)


def test_sends_of_one_reactor_turn_share_one_transaction(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    relay.device("bob", "laptop")
    calls: list[WriteBatch] = []
    original = relay.store.apply_writes

    def counting(batch: WriteBatch, now_ms: int, limits: WriteLimits) -> Deferred[WriteResult]:
        calls.append(batch)
        return original(batch, now_ms, limits)

    relay.store.apply_writes = counting  # type: ignore[method-assign]
    for i in range(10):
        alice.send_text(bytes([i]) * 16, [("bob", "laptop")])
    relay.settle()
    assert [len(b.sends) for b in calls] == [10]
    assert len([m for m in alice.take() if isinstance(m, Sent)]) == 10


def test_the_senders_other_devices_must_be_addressed(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    relay.device("alice", "laptop")
    relay.device("bob", "tablet")
    rid = alice.send_text(b"m" * 16, [("bob", "tablet")])
    relay.settle()
    (error,) = errors(alice.take())
    assert (error.code, error.rid) == (ErrorCode.STALE_DEVICES, rid)
    assert [(r.user, r.device) for r in error.missing or ()] == [("alice", "laptop")]


def test_a_stale_device_set_is_refused_with_missing_and_extra_devices(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    relay.device("bob", "laptop")
    relay.device("bob", "phone")
    alice.send_text(b"m" * 16, [("bob", "laptop"), ("bob", "old-tablet")])
    relay.settle()
    (error,) = errors(alice.take())
    assert error.code == ErrorCode.STALE_DEVICES
    assert [(r.user, r.device) for r in error.missing or ()] == [("bob", "phone")]
    assert [(r.user, r.device) for r in error.extra or ()] == [("bob", "old-tablet")]
    assert relay.counter("medrelay_sends_total", outcome="stale_devices") == 1


def test_sending_to_an_unknown_user_is_refused(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    alice.send_text(b"m" * 16, [("carol", "x")])
    relay.settle()
    assert errors(alice.take())[0].code == ErrorCode.UNKNOWN_USER


def test_patients_cannot_write_to_patients(relay: Relay) -> None:
    relay.account("pat1", "patient")
    relay.account("pat2", "patient")
    sender = relay.online(relay.device("pat1", "phone"))
    relay.device("pat2", "phone")
    sender.send_text(b"m" * 16, [("pat2", "phone")])
    relay.settle()
    assert errors(sender.take())[0].code == ErrorCode.FORBIDDEN


def test_a_resend_with_the_same_id_is_stored_once(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    bob_device = relay.device("bob", "laptop")
    alice.send_text(b"m" * 16, [("bob", "laptop")], b"same")
    relay.settle()
    alice.send_text(b"m" * 16, [("bob", "laptop")], b"same")
    relay.settle()
    first, second = [m for m in alice.take() if isinstance(m, Sent)]
    assert first.time_ms == second.time_ms
    assert len(relay.world.queue_of(bob_device.pk)) == 1
    assert relay.counter("medrelay_sends_total", outcome="duplicate") == 1


def test_reusing_an_id_for_different_envelopes_is_a_conflict(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    relay.device("bob", "laptop")
    alice.send_text(b"m" * 16, [("bob", "laptop")], b"one")
    relay.settle()
    alice.send_text(b"m" * 16, [("bob", "laptop")], b"two")
    relay.settle()
    assert errors(alice.take())[0].code == ErrorCode.ID_CONFLICT


def test_a_full_queue_refuses_the_send_and_stores_nothing(world: StoreWorld) -> None:
    relay = Relay(world, queue_cap=2)
    relay.account("alice")
    relay.account("bob")
    alice = relay.online(relay.device("alice", "phone"))
    bob_device = relay.device("bob", "laptop")
    bob_other = relay.device("bob", "tablet")
    for i in range(3):
        alice.send_text(bytes([i]) * 16, [("bob", "laptop"), ("bob", "tablet")])
        relay.settle()
    assert errors(alice.take())[0].code == ErrorCode.QUEUE_FULL
    assert len(relay.world.queue_of(bob_device.pk)) == 2
    assert len(relay.world.queue_of(bob_other.pk)) == 2


def test_a_database_failure_answers_server_busy_and_acknowledges_nothing(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    relay.device("bob", "laptop")

    def broken(batch: WriteBatch, now_ms: int, limits: WriteLimits) -> Deferred[WriteResult]:
        d: Deferred[WriteResult] = Deferred()
        d.errback(RuntimeError("disk I/O error"))
        return d

    relay.store.apply_writes = broken  # type: ignore[method-assign]
    alice.send_text(b"m" * 16, [("bob", "laptop")])
    relay.settle()
    messages = alice.take()
    assert not [m for m in messages if isinstance(m, Sent)]
    assert errors(messages)[0].code == ErrorCode.SERVER_BUSY


# -- flow control -------------------------------------------------------------------------


def test_a_slow_reader_has_at_most_one_window_in_flight(world: StoreWorld) -> None:
    relay = Relay(world, window_items=4)
    relay.account("alice")
    relay.account("bob")
    alice = relay.online(relay.device("alice", "phone"))
    bob = relay.online(relay.device("bob", "laptop"))
    for i in range(10):
        alice.send_text(bytes([i]) * 16, [("bob", "laptop")])
    relay.settle()
    first = delivered(bob.take())
    assert len(first) == 4
    bob.ack([i.seq for i in first[:2]])
    relay.settle()
    second = delivered(bob.take())
    assert len(second) == 2
    assert [i.seq for i in first + second] == sorted(i.seq for i in first + second)


def test_nothing_is_written_while_the_transport_is_full(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    bob = relay.online(relay.device("bob", "laptop"))
    bob.transport.writable = False
    alice.send_text(b"m" * 16, [("bob", "laptop")])
    relay.settle()
    assert delivered(bob.take()) == []
    bob.transport.writable = True
    bob.connection.resume_writing()
    relay.settle()
    assert len(delivered(bob.take())) == 1


def test_too_many_pending_requests_pause_reading_until_answers_go_out(relay: Relay) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    relay.device("bob", "laptop")
    for i in range(40):
        alice.send_text(i.to_bytes(16, "big"), [("bob", "laptop")])
    assert not alice.transport.reading
    relay.settle()
    assert alice.transport.reading


# -- expiry -------------------------------------------------------------------------------


def test_an_expired_message_is_deleted_and_its_sender_notified(world: StoreWorld) -> None:
    relay = Relay(world, ttl_s=3600, expiry_interval_s=60)
    relay.account("alice")
    relay.account("bob")
    relay.service.startService()
    alice_device = relay.device("alice", "phone")
    alice = relay.online(alice_device)
    bob_device = relay.device("bob", "laptop")
    alice.send_text(b"m" * 16, [("bob", "laptop")])
    relay.settle()
    alice.take()
    relay.clock.advance(3600 + 60)
    relay.settle()
    assert relay.world.queue_of(bob_device.pk) == []
    (notice,) = delivered(alice.take())
    assert (notice.kind, notice.message_id, notice.user, notice.device) == (
        ItemKind.EXPIRED, b"m" * 16, "bob", "laptop",
    )  # fmt: skip
    assert notice.ciphertext is None
    assert relay.counter("medrelay_envelopes_expired_total") == 1


def test_connections_are_counted_by_state(relay: Relay) -> None:
    device = relay.device("alice", "phone")
    client: FakeClient = relay.client()
    assert relay.counter("medrelay_connections", state="handshaking") == 1
    client.login(device, relay.keys[("alice", "phone")])
    assert relay.counter("medrelay_connections", state="authenticated") == 1
    assert relay.counter("medrelay_connections", state="handshaking") == 0
    client.connection.connection_lost()
    assert relay.counter("medrelay_connections", state="authenticated") == 0


def test_error_messages_are_clipped_to_512_bytes_on_a_character_boundary() -> None:
    """The wire bound on error.message counts UTF-8 bytes, not characters."""
    clipped = _clip_utf8("ж" * 400, 512)
    assert len(clipped.encode("utf-8")) == 512 and clipped == "ж" * 256
    assert _clip_utf8("a" + "ж" * 300, 512) == "a" + "ж" * 255


def test_one_commits_items_for_a_device_go_out_as_one_deliver_frame(relay: Relay) -> None:
    """So the device acknowledges them with one ack, and each side pays once per message."""
    alice = relay.online(relay.device("alice", "phone"))
    bob = relay.online(relay.device("bob", "laptop"))
    before = len(bob.transport.written)
    for i in range(5):
        alice.send_text(bytes([i]) * 16, [("bob", "laptop")])
    relay.settle()
    assert len(bob.transport.written) == before + 1  # one transport message
    (deliver,) = [m for m in bob.take() if isinstance(m, Deliver)]
    assert len(deliver.items) == 5


def test_a_pipelining_senders_answers_of_one_turn_share_a_transport_message(
    relay: Relay,
) -> None:
    alice = relay.online(relay.device("alice", "phone"))
    relay.device("bob", "laptop")
    before = len(alice.transport.written)
    for i in range(5):
        alice.send_text(bytes([i]) * 16, [("bob", "laptop")])
    relay.settle()
    assert len(alice.transport.written) == before + 1
    assert len([m for m in alice.take() if isinstance(m, Sent)]) == 5


def test_a_turns_output_is_split_at_the_maximum_frame_size(relay: Relay) -> None:
    """A client accepts transport messages of one maximal frame; coalescing never exceeds it."""
    alice = relay.online(relay.device("alice", "phone"))
    bob = relay.online(relay.device("bob", "laptop"))
    before = len(bob.transport.written)
    for i in range(12):
        alice.send_text(bytes([i]) * 16, [("bob", "laptop")], b"x" * 200_000)
    relay.settle()
    written = bob.transport.written[before:]
    assert len(written) > 1
    assert all(len(chunk) <= 1024 * 1024 + 4 for chunk in written)
    assert len(delivered(bob.take())) == 12
