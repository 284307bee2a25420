"""medrelay.crypto.keys: the versioned encodings, public-key validation (X25519 low-order points,
Ed25519 points outside the main subgroup or non-canonical), secrets kept out of `repr`, and
signatures and DH exchanges that fail only with medrelay's own errors."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings

from medrelay.crypto.errors import BadSignature, InvalidKey, MalformedEncoding
from medrelay.crypto.keys import (
    ENCODED_KEY_SIZE,
    KEY_SIZE,
    SIGNATURE_SIZE,
    TYPE_ED25519_PRIVATE,
    TYPE_ED25519_PUBLIC,
    TYPE_X25519_PRIVATE,
    TYPE_X25519_PUBLIC,
    DHPrivateKey,
    DHPublicKey,
    SigningKey,
    VerifyKey,
)
from medrelay.crypto.rng import seeded_rng

P = 2**255 - 19
A24 = 121666  # (486662 + 2) / 4, the Montgomery-ladder constant of Curve25519

# Every u-coordinate of order dividing 8 on Curve25519 (group Z/8 x Z/L) and its twist (Z/4 x Z/L'):
# 0 (order 2, on both), 1 (order 4, curve), p-1 (order 4, twist), the two order-8 u's, and the
# non-canonical aliases p = 0 and p+1 = 1 that still fit in 255 bits. Checked below against an
# independent x-only ladder.
LOW_ORDER_U = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
]
LOW_ORDER_ENCODINGS = [
    (u | top).to_bytes(32, "little") for u in LOW_ORDER_U for top in (0, 1 << 255)
]

# Ed25519 encodings that are not usable public keys (libsodium ge25519_has_small_order's list and
# RFC 8032 §5.1.3 decoding rules): the identity, points of order 2, 4 and 8, and the same points
# with the sign bit of x flipped, which for x = 0 is a non-canonical encoding.
SMALL_ORDER_ED25519 = [
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity
    "0100000000000000000000000000000000000000000000000000000000000080",  # identity, -0
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2 (y = -1)
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",  # order 2, -0
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4 (y = 0)
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
]
ORDER_8_POINT = bytes.fromhex(SMALL_ORDER_ED25519[6])

seeds = st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE)


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _has_order_dividing_8(u: int) -> bool:
    """[8]P = O for the point with this u, by three x-only doublings (RFC 7748 §5 formulas)."""
    x, z = u % P, 1
    for _ in range(3):
        sum_sq, diff_sq = (x + z) ** 2 % P, (x - z) ** 2 % P
        x, z = sum_sq * diff_sq % P, (sum_sq - diff_sq) * (diff_sq + A24 * (sum_sq - diff_sq)) % P
    return z == 0


# ---------------------------------------------------------------------------------------------
# Encodings


@settings(max_examples=25, deadline=None)
@given(seed=seeds)
def test_every_key_round_trips_through_its_binary_and_text_encodings(seed: bytes) -> None:
    """decode(encode(k)) == k for all four key types; public keys also through to_text/from_text;
    the type byte names the algorithm and whether the key is private."""
    signing_key = SigningKey(seed)
    dh_key = DHPrivateKey(seed)
    verify_key, dh_public = signing_key.verify_key, dh_key.public_key

    assert SigningKey.decode(signing_key.encode()).seed == seed
    assert DHPrivateKey.decode(dh_key.encode()).raw == seed
    assert VerifyKey.decode(verify_key.encode()) == verify_key
    assert DHPublicKey.decode(dh_public.encode()) == dh_public
    assert VerifyKey.from_text(verify_key.to_text()) == verify_key
    assert DHPublicKey.from_text(dh_public.to_text()) == dh_public

    assert [k.encode()[0] for k in (verify_key, dh_public, signing_key, dh_key)] == [
        TYPE_ED25519_PUBLIC,
        TYPE_X25519_PUBLIC,
        TYPE_ED25519_PRIVATE,
        TYPE_X25519_PRIVATE,
    ]
    assert all(len(k.encode()) == ENCODED_KEY_SIZE for k in (verify_key, dh_public))
    assert verify_key.to_text().startswith("ed25519-v1:")
    assert dh_public.to_text().startswith("x25519-v1:")
    assert "=" not in verify_key.to_text()


def test_text_encoding_is_unpadded_base64url_of_the_raw_key() -> None:
    """The text form is the prefix then unpadded base64url of exactly the 32 raw bytes."""
    key = DHPrivateKey(bytes(range(32))).public_key
    body = key.to_text().removeprefix("x25519-v1:")
    assert base64.urlsafe_b64decode(body + "=") == key.raw
    assert len(body) == 43


DECODERS: list[Any] = [VerifyKey.decode, DHPublicKey.decode, SigningKey.decode, DHPrivateKey.decode]
RIGHT_TYPES = [TYPE_ED25519_PUBLIC, TYPE_X25519_PUBLIC, TYPE_ED25519_PRIVATE, TYPE_X25519_PRIVATE]


@pytest.mark.parametrize(("decode", "right_type"), list(zip(DECODERS, RIGHT_TYPES, strict=True)))
def test_binary_decoding_refuses_every_other_type_byte(decode: Any, right_type: int) -> None:
    """Each of the 255 wrong type bytes is MalformedEncoding (a DH key is never read as a
    signing key, a private key never as a public one)."""
    raw = SigningKey(bytes(32)).verify_key.raw  # valid as all four key types
    assert decode(bytes((right_type,)) + raw) is not None
    for type_byte in range(256):
        if type_byte != right_type:
            with pytest.raises(MalformedEncoding):
                decode(bytes((type_byte,)) + raw)


@pytest.mark.parametrize(("decode", "right_type"), list(zip(DECODERS, RIGHT_TYPES, strict=True)))
@pytest.mark.parametrize("length", [0, 1, 32, 34, 66])
def test_binary_decoding_refuses_wrong_lengths(decode: Any, right_type: int, length: int) -> None:
    """Anything but 33 bytes is MalformedEncoding, whatever the first byte says."""
    data = (bytes((right_type,)) + bytes(range(1, 70)))[:length]
    with pytest.raises(MalformedEncoding):
        decode(data)


TEXT_DECODERS: list[Any] = [VerifyKey.from_text, DHPublicKey.from_text]


@pytest.mark.parametrize("from_text", TEXT_DECODERS)
def test_text_decoding_refuses_anything_but_the_one_canonical_text(from_text: Any) -> None:
    """Wrong or missing prefix, padding, standard-alphabet characters, whitespace, non-zero spare
    bits and wrong lengths are all MalformedEncoding."""
    key: VerifyKey | DHPublicKey
    if from_text == VerifyKey.from_text:
        key, other_prefix = SigningKey(bytes(32)).verify_key, "x25519-v1:"
    else:
        key, other_prefix = DHPrivateKey(bytes(32)).public_key, "ed25519-v1:"
    text = key.to_text()
    prefix, body = text[: text.index(":") + 1], text[text.index(":") + 1 :]
    assert from_text(text) == key
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 43 characters carry 258 bits: the last character's two low bits are spare and must be 0.
    spare_bits_set = alphabet[alphabet.index(body[-1]) | 1]
    short = base64.urlsafe_b64encode(key.raw[:31]).rstrip(b"=").decode()
    long = base64.urlsafe_b64encode(key.raw + b"\x00").rstrip(b"=").decode()
    bad_texts = [
        body,
        other_prefix + body,
        prefix.upper() + body,
        prefix + body + "=",
        prefix + " " + body,
        prefix + body + "\n",
        prefix + body[:-1] + spare_bits_set,
        prefix + body[:10] + "+" + body[11:],
        prefix + body[:10] + "/" + body[11:],
        prefix + body[:-1],
        prefix + short,
        prefix + long,
        prefix,
        prefix + "é" + body[1:],
    ]
    for bad in bad_texts:
        with pytest.raises(MalformedEncoding):
            from_text(bad)


@pytest.mark.parametrize("key_class", [VerifyKey, DHPublicKey, SigningKey, DHPrivateKey])
@pytest.mark.parametrize("raw", [b"", bytes(31), bytes(33), bytes(64)])
def test_constructors_refuse_raw_keys_that_are_not_32_bytes(key_class: Any, raw: bytes) -> None:
    """A raw key of the wrong size is InvalidKey, for every key type."""
    with pytest.raises(InvalidKey):
        key_class(raw)


@pytest.mark.parametrize("key_class", [VerifyKey, DHPublicKey, SigningKey, DHPrivateKey])
def test_constructors_refuse_non_bytes_and_accept_bytes_like(key_class: Any) -> None:
    """A str or int is InvalidKey (not 32 zero bytes); bytearray and memoryview are copied."""
    raw = SigningKey(bytes(32)).verify_key.raw
    for bad in ("a" * 32, 32, None):
        with pytest.raises(InvalidKey):
            key_class(bad)
    assert key_class(bytearray(raw)).encode() == key_class(memoryview(raw)).encode()


# ---------------------------------------------------------------------------------------------
# X25519 public-key validation


def test_the_low_order_list_is_exactly_the_points_of_order_dividing_8() -> None:
    """Each listed u (with the top bit ignored) has [8]P = O by an independent ladder."""
    assert all(_has_order_dividing_8(u) for u in LOW_ORDER_U)


@pytest.mark.parametrize("encoding", LOW_ORDER_ENCODINGS, ids=lambda e: e.hex()[:12] + e.hex()[-4:])
def test_every_low_order_x25519_point_and_its_top_bit_alias_is_refused(encoding: bytes) -> None:
    """DHPublicKey refuses every low-order u, canonical or not, with the ignored top bit clear or
    set, whether given raw, in binary encoding or as text."""
    with pytest.raises(InvalidKey):
        DHPublicKey(encoding)
    with pytest.raises(InvalidKey):
        DHPublicKey.decode(bytes((TYPE_X25519_PUBLIC,)) + encoding)
    text = "x25519-v1:" + base64.urlsafe_b64encode(encoding).rstrip(b"=").decode()
    with pytest.raises(InvalidKey):
        DHPublicKey.from_text(text)


@settings(max_examples=200, deadline=None)
@given(
    raw=st.binary(min_size=32, max_size=32)
    | st.sampled_from(LOW_ORDER_ENCODINGS)
    | st.integers(0, 2**256 - 1).map(lambda n: n.to_bytes(32, "little"))
)
def test_x25519_public_keys_are_refused_exactly_when_their_order_divides_8(raw: bytes) -> None:
    """Across random u (and the low-order ones), refusal agrees with the ladder's verdict, and
    an accepted key gives a non-zero shared secret."""
    low_order = _has_order_dividing_8(int.from_bytes(raw, "little") & ((1 << 255) - 1))
    if low_order:
        with pytest.raises(InvalidKey):
            DHPublicKey(raw)
    else:
        assert DHPrivateKey(bytes(range(32))).exchange(DHPublicKey(raw)) != bytes(32)


def test_non_canonical_x25519_u_of_a_normal_point_is_accepted() -> None:
    """RFC 7748 §5: u >= p and the top bit are reduced/ignored, so u + p and u | 2^255 give the
    same secret as u (the Wycheproof "NonCanonicalPublic" cases accept likewise)."""
    private = DHPrivateKey(bytes(range(32)))
    for u in (2, 9, 18):
        expected = private.exchange(DHPublicKey(u.to_bytes(32, "little")))
        assert private.exchange(DHPublicKey((u + P).to_bytes(32, "little"))) == expected
        assert private.exchange(DHPublicKey((u | 1 << 255).to_bytes(32, "little"))) == expected


def test_exchange_matches_rfc7748_and_is_symmetric(known_answers: dict[str, Any]) -> None:
    """RFC 7748 §6.1 through the key classes: Alice's public key, then both directions agree on
    the published secret."""
    entry = known_answers["rfc7748_6_1_x25519"]
    alice = DHPrivateKey(bytes.fromhex(entry["alice_private"]))
    bob = DHPrivateKey(bytes.fromhex(entry["bob_private"]))
    assert alice.public_key.raw.hex() == entry["alice_public"]
    shared = bytes.fromhex(entry["shared"])
    assert alice.exchange(bob.public_key) == shared == bob.exchange(alice.public_key)


@settings(max_examples=20, deadline=None)
@given(a=seeds, b=seeds)
def test_exchange_agrees_from_both_sides(a: bytes, b: bytes) -> None:
    """X25519 is a DH: both parties reach the same 32-byte secret."""
    alice, bob = DHPrivateKey(a), DHPrivateKey(b)
    assert alice.exchange(bob.public_key) == bob.exchange(alice.public_key)


def test_exchange_refuses_a_peer_that_is_not_an_x25519_public_key() -> None:
    """An Ed25519 key's bytes are not a Montgomery u: passing a VerifyKey is a TypeError."""
    signing_key = SigningKey(bytes(32))
    with pytest.raises(TypeError):
        DHPrivateKey(bytes(32)).exchange(signing_key.verify_key)  # type: ignore[arg-type]


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_the_lazily_derived_x25519_public_key_is_valid_and_matches_libsodium(seed: bytes) -> None:
    """The public key computed on demand equals crypto_scalarmult_base and passes validation."""
    public = DHPrivateKey(seed).public_key
    assert public.raw == bindings.crypto_scalarmult_base(seed)
    assert DHPublicKey(public.raw) == public


