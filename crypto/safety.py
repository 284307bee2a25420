"""Safety numbers: Signal's numeric fingerprint, so two people can check each other's identity
keys in person or over a trusted channel (notes/crypto.md §8; libsignal `fingerprint.rs`).

Per party, over the party's serialized public key and a stable id:

    h_0 = SHA-512(0x0000 ‖ key ‖ stable_id ‖ key)          (0x0000: fingerprint version, u16)
    h_i = SHA-512(h_{i-1} ‖ key)                           5200 hashes in all, counting h_0

The first 30 bytes of the last hash, read as six 5-byte big-endian integers each taken mod 100000
and printed as 5 digits, give the party's 30 digits. The safety number is the two parties'
30-digit strings in sorted order (60 digits), so both sides compute the same number.

The scannable form (a QR code) is the protobuf `CombinedFingerprints{version = 2,
local_fingerprint{content = h[:32]}, remote_fingerprint{content = h[:32]}}`, encoded here by hand
(fixed sizes make it a 74-byte constant layout). The scanning side checks that the other's
"local" is its "remote" and vice versa.

The algorithm functions take raw key bytes and stable-id bytes, so libsignal's vectors (with
0x05-prefixed Curve25519 keys) test them directly. medrelay's `safety_number` applies them to the
users' Ed25519 identity keys in their 33-byte `VerifyKey.encode()` form, with the UTF-8 user id as
the stable id. The identity key certifies all of a user's devices, so one number covers them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from medrelay.crypto.errors import MalformedEncoding
from medrelay.crypto.kdf import constant_time_equal, sha512
from medrelay.crypto.keys import VerifyKey

FINGERPRINT_VERSION: Final = 0
ITERATIONS: Final = 5200
SCANNABLE_VERSION: Final = 2
DIGITS_PER_PARTY: Final = 30
SAFETY_NUMBER_DIGITS: Final = 2 * DIGITS_PER_PARTY
GROUP_DIGITS: Final = 5
SCANNABLE_CONTENT_SIZE: Final = 32
# Inputs are public identifiers and keys; the bound only stops absurd allocations.
MAX_INPUT_BYTES: Final = 1024

# Protobuf framing: field 1 varint (tag 0x08); fields 2 and 3 length-delimited (tags 0x12, 0x1a)
# holding a LogicalFingerprint, whose field 1 (tag 0x0a) is 32 bytes.
_TAG_VERSION: Final = 0x08
_TAG_LOCAL: Final = 0x12
_TAG_REMOTE: Final = 0x1A
_TAG_CONTENT: Final = 0x0A
_LOGICAL_SIZE: Final = 2 + SCANNABLE_CONTENT_SIZE
SCANNABLE_SIZE: Final = 2 + 2 * (2 + _LOGICAL_SIZE)


class FingerprintVersionMismatch(MalformedEncoding):
    """A scanned fingerprint of another version: the other side runs different software, which
    is not the same as a mismatch of keys and deserves a different message to the user."""

    code = "fingerprint_version_mismatch"


def fingerprint_hash(key: bytes, stable_id: bytes, iterations: int = ITERATIONS) -> bytes:
    """The iterated SHA-512 of one party (64 bytes)."""
    if len(key) > MAX_INPUT_BYTES or len(stable_id) > MAX_INPUT_BYTES:
        raise ValueError(f"fingerprint inputs are limited to {MAX_INPUT_BYTES} bytes")
    if iterations < 1:
        raise ValueError("at least one iteration")
    key = bytes(key)
    digest = sha512(FINGERPRINT_VERSION.to_bytes(2, "big") + key + bytes(stable_id) + key)
    for _ in range(iterations - 1):
        digest = sha512(digest + key)
    return digest


def _displayable_digits(digest: bytes) -> str:
    chunks = (digest[offset : offset + 5] for offset in range(0, DIGITS_PER_PARTY, 5))
    return "".join(f"{int.from_bytes(chunk, 'big') % 100_000:05d}" for chunk in chunks)


def _logical_fingerprint(tag: int, content: bytes) -> bytes:
    return bytes((tag, _LOGICAL_SIZE, _TAG_CONTENT, SCANNABLE_CONTENT_SIZE)) + content


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Both forms of one side's view of a pair: `displayable` (60 digits, the same on both
    sides) and `scannable` (74 bytes for a QR code, local first, so it differs per side)."""

    displayable: str
    scannable: bytes

    def matches_scanned(self, scanned: bytes) -> bool:
        """Whether a QR payload scanned from the other side describes the same pair of keys.

        Raises `FingerprintVersionMismatch` for another version and `MalformedEncoding` for
        anything that is not a scannable fingerprint.
        """
        theirs_local, theirs_remote = _parse_scannable(scanned)
        ours_local, ours_remote = _parse_scannable(self.scannable)
        # Evaluate both comparisons: no early exit on the first difference.
        same_local = constant_time_equal(theirs_remote, ours_local)
        same_remote = constant_time_equal(theirs_local, ours_remote)
        return same_local & same_remote


