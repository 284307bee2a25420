"""Local secrets sealed by a passphrase: the client's key store (notes/crypto.md §9.9, §2).

Two levels, because a client derives a key once per unlock and then seals many rows:

* `seal` / `open_sealed`: one secret (a root key file, a backup) sealed on its own.
* `new_key_derivation` / `derive_storage_key` give a `StorageKey` that seals and opens many rows
  (`StorageKey.seal` / `StorageKey.open`, XChaCha20-Poly1305 with the row's table and id as
  associated data, so a row cannot be moved to another place and still open).

Construction, for both levels:

    master    = Argon2id(passphrase, salt, opslimit, memlimit)     (libsodium crypto_pwhash, 32 B)
    kek       = HKDF-SHA256(master, salt="", info=INFO_KEK   || format byte)
    key_check = HKDF-SHA256(master, salt="", info=INFO_CHECK || format byte)
    box       = SecretBox(kek).encrypt(secret, nonce)      (XSalsa20-Poly1305, nonce from the rng)

The passphrase (a `str` is NFC-normalised, then UTF-8) is at most `MAX_PASSPHRASE_BYTES`.

Decisions:

* **The storage key is random and wrapped.** `new_key_derivation` draws a random 32-byte storage
  key and stores it sealed (as `secret` above) in the `KeyDerivationHeader`. Rows are encrypted
  under that random key, never under a passphrase-derived one, so changing the passphrase or raising
  the Argon2 parameters re-wraps 32 bytes (`change_passphrase`, `wrap_storage_key`) instead of
  re-encrypting every row; and a device whose storage key lives in the OS keystore uses the same
  row format (`StorageKey(raw)`).
* **Parameters and salt travel with the blob**, so they can be raised later without breaking old
  blobs: opening uses the stored ones. They are checked against `MAX_OPSLIMIT` / `MAX_MEMLIMIT`
  before Argon2 runs, so a corrupted or hostile file cannot make us allocate gigabytes
  (`UnsafeKdfParameters`).
* **Wrong passphrase vs corrupted file.** The stored `key_check` (compared in constant time) says
  whether the passphrase is right before the box is tried, so a wrong passphrase is
  `WrongPassphrase` and a box that then fails to open is `DecryptionFailed` (tampering). An unkeyed
  SHA-256 checksum over the whole blob catches accidental corruption (disk, copy) as
  `MalformedEncoding` before Argon2 runs, so a damaged file is never reported as a wrong
  passphrase. The checksum is not a security measure: an attacker can recompute it, which is why
  the MAC and the parameter ceilings are checked too. The key-check value lets an attacker test
  guesses offline, but no faster than the box's MAC already does (each guess costs one Argon2id).

Encodings (big-endian, `medrelay.crypto.encoding`); the first byte names both the format and its
version, so one kind of blob can never be opened as another:

    sealed secret (0xA1) and key-derivation header (0xA2):
        u8 format | u32 opslimit | u64 memlimit (bytes) | salt[16] | key_check[32] | nonce[24]
        | u32 len + box (16-byte MAC + secret; exactly 48 bytes in a header)
        | checksum[16] = SHA-256(all preceding bytes)[:16]
    storage row (0xA3):
        u8 format | nonce[24] | XChaCha20-Poly1305(storage key, nonce, plaintext,
                                                    ad = format byte || associated_data)
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Final

import nacl.pwhash.argon2id
import nacl.secret
from nacl.exceptions import CryptoError as NaclCryptoError

from medrelay.crypto import aead
from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import (
    CryptoError,
    DecryptionFailed,
    InvalidKey,
    MalformedEncoding,
    WrongPassphrase,
)
from medrelay.crypto.kdf import constant_time_equal, hkdf_sha256, sha256
from medrelay.crypto.rng import Rng

FORMAT_SEALED_SECRET: Final = 0xA1
FORMAT_KEY_HEADER: Final = 0xA2
FORMAT_STORAGE_ROW: Final = 0xA3

STORAGE_KEY_SIZE: Final = 32
SALT_SIZE: Final = nacl.pwhash.argon2id.SALTBYTES  # 16
KEY_CHECK_SIZE: Final = 32
SECRETBOX_NONCE_SIZE: Final = nacl.secret.SecretBox.NONCE_SIZE  # 24
SECRETBOX_MAC_SIZE: Final = nacl.secret.SecretBox.MACBYTES  # 16
CHECKSUM_SIZE: Final = 16
WRAPPED_KEY_SIZE: Final = STORAGE_KEY_SIZE + SECRETBOX_MAC_SIZE

MAX_PASSPHRASE_BYTES: Final = 1024
MAX_SEALED_SECRET_BYTES: Final = 1024 * 1024

# libsodium's floors for Argon2id; below them crypto_pwhash refuses to run.
MIN_OPSLIMIT: Final = nacl.pwhash.argon2id.OPSLIMIT_MIN  # 1
MIN_MEMLIMIT: Final = nacl.pwhash.argon2id.MEMLIMIT_MIN  # 8 KiB
# Our ceilings: libsodium's SENSITIVE memory level (1 GiB) and four times its SENSITIVE ops level.
# Opening a blob above them is refused before any memory is allocated.
MAX_OPSLIMIT: Final = 16
MAX_MEMLIMIT: Final = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE  # 1 GiB

_INFO_KEK: Final = b"medrelay sealing v1 key-encryption key"
_INFO_CHECK: Final = b"medrelay sealing v1 key check"
_MASTER_SIZE: Final = 32


class UnsafeKdfParameters(MalformedEncoding):
    """A sealed blob whose stored Argon2id parameters are outside what we agree to run
    (above the memory or ops ceiling, below libsodium's floor, or not a whole number of KiB)."""

    code = "unsafe_kdf_parameters"


class PassphraseTooLong(CryptoError):
    """A passphrase longer than `MAX_PASSPHRASE_BYTES` once encoded."""

    code = "passphrase_too_long"


@dataclass(frozen=True, slots=True)
class SealParams:
    """Argon2id cost parameters (libsodium's `opslimit` and `memlimit` in bytes).

    The default is libsodium's INTERACTIVE level (ops 2, 64 MiB, about 0.1 s here): above OWASP's
    Argon2id minimum (t=2, 19 MiB) and cheap enough to unlock a key store on a modest laptop.
    Stored with every blob, so a later release may raise it and re-wrap on the next unlock.
    """

    opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
    memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE

    def __post_init__(self) -> None:
        if not MIN_OPSLIMIT <= self.opslimit <= MAX_OPSLIMIT:
            raise ValueError(f"Argon2id opslimit must be within [{MIN_OPSLIMIT}, {MAX_OPSLIMIT}]")
        if not MIN_MEMLIMIT <= self.memlimit <= MAX_MEMLIMIT:
            raise ValueError(
                f"Argon2id memlimit must be within [{MIN_MEMLIMIT}, {MAX_MEMLIMIT}] bytes"
            )
        if self.memlimit % 1024:
            # libsodium truncates to whole KiB; insisting keeps one encoding per cost.
            raise ValueError("Argon2id memlimit must be a whole number of KiB")

    @classmethod
    def for_tests(cls) -> SealParams:
        """libsodium's minimum costs (ops 1, 8 KiB): fast, and never for real secrets."""
        return cls(opslimit=MIN_OPSLIMIT, memlimit=MIN_MEMLIMIT)


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        # The same passphrase typed on systems that compose characters differently must match.
        encoded = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    elif isinstance(passphrase, bytes | bytearray | memoryview):
        encoded = bytes(passphrase)
    else:
        # bytes(n) of an int would silently be n zero bytes.
        raise TypeError("a passphrase must be str or bytes")
    if len(encoded) > MAX_PASSPHRASE_BYTES:
        raise PassphraseTooLong(f"passphrase longer than {MAX_PASSPHRASE_BYTES} bytes")
    return encoded


@dataclass(frozen=True, slots=True)
class _PassphraseKeys:
    kek: bytes
    key_check: bytes


def _derive(
    passphrase: bytes, salt: bytes, params: SealParams, format_byte: int
) -> _PassphraseKeys:
    try:
        master = nacl.pwhash.argon2id.kdf(
            _MASTER_SIZE,
            passphrase,
            salt,
            opslimit=params.opslimit,
            memlimit=params.memlimit,
        )
    except NaclCryptoError:
        # In practice only an allocation failure inside libsodium.
        raise CryptoError("Argon2id key derivation failed") from None
    domain = bytes((format_byte,))
    return _PassphraseKeys(
        kek=hkdf_sha256(master, b"", _INFO_KEK + domain, 32),
        key_check=hkdf_sha256(master, b"", _INFO_CHECK + domain, KEY_CHECK_SIZE),
    )


@dataclass(frozen=True, slots=True)
class _Envelope:
    """The shared layout of a sealed secret and a key-derivation header."""

    params: SealParams
    salt: bytes
    key_check: bytes
    nonce: bytes
    box: bytes

    def encode(self, format_byte: int, max_box: int) -> bytes:
        body = (
            Writer()
            .u8(format_byte)
            .u32(self.params.opslimit)
            .u64(self.params.memlimit)
            .fixed(self.salt, SALT_SIZE)
            .fixed(self.key_check, KEY_CHECK_SIZE)
            .fixed(self.nonce, SECRETBOX_NONCE_SIZE)
            .blob(self.box, max_box)
            .to_bytes()
        )
        return body + sha256(body)[:CHECKSUM_SIZE]

    @classmethod
    def decode(cls, data: bytes, format_byte: int, max_box: int, what: str) -> _Envelope:
        reader = Reader(data, what)
        reader.version(format_byte)
        opslimit = reader.u32()
        memlimit = reader.u64()
        salt = reader.fixed(SALT_SIZE)
        key_check = reader.fixed(KEY_CHECK_SIZE)
        nonce = reader.fixed(SECRETBOX_NONCE_SIZE)
        box = reader.blob(max_box)
        checksum = reader.fixed(CHECKSUM_SIZE)
        reader.finish()
        if not constant_time_equal(sha256(data[:-CHECKSUM_SIZE])[:CHECKSUM_SIZE], checksum):
            raise MalformedEncoding(f"{what}: checksum mismatch (the data is corrupted)")
        if len(box) < SECRETBOX_MAC_SIZE:
            raise MalformedEncoding(f"{what}: sealed box shorter than its MAC")
        try:
            params = SealParams(opslimit=opslimit, memlimit=memlimit)
        except ValueError as exc:
            raise UnsafeKdfParameters(f"{what}: refusing stored parameters: {exc}") from None
        return cls(params, salt, key_check, nonce, box)


def _seal_envelope(
    secret: bytes, passphrase: str | bytes, rng: Rng, params: SealParams, format_byte: int
) -> _Envelope:
    encoded = _passphrase_bytes(passphrase)
    salt = rng(SALT_SIZE)
    nonce = rng(SECRETBOX_NONCE_SIZE)
    keys = _derive(encoded, salt, params, format_byte)
    box = nacl.secret.SecretBox(keys.kek).encrypt(bytes(secret), nonce).ciphertext
    return _Envelope(params, salt, keys.key_check, nonce, box)


def _open_envelope(
    envelope: _Envelope, passphrase: str | bytes, format_byte: int, what: str
) -> bytes:
    encoded = _passphrase_bytes(passphrase)
    keys = _derive(encoded, envelope.salt, envelope.params, format_byte)
    if not constant_time_equal(keys.key_check, envelope.key_check):
        raise WrongPassphrase(f"{what}: wrong passphrase")
    try:
        return nacl.secret.SecretBox(keys.kek).decrypt(envelope.box, envelope.nonce)
    except NaclCryptoError:
        # The passphrase is right, so the box itself was altered.
        raise DecryptionFailed(f"{what}: sealed box does not authenticate") from None


# --- single secrets ---------------------------------------------------------------------------


def seal(
    secret: bytes, passphrase: str | bytes, rng: Rng, params: SealParams | None = None
) -> bytes:
    """`secret` (at most `MAX_SEALED_SECRET_BYTES`) sealed under `passphrase`."""
    if len(secret) > MAX_SEALED_SECRET_BYTES:
        raise ValueError(f"a sealed secret is limited to {MAX_SEALED_SECRET_BYTES} bytes")
    envelope = _seal_envelope(secret, passphrase, rng, params or SealParams(), FORMAT_SEALED_SECRET)
    return envelope.encode(FORMAT_SEALED_SECRET, MAX_SEALED_SECRET_BYTES + SECRETBOX_MAC_SIZE)


def open_sealed(blob: bytes, passphrase: str | bytes) -> bytes:
    """The secret sealed in `blob`.

    Raises `MalformedEncoding` for a damaged blob, `UnsafeKdfParameters` for parameters we refuse
    to run, `WrongPassphrase`, or `DecryptionFailed` for a box altered behind a valid checksum.
    """
    envelope = _decode_sealed(blob)
    return _open_envelope(envelope, passphrase, FORMAT_SEALED_SECRET, "sealed secret")


def sealed_params(blob: bytes) -> SealParams:
    """The parameters `blob` was sealed with (no passphrase needed), to decide on resealing."""
    return _decode_sealed(blob).params


def _decode_sealed(blob: bytes) -> _Envelope:
    return _Envelope.decode(
        blob, FORMAT_SEALED_SECRET, MAX_SEALED_SECRET_BYTES + SECRETBOX_MAC_SIZE, "sealed secret"
    )


# --- the storage key --------------------------------------------------------------------------


class StorageKey:
    """A device's random 32-byte storage key: seals and opens local rows.

    Rows are XChaCha20-Poly1305 with a random 24-byte nonce, so there is no counter to persist and
    no practical limit on the number of rows. The key never appears in `repr`.
    """

    __slots__ = ("_key",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != STORAGE_KEY_SIZE:
            raise InvalidKey(f"a storage key must be {STORAGE_KEY_SIZE} bytes")
        self._key = bytes(raw)

    @classmethod
    def generate(cls, rng: Rng) -> StorageKey:
        return cls(rng(STORAGE_KEY_SIZE))

    @property
    def raw(self) -> bytes:
        """The key bytes, for a device that keeps its storage key in the OS keystore instead."""
        return self._key

    def seal(self, plaintext: bytes, rng: Rng, associated_data: bytes = b"") -> bytes:
        """One encrypted row; `associated_data` (e.g. table name and row id) must be given again
        to open it."""
        nonce = rng(aead.NONCE_SIZE)
        ciphertext = aead.encrypt(self._key, nonce, plaintext, _row_ad(associated_data))
        return bytes((FORMAT_STORAGE_ROW,)) + nonce + ciphertext

    def open(self, blob: bytes, associated_data: bytes = b"") -> bytes:
        """The row's plaintext; `DecryptionFailed` when the row was altered, sealed under another
        key, or sealed with other associated data."""
        reader = Reader(blob, "storage row")
        reader.version(FORMAT_STORAGE_ROW)
        nonce = reader.fixed(aead.NONCE_SIZE)
        ciphertext = reader.rest()
        return aead.decrypt(self._key, nonce, ciphertext, _row_ad(associated_data))

    def __repr__(self) -> str:
        return "StorageKey(<secret>)"


def _row_ad(associated_data: bytes) -> bytes:
    # The format byte is bound too, so a future row format can never be fed to this one.
    return bytes((FORMAT_STORAGE_ROW,)) + bytes(associated_data)


@dataclass(frozen=True, slots=True, repr=False)
class KeyDerivationHeader:
    """What a client stores next to its rows: the Argon2id parameters and salt, the key-check
    value, and the storage key wrapped under the passphrase-derived key. Not secret, but useful
    to an offline guesser, so it is kept as carefully as the rows."""

    params: SealParams
    salt: bytes
    key_check: bytes
    nonce: bytes
    wrapped_key: bytes

    def __post_init__(self) -> None:
        for value, size, what in (
            (self.salt, SALT_SIZE, "salt"),
            (self.key_check, KEY_CHECK_SIZE, "key check"),
            (self.nonce, SECRETBOX_NONCE_SIZE, "nonce"),
            (self.wrapped_key, WRAPPED_KEY_SIZE, "wrapped key"),
        ):
            if len(value) != size:
                raise ValueError(f"key-derivation header {what} must be {size} bytes")

    def encode(self) -> bytes:
        envelope = _Envelope(self.params, self.salt, self.key_check, self.nonce, self.wrapped_key)
        return envelope.encode(FORMAT_KEY_HEADER, WRAPPED_KEY_SIZE)

    @classmethod
    def decode(cls, data: bytes) -> KeyDerivationHeader:
        what = "key-derivation header"
        envelope = _Envelope.decode(data, FORMAT_KEY_HEADER, WRAPPED_KEY_SIZE, what)
        if len(envelope.box) != WRAPPED_KEY_SIZE:
            raise MalformedEncoding(f"{what}: wrapped key must be {WRAPPED_KEY_SIZE} bytes")
        return cls(envelope.params, envelope.salt, envelope.key_check, envelope.nonce, envelope.box)

    def __repr__(self) -> str:
        return (
            f"KeyDerivationHeader(opslimit={self.params.opslimit}, memlimit={self.params.memlimit})"
        )


def wrap_storage_key(
    storage_key: StorageKey, passphrase: str | bytes, rng: Rng, params: SealParams | None = None
) -> KeyDerivationHeader:
    """A fresh header (new salt, new nonce) wrapping `storage_key` under `passphrase`."""
    envelope = _seal_envelope(
        storage_key.raw, passphrase, rng, params or SealParams(), FORMAT_KEY_HEADER
    )
    return KeyDerivationHeader(
        envelope.params, envelope.salt, envelope.key_check, envelope.nonce, envelope.box
    )


def new_key_derivation(
    passphrase: str | bytes, rng: Rng, params: SealParams | None = None
) -> tuple[KeyDerivationHeader, StorageKey]:
    """A new random storage key, and the header that recovers it from `passphrase`."""
    storage_key = StorageKey.generate(rng)
    return wrap_storage_key(storage_key, passphrase, rng, params), storage_key


def derive_storage_key(passphrase: str | bytes, header: KeyDerivationHeader) -> StorageKey:
    """Unlock: the storage key wrapped in `header`, or `WrongPassphrase`."""
    envelope = _Envelope(
        header.params, header.salt, header.key_check, header.nonce, header.wrapped_key
    )
    raw = _open_envelope(envelope, passphrase, FORMAT_KEY_HEADER, "key-derivation header")
    return StorageKey(raw)


def change_passphrase(
    header: KeyDerivationHeader,
    old_passphrase: str | bytes,
    new_passphrase: str | bytes,
    rng: Rng,
    params: SealParams | None = None,
) -> KeyDerivationHeader:
    """A new header for the same storage key under `new_passphrase`: every row stays readable.

    `params` defaults to the header's own; pass stronger ones to raise the cost at the same time
    (or pass the same passphrase twice to only raise the cost).
    """
    storage_key = derive_storage_key(old_passphrase, header)
    return wrap_storage_key(storage_key, new_passphrase, rng, params or header.params)
