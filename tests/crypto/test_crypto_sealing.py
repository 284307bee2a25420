"""Passphrase sealing of local secrets and the wrapped storage key (medrelay.crypto.sealing)."""

from __future__ import annotations

import struct
import unicodedata
from collections.abc import Callable

import nacl.pwhash.argon2id
import nacl.secret
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.crypto import sealing
from medrelay.crypto.errors import (
    DecryptionFailed,
    InvalidKey,
    MalformedEncoding,
    WrongPassphrase,
)
from medrelay.crypto.kdf import hkdf_sha256, sha256
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.sealing import (
    KeyDerivationHeader,
    PassphraseTooLong,
    SealParams,
    StorageKey,
    UnsafeKdfParameters,
    change_passphrase,
    derive_storage_key,
    new_key_derivation,
    open_sealed,
    seal,
    sealed_params,
    wrap_storage_key,
)

FAST = SealParams.for_tests()
# Still tiny, but a different cost from FAST: stands for "the parameters were raised later".
RAISED = SealParams(opslimit=2, memlimit=16 * 1024)

# Offsets in the envelope layout documented in sealing.py.
OPS = slice(1, 5)
MEM = slice(5, 13)
SALT = slice(13, 29)
CHECK = slice(29, 61)
NONCE = slice(61, 85)
BOX_LEN = slice(85, 89)


def _with_checksum(body: bytes) -> bytes:
    """Re-append a valid checksum, as an attacker (or a buggy tool) editing the file would."""
    return body + sha256(body)[: sealing.CHECKSUM_SIZE]


def _replace(blob: bytes, where: slice, value: bytes) -> bytes:
    body = bytearray(blob[: -sealing.CHECKSUM_SIZE])
    body[where] = value
    return _with_checksum(bytes(body))


# --- parameters -------------------------------------------------------------------------------


def test_default_params_are_libsodium_interactive_level() -> None:
    """The default cost is ops 2 and 64 MiB (libsodium's INTERACTIVE)."""
    assert SealParams() == SealParams(opslimit=2, memlimit=64 * 1024 * 1024)
    assert SealParams().opslimit == nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
    assert SealParams().memlimit == nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE


def test_test_params_are_exactly_libsodiums_minimums() -> None:
    """`for_tests` is as cheap as libsodium allows, never below it."""
    assert FAST.opslimit == nacl.pwhash.argon2id.OPSLIMIT_MIN == 1
    assert FAST.memlimit == nacl.pwhash.argon2id.MEMLIMIT_MIN == 8192


@pytest.mark.parametrize(
    ("opslimit", "memlimit"),
    [
        (0, 8192),  # below libsodium's ops floor
        (1, 4096),  # below libsodium's memory floor
        (17, 8192),  # above our ops ceiling
        (1, 1024**3 + 1024),  # above the 1 GiB ceiling
        (1, 8192 + 1),  # not a whole number of KiB
    ],
)
def test_params_outside_the_allowed_range_are_refused(opslimit: int, memlimit: int) -> None:
    """A SealParams is always something we agree to run."""
    with pytest.raises(ValueError):
        SealParams(opslimit=opslimit, memlimit=memlimit)


def test_params_at_the_ceilings_are_accepted() -> None:
    """The ceilings themselves (ops 16, 1 GiB) are allowed."""
    assert SealParams(opslimit=16, memlimit=1024**3).memlimit == sealing.MAX_MEMLIMIT


# --- single sealed secrets --------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(secret=st.binary(max_size=300), passphrase=st.text(max_size=40))
def test_seal_round_trips(secret: bytes, passphrase: str) -> None:
    """open_sealed(seal(s, p), p) == s for any secret and passphrase (the empty ones included)."""
    blob = seal(secret, passphrase, seeded_rng(secret), FAST)
    assert open_sealed(blob, passphrase) == secret


def test_seal_with_default_params_stores_and_uses_them(rng: Rng) -> None:
    """Without explicit params the default cost is used and recorded in the blob."""
    blob = seal(b"root key", "correct horse", rng)
    assert sealed_params(blob) == SealParams()
    assert open_sealed(blob, "correct horse") == b"root key"