# ---------------------------------------------------------------------------------------------
# Ed25519 public-key validation


@pytest.mark.parametrize("encoding", SMALL_ORDER_ED25519)
def test_small_order_ed25519_points_are_refused(encoding: str) -> None:
    """The identity and the points of order 2, 4 and 8 (and their -0 encodings) are InvalidKey."""
    with pytest.raises(InvalidKey):
        VerifyKey(bytes.fromhex(encoding))
    with pytest.raises(InvalidKey):
        VerifyKey.decode(bytes((TYPE_ED25519_PUBLIC,)) + bytes.fromhex(encoding))


def test_a_point_outside_the_main_subgroup_is_refused_twice() -> None:
    """A valid key plus a point of order 8 is on the curve but not in the prime-order subgroup
    (CVE-2025-69277's case): InvalidKey, and still InvalidKey when asked again (the validation
    memo remembers refusals as refusals)."""
    valid = SigningKey(bytes(range(32))).verify_key.raw
    mixed = bindings.crypto_core_ed25519_add(valid, ORDER_8_POINT)
    assert bindings.crypto_core_ed25519_sub(mixed, valid) == ORDER_8_POINT
    for _ in range(2):
        with pytest.raises(InvalidKey):
            VerifyKey(mixed)
    assert VerifyKey(valid) == VerifyKey(valid)


