"""X3DH (medrelay.crypto.x3dh): agreement on both sides, bundle verification before any DH, the
prekey records and the initial message's strict encoding."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.crypto.encoding import Writer
from medrelay.crypto.errors import (
    BadSignature,
    CryptoError,
    InvalidKey,
    MalformedEncoding,
    SessionError,
    UnknownPrekey,
)
from medrelay.crypto.identity import DeviceIdentity, DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, DHPublicKey, SigningKey
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.x3dh import (
    INFO,
    SIGNED_PREKEY_CONTEXT,
    SUITE_X25519_MLKEM768_SHA256,
    InitiatorSetup,
    OneTimePrekey,
    OneTimePrekeyPair,
    PrekeyBundle,
    PrekeyMessage,
    PrekeyMessageHeader,
    PrekeyMismatch,
    SenderMismatch,
    SignedPrekey,
    SignedPrekeyPair,
    associated_data,
    derive_shared_secret,
    generate_one_time_prekeys,
    generate_signed_prekey,
    initiate,
    respond,
)

NOW_MS = 1_790_000_000_000

# RFC 7748 / libsodium low-order X25519 u-coordinates (little-endian), as refused by keys.py.
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


def make_device(user_id: str, device_id: str, rng: Rng) -> DeviceKeys:
    signing_key = SigningKey.generate(rng)
    dh_key = DHPrivateKey.generate(rng)
    identity = DeviceIdentity(
        user_id=user_id,
        device_id=device_id,
        signing_key=signing_key.verify_key,
        dh_key=dh_key.public_key,
        certificate_hash=hashlib.sha256(f"cert:{user_id}/{device_id}".encode()).digest(),
    )
    return DeviceKeys(identity, signing_key, dh_key)


class Parties:
    """Alice's device, Bob's device with a signed and a one-time prekey, and a bystander."""

    def __init__(self, rng: Rng) -> None:
        self.alice = make_device("alice", "phone", rng)
        self.bob = make_device("bob", "laptop", rng)
        self.mallory = make_device("mallory", "phone", rng)
        self.spk: SignedPrekeyPair = generate_signed_prekey(self.bob, 7, NOW_MS, rng)
        self.opk: OneTimePrekeyPair = generate_one_time_prekeys(100, 1, rng)[0]

    def bundle(self, with_one_time: bool = True) -> PrekeyBundle:
        return PrekeyBundle(
            self.bob.identity, self.spk.record, self.opk.record if with_one_time else None
        )


@pytest.fixture
def parties(rng: Rng) -> Parties:
    return Parties(rng)


def forbidden_rng(n: int) -> bytes:
    raise AssertionError("initiate drew randomness before the bundle was verified")


@pytest.fixture
def no_dh(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts X25519 operations; tests of refused bundles assert it stays at zero."""
    calls: list[int] = []
    original = DHPrivateKey.exchange

    def counting(self: DHPrivateKey, peer: DHPublicKey) -> bytes:
        calls.append(1)
        return original(self, peer)

    monkeypatch.setattr(DHPrivateKey, "exchange", counting)
    yield calls


def bob_responds(parties: Parties, setup: InitiatorSetup) -> tuple[bytes, bytes]:
    opk = parties.opk.private_key if setup.one_time_prekey_id is not None else None
    return respond(parties.bob, parties.alice.identity, setup.header, parties.spk.private_key, opk)


# --- agreement ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_one_time", [True, False])
def test_both_sides_derive_the_same_secret_and_associated_data(
    parties: Parties, rng: Rng, with_one_time: bool
) -> None:
    setup = initiate(parties.alice, parties.bundle(with_one_time), rng)
    shared_secret, ad = bob_responds(parties, setup)
    assert shared_secret == setup.shared_secret
    assert ad == setup.associated_data
    assert len(shared_secret) == 32
    assert setup.signed_prekey_id == 7
    assert setup.one_time_prekey_id == (100 if with_one_time else None)
    assert setup.peer_signed_prekey == parties.spk.record.public_key


def test_one_time_prekey_changes_the_secret(parties: Parties) -> None:
    """DH4 is really mixed in: the same ephemeral key with and without the OPK gives two SKs."""
    with_opk = initiate(parties.alice, parties.bundle(True), seeded_rng(b"ek"))
    without = initiate(parties.alice, parties.bundle(False), seeded_rng(b"ek"))
    assert with_opk.ephemeral_key == without.ephemeral_key
    assert with_opk.shared_secret != without.shared_secret


