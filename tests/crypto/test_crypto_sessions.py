"""Sesame-style sessions (medrelay.crypto.sessions): multi-device fan-out and receive, the X3DH
header until the first reply, simultaneous initiation, replays, prekey handling, all-or-nothing
store updates and the stores' byte encodings."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from session_devices import NOW_MS
from session_devices import SessionDevice as Device

from medrelay.crypto.encoding import Writer
from medrelay.crypto.errors import (
    BadSignature,
    CryptoError,
    DecryptionFailed,
    DuplicateMessage,
    MalformedEncoding,
    SessionError,
    UnknownPrekey,
)
from medrelay.crypto.identity import DeviceAddress, DeviceIdentity, DeviceKeys
from medrelay.crypto.rng import Rng
from medrelay.crypto.sessions import (
    CIPHERTEXT_PREKEY,
    CIPHERTEXT_RATCHET,
    MAX_INACTIVE,
    SIGNED_PREKEY_GRACE_MS,
    InMemoryPrekeyStore,
    InMemorySessionStore,
    MissingPrekeyBundle,
    NoSession,
    SessionRecord,
    decode_device_ciphertext,
    decrypt_from_device,
    encode_device_ciphertext,
    encrypt_for_devices,
)
from medrelay.crypto.x3dh import (
    PrekeyBundle,
    PrekeyMessage,
    SenderMismatch,
    SignedPrekey,
    generate_one_time_prekeys,
    generate_signed_prekey,
)

DAY_MS = 24 * 3600 * 1000


class World:
    def __init__(self, rng: Rng) -> None:
        self.rng = rng
        self.alice_phone = Device("alice", "phone", rng)
        self.alice_laptop = Device("alice", "laptop", rng)
        self.bob_phone = Device("bob", "phone", rng)
        self.bob_laptop = Device("bob", "laptop", rng)
        self.devices = [self.alice_phone, self.alice_laptop, self.bob_phone, self.bob_laptop]

    def by_address(self, address: DeviceAddress) -> Device:
        return next(d for d in self.devices if d.address == address)

    def send(
        self, sender: Device, plaintext: bytes, targets: Sequence[Device]
    ) -> dict[Device, bytes]:
        """Like a client: try with no bundles, fetch the ones the error names, retry."""
        identities = [t.identity for t in targets]
        try:
            out = encrypt_for_devices(
                sender.keys, plaintext, identities, sender.sessions, {}, self.rng
            )
        except MissingPrekeyBundle as missing:
            bundles = {a: self.by_address(a).bundle() for a in missing.addresses}
            out = encrypt_for_devices(
                sender.keys, plaintext, identities, sender.sessions, bundles, self.rng
            )
        return {self.by_address(a): c for a, c in out.items()}

    def receive(self, receiver: Device, sender: Device, ciphertext: bytes) -> bytes:
        return decrypt_from_device(
            receiver.keys,
            sender.identity,
            ciphertext,
            receiver.sessions,
            receiver.prekeys,
            self.rng,
        )

    def exchange(self, sender: Device, receiver: Device, plaintext: bytes) -> bytes:
        """Send one message to one device and deliver it at once; returns the ciphertext."""
        ciphertext = self.send(sender, plaintext, [receiver])[receiver]
        assert self.receive(receiver, sender, ciphertext) == plaintext
        return ciphertext

    def refused(
        self, receiver: Device, sender: Device, ciphertext: bytes, error: type[CryptoError]
    ) -> CryptoError:
        """Delivery fails with `error` and leaves the receiver's stores exactly as they were."""
        before = receiver.state()
        with pytest.raises(error) as caught:
            self.receive(receiver, sender, ciphertext)
        assert receiver.state() == before
        return caught.value


@pytest.fixture
def world(rng: Rng) -> World:
    return World(rng)


def kind(ciphertext: bytes) -> int:
    return ciphertext[0]


# --- fan-out ---------------------------------------------------------------------------------


def test_one_plaintext_reaches_both_recipient_devices_and_the_senders_other_device(
    world: World,
) -> None:
    w = world
    targets = [w.bob_phone, w.bob_laptop, w.alice_laptop]
    out = w.send(w.alice_phone, b"results are normal", targets)
    assert set(out) == set(targets)
    assert len(set(out.values())) == 3
    for device, ciphertext in out.items():
        assert kind(ciphertext) == CIPHERTEXT_PREKEY
        assert w.receive(device, w.alice_phone, ciphertext) == b"results are normal"