def test_sealed_blob_follows_the_documented_construction(rng: Rng) -> None:
    """Re-deriving Argon2id -> HKDF -> SecretBox by hand from the stored fields opens the blob:
    the layout and the construction in the module docstring are the real ones."""
    blob = seal(b"the secret", b"pass", rng, FAST)
    assert blob[0] == sealing.FORMAT_SEALED_SECRET == 0xA1
    assert struct.unpack(">I", blob[OPS])[0] == FAST.opslimit
    assert struct.unpack(">Q", blob[MEM])[0] == FAST.memlimit
    box_len = struct.unpack(">I", blob[BOX_LEN])[0]
    assert box_len == len(b"the secret") + 16
    assert len(blob) == BOX_LEN.stop + box_len + 16
    assert blob[-16:] == sha256(blob[:-16])[:16]
    master = nacl.pwhash.argon2id.kdf(
        32, b"pass", blob[SALT], opslimit=FAST.opslimit, memlimit=FAST.memlimit
    )
    kek = hkdf_sha256(master, b"", b"medrelay sealing v1 key-encryption key\xa1", 32)
    check = hkdf_sha256(master, b"", b"medrelay sealing v1 key check\xa1", 32)
    assert blob[CHECK] == check
    box = blob[BOX_LEN.stop : BOX_LEN.stop + box_len]
    assert nacl.secret.SecretBox(kek).decrypt(box, blob[NONCE]) == b"the secret"


def test_sealing_is_deterministic_given_the_rng() -> None:
    """Salt and nonce come from the injected rng only: the same seed gives the same blob, another
    seed a different one."""
    one = seal(b"s", "p", seeded_rng(b"a"), FAST)
    assert one == seal(b"s", "p", seeded_rng(b"a"), FAST)
    assert one != seal(b"s", "p", seeded_rng(b"b"), FAST)


def test_wrong_passphrase_is_wrong_passphrase(rng: Rng) -> None:
    """A wrong passphrase is reported as such (key-check mismatch), not as corruption."""
    blob = seal(b"secret", "right", rng, FAST)
    with pytest.raises(WrongPassphrase):
        open_sealed(blob, "wrong")
    with pytest.raises(WrongPassphrase):
        open_sealed(blob, "Right")


def test_str_passphrases_are_nfc_normalised(rng: Rng) -> None:
    """'é' typed as one code point or as e + combining accent opens the same blob; the bytes
    form of the composed UTF-8 does too."""
    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    blob = seal(b"secret", decomposed, rng, FAST)
    assert open_sealed(blob, composed) == b"secret"
    assert open_sealed(blob, composed.encode("utf-8")) == b"secret"


def test_every_single_byte_corruption_is_malformed_not_wrong_passphrase(rng: Rng) -> None:
    """Flipping any bit of a sealed blob is caught by the checksum as corruption, so a damaged
    file is never mistaken for a wrong passphrase."""
    blob = seal(b"secret", "pw", rng, FAST)
    for index in range(len(blob)):
        damaged = bytearray(blob)
        damaged[index] ^= 0x04
        with pytest.raises(MalformedEncoding):
            open_sealed(bytes(damaged), "pw")


def test_tampered_box_behind_a_valid_checksum_fails_to_decrypt(rng: Rng) -> None:
    """With the checksum recomputed, an altered box is DecryptionFailed (the MAC), while the
    passphrase is still recognised as right."""
    blob = seal(b"secret", "pw", rng, FAST)
    body = bytearray(blob[:-16])
    body[-1] ^= 0x01
    with pytest.raises(DecryptionFailed):
        open_sealed(_with_checksum(bytes(body)), "pw")


