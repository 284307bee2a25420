"""Hashes, HMAC and HKDF (RFC 5869) from the standard library, plus constant-time comparison.

PyNaCl binds neither HMAC nor HKDF (notes/crypto.md §2), so they come from `hmac`/`hashlib`
(OpenSSL underneath); the tests check them against RFC 5869 Appendix A and Wycheproof's HKDF-SHA256
and HMAC-SHA256 vectors. HKDF is on the ratchet's per-message path, so `hkdf_expand` uses one-shot
HMAC for short outputs (the common 32- to 64-byte case) and a copied keyed state for long ones.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

HASH_LEN: Final = 32
MAX_HKDF_LENGTH: Final = 255 * HASH_LEN
"""RFC 5869 §2.3: L <= 255 * HashLen (8160 bytes for SHA-256)."""

_ZERO_SALT: Final = bytes(HASH_LEN)
_COUNTERS: Final = tuple(bytes((i,)) for i in range(256))
# Below this many blocks one-shot `hmac.digest` beats building a keyed state and copying it.
_COPY_STATE_FROM_BLOCKS: Final = 3


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 HKDF-Extract; an empty salt means a string of HashLen zeros."""
    return hmac.digest(salt or _ZERO_SALT, ikm, "sha256")


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Expand; `ValueError` for a length outside [0, 8160]."""
    if not 0 <= length <= MAX_HKDF_LENGTH:
        raise ValueError(f"HKDF-SHA256 output is limited to {MAX_HKDF_LENGTH} bytes")
    block_count = -(-length // HASH_LEN)
    blocks: list[bytes] = []
    block = b""
    if block_count < _COPY_STATE_FROM_BLOCKS:
        for counter in range(1, block_count + 1):
            block = hmac.digest(prk, block + info + _COUNTERS[counter], "sha256")
            blocks.append(block)
    else:
        keyed = hmac.new(prk, digestmod="sha256")
        for counter in range(1, block_count + 1):
            state = keyed.copy()
            state.update(block + info + _COUNTERS[counter])
            block = state.digest()
            blocks.append(block)
    okm = b"".join(blocks)
    return okm if len(okm) == length else okm[:length]


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare secrets (MACs, token digests) without leaking where they differ.

    Different lengths compare unequal (the length itself is not hidden).
    """
    return hmac.compare_digest(a, b)