def test_the_sending_device_and_repeated_targets_are_refused(world: World) -> None:
    w = world
    with pytest.raises(ValueError, match="itself"):
        w.send(w.alice_phone, b"x", [w.bob_phone, w.alice_phone])
    with pytest.raises(ValueError, match="twice"):
        w.send(w.alice_phone, b"x", [w.bob_phone, w.bob_phone])
    assert w.alice_phone.sessions.addresses() == []


def test_missing_bundle_gives_a_clear_error_and_saves_nothing(world: World) -> None:
    """Bob's phone has a session, his laptop none and no bundle: nothing advances or is saved."""
    w = world
    w.exchange(w.alice_phone, w.bob_phone, b"hello")
    before = w.alice_phone.state()
    with pytest.raises(MissingPrekeyBundle) as caught:
        encrypt_for_devices(
            w.alice_phone.keys,
            b"second",
            [w.bob_phone.identity, w.bob_laptop.identity, w.alice_laptop.identity],
            w.alice_phone.sessions,
            {},
            w.rng,
        )
    assert caught.value.addresses == (w.bob_laptop.address, w.alice_laptop.address)
    assert "bob/laptop" in str(caught.value)
    assert "alice/laptop" in str(caught.value)
    assert "bob/phone" not in str(caught.value)
    assert w.alice_phone.state() == before


def test_one_failing_target_saves_no_session_state(world: World) -> None:
    """The laptop's bundle has a forged SPK signature: the phone's ratchet step is not saved
    either, and the next message to the phone is the one it expects."""
    w = world
    w.exchange(w.alice_phone, w.bob_phone, b"hello")
    w.exchange(w.bob_phone, w.alice_phone, b"hi")
    good = w.bob_laptop.bundle()
    forged_spk = SignedPrekey(
        good.signed_prekey.user_id,
        good.signed_prekey.device_id,
        good.signed_prekey.prekey_id,
        good.signed_prekey.public_key,
        good.signed_prekey.created_at_ms,
        bytes(64),
    )
    forged = PrekeyBundle(good.identity, forged_spk, good.one_time_prekey)
    before = w.alice_phone.state()
    with pytest.raises(BadSignature):
        encrypt_for_devices(
            w.alice_phone.keys,
            b"to both",
            [w.bob_phone.identity, w.bob_laptop.identity],
            w.alice_phone.sessions,
            {w.bob_laptop.address: forged},
            w.rng,
        )
    assert w.alice_phone.state() == before
    w.exchange(w.alice_phone, w.bob_phone, b"after the failure")


def test_a_bundle_carrying_another_identity_is_refused(world: World) -> None:
    w = world
    before = w.alice_phone.state()
    with pytest.raises(SessionError, match="another identity"):
        encrypt_for_devices(
            w.alice_phone.keys,
            b"x",
            [w.bob_phone.identity],
            w.alice_phone.sessions,
            {w.bob_phone.address: w.bob_laptop.bundle()},
            w.rng,
        )
    assert w.alice_phone.state() == before


def test_bundles_for_targets_with_a_session_are_not_used(world: World) -> None:
    w = world
    w.exchange(w.alice_phone, w.bob_phone, b"hello")
    out = encrypt_for_devices(
        w.alice_phone.keys,
        b"again",
        [w.bob_phone.identity],
        w.alice_phone.sessions,
        {w.bob_phone.address: w.bob_phone.bundle()},
        w.rng,
    )
    record = w.alice_phone.sessions.load(w.bob_phone.address)
    assert record is not None and len(record) == 1
    assert w.receive(w.bob_phone, w.alice_phone, out[w.bob_phone.address]) == b"again"


# --- the X3DH header until the first reply -----------------------------------------------


def test_initiator_attaches_the_x3dh_header_until_the_first_reply(world: World) -> None:
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    first = w.exchange(alice, bob, b"one")
    second = w.exchange(alice, bob, b"two")
    assert kind(first) == kind(second) == CIPHERTEXT_PREKEY
    header_1 = decode_device_ciphertext(first)
    header_2 = decode_device_ciphertext(second)
    assert isinstance(header_1, PrekeyMessage) and isinstance(header_2, PrekeyMessage)
    assert header_1.header == header_2.header

    reply = w.exchange(bob, alice, b"three")
    assert kind(reply) == CIPHERTEXT_RATCHET
    after = w.exchange(alice, bob, b"four")
    assert kind(after) == CIPHERTEXT_RATCHET
    record = bob.sessions.load(alice.address)
    assert record is not None and len(record) == 1


