"""medrelay.crypto.aead, kdf and rng: XChaCha20-Poly1305 refuses every tampering with
DecryptionFailed, padding round-trips and refuses malformed padding, HKDF honours RFC 5869's
length limit and prefix property, constant_time_equal is plain equality, and seeded_rng is a
deterministic, seed-separated stream."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings

from medrelay.crypto import aead, kdf
from medrelay.crypto.errors import CryptoError, DecryptionFailed
from medrelay.crypto.rng import seeded_rng, system_rng

KEY = bytes(range(32))
NONCE = bytes(range(100, 124))
keys = st.binary(min_size=aead.KEY_SIZE, max_size=aead.KEY_SIZE)
nonces = st.binary(min_size=aead.NONCE_SIZE, max_size=aead.NONCE_SIZE)


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


# ---------------------------------------------------------------------------------------------
# AEAD


@settings(max_examples=100, deadline=None)
@given(key=keys, nonce=nonces, plaintext=st.binary(max_size=300), ad=st.binary(max_size=100))
def test_aead_round_trips_with_a_16_byte_tag(
    key: bytes, nonce: bytes, plaintext: bytes, ad: bytes
) -> None:
    """decrypt(encrypt(m)) == m, and the ciphertext is exactly 16 bytes longer."""
    ciphertext = aead.encrypt(key, nonce, plaintext, ad)
    assert len(ciphertext) == len(plaintext) + aead.TAG_SIZE
    assert aead.decrypt(key, nonce, ciphertext, ad) == plaintext


def test_any_bit_flip_in_ciphertext_ad_nonce_or_key_fails() -> None:
    """Every single-bit change of ciphertext (body and tag), associated data, nonce or key is
    DecryptionFailed."""
    plaintext, ad = b"take 2 tablets", b"header+ad"
    ciphertext = aead.encrypt(KEY, NONCE, plaintext, ad)
    for bit in range(len(ciphertext) * 8):
        with pytest.raises(DecryptionFailed):
            aead.decrypt(KEY, NONCE, _flip(ciphertext, bit), ad)
    for bit in range(len(ad) * 8):
        with pytest.raises(DecryptionFailed):
            aead.decrypt(KEY, NONCE, ciphertext, _flip(ad, bit))
    for bit in range(aead.NONCE_SIZE * 8):
        with pytest.raises(DecryptionFailed):
            aead.decrypt(KEY, _flip(NONCE, bit), ciphertext, ad)
    for bit in range(aead.KEY_SIZE * 8):
        with pytest.raises(DecryptionFailed):
            aead.decrypt(_flip(KEY, bit), NONCE, ciphertext, ad)
    assert aead.decrypt(KEY, NONCE, ciphertext, ad) == plaintext


def test_short_truncated_or_extended_ciphertexts_fail() -> None:
    """Anything shorter than the tag, any truncation and any appended byte is DecryptionFailed;
    so is moving the associated data into the plaintext's place."""
    ciphertext = aead.encrypt(KEY, NONCE, b"abc", b"ad")
    for length in range(len(ciphertext)):
        with pytest.raises(DecryptionFailed):
            aead.decrypt(KEY, NONCE, ciphertext[:length], b"ad")
    with pytest.raises(DecryptionFailed):
        aead.decrypt(KEY, NONCE, ciphertext + b"\x00", b"ad")
    with pytest.raises(DecryptionFailed):
        aead.decrypt(KEY, NONCE, ciphertext, b"")


@pytest.mark.parametrize(
    ("key_size", "nonce_size"), [(31, 24), (33, 24), (0, 24), (32, 12), (32, 0)]
)
def test_wrong_key_or_nonce_sizes_are_aead_parameter_errors(key_size: int, nonce_size: int) -> None:
    """A wrong-size key or nonce is AeadParameterError in both directions: a CryptoError for the
    package boundary and still the ValueError it always was."""
    key, nonce = bytes(key_size), bytes(nonce_size)
    for call in (aead.encrypt, aead.decrypt):
        with pytest.raises(aead.AeadParameterError) as raised:
            call(key, nonce, bytes(16), b"")
        assert isinstance(raised.value, CryptoError)
        assert isinstance(raised.value, ValueError)
        assert raised.value.code == "aead_parameter_invalid"