@pytest.mark.parametrize("offset", range(19))
@pytest.mark.parametrize("sign", [0, 0x80])
def test_non_canonical_ed25519_y_coordinates_are_refused(offset: int, sign: int) -> None:
    """y = p + k (k < 19) is a non-canonical encoding whatever point it aliases: InvalidKey."""
    encoding = bytearray((P + offset).to_bytes(32, "little"))
    encoding[31] |= sign
    with pytest.raises(InvalidKey):
        VerifyKey(bytes(encoding))


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(min_size=32, max_size=32))
def test_ed25519_validation_agrees_with_libsodium_on_random_bytes(raw: bytes) -> None:
    """VerifyKey accepts random bytes exactly when libsodium's point check does (so the memo and
    the derived-key shortcut never change the verdict)."""
    if bindings.crypto_core_ed25519_is_valid_point(raw):
        assert VerifyKey(raw).raw == raw
    else:
        with pytest.raises(InvalidKey):
            VerifyKey(raw)


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_a_seed_derived_verify_key_passes_full_validation(seed: bytes) -> None:
    """The verify key a SigningKey derives without re-checking is one VerifyKey accepts."""
    derived = SigningKey(seed).verify_key
    assert VerifyKey(derived.raw) == derived
    assert bindings.crypto_core_ed25519_is_valid_point(derived.raw)


