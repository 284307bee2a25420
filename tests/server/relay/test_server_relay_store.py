"""The RelayStore conformance suite at the batch level: what one group commit must do, checked
against every implementation (in memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import pytest
from store_worlds import StoreWorld, result

from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.messages import ItemKind
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

NOW = 1_800_000_000_000
LIMITS = WriteLimits(ttl_ms=3_600_000, queue_cap=5)


def request(
    sender: DeviceRecord, n: int, *targets: DeviceRecord, body: bytes = b"c"
) -> SendRequest:
    envelopes = tuple(
        Envelope(t.username, t.device_id, body + n.to_bytes(2, "big")) for t in targets
    )
    return SendRequest(
        sender=sender,
        message_id=n.to_bytes(16, "big"),
        envelopes=envelopes,
        digest=send_digest(envelopes),
    )


def apply(world: StoreWorld, batch: WriteBatch, now_ms: int = NOW) -> tuple[SendOutcome, ...]:
    return result(world.store.apply_writes(batch, now_ms, LIMITS)).sends


@pytest.fixture
def devices(world: StoreWorld) -> tuple[DeviceRecord, DeviceRecord, DeviceRecord]:
    world.add_account("alice", "doctor")
    world.add_account("bob", "doctor")
    alice = world.add_device("alice", "a1", signing_key=b"\x01" * 32)
    bob1 = world.add_device("bob", "b1", signing_key=b"\x02" * 32)
    bob2 = world.add_device("bob", "b2", signing_key=b"\x03" * 32)
    return alice, bob1, bob2


def test_a_batch_stores_every_accepted_send_with_increasing_seqs(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    outcomes = apply(
        world, WriteBatch(sends=tuple(request(alice, n, bob1, bob2) for n in range(4)))
    )
    assert all(isinstance(o, SendAccepted) and not o.duplicate for o in outcomes)
    seqs = [i.seq for o in outcomes if isinstance(o, SendAccepted) for i in o.items]
    assert seqs == sorted(seqs) and len(set(seqs)) == 8
    queued = world.queue_of(bob1.pk)
    assert [i.ciphertext for i in queued] == [b"c" + n.to_bytes(2, "big") for n in range(4)]
    assert all(i.kind is ItemKind.MESSAGE and i.peer_user == "alice" for i in queued)


def test_a_refused_send_does_not_affect_the_others_of_its_batch(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    stale = request(alice, 1, bob1)  # leaves out bob's second device
    outcomes = apply(world, WriteBatch(sends=(request(alice, 0, bob1, bob2), stale)))
    assert isinstance(outcomes[0], SendAccepted)
    assert isinstance(outcomes[1], RelayError) and outcomes[1].code == ErrorCode.STALE_DEVICES
    assert outcomes[1].missing == (("bob", "b2"),)
    assert len(world.queue_of(bob1.pk)) == 1


def test_the_same_message_twice_in_one_batch_is_stored_once(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    send = request(alice, 7, bob1, bob2)
    first, second = apply(world, WriteBatch(sends=(send, send)))
    assert isinstance(first, SendAccepted) and isinstance(second, SendAccepted)
    assert second.duplicate and second.time_ms == first.time_ms
    assert len(world.queue_of(bob1.pk)) == 1


def test_a_resend_in_a_later_batch_is_a_duplicate_and_a_changed_one_a_conflict(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    apply(world, WriteBatch(sends=(request(alice, 7, bob1, bob2),)))
    (again,) = apply(world, WriteBatch(sends=(request(alice, 7, bob1, bob2),)), NOW + 5)
    assert isinstance(again, SendAccepted) and again.duplicate and again.time_ms == NOW
    (changed,) = apply(world, WriteBatch(sends=(request(alice, 7, bob1, bob2, body=b"x"),)))
    assert isinstance(changed, RelayError) and changed.code == ErrorCode.ID_CONFLICT


def test_the_queue_cap_counts_sends_accepted_earlier_in_the_same_batch(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    outcomes = apply(
        world, WriteBatch(sends=tuple(request(alice, n, bob1, bob2) for n in range(7)))
    )
    refused = [o for o in outcomes if isinstance(o, RelayError)]
    assert [o.code for o in refused] == [ErrorCode.QUEUE_FULL] * 2
    assert len(world.queue_of(bob1.pk)) == LIMITS.queue_cap


def test_acks_delete_only_the_acknowledging_devices_items(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    apply(world, WriteBatch(sends=(request(alice, 1, bob1, bob2),)))
    (item1,) = world.queue_of(bob1.pk)
    (item2,) = world.queue_of(bob2.pk)
    # bob's second device names both seqs; only its own goes.
    apply(world, WriteBatch(acks=((bob2.pk, (item1.seq, item2.seq, 999_999)),)))
    assert world.queue_of(bob1.pk) == [item1]
    assert world.queue_of(bob2.pk) == []


def test_acks_free_room_under_the_cap_within_the_same_batch(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    apply(world, WriteBatch(sends=tuple(request(alice, n, bob1, bob2) for n in range(5))))
    seqs1 = tuple(i.seq for i in world.queue_of(bob1.pk))
    seqs2 = tuple(i.seq for i in world.queue_of(bob2.pk))
    (outcome,) = apply(
        world,
        WriteBatch(
            sends=(request(alice, 9, bob1, bob2),), acks=((bob1.pk, seqs1), (bob2.pk, seqs2))
        ),
    )
    assert isinstance(outcome, SendAccepted)


def test_many_acks_in_one_batch_are_all_applied(world: StoreWorld) -> None:
    """More seqs than one IN list holds (the SQL store works in chunks)."""
    world.add_account("alice", "doctor")
    world.add_account("bob", "doctor")
    alice = world.add_device("alice", "a1", signing_key=b"\x01" * 32)
    bob = world.add_device("bob", "b1", signing_key=b"\x02" * 32)
    limits = WriteLimits(ttl_ms=3_600_000, queue_cap=10_000)
    sends = tuple(request(alice, n, bob) for n in range(1200))
    result(world.store.apply_writes(WriteBatch(sends=sends), NOW, limits))
    seqs = tuple(i.seq for i in world.queue_of(bob.pk))
    assert len(seqs) == 1200
    result(world.store.apply_writes(WriteBatch(acks=((bob.pk, seqs),)), NOW, limits))
    assert world.queue_of(bob.pk) == []
    # the count came back to zero: the cap is not reached by phantom items
    again = tuple(request(alice, 5000 + n, bob) for n in range(3))
    outcomes = result(world.store.apply_writes(WriteBatch(sends=again), NOW, LIMITS)).sends
    assert all(isinstance(o, SendAccepted) for o in outcomes)


def test_a_revoked_device_is_no_longer_part_of_the_device_set(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    world.revoke_device("bob", "b2")
    (stale,) = apply(world, WriteBatch(sends=(request(alice, 1, bob1, bob2),)))
    assert isinstance(stale, RelayError) and stale.extra == (("bob", "b2"),)
    (ok,) = apply(world, WriteBatch(sends=(request(alice, 2, bob1),)))
    assert isinstance(ok, SendAccepted)


def test_expiry_in_a_batch_deletes_and_notifies_the_sender(
    world: StoreWorld, devices: tuple[DeviceRecord, DeviceRecord, DeviceRecord]
) -> None:
    alice, bob1, bob2 = devices
    apply(world, WriteBatch(sends=(request(alice, 1, bob1, bob2),)))
    later = NOW + LIMITS.ttl_ms + 1
    outcome = result(world.store.apply_writes(WriteBatch(expire_up_to=100), later, LIMITS))
    assert outcome.expired == 2
    assert {(n.device_pk, n.peer_device, n.kind) for n in outcome.notices} == {
        (alice.pk, "b1", ItemKind.EXPIRED),
        (alice.pk, "b2", ItemKind.EXPIRED),
    }
    assert world.queue_of(bob1.pk) == [] and len(world.queue_of(alice.pk)) == 2
