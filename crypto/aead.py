"""XChaCha20-Poly1305 (IETF, libsodium `crypto_aead_xchacha20poly1305_ietf_*`) and length-hiding
padding (ISO/IEC 7816-4, libsodium `sodium_pad`/`sodium_unpad`).

Wrapped so that no PyNaCl exception leaks out of medrelay.crypto:
- a ciphertext that does not authenticate (including one shorter than its tag) is
  `DecryptionFailed`;
- a key or nonce of the wrong size is `AeadParameterError`, which is both a `CryptoError` and (as it
  always was) a `ValueError`;
- inputs may be any bytes-like object; anything else is a `TypeError` (PyNaCl would raise its own).

`pad` is written out in Python (it is formatting, not cryptography, and byte-identical to
`sodium_pad`, which the tests check); `unpad` stays libsodium's constant-time scan and additionally
insists on a whole number of blocks, since `pad` never produces anything else.
"""

from __future__ import annotations

from typing import Final

from nacl import bindings
from nacl.exceptions import CryptoError as NaclCryptoError

from medrelay.crypto.errors import CryptoError, DecryptionFailed

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 24
TAG_SIZE: Final = 16

_PADDING_MARKER: Final = b"\x80"


class AeadParameterError(CryptoError, ValueError):
    """An AEAD key or nonce of the wrong size: a caller's mistake or a malformed record."""

    code = "aead_parameter_invalid"


def encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Ciphertext with its 16-byte tag appended."""
    key, nonce = _check_sizes(key, nonce)
    ciphertext: bytes = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        _as_bytes(plaintext, "plaintext"), _as_bytes(associated_data, "associated data"), nonce, key
    )
    return ciphertext


def decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """The plaintext, or `DecryptionFailed` when the ciphertext or the data do not authenticate."""
    key, nonce = _check_sizes(key, nonce)
    ciphertext = _as_bytes(ciphertext, "ciphertext")
    if len(ciphertext) < TAG_SIZE:
        raise DecryptionFailed("ciphertext shorter than its tag")
    try:
        plaintext: bytes = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, _as_bytes(associated_data, "associated data"), nonce, key
        )
    except NaclCryptoError:
        raise DecryptionFailed("ciphertext does not authenticate") from None
    return plaintext


def pad(data: bytes, block_size: int) -> bytes:
    """ISO/IEC 7816-4 padding (libsodium `sodium_pad`) up to a multiple of `block_size`: a 0x80
    byte then zeros, always at least one byte, so an exact multiple gains a whole block."""
    _check_block_size(block_size)
    data = _as_bytes(data, "data")
    return data + _PADDING_MARKER + bytes(block_size - 1 - len(data) % block_size)


def unpad(data: bytes, block_size: int) -> bytes:
    """Undo `pad`; malformed padding is a `DecryptionFailed` (it only occurs after a forged
    plaintext, which authentication already excludes, or a peer bug)."""
    _check_block_size(block_size)
    data = _as_bytes(data, "data")
    if not data or len(data) % block_size:
        raise DecryptionFailed("invalid padding")
    try:
        unpadded: bytes = bindings.sodium_unpad(data, block_size)
    except NaclCryptoError:
        raise DecryptionFailed("invalid padding") from None
    return unpadded


def _check_sizes(key: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    key = _as_bytes(key, "key")
    nonce = _as_bytes(nonce, "nonce")
    if len(key) != KEY_SIZE:
        raise AeadParameterError(f"XChaCha20-Poly1305 key must be {KEY_SIZE} bytes")
    if len(nonce) != NONCE_SIZE:
        raise AeadParameterError(f"XChaCha20-Poly1305 nonce must be {NONCE_SIZE} bytes")
    return key, nonce


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError("padding block size must be a positive integer")


def _as_bytes(value: object, what: str) -> bytes:
    # bytes(bytes) is the same object, so the common case costs no copy.
    if type(value) is bytes:
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be bytes")