def _parse_scannable(data: bytes) -> tuple[bytes, bytes]:
    data = bytes(data)
    if len(data) != SCANNABLE_SIZE or data[0] != _TAG_VERSION:
        raise MalformedEncoding("scannable fingerprint: unexpected layout")
    if data[1] != SCANNABLE_VERSION:
        raise FingerprintVersionMismatch(
            f"scannable fingerprint: version {data[1]}, expected {SCANNABLE_VERSION}"
        )
    parts: list[bytes] = []
    offset = 2
    for tag in (_TAG_LOCAL, _TAG_REMOTE):
        header = data[offset : offset + 4]
        if header != bytes((tag, _LOGICAL_SIZE, _TAG_CONTENT, SCANNABLE_CONTENT_SIZE)):
            raise MalformedEncoding("scannable fingerprint: unexpected layout")
        parts.append(data[offset + 4 : offset + 4 + SCANNABLE_CONTENT_SIZE])
        offset += 2 + _LOGICAL_SIZE
    return parts[0], parts[1]


def numeric_fingerprint(
    local_key: bytes, local_stable_id: bytes, remote_key: bytes, remote_stable_id: bytes
) -> Fingerprint:
    """Signal's numeric fingerprint (version 2 scannable form) over raw keys and stable ids."""
    local = fingerprint_hash(local_key, local_stable_id)
    remote = fingerprint_hash(remote_key, remote_stable_id)
    displayable = "".join(sorted((_displayable_digits(local), _displayable_digits(remote))))
    scannable = (
        bytes((_TAG_VERSION, SCANNABLE_VERSION))
        + _logical_fingerprint(_TAG_LOCAL, local[:SCANNABLE_CONTENT_SIZE])
        + _logical_fingerprint(_TAG_REMOTE, remote[:SCANNABLE_CONTENT_SIZE])
    )
    return Fingerprint(displayable, scannable)


def safety_fingerprint(
    local_identity_key: VerifyKey,
    local_user_id: str,
    remote_identity_key: VerifyKey,
    remote_user_id: str,
) -> Fingerprint:
    """Both forms of the safety number between two medrelay users' identity keys."""
    return numeric_fingerprint(
        local_identity_key.encode(),
        local_user_id.encode("utf-8"),
        remote_identity_key.encode(),
        remote_user_id.encode("utf-8"),
    )


def safety_number(
    local_identity_key: VerifyKey,
    local_user_id: str,
    remote_identity_key: VerifyKey,
    remote_user_id: str,
) -> str:
    """The 60-digit safety number between two users; both sides compute the same digits."""
    return safety_fingerprint(
        local_identity_key, local_user_id, remote_identity_key, remote_user_id
    ).displayable


def safety_number_groups(number: str) -> tuple[str, ...]:
    """The 12 five-digit groups of a 60-digit safety number, as people read them aloud."""
    if len(number) != SAFETY_NUMBER_DIGITS or not (number.isascii() and number.isdigit()):
        raise ValueError(f"a safety number is {SAFETY_NUMBER_DIGITS} ASCII digits")
    return tuple(
        number[offset : offset + GROUP_DIGITS]
        for offset in range(0, SAFETY_NUMBER_DIGITS, GROUP_DIGITS)
    )


def format_safety_number(number: str, groups_per_line: int = 12) -> str:
    """Space-separated five-digit groups; `groups_per_line=4` gives Signal's three rows."""
    if groups_per_line < 1:
        raise ValueError("groups_per_line must be positive")
    groups = safety_number_groups(number)
    lines = (
        " ".join(groups[start : start + groups_per_line])
        for start in range(0, len(groups), groups_per_line)
    )
    return "\n".join(lines)