def test_one_time_prekey_is_consumed_only_after_the_first_message_decrypts(world: World) -> None:
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    ciphertext = w.send(alice, b"hello", [bob])[bob]
    message = decode_device_ciphertext(ciphertext)
    assert isinstance(message, PrekeyMessage)
    opk_id = message.header.one_time_prekey_id
    assert opk_id is not None

    tampered = bytearray(ciphertext)
    tampered[-1] ^= 1
    w.refused(bob, alice, bytes(tampered), DecryptionFailed)
    assert bob.prekeys.one_time_prekey(opk_id) is not None
    assert bob.sessions.load(alice.address) is None

    assert w.receive(bob, alice, ciphertext) == b"hello"
    assert bob.prekeys.one_time_prekey(opk_id) is None


def test_session_without_a_one_time_prekey(world: World) -> None:
    """When the relay has run out of OPKs the three-DH variant still works both ways."""
    w = world
    w.bob_phone.served.clear()
    w.exchange(w.alice_phone, w.bob_phone, b"no opk")
    w.exchange(w.bob_phone, w.alice_phone, b"reply")


# --- simultaneous initiation -------------------------------------------------------------


def test_simultaneous_initiation_converges(world: World) -> None:
    """Both sides start a session before either message arrives; crossing messages create two
    sessions per side, messages keep decrypting both ways, and after one round trip both
    sides send on the same X3DH run."""
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    from_alice = w.send(alice, b"a1", [bob])[bob]
    from_bob = w.send(bob, b"b1", [alice])[alice]
    assert w.receive(bob, alice, from_alice) == b"a1"
    assert w.receive(alice, bob, from_bob) == b"b1"

    for round_number in range(3):
        w.exchange(alice, bob, b"a%d" % round_number)
        w.exchange(bob, alice, b"b%d" % round_number)
    alice_record = alice.sessions.load(bob.address)
    bob_record = bob.sessions.load(alice.address)
    assert alice_record is not None and bob_record is not None
    assert len(alice_record) == len(bob_record) == 2
    assert alice_record.active.base_key == bob_record.active.base_key
    assert kind(w.send(alice, b"x", [bob])[bob]) == CIPHERTEXT_RATCHET


def test_simultaneous_initiation_with_crossing_replies_keeps_decrypting(world: World) -> None:
    """Even when both keep sending before hearing back, every message decrypts."""
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    for round_number in range(4):
        from_alice = w.send(alice, b"a%d" % round_number, [bob])[bob]
        from_bob = w.send(bob, b"b%d" % round_number, [alice])[alice]
        assert w.receive(bob, alice, from_alice) == b"a%d" % round_number
        assert w.receive(alice, bob, from_bob) == b"b%d" % round_number


def test_message_on_an_inactive_session_promotes_it(world: World) -> None:
    """After crossing initiations Alice's active session is Bob's run; Bob answering on Alice's
    run decrypts on her inactive session, which becomes active again."""
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    from_alice = w.send(alice, b"a1", [bob])[bob]
    from_bob = w.send(bob, b"b1", [alice])[alice]
    w.receive(bob, alice, from_alice)
    w.receive(alice, bob, from_bob)
    record = alice.sessions.load(bob.address)
    assert record is not None
    bob_run, alice_run = record.active.base_key, record.inactive[0].base_key

    bob_record = bob.sessions.load(alice.address)
    assert bob_record is not None and bob_record.active.base_key == alice_run
    w.exchange(bob, alice, b"on alice's run")
    record = alice.sessions.load(bob.address)
    assert record is not None
    assert (record.active.base_key, record.inactive[0].base_key) == (alice_run, bob_run)


# --- replays, duplicates, prekey errors ----------------------------------------------------


def test_replayed_prekey_message_is_a_duplicate_not_a_second_session(world: World) -> None:
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    first = w.exchange(alice, bob, b"hello")
    w.refused(bob, alice, first, DuplicateMessage)

    # Still a duplicate after the conversation moved through several DH ratchet steps.
    for i in range(3):
        w.exchange(bob, alice, b"b%d" % i)
        w.exchange(alice, bob, b"a%d" % i)
    w.refused(bob, alice, first, DuplicateMessage)
    record = bob.sessions.load(alice.address)
    assert record is not None and len(record) == 1


