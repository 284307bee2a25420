"""Who a device is, as the rest of medrelay.crypto needs to know it.

`DeviceIdentity` is the public, *already verified* view of one device: the values come out of a
device certificate whose chain was checked (`medrelay.crypto.certificates`), and X3DH, the
ratchet's associated data, signed content and fan-out all take it as input. `DeviceKeys` adds the
device's own private keys.

Conventions shared by every module of the package:
- user ids and device ids are short UTF-8 strings (at most `MAX_ID_BYTES` bytes) without control
  characters (`check_id`);
- times are integer milliseconds since the Unix epoch, UTC, named `*_ms`, and always passed in.

Invalid values raise `ValueError` (decoders turn it into `MalformedEncoding`); values of the wrong
type raise `TypeError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from medrelay.crypto.keys import DHPrivateKey, DHPublicKey, SigningKey, VerifyKey

MAX_ID_BYTES: Final = 64
CERTIFICATE_HASH_SIZE: Final = 32


def check_id(value: str, what: str) -> str:
    """Validate a user or device id: non-empty, at most MAX_ID_BYTES of UTF-8, no control
    characters (C0, DEL and C1: Unicode category Cc) and no lone surrogates (not encodable)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if not (value.isascii() and value.isprintable()):
        # The slow path only for ids outside printable ASCII (the common case is one C call).
        for char in value:
            if _is_control(char):
                raise ValueError(f"{what} contains control characters")
            if 0xD800 <= ord(char) <= 0xDFFF:
                raise ValueError(f"{what} contains a lone surrogate")
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise ValueError(f"{what} is longer than {MAX_ID_BYTES} bytes")
    return value


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


@dataclass(frozen=True, slots=True)
class DeviceAddress:
    """A (user, device) pair: where a ciphertext goes."""

    user_id: str
    device_id: str

    def __post_init__(self) -> None:
        check_id(self.user_id, "user id")
        check_id(self.device_id, "device id")


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """A device's verified public keys.

    `certificate_hash` is SHA-256 of the encoded device certificate; X3DH binds it into the
    session's associated data and signed content names it, so a session or a signature is tied to
    one certificate, not just to a key.
    """

    user_id: str
    device_id: str
    signing_key: VerifyKey
    dh_key: DHPublicKey
    certificate_hash: bytes

    def __post_init__(self) -> None:
        check_id(self.user_id, "user id")
        check_id(self.device_id, "device id")
        if not isinstance(self.signing_key, VerifyKey):
            raise TypeError("signing key must be a VerifyKey")
        if not isinstance(self.dh_key, DHPublicKey):
            raise TypeError("DH key must be a DHPublicKey")
        certificate_hash: object = self.certificate_hash
        if isinstance(certificate_hash, bytearray | memoryview):
            # A mutable hash would make this frozen value unhashable and changeable behind it.
            certificate_hash = bytes(certificate_hash)
            object.__setattr__(self, "certificate_hash", certificate_hash)
        if not isinstance(certificate_hash, bytes):
            raise TypeError("certificate hash must be bytes")
        if len(certificate_hash) != CERTIFICATE_HASH_SIZE:
            raise ValueError("certificate hash must be 32 bytes")

    @property
    def address(self) -> DeviceAddress:
        return DeviceAddress(self.user_id, self.device_id)


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """This device's identity together with its private keys."""

    identity: DeviceIdentity
    signing_key: SigningKey
    dh_key: DHPrivateKey

    def __post_init__(self) -> None:
        if not isinstance(self.identity, DeviceIdentity):
            raise TypeError("identity must be a DeviceIdentity")
        if not isinstance(self.signing_key, SigningKey):
            raise TypeError("signing key must be a SigningKey")
        if not isinstance(self.dh_key, DHPrivateKey):
            raise TypeError("DH key must be a DHPrivateKey")
        if self.signing_key.verify_key != self.identity.signing_key:
            raise ValueError("signing key does not match the device identity")
        if self.dh_key.public_key != self.identity.dh_key:
            raise ValueError("DH key does not match the device identity")