def test_secret_is_hkdf_over_ff_prefix_and_the_four_dh_values(parties: Parties) -> None:
    """SK = HKDF-SHA256(salt=0^32, IKM=0xFF^32 ‖ DH1..DH4, info) recomputed with stdlib hmac."""
    ek = DHPrivateKey.generate(seeded_rng(b"ek"))
    setup = initiate(parties.alice, parties.bundle(), seeded_rng(b"ek"))
    bob = parties.bob.identity
    dhs = [
        parties.alice.dh_key.exchange(parties.spk.record.public_key),
        ek.exchange(bob.dh_key),
        ek.exchange(parties.spk.record.public_key),
        ek.exchange(parties.opk.record.public_key),
    ]
    prk = hmac.digest(bytes(32), b"\xff" * 32 + b"".join(dhs), "sha256")
    okm = hmac.digest(prk, INFO + b"\x01", "sha256")
    assert INFO == b"MedRelay_CURVE25519_SHA-256"
    assert setup.shared_secret == okm
    assert derive_shared_secret(dhs) == okm


def test_associated_data_binds_both_dh_keys_and_certificates(parties: Parties, rng: Rng) -> None:
    setup = initiate(parties.alice, parties.bundle(), rng)
    a, b = parties.alice.identity, parties.bob.identity
    expected = a.dh_key.encode() + b.dh_key.encode() + a.certificate_hash + b.certificate_hash
    assert setup.associated_data == expected == associated_data(a, b)
    assert len(expected) == 33 + 33 + 32 + 32


def test_derive_shared_secret_refuses_wrong_dh_count() -> None:
    with pytest.raises(ValueError):
        derive_shared_secret([bytes(32)] * 2)
    with pytest.raises(ValueError):
        derive_shared_secret([bytes(32), bytes(32), bytes(31)])


def test_fresh_ephemeral_key_per_initiation(parties: Parties, rng: Rng) -> None:
    first = initiate(parties.alice, parties.bundle(), rng)
    second = initiate(parties.alice, parties.bundle(), rng)
    assert first.ephemeral_key != second.ephemeral_key
    assert first.shared_secret != second.shared_secret


def test_setup_repr_hides_the_shared_secret(parties: Parties, rng: Rng) -> None:
    setup = initiate(parties.alice, parties.bundle(), rng)
    text = repr(setup)
    assert setup.shared_secret.hex() not in text
    assert repr(setup.shared_secret) not in text


# --- the bundle is verified before any DH ---------------------------------------------------


def test_valid_bundle_uses_dh(parties: Parties, rng: Rng, no_dh: list[int]) -> None:
    """Control for the refusal tests below: the DH counter does see a normal agreement."""
    initiate(parties.alice, parties.bundle(), rng)
    assert len(no_dh) == 4


def _altered(record: SignedPrekey, **changes: object) -> SignedPrekey:
    """`record` with some fields replaced and its signature kept as it was."""
    fields: dict[str, object] = {
        "user_id": record.user_id,
        "device_id": record.device_id,
        "prekey_id": record.prekey_id,
        "public_key": record.public_key,
        "created_at_ms": record.created_at_ms,
        "signature": record.signature,
    }
    fields.update(changes)
    return SignedPrekey(**fields)  # type: ignore[arg-type]