def test_replayed_prekey_message_after_the_session_is_gone_needs_its_used_prekey(
    world: World,
) -> None:
    """Without the session the one-time prekey is what stops a replay: it is gone."""
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    first = w.exchange(alice, bob, b"hello")
    bob.sessions.delete(alice.address)
    w.refused(bob, alice, first, UnknownPrekey)


def test_replayed_ratchet_message_is_a_duplicate(world: World) -> None:
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    w.exchange(alice, bob, b"hello")
    reply = w.exchange(bob, alice, b"reply")
    assert kind(reply) == CIPHERTEXT_RATCHET
    w.refused(alice, bob, reply, DuplicateMessage)


def test_replay_on_an_inactive_session_is_reported_as_a_duplicate(world: World) -> None:
    """The replay fails on the active session too (as an AEAD failure); the error names the
    real cause."""
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    w.exchange(alice, bob, b"hello")
    reply = w.exchange(bob, alice, b"reply")
    bob.sessions.delete(alice.address)
    w.exchange(bob, alice, b"bob starts over")
    record = alice.sessions.load(bob.address)
    assert record is not None and len(record) == 2
    w.refused(alice, bob, reply, DuplicateMessage)


def test_out_of_order_messages_decrypt_once(world: World) -> None:
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    w.exchange(alice, bob, b"hello")
    w.exchange(bob, alice, b"reply")
    later = [w.send(alice, b"m%d" % i, [bob])[bob] for i in range(5)]
    for i in (3, 0, 4, 1, 2):
        assert w.receive(bob, alice, later[i]) == b"m%d" % i
    for ciphertext in later:
        w.refused(bob, alice, ciphertext, DuplicateMessage)


def test_stale_signed_prekey_gives_unknown_prekey(world: World) -> None:
    """A bundle fetched before Bob rotated his SPK works during the grace period, and gives
    UnknownPrekey (stores untouched) once the old key is pruned."""
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    old_bundle = bob.bundle()
    old_bundle_2 = bob.bundle()
    rotated_at = NOW_MS + 7 * DAY_MS
    bob.prekeys.add_signed_prekey(generate_signed_prekey(bob.keys, 2, rotated_at, w.rng))
    assert bob.prekeys.prune_signed_prekeys(rotated_at + SIGNED_PREKEY_GRACE_MS) == []

    within_grace = encrypt_for_devices(
        alice.keys, b"in grace", [bob.identity], alice.sessions, {bob.address: old_bundle}, w.rng
    )[bob.address]
    assert w.receive(bob, alice, within_grace) == b"in grace"

    assert bob.prekeys.prune_signed_prekeys(rotated_at + SIGNED_PREKEY_GRACE_MS + 1) == [1]
    laptop = w.alice_laptop
    stale = encrypt_for_devices(
        laptop.keys, b"stale", [bob.identity], laptop.sessions, {bob.address: old_bundle_2}, w.rng
    )[bob.address]
    error = w.refused(bob, laptop, stale, UnknownPrekey)
    assert "signed prekey 1" in str(error)


def test_prekey_message_naming_another_sender_is_refused(world: World) -> None:
    """The relay says the laptop sent it, but the X3DH header names the phone."""
    w = world
    ciphertext = w.send(w.alice_phone, b"hello", [w.bob_phone])[w.bob_phone]
    w.refused(w.bob_phone, w.alice_laptop, ciphertext, SenderMismatch)


def test_ratchet_message_from_a_device_without_a_session_is_refused(world: World) -> None:
    w = world
    w.exchange(w.alice_phone, w.bob_phone, b"hello")
    reply = w.exchange(w.bob_phone, w.alice_phone, b"reply")
    w.refused(w.alice_laptop, w.bob_phone, reply, NoSession)


def test_ratchet_message_from_the_wrong_sender_fails(world: World) -> None:
    """Bob's laptop shares no session with Alice's phone's session with Bob's phone."""
    w = world
    w.exchange(w.alice_phone, w.bob_phone, b"hello")
    w.exchange(w.alice_phone, w.bob_laptop, b"hello laptop")
    w.exchange(w.bob_laptop, w.alice_phone, b"from laptop")
    reply = w.send(w.bob_phone, b"from phone", [w.alice_phone])[w.alice_phone]
    w.refused(w.alice_phone, w.bob_laptop, reply, DecryptionFailed)


