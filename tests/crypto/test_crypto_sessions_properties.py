"""Property tests of medrelay.crypto.sessions: four devices (Alice and Bob with two each) fan out
messages to every other device while the network duplicates, reorders and drops ciphertexts and
devices reload their stores from bytes at random moments.

Pinned behaviour: a ciphertext decrypts to its plaintext on its first delivery (whatever arrived
before it), a second delivery of it always fails with a `CryptoError`, a failure leaves the
receiver's stores byte-for-byte unchanged, and afterwards every pair of devices still talks.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from session_devices import SessionDevice as Device

from medrelay.crypto.errors import CryptoError
from medrelay.crypto.identity import DeviceAddress
from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.sessions import (
    MissingPrekeyBundle,
    decrypt_from_device,
    encrypt_for_devices,
)


@dataclass
class InFlight:
    sender: int
    receiver: int
    ciphertext: bytes
    plaintext: bytes
    delivered: bool = False


class Network:
    def __init__(self) -> None:
        self.rng = seeded_rng(b"sessions properties")
        self.devices = [
            Device("alice", "phone", self.rng, one_time=8),
            Device("alice", "laptop", self.rng, one_time=8),
            Device("bob", "phone", self.rng, one_time=8),
            Device("bob", "laptop", self.rng, one_time=8),
        ]
        self.sent = 0

    def index(self, address: DeviceAddress) -> int:
        return next(i for i, d in enumerate(self.devices) if d.address == address)

    def send(self, sender: int, targets: list[int]) -> list[InFlight]:
        device = self.devices[sender]
        identities = [self.devices[t].keys.identity for t in targets]
        plaintext = b"message %d" % self.sent
        self.sent += 1
        try:
            out = encrypt_for_devices(
                device.keys, plaintext, identities, device.sessions, {}, self.rng
            )
        except MissingPrekeyBundle as missing:
            bundles = {a: self.devices[self.index(a)].bundle() for a in missing.addresses}
            out = encrypt_for_devices(
                device.keys, plaintext, identities, device.sessions, bundles, self.rng
            )
        return [InFlight(sender, self.index(a), c, plaintext) for a, c in out.items()]

    def deliver(self, item: InFlight) -> None:
        receiver = self.devices[item.receiver]
        before = receiver.state()
        try:
            plaintext = decrypt_from_device(
                receiver.keys,
                self.devices[item.sender].keys.identity,
                item.ciphertext,
                receiver.sessions,
                receiver.prekeys,
                self.rng,
            )
        except CryptoError as exc:
            assert item.delivered, f"first delivery failed: {exc!r}"
            assert receiver.state() == before, "a failed delivery changed the stores"
            return
        assert not item.delivered, "a ciphertext decrypted twice"
        assert plaintext == item.plaintext
        item.delivered = True


ACTIONS = ["send", "send", "deliver", "deliver", "deliver", "duplicate", "drop", "reload"]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_duplicates_reorders_and_drops_decrypt_once_or_fail_cleanly(data: st.DataObject) -> None:
    network = Network()
    pool: list[InFlight] = []
    steps = data.draw(st.integers(5, 30), label="steps")
    for _ in range(steps):
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        if action == "reload":
            network.devices[data.draw(st.integers(0, 3), label="device")].reload()
        elif action == "send" or not pool:
            sender = data.draw(st.integers(0, 3), label="sender")
            everyone_else = [i for i in range(4) if i != sender]
            targets = data.draw(
                st.lists(st.sampled_from(everyone_else), min_size=1, unique=True), label="targets"
            )
            pool.extend(network.send(sender, targets))
        else:
            index = data.draw(st.integers(0, len(pool) - 1), label="item")
            if action == "duplicate":
                network.deliver(pool[index])
                continue
            item = pool.pop(index)
            if action == "deliver":
                network.deliver(item)

    # Whatever happened, every ordered pair of devices can still exchange a message.
    for sender in range(4):
        for receiver in range(4):
            if sender != receiver:
                (item,) = network.send(sender, [receiver])
                network.deliver(item)
                assert item.delivered


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    order=st.permutations(range(6)),
    replays=st.lists(st.integers(0, 5), max_size=4),
)
def test_prekey_messages_in_any_order_make_one_session(
    order: list[int], replays: list[int]
) -> None:
    """Six PrekeyMessages of one unanswered session, delivered in any order with replays mixed
    in: each decrypts once, and the receiver ends with exactly one session."""
    network = Network()
    messages = [network.send(0, [2])[0] for _ in range(6)]
    for position in order:
        network.deliver(messages[position])
        for replay in replays:
            if messages[replay].delivered:
                network.deliver(messages[replay])
    assert all(m.delivered for m in messages)
    record = network.devices[2].sessions.load(network.devices[0].address)
    assert record is not None and len(record) == 1
