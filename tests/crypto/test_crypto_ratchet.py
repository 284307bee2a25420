"""The Double Ratchet (medrelay.crypto.ratchet): known answers, the wire header, the session's
behaviour in conversation, its limits, its failures (which leave the session unchanged) and its
state encoding. Interop lives in test_crypto_ratchet_interop.py, randomised properties in
test_crypto_ratchet_properties.py."""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from typing import Any

import pytest
from nacl import bindings

from medrelay.crypto import ratchet
from medrelay.crypto.errors import (
    CryptoError,
    DecryptionFailed,
    DuplicateMessage,
    InvalidKey,
    MalformedEncoding,
    SessionError,
    SkipLimitExceeded,
)
from medrelay.crypto.kdf import hkdf_sha256
from medrelay.crypto.keys import DHPrivateKey, DHPublicKey
from medrelay.crypto.ratchet import (
    HEADER_SIZE,
    MAX_MESSAGE_NUMBER,
    MAX_PREVIOUS_CHAINS,
    MAX_SKIP,
    MAX_STATE_SIZE,
    MAX_STORED_SKIPPED,
    RatchetHeader,
    RatchetSession,
    kdf_ck,
    kdf_rk,
    parse_header,
)
from medrelay.crypto.rng import Rng, seeded_rng

SHARED_SECRET = bytes(range(32))
AD = b"medrelay ratchet test associated data"

# A low-order X25519 point (order 8); see keys.py.
LOW_ORDER_POINT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def make_pair(rng: Rng, ad: bytes = AD) -> tuple[RatchetSession, RatchetSession]:
    """(alice, bob): alice initiates towards bob's signed prekey."""
    spk = DHPrivateKey.generate(rng)
    alice = RatchetSession.initiator(SHARED_SECRET, ad, spk.public_key, rng)
    bob = RatchetSession.responder(SHARED_SECRET, ad, spk)
    return alice, bob


def established(rng: Rng) -> tuple[RatchetSession, RatchetSession]:
    """A pair that has exchanged one message each way."""
    alice, bob = make_pair(rng)
    assert bob.decrypt(alice.encrypt(b"hello", rng), rng) == b"hello"
    assert alice.decrypt(bob.encrypt(b"hi", rng), rng) == b"hi"
    return alice, bob


def assert_fails_unchanged(
    session: RatchetSession, message: bytes, rng: Rng, error: type[CryptoError]
) -> None:
    before = session.to_bytes()
    with pytest.raises(error):
        session.decrypt(message, rng)
    assert session.to_bytes() == before


def with_header(message: bytes, **changes: int) -> bytes:
    version, key, pn, n = struct.unpack(">B32sII", message[:HEADER_SIZE])
    fields = {"version": version, "pn": pn, "n": n} | changes
    header = struct.pack(">B32sII", fields["version"], key, fields["pn"], fields["n"])
    return header + message[HEADER_SIZE:]


def counters_offset(state: bytes) -> int:
    """Where u32 ns, pn, nr start in an encoded state (see RatchetSession.to_bytes)."""
    ad_len = int.from_bytes(state[1:5], "big")
    offset = 1 + 4 + ad_len + 32 + 32
    phase = state[offset]
    return offset + 1 + (64 if phase >= 1 else 0) + (32 if phase == 2 else 0)


def with_counters(state: bytes, **values: int) -> bytes:
    offset = counters_offset(state)
    ns, pn, nr = struct.unpack_from(">III", state, offset)
    fields = {"ns": ns, "pn": pn, "nr": nr} | values
    packed = struct.pack(">III", fields["ns"], fields["pn"], fields["nr"])
    return state[:offset] + packed + state[offset + 12 :]


# -- known answers ----------------------------------------------------------------------------


def test_kdf_ck_reproduces_the_libsignal_chain_key_vector(known_answers: dict[str, Any]) -> None:
    vector = known_answers["double_ratchet_chain_key"]
    next_chain_key, message_key = kdf_ck(bytes.fromhex(vector["chain_key"]))
    assert next_chain_key.hex() == vector["next_chain_key"]
    okm = hkdf_sha256(message_key, b"", b"WhisperMessageKeys", 80)
    assert okm[:32].hex() == vector["message_key_okm_0_32"]
    assert okm[32:64].hex() == vector["message_key_okm_32_64"]