# ---------------------------------------------------------------------------------------------
# Secrets stay out of repr/str


def _renderings(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret),
        secret.hex()[:16],
    ]


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_private_key_repr_and_str_never_contain_the_secret(seed: bytes) -> None:
    """repr/str of private keys show the public key only: no hex, base64 or bytes-literal of the
    seed (nor of a 16-hex-digit piece of it, nor of libsodium's expanded secret key)."""
    signing_key, dh_key = SigningKey(seed), DHPrivateKey(seed)
    expanded = bindings.crypto_sign_seed_keypair(seed)[1]
    for text in (repr(signing_key), str(signing_key), repr(dh_key), str(dh_key)):
        for rendering in _renderings(seed) + _renderings(expanded):
            assert rendering not in text
    assert signing_key.verify_key.to_text() in repr(signing_key)
    assert dh_key.public_key.to_text() in repr(dh_key)


# ---------------------------------------------------------------------------------------------
# Signatures


def test_signatures_verify_and_any_flipped_bit_fails() -> None:
    """A signature verifies; flipping any bit of the message or the signature is BadSignature,
    and flipping any bit of the key is InvalidKey (not a usable point) or BadSignature."""
    signing_key = SigningKey(seeded_rng(b"flip")(32))
    key, message = signing_key.verify_key, b"prescription: 5 mg"
    signature = signing_key.sign(message)
    assert len(signature) == SIGNATURE_SIZE
    key.verify(message, signature)
    for bit in range(len(message) * 8):
        with pytest.raises(BadSignature):
            key.verify(_flip(message, bit), signature)
    for bit in range(SIGNATURE_SIZE * 8):
        with pytest.raises(BadSignature):
            key.verify(message, _flip(signature, bit))
    usable_flipped_keys = 0
    for bit in range(KEY_SIZE * 8):
        try:
            flipped = VerifyKey(_flip(key.raw, bit))
        except InvalidKey:
            continue
        usable_flipped_keys += 1
        with pytest.raises(BadSignature):
            flipped.verify(message, signature)
    assert usable_flipped_keys > 0  # the BadSignature branch really ran