def test_aead_accepts_bytes_like_and_refuses_other_types() -> None:
    """bytearray/memoryview inputs behave like bytes; a str is a TypeError, never PyNaCl's."""
    ciphertext = aead.encrypt(
        bytearray(KEY),  # type: ignore[arg-type]
        memoryview(NONCE),  # type: ignore[arg-type]
        bytearray(b"m"),  # type: ignore[arg-type]
        memoryview(b"ad"),  # type: ignore[arg-type]
    )
    assert ciphertext == aead.encrypt(KEY, NONCE, b"m", b"ad")
    assert aead.decrypt(KEY, NONCE, bytearray(ciphertext), b"ad") == b"m"  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        aead.encrypt(KEY, NONCE, "m", b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        aead.decrypt(KEY, NONCE, "0123456789abcdef", b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        aead.encrypt(KEY, NONCE, b"m", None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Padding


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), block_size=st.integers(1, 300))
def test_pad_is_sodium_pad_and_unpad_inverts_it(data: bytes, block_size: int) -> None:
    """pad gives libsodium's bytes exactly (a whole number of blocks, at least one byte added)
    and unpad recovers the data."""
    padded = aead.pad(data, block_size)
    assert padded == bindings.sodium_pad(data, block_size)
    assert len(padded) % block_size == 0
    assert len(data) < len(padded) <= len(data) + block_size
    assert aead.unpad(padded, block_size) == data


@pytest.mark.parametrize(
    "padded",
    [
        b"",  # nothing at all
        bytes(16),  # no 0x80 marker
        b"data" + bytes(12),  # no marker
        b"data\x80" + bytes(10) + b"\x01",  # marker followed by non-zero
        b"x" * 16,  # no marker at all, no zeros
        b"\x80" + bytes(15) + bytes(16),  # marker more than a block from the end
        b"data\x80" + bytes(6),  # not a whole number of blocks
    ],
)
def test_malformed_padding_is_decryption_failed(padded: bytes) -> None:
    """A missing marker, non-zero bytes after it, padding longer than a block or a length that is
    not a whole number of blocks is DecryptionFailed."""
    with pytest.raises(DecryptionFailed):
        aead.unpad(padded, 16)


@pytest.mark.parametrize("block_size", [0, -1, -256])
def test_non_positive_block_sizes_are_value_errors(block_size: int) -> None:
    """A block size below 1 is a programming error (ValueError), not a padding failure."""
    with pytest.raises(ValueError):
        aead.pad(b"x", block_size)
    with pytest.raises(ValueError):
        aead.unpad(b"x\x80", block_size)


# ---------------------------------------------------------------------------------------------
# HKDF and HMAC


def _rfc5869_reference(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 §2 written as literally as possible, as an oracle for kdf.hkdf_sha256's paths."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, 256):
        if len(okm) >= length:
            break
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


@settings(max_examples=100, deadline=None)
@given(
    ikm=st.binary(max_size=64),
    salt=st.binary(max_size=64),
    info=st.binary(max_size=64),
    length=st.integers(0, 400) | st.sampled_from([31, 32, 33, 64, 65, 96, 97, 8160]),
)
def test_hkdf_matches_the_rfc_5869_definition(
    ikm: bytes, salt: bytes, info: bytes, length: int
) -> None:
    """Both the one-shot (<= 2 blocks) and the copied-state (longer) paths give RFC 5869's
    output, for every length up to the maximum."""
    assert kdf.hkdf_sha256(ikm, salt, info, length) == _rfc5869_reference(ikm, salt, info, length)


def test_hkdf_length_limits() -> None:
    """0 and 255*32 = 8160 bytes are allowed; 8161 and negative lengths are ValueError."""
    assert kdf.hkdf_sha256(b"ikm", b"", b"", 0) == b""
    assert len(kdf.hkdf_sha256(b"ikm", b"", b"", kdf.MAX_HKDF_LENGTH)) == 8160
    for bad in (kdf.MAX_HKDF_LENGTH + 1, -1, 10**9):
        with pytest.raises(ValueError):
            kdf.hkdf_sha256(b"ikm", b"", b"", bad)
        with pytest.raises(ValueError):
            kdf.hkdf_expand(bytes(32), b"", bad)


def test_hkdf_shorter_outputs_are_prefixes_and_empty_salt_is_zero_salt() -> None:
    """HKDF output for L is the prefix of the output for any longer L, and an empty salt means
    32 zero bytes (RFC 5869 §2.2)."""
    longest = kdf.hkdf_sha256(b"ikm", b"salt", b"info", 200)
    for length in (1, 31, 32, 33, 56, 64, 65, 199):
        assert kdf.hkdf_sha256(b"ikm", b"salt", b"info", length) == longest[:length]
    assert kdf.hkdf_extract(b"", b"ikm") == kdf.hkdf_extract(bytes(32), b"ikm")


def test_hashes_and_hmac_are_the_standard_ones() -> None:
    """sha256/sha512/hmac_sha256 are the standard functions (FIPS 180-4 "abc", RFC 4231 case 2)."""
    assert kdf.sha256(b"abc").hex().startswith("ba7816bf8f01cfea")
    assert kdf.sha512(b"abc").hex().startswith("ddaf35a193617aba")
    assert kdf.hmac_sha256(b"Jefe", b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


# ---------------------------------------------------------------------------------------------
# constant_time_equal


@settings(max_examples=100, deadline=None)
@given(a=st.binary(max_size=40), b=st.binary(max_size=40))
def test_constant_time_equal_is_byte_equality(a: bytes, b: bytes) -> None:
    """The answer is exactly a == b, for equal and unequal lengths."""
    assert kdf.constant_time_equal(a, b) is (a == b)
    assert kdf.constant_time_equal(a, a) is True


def test_constant_time_equal_sees_a_difference_in_any_position() -> None:
    """A single flipped bit anywhere makes two MACs unequal; so does a missing last byte."""
    tag = kdf.hmac_sha256(b"key", b"message")
    for bit in range(len(tag) * 8):
        assert not kdf.constant_time_equal(tag, _flip(tag, bit))
    assert not kdf.constant_time_equal(tag, tag[:-1])
    assert kdf.constant_time_equal(b"", b"")


# ---------------------------------------------------------------------------------------------
# Rng


def test_seeded_rng_is_the_documented_shake256_stream() -> None:
    """The stream is SHAKE-256(seed ‖ u64be(i))[:64] blocks; the conftest seed's first bytes are
    pinned because other tests' vectors are derived from them."""
    stream = seeded_rng(b"medrelay tests")(130)
    expected = b"".join(
        hashlib.shake_256(b"medrelay tests" + i.to_bytes(8, "big")).digest(64) for i in range(3)
    )
    assert stream == expected[:130]
    assert stream[:16].hex() == "7c31b856da684d5c90099d770151997c"


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(max_size=20), sizes=st.lists(st.integers(0, 150), max_size=8))
def test_seeded_rng_output_does_not_depend_on_how_requests_are_split(
    seed: bytes, sizes: list[int]
) -> None:
    """Two rngs with the same seed give the same bytes, however the draws are sliced."""
    split = seeded_rng(seed)
    pieces = b"".join(split(size) for size in sizes)
    assert [len(split(0))] == [0]
    assert seeded_rng(seed)(len(pieces)) == pieces


def test_seeded_rngs_with_different_seeds_are_independent() -> None:
    """Distinct seeds (including prefixes of each other) give unrelated streams."""
    streams = {seed: seeded_rng(seed)(64) for seed in (b"", b"a", b"ab", b"b", b"a\x00")}
    assert len(set(streams.values())) == len(streams)


def test_seeded_rng_is_linear_in_the_request_size() -> None:
    """Drawing 4 MiB at once takes well under three seconds (it used to be quadratic:
    minutes)."""
    started = time.perf_counter()
    assert len(seeded_rng(b"big")(4 * 1024 * 1024)) == 4 * 1024 * 1024
    assert time.perf_counter() - started < 3.0


def test_rngs_refuse_negative_counts() -> None:
    """rng(-1) is a ValueError (it used to return a short slice) in both rngs; system_rng is not
    drawn from."""
    with pytest.raises(ValueError):
        seeded_rng(b"x")(-1)
    with pytest.raises(ValueError):
        system_rng(-1)