def test_kdf_rk_is_hkdf_sha256_salted_with_the_root_key() -> None:
    root_key, dh_out = bytes(range(32)), bytes(range(32, 64))
    prk = hmac.new(root_key, dh_out, hashlib.sha256).digest()
    t1 = hmac.new(prk, b"MedRelay_Ratchet\x01", hashlib.sha256).digest()
    t2 = hmac.new(prk, t1 + b"MedRelay_Ratchet\x02", hashlib.sha256).digest()
    assert kdf_rk(root_key, dh_out) == (t1, t2)


def test_kdf_functions_refuse_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        kdf_ck(bytes(31))
    with pytest.raises(ValueError):
        kdf_rk(bytes(32), bytes(33))


@pytest.mark.parametrize("seed", [b"", b"a", b"b", b"c"])
def test_message_cipher_keys_equal_generic_hkdf_56(seed: bytes) -> None:
    """The unrolled two-block HKDF on the hot path equals the generic RFC 5869 loop."""
    message_key = hashlib.sha256(seed).digest()
    okm = hkdf_sha256(message_key, bytes(32), b"MedRelay_MessageKeys", 56)
    assert ratchet._message_cipher_keys(message_key) == (okm[:32], okm[32:])


REGRESSION_MESSAGE = (
    "018838ca45e7b6442d644ebab544e0004373e8da76385d198fedc27e7f20638e080000000000000000"
    "4475c34e704a62ab5c52de3d2fc3ac7e72161b11921771b1f20b0050e4992855ee46fc5e462e6327d1742e"
    "0484eeb545bfa24a8bacecb57dd4ee6b2092c1fb9752253e9ce8193a114e7ae072828c5344fb343f3b1120"
    "49631d10ee249b865cb92c418a81a1b05c4966348d8024baa1e3a4fd48b8acc3c0b56bb7de30e343fffde9"
    "08a23a14cec727d3bb9279902c05dea960c7eef1fe876f4f4435b58e00117fd8963e93a71ae7b8f0096f56"
    "c5b4bc2d2e0a5aa2e0bb42e67beff444e2504278fac053ac6ed952c57c632f8415b83b460fe6bd8dd99b45"
    "9156b8e616cc85489224e7dc75fa7a214d9e13253d170fc4298e278b321109b84b9bffc38298363fc3666b"
    "d50c82a320e0973f0fd3bab52469"
)


def test_first_message_regression_vector() -> None:
    """Fixed secret, AD and seeded randomness give exactly this first message: pins the whole
    construction (KDFs, header layout, CONCAT, padding, AEAD)."""
    spk = DHPrivateKey.generate(seeded_rng(b"medrelay ratchet vector: bob spk"))
    alice = RatchetSession.initiator(
        SHARED_SECRET,
        b"medrelay ratchet vector AD",
        spk.public_key,
        seeded_rng(b"medrelay ratchet vector: alice"),
    )
    message = alice.encrypt(b"Your test results are ready.", seeded_rng(b"unused"))
    assert message.hex() == REGRESSION_MESSAGE