@pytest.mark.parametrize(
    ("opslimit", "memlimit"),
    [
        (1, 4 * 1024**3),  # 4 GiB
        (1, 2**64 - 1024),
        (2**32 - 1, 8192),
        (0, 8192),
        (1, 0),
        (1, 8192 + 7),
    ],
)
def test_hostile_stored_params_are_refused_before_argon2_runs(
    rng: Rng, monkeypatch: pytest.MonkeyPatch, opslimit: int, memlimit: int
) -> None:
    """A blob whose stored cost is absurd (but whose checksum is valid) is refused with
    UnsafeKdfParameters, and Argon2id is never called."""
    blob = seal(b"secret", "pw", rng, FAST)
    blob = _replace(blob, OPS, struct.pack(">I", opslimit))
    blob = _replace(blob, MEM, struct.pack(">Q", memlimit))

    def forbidden(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("Argon2id must not run on refused parameters")

    monkeypatch.setattr(nacl.pwhash.argon2id, "kdf", forbidden)
    with pytest.raises(UnsafeKdfParameters) as info:
        open_sealed(blob, "pw")
    assert isinstance(info.value, MalformedEncoding)
    with pytest.raises(UnsafeKdfParameters):
        sealed_params(blob)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],  # truncated
        lambda b: b + b"\x00",  # trailing byte
        lambda b: b"",
        lambda b: b[:40],
        lambda b: _replace(b, slice(0, 1), b"\xa2"),  # a header's format byte
        lambda b: _replace(b, slice(0, 1), b"\x01"),
        lambda b: _replace(b, BOX_LEN, struct.pack(">I", 2**32 - 1)),  # oversize length prefix
    ],
)
def test_malformed_sealed_blobs_are_malformed_encoding(
    rng: Rng, mutate: Callable[[bytes], bytes]
) -> None:
    """Truncation, trailing bytes, a foreign format byte and an oversize length are
    MalformedEncoding."""
    blob = mutate(seal(b"secret", "pw", rng, FAST))
    with pytest.raises(MalformedEncoding):
        open_sealed(blob, "pw")


def test_box_shorter_than_its_mac_is_malformed(rng: Rng) -> None:
    """A box too short to hold a MAC is refused while parsing."""
    blob = seal(b"", "pw", rng, FAST)
    body = blob[: BOX_LEN.start] + struct.pack(">I", 15) + blob[BOX_LEN.stop : BOX_LEN.stop + 15]
    with pytest.raises(MalformedEncoding, match="shorter than its MAC"):
        open_sealed(_with_checksum(body), "pw")


def test_blob_sealed_with_old_params_opens_after_params_are_raised(rng: Rng) -> None:
    """The stored cost is what opening uses, so raising the cost for new blobs keeps old ones
    readable, and sealed_params tells when a blob should be resealed."""
    old = seal(b"secret", "pw", rng, FAST)
    new = seal(b"secret", "pw", rng, RAISED)
    assert sealed_params(old) == FAST
    assert sealed_params(new) == RAISED
    assert open_sealed(old, "pw") == open_sealed(new, "pw") == b"secret"


def test_passphrase_length_is_bounded(rng: Rng) -> None:
    """1024 bytes is accepted; 1025 bytes (also as a str) is PassphraseTooLong."""
    assert open_sealed(seal(b"s", b"x" * 1024, rng, FAST), b"x" * 1024) == b"s"
    with pytest.raises(PassphraseTooLong):
        seal(b"s", b"x" * 1025, rng, FAST)
    with pytest.raises(PassphraseTooLong):
        seal(b"s", "é" * 513, rng, FAST)  # 1026 bytes of UTF-8
    blob = seal(b"s", "pw", rng, FAST)
    with pytest.raises(PassphraseTooLong):
        open_sealed(blob, "x" * 1025)


def test_secret_size_is_bounded(rng: Rng) -> None:
    """A single sealed secret is at most 1 MiB."""
    with pytest.raises(ValueError):
        seal(bytes(sealing.MAX_SEALED_SECRET_BYTES + 1), "pw", rng, FAST)


# --- storage key and rows ---------------------------------------------------------------------


def test_storage_key_repr_never_shows_the_key(rng: Rng) -> None:
    """Neither repr nor str of a StorageKey or a header contains key, salt or check bytes."""
    header, key = new_key_derivation("pw", rng, FAST)
    for text in (repr(key), str(key), repr(header), str(header)):
        for secret in (key.raw, header.salt, header.key_check, header.wrapped_key):
            assert secret.hex() not in text
            assert repr(secret) not in text
    assert repr(key) == "StorageKey(<secret>)"


