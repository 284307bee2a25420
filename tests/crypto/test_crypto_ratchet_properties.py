"""Randomised and exhaustive properties of medrelay.crypto.ratchet.

The central one: whatever the network does (reorder, drop, duplicate, corrupt) and whenever a
session is saved and restored, every message either decrypts to exactly what was sent, once, or
fails with a CryptoError and leaves the receiving session byte-identical.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from medrelay.crypto.errors import (
    CryptoError,
    DuplicateMessage,
    MalformedEncoding,
    SkipLimitExceeded,
)
from medrelay.crypto.keys import DHPrivateKey
from medrelay.crypto.ratchet import (
    HEADER_SIZE,
    MAX_MESSAGE_NUMBER,
    MAX_SKIP,
    MAX_STORED_SKIPPED,
    RatchetSession,
)
from medrelay.crypto.rng import Rng, seeded_rng

SHARED_SECRET = bytes(range(32))
AD = b"property test associated data"
PEERS = ("alice", "bob")


def make_pair(rng: Rng) -> tuple[RatchetSession, RatchetSession]:
    spk = DHPrivateKey.generate(rng)
    alice = RatchetSession.initiator(SHARED_SECRET, AD, spk.public_key, rng)
    bob = RatchetSession.responder(SHARED_SECRET, AD, spk)
    return alice, bob


def other(name: str) -> str:
    return "bob" if name == "alice" else "alice"


def with_header(message: bytes, **changes: int) -> bytes:
    version, key, pn, n = struct.unpack(">B32sII", message[:HEADER_SIZE])
    fields = {"pn": pn, "n": n} | changes
    return struct.pack(">B32sII", version, key, fields["pn"], fields["n"]) + message[HEADER_SIZE:]


def assert_fails_cleanly(
    session: RatchetSession, message: bytes, rng: Rng, error: type[CryptoError] = CryptoError
) -> None:
    before = session.to_bytes()
    with pytest.raises(error):
        session.decrypt(message, rng)
    assert session.to_bytes() == before


# -- the network as a state machine -------------------------------------------------------------


class Network(RuleBasedStateMachine):
    """Two sessions and an adversarial network between them."""

    def __init__(self) -> None:
        super().__init__()
        self.rng = seeded_rng(b"network")
        alice, bob = make_pair(self.rng)
        self.sessions = {"alice": alice, "bob": bob}
        self.in_flight: dict[str, list[tuple[bytes, bytes]]] = {"alice": [], "bob": []}
        self.delivered: dict[str, list[bytes]] = {"alice": [], "bob": []}
        self.sent = 0

    @initialize(seed=st.binary(max_size=8))
    def seed_randomness(self, seed: bytes) -> None:
        self.rng = seeded_rng(b"network " + seed)

    @rule(data=st.data(), sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4))
    def send(self, data: st.DataObject, sizes: list[int]) -> None:
        """A burst from one side (bob only once he has heard from alice)."""
        able = [name for name in PEERS if name == "alice" or self.sessions[name].has_received]
        sender = data.draw(st.sampled_from(able))
        for size in sizes:
            plaintext = b"%d:" % self.sent + bytes(size)
            self.sent += 1
            wire = self.sessions[sender].encrypt(plaintext, self.rng)
            self.in_flight[other(sender)].append((wire, plaintext))

    def _pick_queue(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from([name for name in PEERS if self.in_flight[name]]))

    def _receive(self, to: str, index: int) -> None:
        wire, plaintext = self.in_flight[to].pop(index)
        assert self.sessions[to].decrypt(wire, self.rng) == plaintext
        self.delivered[to].append(wire)

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        to = self._pick_queue(data)
        self._receive(to, data.draw(st.integers(0, len(self.in_flight[to]) - 1)))

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def deliver_newest(self, data: st.DataObject) -> None:
        """Overtaking: the newest message first, so the older ones need skipped keys."""
        self._receive(self._pick_queue(data), -1)

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        queue = self.in_flight[self._pick_queue(data)]
        queue.pop(data.draw(st.integers(0, len(queue) - 1)))

    @precondition(lambda self: any(self.delivered.values()))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        to = data.draw(st.sampled_from([name for name in PEERS if self.delivered[name]]))
        wire = data.draw(st.sampled_from(self.delivered[to]))
        # DuplicateMessage even for finished chains: 40 steps cannot push a chain out of the
        # MAX_PREVIOUS_CHAINS (32) the session remembers.
        assert_fails_cleanly(self.sessions[to], wire, self.rng, DuplicateMessage)

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def corrupt(self, data: st.DataObject) -> None:
        """A flipped bit anywhere: refused, and the genuine message stays deliverable."""
        to = self._pick_queue(data)
        wire, _ = data.draw(st.sampled_from(self.in_flight[to]))
        bit = data.draw(st.integers(0, len(wire) * 8 - 1))
        tampered = bytearray(wire)
        tampered[bit // 8] ^= 1 << (bit % 8)
        assert_fails_cleanly(self.sessions[to], bytes(tampered), self.rng)

    @rule(who=st.sampled_from(PEERS))
    def save_and_restore(self, who: str) -> None:
        state = self.sessions[who].to_bytes()
        restored = RatchetSession.from_bytes(state)
        assert restored.to_bytes() == state
        self.sessions[who] = restored

    @precondition(lambda self: any(self.in_flight.values()))
    @rule()
    def deliver_everything(self) -> None:
        for to in PEERS:
            for wire, plaintext in self.in_flight[to]:
                assert self.sessions[to].decrypt(wire, self.rng) == plaintext
                self.delivered[to].append(wire)
            self.in_flight[to] = []

    @invariant()
    def skipped_keys_are_bounded(self) -> None:
        for session in self.sessions.values():
            assert 0 <= session.stored_skipped_keys <= MAX_STORED_SKIPPED


TestNetwork = Network.TestCase
TestNetwork.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- exhaustive bit flips -----------------------------------------------------------------------


def flip_every_bit_and_check(session: RatchetSession, message: bytes, rng: Rng) -> None:
    before = session.to_bytes()
    for bit in range(len(message) * 8):
        tampered = bytearray(message)
        tampered[bit // 8] ^= 1 << (bit % 8)
        try:
            session.decrypt(bytes(tampered), rng)
        except CryptoError:
            pass
        else:
            pytest.fail(f"a message with bit {bit} flipped decrypted")
        assert session.to_bytes() == before, f"bit {bit} changed the session"


def test_every_single_bit_flip_fails_cleanly_on_each_decrypt_path() -> None:
    """Every bit of three messages, one per path: a new remote chain (DH ratchet step), the
    current chain, and a stored skipped key of a finished chain."""
    rng = seeded_rng(b"bit flips")
    alice, bob = make_pair(rng)
    bob.decrypt(alice.encrypt(b"hello", rng), rng)
    delayed = bob.encrypt(b"delayed " * 10, rng)
    current = bob.encrypt(b"current chain " * 5, rng)
    assert alice.decrypt(current, rng) == b"current chain " * 5
    bob.decrypt(alice.encrypt(b"turn", rng), rng)
    first_of_chain = bob.encrypt(b"first of a new chain", rng)
    same_chain = bob.encrypt(b"same chain", rng)
    assert alice.decrypt(first_of_chain, rng) == b"first of a new chain"

    flip_every_bit_and_check(alice, same_chain, rng)  # current chain
    flip_every_bit_and_check(alice, delayed, rng)  # skipped key of a finished chain
    assert alice.decrypt(same_chain, rng) == b"same chain"
    assert alice.decrypt(delayed, rng) == b"delayed " * 10

    bob.decrypt(alice.encrypt(b"turn", rng), rng)
    new_chain = bob.encrypt(b"new chain", rng)
    flip_every_bit_and_check(alice, new_chain, rng)  # DH ratchet step
    assert alice.decrypt(new_chain, rng) == b"new chain"


# -- over-limit skips ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(ahead=st.integers(MAX_SKIP + 1, MAX_MESSAGE_NUMBER - 1))
def test_a_message_number_too_far_ahead_is_refused_on_both_paths(ahead: int) -> None:
    rng = seeded_rng(b"skip limit")
    alice, bob = make_pair(rng)
    bob.decrypt(alice.encrypt(b"hello", rng), rng)
    same_chain = alice.encrypt(b"same chain", rng)  # n = 1, bob's receiving length is 1
    assert_fails_cleanly(bob, with_header(same_chain, n=1 + ahead), rng, SkipLimitExceeded)
    new_chain = bob.encrypt(b"reply", rng)  # a first message of a chain for alice
    assert_fails_cleanly(alice, with_header(new_chain, n=ahead), rng, SkipLimitExceeded)
    assert bob.decrypt(same_chain, rng) == b"same chain"
    assert alice.decrypt(new_chain, rng) == b"reply"


@settings(max_examples=40, deadline=None)
@given(pn=st.integers(MAX_SKIP + 2, 0xFFFF_FFFF))
def test_a_previous_chain_length_too_far_ahead_is_refused(pn: int) -> None:
    """pn closes the old chain: bob has received 1 message of it, so pn - 1 keys would be
    skipped."""
    rng = seeded_rng(b"pn limit")
    alice, bob = make_pair(rng)
    bob.decrypt(alice.encrypt(b"hello", rng), rng)
    alice.decrypt(bob.encrypt(b"reply", rng), rng)
    message = alice.encrypt(b"new chain", rng)
    assert_fails_cleanly(bob, with_header(message, pn=pn), rng, SkipLimitExceeded)
    assert bob.decrypt(message, rng) == b"new chain"


# -- eviction -----------------------------------------------------------------------------------


def test_stored_skipped_keys_are_capped_and_the_oldest_evicted_first() -> None:
    rng = seeded_rng(b"eviction")
    alice, bob = make_pair(rng)
    bob.decrypt(alice.encrypt(b"hello", rng), rng)
    alice.decrypt(bob.encrypt(b"hi", rng), rng)

    def chain(count: int) -> list[bytes]:
        """Alice sends `count` messages in a fresh chain; bob gets only the last one."""
        messages = [alice.encrypt(b"%d" % i, rng) for i in range(count)]
        assert bob.decrypt(messages[-1], rng) == b"%d" % (count - 1)
        alice.decrypt(bob.encrypt(b"next turn", rng), rng)
        return messages

    first = chain(MAX_SKIP + 1)
    second = chain(MAX_SKIP + 1)
    assert bob.stored_skipped_keys == 2 * MAX_SKIP == MAX_STORED_SKIPPED
    third = chain(11)
    assert bob.stored_skipped_keys == MAX_STORED_SKIPPED
    for evicted in first[:10]:
        assert_fails_cleanly(bob, evicted, rng, DuplicateMessage)
    assert bob.decrypt(first[10], rng) == b"10"
    assert bob.decrypt(second[0], rng) == b"0"
    assert bob.decrypt(third[0], rng) == b"0"
    assert bob.stored_skipped_keys == MAX_STORED_SKIPPED - 3

    # 1000 more: the rest of the first chain goes as a whole, then the oldest of the second
    chain(MAX_SKIP + 1)
    assert bob.stored_skipped_keys == MAX_STORED_SKIPPED
    for evicted in (first[11], first[999], second[1], second[8]):
        assert_fails_cleanly(bob, evicted, rng, DuplicateMessage)
    assert bob.decrypt(second[9], rng) == b"9"
    restored = RatchetSession.from_bytes(bob.to_bytes())
    assert restored.to_bytes() == bob.to_bytes()
    assert restored.decrypt(third[1], rng) == b"1"


# -- the state encoding -------------------------------------------------------------------------


def rich_state() -> bytes:
    """A state with every optional part: skipped keys in two chains and previous chains."""
    rng = seeded_rng(b"rich state")
    alice, bob = make_pair(rng)
    for turn in range(3):
        messages = [alice.encrypt(b"a", rng) for _ in range(4)]
        bob.decrypt(messages[2], rng)
        alice.decrypt(bob.encrypt(b"b%d" % turn, rng), rng)
    bob.decrypt(alice.encrypt(b"c", rng), rng)
    assert bob.stored_skipped_keys > 4
    return bob.to_bytes()


RICH_STATE = rich_state()


def test_every_truncation_of_a_state_is_malformed() -> None:
    for size in range(len(RICH_STATE)):
        with pytest.raises(MalformedEncoding):
            RatchetSession.from_bytes(RICH_STATE[:size])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_mutated_state_is_refused_cleanly_or_decodes_canonically(data: st.DataObject) -> None:
    """Never an exception other than CryptoError, and whatever decodes re-encodes to the same
    bytes (one encoding per state)."""
    mutated = bytearray(RICH_STATE)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    try:
        session = RatchetSession.from_bytes(bytes(mutated))
    except CryptoError:
        return
    assert session.to_bytes() == bytes(mutated)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=400))
def test_arbitrary_bytes_never_escape_as_anything_but_crypto_errors(blob: bytes) -> None:
    for data in (blob, RICH_STATE[:60] + blob):
        try:
            session = RatchetSession.from_bytes(data)
        except CryptoError:
            continue
        assert session.to_bytes() == data