def test_first_message_recomputed_from_primitives() -> None:
    """The regression vector again, derived step by step from HMAC, HKDF, X25519 and libsodium
    directly (not through the module), then opened with the responder's session."""
    spk = DHPrivateKey.generate(seeded_rng(b"medrelay ratchet vector: bob spk"))
    alice_ratchet = seeded_rng(b"medrelay ratchet vector: alice")(32)
    ad = b"medrelay ratchet vector AD"
    message = bytes.fromhex(REGRESSION_MESSAGE)

    alice_public = bindings.crypto_scalarmult_base(alice_ratchet)
    dh_out = bindings.crypto_scalarmult(alice_ratchet, spk.public_key.raw)
    prk = hmac.new(SHARED_SECRET, dh_out, hashlib.sha256).digest()
    okm = hmac.new(prk, b"MedRelay_Ratchet\x01", hashlib.sha256).digest()
    okm += hmac.new(prk, okm + b"MedRelay_Ratchet\x02", hashlib.sha256).digest()
    chain_key = okm[32:]
    message_key = hmac.new(chain_key, b"\x01", hashlib.sha256).digest()
    prk = hmac.new(bytes(32), message_key, hashlib.sha256).digest()
    t1 = hmac.new(prk, b"MedRelay_MessageKeys\x01", hashlib.sha256).digest()
    t2 = hmac.new(prk, t1 + b"MedRelay_MessageKeys\x02", hashlib.sha256).digest()
    header = b"\x01" + alice_public + struct.pack(">II", 0, 0)
    concat = struct.pack(">H", len(ad)) + ad + header
    padded = bindings.sodium_pad(b"Your test results are ready.", 256)
    ciphertext = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(padded, concat, t2[:24], t1)
    assert message == header + ciphertext

    bob = RatchetSession.responder(SHARED_SECRET, ad, spk)
    assert bob.decrypt(message, seeded_rng(b"bob")) == b"Your test results are ready."


# -- the header -------------------------------------------------------------------------------


def test_parse_header_returns_the_fields_and_reencodes_exactly(rng: Rng) -> None:
    alice, _ = established(rng)
    alice.encrypt(b"one", rng)
    message = alice.encrypt(b"two", rng)
    header = parse_header(message)
    assert header == RatchetHeader(1, header.ratchet_key, 1, 1)
    assert header.encode() == message[:HEADER_SIZE]
    assert isinstance(header.ratchet_key, DHPublicKey)


def test_a_header_value_cannot_hold_unencodable_fields(rng: Rng) -> None:
    key = DHPrivateKey.generate(rng).public_key
    for version, pn, n in [(2, 0, 0), (1, -1, 0), (1, 2**32, 0), (1, 0, 0xFFFF_FFFF)]:
        with pytest.raises(ValueError):
            RatchetHeader(version, key, pn, n)
    assert RatchetHeader(1, key, 0xFFFF_FFFF, MAX_MESSAGE_NUMBER).encode()[-8:] == bytes.fromhex(
        "fffffffffffffffe"
    )


@pytest.mark.parametrize("size", [0, 1, HEADER_SIZE, HEADER_SIZE + 16, HEADER_SIZE + 256 + 15])
def test_parse_header_rejects_truncated_messages(rng: Rng, size: int) -> None:
    alice, _ = make_pair(rng)
    message = alice.encrypt(b"x", rng)
    with pytest.raises(MalformedEncoding):
        parse_header(message[:size])


def test_parse_header_rejects_a_ciphertext_that_is_not_whole_blocks(rng: Rng) -> None:
    alice, _ = make_pair(rng)
    message = alice.encrypt(b"x", rng)
    with pytest.raises(MalformedEncoding):
        parse_header(message + b"\x00")


@pytest.mark.parametrize("version", [0, 2, 0x7F, 0x80, 0x81, 0xFF])
def test_parse_header_rejects_other_versions_and_the_header_encrypted_bit(
    rng: Rng, version: int
) -> None:
    alice, bob = make_pair(rng)
    message = with_header(alice.encrypt(b"x", rng), version=version)
    with pytest.raises(MalformedEncoding):
        parse_header(message)
    assert_fails_unchanged(bob, message, rng, MalformedEncoding)