def test_storage_key_must_be_32_bytes() -> None:
    """A storage key of another size is InvalidKey."""
    with pytest.raises(InvalidKey):
        StorageKey(bytes(31))
    with pytest.raises(InvalidKey):
        StorageKey(bytes(33))


def test_derive_storage_key_recovers_the_generated_key(rng: Rng) -> None:
    """The same passphrase and header give back the storage key, also after the header went
    through encode/decode."""
    header, key = new_key_derivation("pw", rng, FAST)
    decoded = KeyDerivationHeader.decode(header.encode())
    assert decoded == header
    assert derive_storage_key("pw", decoded).raw == key.raw
    assert header.params == FAST


def test_header_wrong_passphrase_is_wrong_passphrase(rng: Rng) -> None:
    """Unlocking with a wrong passphrase is WrongPassphrase."""
    header, _ = new_key_derivation("pw", rng, FAST)
    with pytest.raises(WrongPassphrase):
        derive_storage_key("not pw", header)


def test_every_single_byte_corruption_of_a_header_is_malformed(rng: Rng) -> None:
    """A damaged stored header is MalformedEncoding, never WrongPassphrase."""
    encoded = new_key_derivation("pw", rng, FAST)[0].encode()
    for index in range(len(encoded)):
        damaged = bytearray(encoded)
        damaged[index] ^= 0x80
        with pytest.raises(MalformedEncoding):
            KeyDerivationHeader.decode(bytes(damaged))


def test_header_with_tampered_wrapped_key_fails_to_decrypt(rng: Rng) -> None:
    """An altered wrapped key behind a valid checksum is DecryptionFailed."""
    encoded = new_key_derivation("pw", rng, FAST)[0].encode()
    body = bytearray(encoded[:-16])
    body[-3] ^= 0x01
    header = KeyDerivationHeader.decode(_with_checksum(bytes(body)))
    with pytest.raises(DecryptionFailed):
        derive_storage_key("pw", header)


def test_header_with_hostile_params_is_refused(rng: Rng) -> None:
    """A header claiming 2 GiB of memory does not decode."""
    encoded = new_key_derivation("pw", rng, FAST)[0].encode()
    with pytest.raises(UnsafeKdfParameters):
        KeyDerivationHeader.decode(_replace(encoded, MEM, struct.pack(">Q", 2 * 1024**3)))


def test_header_and_sealed_secret_are_not_interchangeable(rng: Rng) -> None:
    """A header is not a sealed secret and vice versa (distinct format bytes), even though they
    share a layout."""
    header, _ = new_key_derivation("pw", rng, FAST)
    with pytest.raises(MalformedEncoding):
        open_sealed(header.encode(), "pw")
    with pytest.raises(MalformedEncoding):
        KeyDerivationHeader.decode(seal(bytes(32), "pw", rng, FAST))


def test_header_wrapped_key_length_is_fixed(rng: Rng) -> None:
    """A header whose wrapped key is not exactly 48 bytes does not decode."""
    encoded = new_key_derivation("pw", rng, FAST)[0].encode()
    body = encoded[: BOX_LEN.start] + struct.pack(">I", 47) + encoded[BOX_LEN.stop : -17]
    with pytest.raises(MalformedEncoding):
        KeyDerivationHeader.decode(_with_checksum(body))


def test_rows_round_trip_and_bind_their_associated_data(rng: Rng) -> None:
    """A row opens with its own associated data and fails with any other, or with none."""
    key = StorageKey.generate(rng)
    row = key.seal(b"session state", rng, b"sessions/42")
    assert row[0] == sealing.FORMAT_STORAGE_ROW
    assert key.open(row, b"sessions/42") == b"session state"
    for other in (b"sessions/43", b"prekeys/42", b""):
        with pytest.raises(DecryptionFailed):
            key.open(row, other)


def test_rows_without_associated_data_round_trip(rng: Rng) -> None:
    """The associated data defaults to empty on both sides."""
    key = StorageKey.generate(rng)
    assert key.open(key.seal(b"x", rng)) == b"x"