TAMPERS: dict[str, Callable[[Parties], SignedPrekey]] = {
    "flipped signature bit": lambda p: _altered(
        p.spk.record,
        signature=bytes([p.spk.record.signature[0] ^ 1]) + p.spk.record.signature[1:],
    ),
    "swapped public key": lambda p: _altered(
        p.spk.record, public_key=DHPrivateKey(b"\x05" * 32).public_key
    ),
    "changed prekey id": lambda p: _altered(p.spk.record, prekey_id=8),
    "changed creation time": lambda p: _altered(p.spk.record, created_at_ms=NOW_MS + 1),
    "relabelled as bob's but signed by mallory": lambda p: _altered(
        generate_signed_prekey(p.mallory, 7, NOW_MS, seeded_rng(b"m")).record,
        user_id="bob",
        device_id="laptop",
    ),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_signed_prekey_is_refused_before_any_dh(
    parties: Parties, no_dh: list[int], tamper: str
) -> None:
    spk = TAMPERS[tamper](parties)
    bundle = PrekeyBundle(parties.bob.identity, spk, parties.opk.record)
    with pytest.raises(BadSignature):
        initiate(parties.alice, bundle, forbidden_rng)
    assert no_dh == []


def test_signed_prekey_of_another_device_is_refused_before_any_dh(
    parties: Parties, no_dh: list[int]
) -> None:
    """A validly signed SPK of Mallory's device, served in Bob's bundle."""
    mallory_spk = generate_signed_prekey(parties.mallory, 7, NOW_MS, seeded_rng(b"m")).record
    mallory_spk.verify(parties.mallory.identity)
    bundle = PrekeyBundle(parties.bob.identity, mallory_spk, parties.opk.record)
    with pytest.raises(PrekeyMismatch):
        initiate(parties.alice, bundle, forbidden_rng)
    assert no_dh == []


def test_signed_prekey_of_another_device_of_the_same_user_is_refused(
    parties: Parties, rng: Rng, no_dh: list[int]
) -> None:
    bob_tablet = make_device("bob", "tablet", rng)
    tablet_spk = generate_signed_prekey(bob_tablet, 7, NOW_MS, rng).record
    with pytest.raises(PrekeyMismatch):
        initiate(parties.alice, PrekeyBundle(parties.bob.identity, tablet_spk), forbidden_rng)
    assert no_dh == []


def test_bundle_of_the_initiating_device_itself_is_refused(
    parties: Parties, rng: Rng, no_dh: list[int]
) -> None:
    own_spk = generate_signed_prekey(parties.alice, 1, NOW_MS, rng).record
    with pytest.raises(SessionError):
        initiate(parties.alice, PrekeyBundle(parties.alice.identity, own_spk), forbidden_rng)
    assert no_dh == []


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_low_order_prekeys_cannot_enter_a_bundle(parties: Parties, point: bytes) -> None:
    """A bundle arrives encoded; a low-order SPK or OPK fails to decode with InvalidKey, and so
    never reaches the DH. (Flipping the ignored top bit gives the same point.)"""
    for raw in (point, point[:31] + bytes([point[31] ^ 0x80])):
        spk_bytes = parties.spk.record.encode()
        key_at = spk_bytes.index(parties.spk.record.public_key.raw)
        with pytest.raises(InvalidKey):
            SignedPrekey.decode(spk_bytes[:key_at] + raw + spk_bytes[key_at + 32 :])
        opk_bytes = parties.opk.record.encode()
        with pytest.raises(InvalidKey):
            OneTimePrekey.decode(opk_bytes[:-32] + raw)
        with pytest.raises(InvalidKey):
            DHPublicKey(raw)


def test_low_order_ephemeral_key_in_a_prekey_message_is_refused(parties: Parties, rng: Rng) -> None:
    setup = initiate(parties.alice, parties.bundle(), rng)
    encoded = PrekeyMessage(setup.header, b"ratchet").encode()
    at = encoded.index(setup.ephemeral_key.raw)
    with pytest.raises(InvalidKey):
        PrekeyMessage.decode(encoded[:at] + LOW_ORDER_POINTS[2] + encoded[at + 32 :])


# --- respond ----------------------------------------------------------------------------


def test_respond_refuses_a_header_naming_another_sender(parties: Parties, rng: Rng) -> None:
    setup = initiate(parties.alice, parties.bundle(), rng)
    with pytest.raises(SenderMismatch):
        respond(
            parties.bob,
            parties.mallory.identity,
            setup.header,
            parties.spk.private_key,
            parties.opk.private_key,
        )


def test_respond_refuses_a_dh_identity_key_not_in_the_senders_certificate(
    parties: Parties, rng: Rng
) -> None:
    """Mallory keeps Alice's ids but puts her own DIK in the header: DH1 would use her key."""
    setup = initiate(parties.alice, parties.bundle(), rng)
    forged = PrekeyMessageHeader(
        "alice",
        "phone",
        parties.mallory.identity.dh_key,
        setup.ephemeral_key,
        setup.signed_prekey_id,
        setup.one_time_prekey_id,
    )
    with pytest.raises(SenderMismatch):
        respond(
            parties.bob,
            parties.alice.identity,
            forged,
            parties.spk.private_key,
            parties.opk.private_key,
        )


def test_respond_requires_exactly_the_one_time_prekey_the_header_names(
    parties: Parties, rng: Rng
) -> None:
    with_opk = initiate(parties.alice, parties.bundle(True), rng)
    without = initiate(parties.alice, parties.bundle(False), rng)
    with pytest.raises(UnknownPrekey):
        respond(parties.bob, parties.alice.identity, with_opk.header, parties.spk.private_key, None)
    with pytest.raises(UnknownPrekey):
        respond(
            parties.bob,
            parties.alice.identity,
            without.header,
            parties.spk.private_key,
            parties.opk.private_key,
        )


def test_respond_with_the_wrong_signed_prekey_gives_a_different_secret(
    parties: Parties, rng: Rng
) -> None:
    """Not detectable by X3DH itself: the ratchet's first AEAD check is what fails."""
    setup = initiate(parties.alice, parties.bundle(), rng)
    other = generate_signed_prekey(parties.bob, 8, NOW_MS, rng)
    shared_secret, _ = respond(
        parties.bob,
        parties.alice.identity,
        setup.header,
        other.private_key,
        parties.opk.private_key,
    )
    assert shared_secret != setup.shared_secret


# --- prekey records ----------------------------------------------------------------------


def test_signed_prekey_round_trips_and_verifies(parties: Parties) -> None:
    record = parties.spk.record
    assert SignedPrekey.decode(record.encode()) == record
    record.verify(parties.bob.identity)
    assert record.signed_bytes().startswith(SIGNED_PREKEY_CONTEXT)
    assert record.encode() == record.signed_bytes()[len(SIGNED_PREKEY_CONTEXT) :] + (
        record.signature
    )


def test_signed_prekey_signature_covers_the_context_string(parties: Parties) -> None:
    """A signature of the body alone (without the context) does not verify."""
    record = parties.spk.record
    body = record.signed_bytes()[len(SIGNED_PREKEY_CONTEXT) :]
    bare = _altered(record, signature=parties.bob.signing_key.sign(body))
    with pytest.raises(BadSignature):
        bare.verify(parties.bob.identity)


def test_signed_prekey_decode_is_strict(parties: Parties) -> None:
    encoded = parties.spk.record.encode()
    for cut in range(len(encoded)):
        with pytest.raises(MalformedEncoding):
            SignedPrekey.decode(encoded[:cut])
    with pytest.raises(MalformedEncoding):
        SignedPrekey.decode(encoded + b"\x00")
    with pytest.raises(MalformedEncoding):
        SignedPrekey.decode(b"\x02" + encoded[1:])


def test_one_time_prekey_round_trip_and_strict_decode(parties: Parties) -> None:
    encoded = parties.opk.record.encode()
    assert OneTimePrekey.decode(encoded) == parties.opk.record
    assert len(encoded) == 1 + 4 + 33
    for cut in range(len(encoded)):
        with pytest.raises(MalformedEncoding):
            OneTimePrekey.decode(encoded[:cut])
    with pytest.raises(MalformedEncoding):
        OneTimePrekey.decode(encoded + b"\x00")


def test_generated_one_time_prekeys_are_numbered_and_distinct(rng: Rng) -> None:
    pairs = generate_one_time_prekeys(0xFFFF_FFF0, 16, rng)
    assert [p.record.prekey_id for p in pairs] == list(range(0xFFFF_FFF0, 0x1_0000_0000))
    assert len({p.record.public_key for p in pairs}) == 16
    assert all(p.private_key.public_key == p.record.public_key for p in pairs)
    assert generate_one_time_prekeys(5, 0, rng) == []
    with pytest.raises(ValueError):
        generate_one_time_prekeys(0xFFFF_FFF0, 17, rng)
    with pytest.raises(ValueError):
        generate_one_time_prekeys(-1, 1, rng)


def test_prekey_pairs_refuse_mismatched_private_keys(parties: Parties, rng: Rng) -> None:
    with pytest.raises(ValueError):
        SignedPrekeyPair(parties.spk.record, DHPrivateKey.generate(rng))
    with pytest.raises(ValueError):
        OneTimePrekeyPair(parties.opk.record, DHPrivateKey.generate(rng))


def test_prekey_ids_must_be_u32(parties: Parties) -> None:
    with pytest.raises(ValueError):
        generate_signed_prekey(parties.bob, 1 << 32, NOW_MS, seeded_rng(b"x"))
    with pytest.raises(ValueError):
        OneTimePrekey(-1, parties.opk.record.public_key)


# --- the initial message -----------------------------------------------------------------


@pytest.mark.parametrize("with_one_time", [True, False])
def test_prekey_message_round_trips(parties: Parties, rng: Rng, with_one_time: bool) -> None:
    setup = initiate(parties.alice, parties.bundle(with_one_time), rng)
    message = PrekeyMessage(setup.header, b"\x01ratchet bytes")
    encoded = message.encode()
    assert PrekeyMessage.decode(encoded) == message
    assert PrekeyMessageHeader.decode(setup.header.encode()) == setup.header
    assert encoded[0] == 0x01


def test_prekey_message_decode_is_strict(parties: Parties, rng: Rng) -> None:
    setup = initiate(parties.alice, parties.bundle(), rng)
    encoded = PrekeyMessage(setup.header, b"ratchet").encode()
    for cut in range(len(encoded)):
        with pytest.raises(MalformedEncoding):
            PrekeyMessage.decode(encoded[:cut])
    with pytest.raises(MalformedEncoding):
        PrekeyMessage.decode(encoded + b"\x00")


def test_prekey_message_with_reserved_or_unknown_suite_is_refused(
    parties: Parties, rng: Rng
) -> None:
    setup = initiate(parties.alice, parties.bundle(), rng)
    encoded = PrekeyMessage(setup.header, b"ratchet").encode()
    for suite in (0x00, SUITE_X25519_MLKEM768_SHA256, 0xFF):
        with pytest.raises(MalformedEncoding, match="suite"):
            PrekeyMessage.decode(bytes([suite]) + encoded[1:])


def test_prekey_message_refuses_a_non_boolean_flag_and_an_oversized_body(
    parties: Parties, rng: Rng
) -> None:
    setup = initiate(parties.alice, parties.bundle(False), rng)
    header = setup.header.encode()
    assert header[-1] == 0
    with pytest.raises(MalformedEncoding):
        PrekeyMessage.decode(header[:-1] + b"\x02" + Writer().blob(b"", 0).to_bytes())
    huge_length = (1 << 20) + 1
    with pytest.raises(MalformedEncoding, match="exceeds"):
        PrekeyMessage.decode(header + huge_length.to_bytes(4, "big"))


def test_prekey_message_decode_errors_are_crypto_errors(parties: Parties, rng: Rng) -> None:
    """Swapping each byte for a few values never raises anything but CryptoError (or decodes)."""
    setup = initiate(parties.alice, parties.bundle(), rng)
    encoded = PrekeyMessage(setup.header, b"ratchet").encode()
    for i in range(len(encoded)):
        for value in (0x00, 0x80, 0xFF):
            mutated = encoded[:i] + bytes([value]) + encoded[i + 1 :]
            with contextlib.suppress(CryptoError):
                PrekeyMessage.decode(mutated)


@settings(max_examples=50, deadline=None)
@given(
    user_id=st.text(
        alphabet=st.characters(max_codepoint=0x2FF, exclude_categories=("Cc", "Cs")),
        min_size=1,
        max_size=20,
    ),
    spk_id=st.integers(0, 0xFFFF_FFFF),
    opk_id=st.none() | st.integers(0, 0xFFFF_FFFF),
    body=st.binary(max_size=200),
)
def test_prekey_message_round_trip_property(
    user_id: str, spk_id: int, opk_id: int | None, body: bytes
) -> None:
    keys = seeded_rng(b"property")
    header = PrekeyMessageHeader(
        user_id,
        "device",
        DHPrivateKey.generate(keys).public_key,
        DHPrivateKey.generate(keys).public_key,
        spk_id,
        opk_id,
    )
    message = PrekeyMessage(header, body)
    assert PrekeyMessage.decode(message.encode()) == message