def test_a_message_from_this_device_itself_is_refused(world: World) -> None:
    w = world
    ciphertext = w.send(w.alice_phone, b"hello", [w.bob_phone])[w.bob_phone]
    with pytest.raises(SessionError):
        w.receive(w.alice_phone, w.alice_phone, ciphertext)


def test_certificate_change_needs_a_new_session(world: World) -> None:
    """Bob's phone is re-certified (new certificate hash): the old session is neither used for
    sending nor tried for receiving, and a new one starts from a fresh bundle."""
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    w.exchange(alice, bob, b"hello")
    old_reply = w.send(bob, b"reply", [alice])[alice]

    new_identity = DeviceIdentity(
        bob.identity.user_id,
        bob.identity.device_id,
        bob.identity.signing_key,
        bob.identity.dh_key,
        hashlib.sha256(b"renewed certificate").digest(),
    )
    bob.keys = DeviceKeys(new_identity, bob.keys.signing_key, bob.keys.dh_key)
    bob.prekeys.add_signed_prekey(generate_signed_prekey(bob.keys, 2, NOW_MS, w.rng))

    w.refused(alice, bob, old_reply, NoSession)
    with pytest.raises(MissingPrekeyBundle):
        encrypt_for_devices(alice.keys, b"x", [new_identity], alice.sessions, {}, w.rng)
    w.exchange(alice, bob, b"new session")
    w.exchange(bob, alice, b"new reply")
    record = alice.sessions.load(bob.address)
    assert record is not None and len(record) == 2


def test_at_most_forty_inactive_sessions_are_kept(world: World) -> None:
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    more = generate_one_time_prekeys(1000, 30, w.rng)
    bob.prekeys.add_one_time_prekeys(more)
    bob.served.extend(pair.record for pair in more)
    bases = []
    for i in range(MAX_INACTIVE + 3):
        alice.sessions.delete(bob.address)
        ciphertext = w.exchange(alice, bob, b"session %d" % i)
        message = decode_device_ciphertext(ciphertext)
        assert isinstance(message, PrekeyMessage)
        bases.append(message.header.ephemeral_key)
    record = bob.sessions.load(alice.address)
    assert record is not None
    assert len(record) == 1 + MAX_INACTIVE
    assert [s.base_key for s in record] == bases[::-1][: 1 + MAX_INACTIVE]


# --- stores and encodings ------------------------------------------------------------------


def test_store_contents_round_trip_through_bytes_mid_conversation(world: World) -> None:
    w = world
    alice, bob = w.alice_phone, w.bob_phone
    w.exchange(alice, bob, b"one")
    pending = w.send(alice, b"two", [bob])[bob]
    w.exchange(bob, alice, b"three")

    for device in (alice, bob):
        sessions_bytes, prekeys_bytes = device.state()
        device.sessions = InMemorySessionStore.from_bytes(sessions_bytes)
        device.prekeys = InMemoryPrekeyStore.from_bytes(prekeys_bytes)
        assert device.state() == (sessions_bytes, prekeys_bytes)

    assert w.receive(bob, alice, pending) == b"two"
    w.exchange(alice, bob, b"four")
    w.exchange(bob, alice, b"five")


def test_session_store_decoding_is_strict(world: World) -> None:
    w = world
    w.exchange(w.alice_phone, w.bob_phone, b"one")
    encoded = w.bob_phone.sessions.to_bytes()
    record_bytes = w.bob_phone.sessions._records[w.alice_phone.address]
    for cut in range(0, len(encoded), 7):
        with pytest.raises(MalformedEncoding):
            InMemorySessionStore.from_bytes(encoded[:cut])
    for data in (encoded + b"\x00", b"\x02" + encoded[1:]):
        with pytest.raises(MalformedEncoding):
            InMemorySessionStore.from_bytes(data)
    for cut in range(0, len(record_bytes), 5):
        with pytest.raises(MalformedEncoding):
            SessionRecord.from_bytes(record_bytes[:cut])
    with pytest.raises(MalformedEncoding):
        SessionRecord.from_bytes(record_bytes + b"\x00")


def test_session_record_refuses_more_than_forty_inactive_sessions(world: World) -> None:
    w = world
    w.exchange(w.alice_phone, w.bob_phone, b"one")
    record = w.bob_phone.sessions.load(w.alice_phone.address)
    assert record is not None
    state = record.active.write(Writer()).to_bytes()
    for count in (MAX_INACTIVE, MAX_INACTIVE + 1):
        encoded = b"\x01" + state + bytes([count]) + state * count
        if count <= MAX_INACTIVE:
            assert len(SessionRecord.from_bytes(encoded)) == count + 1
        else:
            with pytest.raises(MalformedEncoding, match="inactive"):
                SessionRecord.from_bytes(encoded)