def test_signatures_are_deterministic_and_bound_to_the_key(known_answers: dict[str, Any]) -> None:
    """Ed25519 signs deterministically (RFC 8032 TEST 1), and another key's signature fails."""
    entry = known_answers["rfc8032_7_1_test1_ed25519"]
    signing_key = SigningKey(bytes.fromhex(entry["seed"]))
    assert signing_key.sign(b"") == signing_key.sign(b"") == bytes.fromhex(entry["signature"])
    other = SigningKey(bytes(32))
    with pytest.raises(BadSignature):
        other.verify_key.verify(b"", signing_key.sign(b""))


@settings(max_examples=150, deadline=None)
@given(
    seed=seeds,
    message=st.binary(max_size=100),
    signature=st.binary(max_size=100) | st.binary(min_size=64, max_size=64),
)
def test_verify_raises_only_bad_signature_for_garbage(
    seed: bytes, message: bytes, signature: bytes
) -> None:
    """Random signatures of any length against any message: BadSignature, never a PyNaCl error,
    ValueError or TypeError."""
    key = SigningKey(seed).verify_key
    with pytest.raises(BadSignature):
        key.verify(message, signature)


def test_signing_and_verifying_refuse_non_bytes_messages() -> None:
    """sign(5) would otherwise sign five zero bytes: a TypeError instead."""
    signing_key = SigningKey(bytes(32))
    with pytest.raises(TypeError):
        signing_key.sign(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        signing_key.verify_key.verify(5, bytes(64))  # type: ignore[arg-type]


def test_signatures_accept_bytes_like_messages() -> None:
    """bytearray and memoryview messages sign and verify like the equal bytes (annotated as
    bytes, accepted as any bytes-like object at run time)."""
    signing_key = SigningKey(bytes(32))
    signature = signing_key.sign(bytearray(b"abc"))  # type: ignore[arg-type]
    assert signature == signing_key.sign(b"abc")
    signing_key.verify_key.verify(memoryview(b"abc"), bytearray(signature))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Identity of keys


def test_public_keys_compare_and_hash_by_type_and_bytes() -> None:
    """Equal bytes of the same type are equal and hash alike; an Ed25519 and an X25519 key with
    the same bytes are different keys."""
    raw = SigningKey(bytes(32)).verify_key.raw
    assert VerifyKey(raw) == VerifyKey(bytes(raw))
    assert hash(VerifyKey(raw)) == hash(VerifyKey(bytes(raw)))
    assert VerifyKey(raw) != DHPublicKey(raw)
    assert len({VerifyKey(raw), DHPublicKey(raw), VerifyKey(raw)}) == 2


def test_generate_draws_the_key_from_the_given_rng() -> None:
    """generate(rng) is SigningKey/DHPrivateKey of rng(32): reproducible with a seeded rng."""
    assert SigningKey.generate(seeded_rng(b"k")).seed == seeded_rng(b"k")(32)
    assert DHPrivateKey.generate(seeded_rng(b"k")).raw == seeded_rng(b"k")(32)