def test_parse_header_and_decrypt_reject_a_low_order_ratchet_key(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    message = alice.encrypt(b"x", rng)
    forged = message[:1] + LOW_ORDER_POINT + message[33:]
    with pytest.raises(InvalidKey):
        parse_header(forged)
    assert_fails_unchanged(bob, forged, rng, InvalidKey)


def test_message_number_that_would_overflow_is_malformed(rng: Rng) -> None:
    alice, bob = established(rng)
    message = with_header(alice.encrypt(b"x", rng), n=0xFFFF_FFFF)
    with pytest.raises(MalformedEncoding):
        parse_header(message)
    assert_fails_unchanged(bob, message, rng, MalformedEncoding)


# -- conversation -----------------------------------------------------------------------------


def test_a_conversation_over_several_ratchet_turns(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    assert (alice.has_received, bob.has_received) == (False, False)
    keys_seen: set[bytes] = set()
    for turn in range(5):
        for i in range(3):
            text = f"alice {turn}.{i}".encode()
            message = alice.encrypt(text, rng)
            keys_seen.add(message[1:33])
            assert bob.decrypt(message, rng) == text
        assert bob.has_received
        for i in range(2):
            text = f"bob {turn}.{i}".encode()
            message = bob.encrypt(text, rng)
            keys_seen.add(message[1:33])
            assert alice.decrypt(message, rng) == text
        assert alice.has_received
    assert len(keys_seen) == 10, "every turn uses a fresh ratchet key"
    assert alice.associated_data == bob.associated_data == AD


def test_header_counts_pn_and_n(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    for _ in range(3):
        bob.decrypt(alice.encrypt(b"a", rng), rng)
    reply = bob.encrypt(b"b", rng)
    alice.decrypt(reply, rng)
    message = alice.encrypt(b"c", rng)
    header = parse_header(message)
    assert (header.previous_chain_length, header.message_number) == (3, 0)


def test_the_initiator_keeps_its_sending_chain_until_a_reply(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    first = alice.encrypt(b"1", rng)
    second = alice.encrypt(b"2", rng)
    assert first[1:33] == second[1:33]
    assert parse_header(second).message_number == 1
    assert bob.decrypt(second, rng) == b"2"
    assert bob.decrypt(first, rng) == b"1"


def test_the_responder_cannot_send_before_receiving(rng: Rng) -> None:
    _, bob = make_pair(rng)
    before = bob.to_bytes()
    with pytest.raises(SessionError):
        bob.encrypt(b"too early", rng)
    assert bob.to_bytes() == before


def test_out_of_order_within_a_chain_and_across_chains(rng: Rng) -> None:
    alice, bob = established(rng)
    chain_one = [alice.encrypt(f"one {i}".encode(), rng) for i in range(4)]
    assert bob.decrypt(chain_one[2], rng) == b"one 2"
    bob_reply = bob.encrypt(b"reply", rng)
    assert alice.decrypt(bob_reply, rng) == b"reply"
    chain_two = [alice.encrypt(f"two {i}".encode(), rng) for i in range(3)]
    # the new chain first: its pn (4) makes bob keep keys 0, 1, 3 of chain one
    assert bob.decrypt(chain_two[1], rng) == b"two 1"
    assert bob.stored_skipped_keys == 4
    for index in (3, 0, 1):
        assert bob.decrypt(chain_one[index], rng) == f"one {index}".encode()
    assert bob.decrypt(chain_two[0], rng) == b"two 0"
    assert bob.decrypt(chain_two[2], rng) == b"two 2"
    assert bob.stored_skipped_keys == 0


def test_empty_and_block_sized_plaintexts_round_trip(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    for size in (0, 1, 255, 256, 257, 4096):
        text = bytes(range(256)) * (size // 256) + bytes(size % 256)
        message = alice.encrypt(text, rng)
        assert (len(message) - HEADER_SIZE - 16) % 256 == 0
        assert len(message) - HEADER_SIZE - 16 > size
        assert bob.decrypt(message, rng) == text


def test_a_memoryview_message_is_accepted(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    message = alice.encrypt(b"view", rng)
    assert bob.decrypt(memoryview(message), rng) == b"view"  # type: ignore[arg-type]


# -- failures leave the session unchanged -------------------------------------------------------


def test_replay_in_the_current_chain_is_a_duplicate(rng: Rng) -> None:
    alice, bob = established(rng)
    message = alice.encrypt(b"once", rng)
    assert bob.decrypt(message, rng) == b"once"
    assert_fails_unchanged(bob, message, rng, DuplicateMessage)


def test_replay_of_a_used_skipped_key_is_a_duplicate(rng: Rng) -> None:
    alice, bob = established(rng)
    late = alice.encrypt(b"late", rng)
    bob.decrypt(alice.encrypt(b"early", rng), rng)
    assert bob.decrypt(late, rng) == b"late"
    assert_fails_unchanged(bob, late, rng, DuplicateMessage)


def test_replay_from_a_finished_chain_is_a_duplicate_without_a_ratchet_step(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    first = alice.encrypt(b"first", rng)
    bob.decrypt(first, rng)
    for turn in range(3):
        alice.decrypt(bob.encrypt(f"b{turn}".encode(), rng), rng)
        bob.decrypt(alice.encrypt(f"a{turn}".encode(), rng), rng)
    assert_fails_unchanged(bob, first, rng, DuplicateMessage)


def test_a_message_beyond_the_end_of_a_finished_chain_fails(rng: Rng) -> None:
    alice, bob = established(rng)
    old = alice.encrypt(b"old chain", rng)
    bob.decrypt(old, rng)
    alice.decrypt(bob.encrypt(b"turn", rng), rng)
    bob.decrypt(alice.encrypt(b"new chain", rng), rng)
    forged = with_header(old, n=5)
    assert_fails_unchanged(bob, forged, rng, DecryptionFailed)


@pytest.mark.parametrize("position", [HEADER_SIZE, HEADER_SIZE + 100, -1])
def test_a_tampered_ciphertext_fails_and_the_genuine_one_still_decrypts(
    rng: Rng, position: int
) -> None:
    alice, bob = established(rng)
    message = alice.encrypt(b"genuine", rng)
    tampered = bytearray(message)
    tampered[position] ^= 0x01
    assert_fails_unchanged(bob, bytes(tampered), rng, DecryptionFailed)
    assert bob.decrypt(message, rng) == b"genuine"


def test_a_tampered_first_reply_fails_and_the_genuine_one_still_decrypts(rng: Rng) -> None:
    """The DH-ratchet path: nothing of the new chain is kept after a failure."""
    alice, bob = make_pair(rng)
    bob.decrypt(alice.encrypt(b"hello", rng), rng)
    reply = bob.encrypt(b"reply", rng)
    tampered = bytearray(reply)
    tampered[-5] ^= 0x40
    assert_fails_unchanged(alice, bytes(tampered), rng, DecryptionFailed)
    assert not alice.has_received
    assert alice.decrypt(reply, rng) == b"reply"


def test_a_message_under_different_associated_data_fails(rng: Rng) -> None:
    spk = DHPrivateKey.generate(rng)
    alice = RatchetSession.initiator(SHARED_SECRET, b"ad one", spk.public_key, rng)
    bob = RatchetSession.responder(SHARED_SECRET, b"ad two", spk)
    assert_fails_unchanged(bob, alice.encrypt(b"x", rng), rng, DecryptionFailed)


def test_a_message_of_another_session_fails(rng: Rng) -> None:
    alice, _ = established(rng)
    _, other_bob = established(rng)
    assert_fails_unchanged(other_bob, alice.encrypt(b"x", rng), rng, DecryptionFailed)


def test_a_message_claiming_the_signed_prekey_as_ratchet_key_fails(rng: Rng) -> None:
    """The initiator's first remote key has no receiving chain."""
    spk = DHPrivateKey.generate(rng)
    alice = RatchetSession.initiator(SHARED_SECRET, AD, spk.public_key, rng)
    message = alice.encrypt(b"x", rng)
    forged = message[:1] + spk.public_key.raw + message[33:]
    assert_fails_unchanged(alice, forged, rng, DecryptionFailed)


def test_a_broken_rng_during_the_ratchet_step_leaves_the_session_unchanged(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    message = alice.encrypt(b"x", rng)

    def short_rng(n: int) -> bytes:
        return bytes(n - 1)

    assert_fails_unchanged(bob, message, short_rng, InvalidKey)
    assert bob.decrypt(message, rng) == b"x"


# -- limits -----------------------------------------------------------------------------------


def test_skipping_exactly_max_skip_keys_in_one_chain_is_allowed(rng: Rng) -> None:
    alice, bob = established(rng)
    messages = [alice.encrypt(b"%d" % i, rng) for i in range(MAX_SKIP + 1)]
    assert bob.decrypt(messages[MAX_SKIP], rng) == b"%d" % MAX_SKIP
    assert bob.stored_skipped_keys == MAX_SKIP
    assert bob.decrypt(messages[0], rng) == b"0"


def test_skipping_more_than_max_skip_keys_raises_and_changes_nothing(rng: Rng) -> None:
    alice, bob = established(rng)
    messages = [alice.encrypt(b"%d" % i, rng) for i in range(MAX_SKIP + 2)]
    assert_fails_unchanged(bob, messages[MAX_SKIP + 1], rng, SkipLimitExceeded)
    assert bob.decrypt(messages[MAX_SKIP], rng) == b"%d" % MAX_SKIP


def test_a_first_message_far_ahead_is_refused_too(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    forged = with_header(alice.encrypt(b"x", rng), n=MAX_SKIP + 1)
    assert_fails_unchanged(bob, forged, rng, SkipLimitExceeded)


def test_a_previous_chain_length_far_ahead_is_refused(rng: Rng) -> None:
    """pn is checked against MAX_SKIP for the chain being closed (spec SkipMessageKeys)."""
    alice, bob = established(rng)
    bob.decrypt(alice.encrypt(b"seen", rng), rng)
    for _ in range(MAX_SKIP + 1):
        alice.encrypt(b"lost", rng)
    alice.decrypt(bob.encrypt(b"turn", rng), rng)
    message = alice.encrypt(b"new chain", rng)
    assert parse_header(message).previous_chain_length == MAX_SKIP + 2
    assert_fails_unchanged(bob, message, rng, SkipLimitExceeded)


def test_message_numbers_never_wrap(rng: Rng) -> None:
    """A sender at the last u32 message number sends it, and then refuses to send more."""
    alice, bob = established(rng)
    bob.decrypt(alice.encrypt(b"bob now receives on alice's current chain", rng), rng)
    alice = RatchetSession.from_bytes(with_counters(alice.to_bytes(), ns=MAX_MESSAGE_NUMBER))
    bob = RatchetSession.from_bytes(with_counters(bob.to_bytes(), nr=MAX_MESSAGE_NUMBER))
    last = alice.encrypt(b"last", rng)
    assert parse_header(last).message_number == MAX_MESSAGE_NUMBER
    assert bob.decrypt(last, rng) == b"last"
    before = alice.to_bytes()
    with pytest.raises(SessionError):
        alice.encrypt(b"one too many", rng)
    assert alice.to_bytes() == before
    # the exhausted chain is still closed normally by the next turn
    alice.decrypt(bob.encrypt(b"turn", rng), rng)
    assert bob.decrypt(alice.encrypt(b"fresh chain", rng), rng) == b"fresh chain"


def test_setup_checks_the_secret_and_bounds_the_associated_data(rng: Rng) -> None:
    spk = DHPrivateKey.generate(rng)
    with pytest.raises(ValueError):
        RatchetSession.initiator(bytes(31), AD, spk.public_key, rng)
    with pytest.raises(ValueError):
        RatchetSession.responder(bytes(33), AD, spk)
    with pytest.raises(ValueError):
        RatchetSession.responder(SHARED_SECRET, bytes(1025), spk)
    alice, bob = make_pair(rng, ad=bytes(1024))
    assert bob.decrypt(alice.encrypt(b"max ad", rng), rng) == b"max ad"


# -- state encoding ---------------------------------------------------------------------------


def test_state_round_trips_in_every_phase(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    for session in (alice, bob):
        assert RatchetSession.from_bytes(session.to_bytes()).to_bytes() == session.to_bytes()
    message = alice.encrypt(b"x", rng)
    alice.encrypt(b"y", rng)
    bob.decrypt(alice.encrypt(b"z", rng), rng)
    for session in (alice, bob):
        restored = RatchetSession.from_bytes(session.to_bytes())
        assert restored.to_bytes() == session.to_bytes()
        assert restored.has_received == session.has_received
        assert restored.stored_skipped_keys == session.stored_skipped_keys
    assert RatchetSession.from_bytes(bob.to_bytes()).decrypt(message, rng) == b"x"


def test_state_starts_with_its_version_and_rejects_others(rng: Rng) -> None:
    alice, _ = make_pair(rng)
    state = alice.to_bytes()
    assert state[0] == 1
    for version in (0, 2, 0xFF):
        with pytest.raises(MalformedEncoding):
            RatchetSession.from_bytes(bytes((version,)) + state[1:])


def test_state_rejects_trailing_bytes_and_unknown_phase(rng: Rng) -> None:
    alice, _ = make_pair(rng)
    state = alice.to_bytes()
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(state + b"\x00")
    phase_at = 1 + 4 + len(AD) + 64
    assert state[phase_at] == 1
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(state[:phase_at] + b"\x03" + state[phase_at + 1 :])


def test_state_rejects_a_low_order_remote_key_as_malformed(rng: Rng) -> None:
    alice, _ = make_pair(rng)
    state = alice.to_bytes()
    remote_at = 1 + 4 + len(AD) + 64 + 1
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(state[:remote_at] + LOW_ORDER_POINT + state[remote_at + 32 :])


def test_state_rejects_counters_impossible_for_the_phase(rng: Rng) -> None:
    alice, bob = make_pair(rng)
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(with_counters(bob.to_bytes(), ns=1))
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(with_counters(alice.to_bytes(), nr=1))
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(with_counters(alice.to_bytes(), pn=1))


def test_state_rejects_a_skipped_key_at_or_beyond_the_receiving_length(rng: Rng) -> None:
    alice, bob = established(rng)
    skipped = alice.encrypt(b"skipped", rng)
    bob.decrypt(alice.encrypt(b"next", rng), rng)
    state = bob.to_bytes()
    assert bob.stored_skipped_keys == 1
    # bob's receiving chain is at 2 and holds the key of message 0
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(with_counters(state, nr=0))
    assert RatchetSession.from_bytes(with_counters(state, nr=1)).stored_skipped_keys == 1
    assert RatchetSession.from_bytes(state).decrypt(skipped, rng) == b"skipped"


def test_the_largest_possible_state_decodes_and_one_byte_more_is_refused() -> None:
    """Maximal AD, a full history of finished chains and 2000 skipped keys each in its own
    chain (the most expensive layout): exactly MAX_STATE_SIZE bytes, which other modules use
    as their bound for a stored ratchet state."""
    rng = seeded_rng(b"largest state")
    alice, bob = make_pair(rng, ad=bytes(1024))
    bob.decrypt(alice.encrypt(b"x", rng), rng)
    alice.decrypt(bob.encrypt(b"y", rng), rng)
    state = alice.to_bytes()
    prefix = state[: counters_offset(state) + 12]
    keys = [DHPrivateKey.generate(rng).public_key.raw for _ in range(MAX_STORED_SKIPPED)]
    history = struct.pack(">I", MAX_PREVIOUS_CHAINS) + b"".join(
        key + struct.pack(">I", 10) for key in keys[:MAX_PREVIOUS_CHAINS]
    )

    def skipped(count: int) -> bytes:
        entries = (key + struct.pack(">II", 1, 9) + bytes(32) for key in keys[:count])
        return struct.pack(">I", count) + b"".join(entries)

    largest = prefix + history + skipped(MAX_STORED_SKIPPED)
    assert len(largest) == MAX_STATE_SIZE
    session = RatchetSession.from_bytes(largest)
    assert session.stored_skipped_keys == MAX_STORED_SKIPPED
    assert session.to_bytes() == largest
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(largest + b"\x00")
    keys.append(DHPrivateKey.generate(rng).public_key.raw)
    with pytest.raises(MalformedEncoding):
        RatchetSession.from_bytes(prefix + history + skipped(MAX_STORED_SKIPPED + 1))
    # under the size bound (a short AD), 2001 skipped keys are still refused by their count
    small = established(rng)[0].to_bytes()
    over_count = small[: counters_offset(small) + 12] + history + skipped(MAX_STORED_SKIPPED + 1)
    assert len(over_count) < MAX_STATE_SIZE
    with pytest.raises(MalformedEncoding, match="skipped"):
        RatchetSession.from_bytes(over_count)


def test_repr_shows_no_secrets(rng: Rng) -> None:
    alice, bob = established(rng)
    for session in (alice, bob):
        text = repr(session)
        assert "RatchetSession(" in text
        assert not re.search(r"[0-9a-fA-F]{16}|[A-Za-z0-9_-]{40}", text)