def test_session_state_must_keep_the_header_exactly_while_unanswered(world: World) -> None:
    """A stored initiator session without its X3DH header could never be answered; one with a
    header after the reply would keep leaking it: both are refused on load."""
    w = world
    w.send(w.alice_phone, b"one", [w.bob_phone])
    record = w.alice_phone.sessions.load(w.bob_phone.address)
    assert record is not None and record.active.pending_header is not None
    state = record.active.write(Writer()).to_bytes()
    flag_at = 1 + 1 + 33
    assert state[flag_at] == 1
    header_len = len(record.active.pending_header.encode())
    stripped = state[:flag_at] + b"\x00" + state[flag_at + 1 + header_len :]
    with pytest.raises(MalformedEncoding, match="X3DH header"):
        SessionRecord.from_bytes(b"\x01" + stripped + b"\x00")
    assert len(SessionRecord.from_bytes(b"\x01" + state + b"\x00")) == 1

    w.receive(w.bob_phone, w.alice_phone, w.send(w.alice_phone, b"two", [w.bob_phone])[w.bob_phone])
    bob_record = w.bob_phone.sessions.load(w.alice_phone.address)
    assert bob_record is not None and bob_record.active.pending_header is None
    bob_state = bob_record.active.write(Writer()).to_bytes()
    assert bob_state[flag_at] == 0
    added = (
        bob_state[:flag_at]
        + b"\x01"
        + record.active.pending_header.encode()
        + bob_state[flag_at + 1 :]
    )
    with pytest.raises(MalformedEncoding, match="X3DH header"):
        SessionRecord.from_bytes(b"\x01" + added + b"\x00")


def test_prekey_store_round_trip_and_strict_decoding(world: World) -> None:
    store = world.bob_phone.prekeys
    store.add_signed_prekey(generate_signed_prekey(world.bob_phone.keys, 2, NOW_MS + 1, world.rng))
    store.consume_one_time_prekey(3)
    encoded = store.to_bytes()
    copy = InMemoryPrekeyStore.from_bytes(encoded)
    assert copy.to_bytes() == encoded
    assert copy.current_signed_prekey == store.current_signed_prekey
    assert copy.signed_prekey(1) is not None and copy.signed_prekey(3) is None
    assert copy.one_time_prekey(3) is None and copy.one_time_prekey(4) is not None
    assert [r.prekey_id for r in copy.one_time_prekey_records()] == [
        i for i in range(1, 21) if i != 3
    ]
    for cut in range(0, len(encoded), 11):
        with pytest.raises(MalformedEncoding):
            InMemoryPrekeyStore.from_bytes(encoded[:cut])
    with pytest.raises(MalformedEncoding):
        InMemoryPrekeyStore.from_bytes(encoded + b"\x00")


def test_prekey_store_refuses_reused_ids(world: World) -> None:
    store = world.bob_phone.prekeys
    with pytest.raises(ValueError):
        store.add_signed_prekey(generate_signed_prekey(world.bob_phone.keys, 1, NOW_MS, world.rng))
    with pytest.raises(ValueError):
        store.add_one_time_prekeys(generate_one_time_prekeys(20, 1, world.rng))


def test_prekey_store_repr_holds_no_key_material(world: World) -> None:
    text = repr(world.bob_phone.prekeys)
    assert "one_time=20" in text
    private = world.bob_phone.prekeys.signed_prekey(1)
    assert private is not None and private.raw.hex() not in text


def test_device_ciphertext_tags(world: World) -> None:
    w = world
    w.exchange(w.alice_phone, w.bob_phone, b"hello")
    reply = w.exchange(w.bob_phone, w.alice_phone, b"reply")
    ratchet_message = decode_device_ciphertext(reply)
    assert isinstance(ratchet_message, bytes)
    assert encode_device_ciphertext(ratchet_message) == reply
    for bad in (b"", b"\x00" + reply[1:], b"\x03" + reply[1:], reply[:20]):
        with pytest.raises(MalformedEncoding):
            decode_device_ciphertext(bad)
    with pytest.raises(MalformedEncoding):
        w.receive(w.alice_phone, w.bob_phone, b"\x01" + reply[1:])