def test_rows_use_fresh_nonces(rng: Rng) -> None:
    """Sealing the same plaintext twice gives different rows."""
    key = StorageKey.generate(rng)
    assert key.seal(b"same", rng) != key.seal(b"same", rng)


def test_row_under_another_key_or_altered_fails(rng: Rng) -> None:
    """Another storage key, a flipped bit, or a truncated tag is DecryptionFailed; a row too
    short to hold its nonce or with a foreign format byte is MalformedEncoding."""
    key = StorageKey.generate(rng)
    row = key.seal(b"payload", rng, b"ad")
    with pytest.raises(DecryptionFailed):
        StorageKey.generate(rng).open(row, b"ad")
    for index in range(len(row)):
        damaged = bytearray(row)
        damaged[index] ^= 0x01
        with pytest.raises((DecryptionFailed, MalformedEncoding)):
            key.open(bytes(damaged), b"ad")
    with pytest.raises(DecryptionFailed):
        key.open(row[:-1], b"ad")
    with pytest.raises(DecryptionFailed):
        key.open(row[:25], b"ad")
    with pytest.raises(MalformedEncoding):
        key.open(row[:20], b"ad")
    with pytest.raises(MalformedEncoding):
        key.open(b"\xa1" + row[1:], b"ad")


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=2000), ad=st.binary(max_size=64))
def test_rows_round_trip_property(plaintext: bytes, ad: bytes) -> None:
    """open(seal(p, ad), ad) == p for any plaintext and associated data."""
    rng = seeded_rng(plaintext + ad)
    key = StorageKey.generate(rng)
    assert key.open(key.seal(plaintext, rng, ad), ad) == plaintext


def test_change_passphrase_rewraps_the_same_key_and_rows_stay_readable(rng: Rng) -> None:
    """After a passphrase change the rows sealed before open under the key unlocked by the new
    passphrase; the old passphrase no longer opens the new header."""
    header, key = new_key_derivation("old", rng, FAST)
    rows = [key.seal(f"row {i}".encode(), rng, f"t/{i}".encode()) for i in range(5)]
    new_header = change_passphrase(header, "old", "new", rng)
    assert new_header.params == FAST  # kept by default
    assert new_header.salt != header.salt
    unlocked = derive_storage_key("new", new_header)
    assert unlocked.raw == key.raw
    assert [unlocked.open(row, f"t/{i}".encode()) for i, row in enumerate(rows)] == [
        f"row {i}".encode() for i in range(5)
    ]
    with pytest.raises(WrongPassphrase):
        derive_storage_key("old", new_header)


def test_change_passphrase_refuses_a_wrong_old_passphrase(rng: Rng) -> None:
    """Changing the passphrase requires the current one."""
    header, _ = new_key_derivation("old", rng, FAST)
    with pytest.raises(WrongPassphrase):
        change_passphrase(header, "guess", "new", rng)


def test_raising_params_rewraps_the_same_key(rng: Rng) -> None:
    """Re-wrapping under raised parameters (same passphrase) records them and keeps the key; the
    old header, with the old cost, still opens too."""
    header, key = new_key_derivation("pw", rng, FAST)
    row = key.seal(b"row", rng, b"ad")
    raised = change_passphrase(header, "pw", "pw", rng, RAISED)
    assert raised.params == RAISED
    assert KeyDerivationHeader.decode(raised.encode()).params == RAISED
    assert derive_storage_key("pw", raised).open(row, b"ad") == b"row"
    assert derive_storage_key("pw", header).raw == key.raw


def test_wrap_storage_key_accepts_a_keystore_key(rng: Rng) -> None:
    """A storage key that came from elsewhere (the OS keystore) can be wrapped for a backup."""
    key = StorageKey(bytes(range(32)))
    header = wrap_storage_key(key, "pw", rng, FAST)
    assert derive_storage_key("pw", header).raw == bytes(range(32))


def test_non_text_passphrase_is_a_type_error(rng: Rng) -> None:
    """An int is not silently turned into zero bytes."""
    with pytest.raises(TypeError):
        seal(b"s", 8, rng, FAST)  # type: ignore[arg-type]
