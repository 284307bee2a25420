"""The clinic's chain of trust: clinic-key, user and device certificates (notes/crypto.md §9.1).

    clinic root key (offline)
      └─ ClinicKeyCertificate   purpose ISSUING (signs users) or LOG (signs log checkpoints)
           └─ UserCertificate   signed by the ISSUING key: user id, role, names, identity key
                └─ DeviceCertificate   signed by the user's identity key: device Ed25519 + X25519

Each certificate has exactly one encoding: the to-be-signed bytes (a version byte, then the
fields in a fixed order through `medrelay.crypto.encoding`), followed by the 64-byte Ed25519
signature over `context ‖ to-be-signed bytes`. Every type has its own context string, so a
signature made for one type can never be read as another. A certificate's hash (SHA-256 of the
whole encoding, signature included) names it: a user certificate points at its predecessor by
hash, `DeviceIdentity.certificate_hash` is the device certificate's hash, and signed content names
the sender's device certificate by it. libsodium refuses non-canonical signatures, so one
certificate has one hash.

Decoding only checks shape; the `verify_*` functions check signatures, issuers, subjects,
validity windows and roles, and name exactly what failed with a `CertificateError`. Validity is
checked at an explicit `now_ms`, so a record can be verified "as of" the time it was written.
Device certificates do not expire: a device leaves through a revocation in the transparency log.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final, TypeVar

from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import (
    BadSignature,
    CertificateError,
    CertificateFailure,
    InvalidKey,
    MalformedEncoding,
)
from medrelay.crypto.identity import MAX_ID_BYTES, DeviceIdentity, check_id
from medrelay.crypto.kdf import sha256
from medrelay.crypto.keys import (
    ENCODED_KEY_SIZE,
    SIGNATURE_SIZE,
    DHPublicKey,
    SigningKey,
    VerifyKey,
)

CLINIC_KEY_CONTEXT: Final = b"MEDRELAY/v1/clinic-key-cert\x00"
USER_CONTEXT: Final = b"MEDRELAY/v1/user-cert\x00"
DEVICE_CONTEXT: Final = b"MEDRELAY/v1/device-cert\x00"

CLINIC_KEY_CERTIFICATE_VERSION: Final = 1
USER_CERTIFICATE_VERSION: Final = 1
DEVICE_CERTIFICATE_VERSION: Final = 1

HASH_SIZE: Final = 32
MAX_DISPLAY_NAME_BYTES: Final = 256
MAX_SPECIALTY_BYTES: Final = 128
MAX_DEPARTMENT_BYTES: Final = 128
_U64_MAX: Final = 2**64 - 1

SUBJECT_CLINIC_KEY: Final = "clinic-key"
SUBJECT_USER: Final = "user"
SUBJECT_DEVICE: Final = "device"

# Upper bounds of each encoding, checked before any parsing.
_TEXT_PREFIX = 4
MAX_CLINIC_KEY_CERTIFICATE_BYTES: Final = (
    1 + (_TEXT_PREFIX + MAX_ID_BYTES) + 1 + ENCODED_KEY_SIZE + 3 * 8 + SIGNATURE_SIZE
)
MAX_USER_CERTIFICATE_BYTES: Final = (
    1
    + (_TEXT_PREFIX + MAX_ID_BYTES)
    + 1
    + (_TEXT_PREFIX + MAX_DISPLAY_NAME_BYTES)
    + (_TEXT_PREFIX + MAX_SPECIALTY_BYTES)
    + (_TEXT_PREFIX + MAX_DEPARTMENT_BYTES)
    + ENCODED_KEY_SIZE
    + 3 * 8
    + HASH_SIZE
    + 1
    + HASH_SIZE
    + SIGNATURE_SIZE
)
MAX_DEVICE_CERTIFICATE_BYTES: Final = (
    1 + 2 * (_TEXT_PREFIX + MAX_ID_BYTES) + 2 * ENCODED_KEY_SIZE + 8 + HASH_SIZE + SIGNATURE_SIZE
)


class ClinicKeyPurpose(enum.Enum):
    """What an online clinic key is certified to sign."""

    ISSUING = "issuing"  # user certificates
    LOG = "log"  # transparency-log checkpoints


class Role(enum.Enum):
    """A user's role in the clinic (DESIGN.md, Roles)."""

    ADMIN = "admin"
    REGISTRAR = "registrar"
    DOCTOR = "doctor"
    NURSE = "nurse"
    PATIENT = "patient"
    RECORDS = "records"


# Wire codes: fixed forever, independent of the enums' order or spelling.
_PURPOSE_CODES: Final = {ClinicKeyPurpose.ISSUING: 1, ClinicKeyPurpose.LOG: 2}
_ROLE_CODES: Final = {
    Role.ADMIN: 1,
    Role.REGISTRAR: 2,
    Role.DOCTOR: 3,
    Role.NURSE: 4,
    Role.PATIENT: 5,
    Role.RECORDS: 6,
}
_PURPOSES_BY_CODE: Final = {code: purpose for purpose, code in _PURPOSE_CODES.items()}
_ROLES_BY_CODE: Final = {code: role for role, code in _ROLE_CODES.items()}

# Explicit bidirectional formatting characters: they let a name render as something else.
_BIDI_CONTROLS: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e") | frozenset(
    "\u2066\u2067\u2068\u2069"
)


class MalformedCertificate(CertificateError, MalformedEncoding):
    """Certificate bytes that do not decode; both a `CertificateError` (failure MALFORMED) and a
    `MalformedEncoding`, so either kind of handler catches it."""

    code = CertificateError.code

    def __init__(self, subject: str, detail: str = "") -> None:
        super().__init__(CertificateFailure.MALFORMED, subject, detail)


def key_hash(key: VerifyKey) -> bytes:
    """SHA-256 of a public key's 33-byte encoding: how a certificate names its signing key."""
    return sha256(key.encode())


def _check_u64(value: int, what: str) -> None:
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} must fit in 64 unsigned bits")


def _check_window(not_before_ms: int, not_after_ms: int) -> None:
    _check_u64(not_before_ms, "not_before_ms")
    _check_u64(not_after_ms, "not_after_ms")
    if not_before_ms >= not_after_ms:
        raise ValueError("validity window is empty (not_before_ms must precede not_after_ms)")


def _check_display_text(value: str, limit: int, what: str, *, required: bool) -> None:
    if required and not value:
        raise ValueError(f"{what} must not be empty")
    if len(value.encode("utf-8")) > limit:
        raise ValueError(f"{what} is longer than {limit} bytes")
    if any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in value):
        raise ValueError(f"{what} contains control or bidirectional formatting characters")


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes")


def _check_signature(value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != SIGNATURE_SIZE:
        raise ValueError(f"signature must be {SIGNATURE_SIZE} bytes")


def _check_validity(not_before_ms: int, not_after_ms: int, now_ms: int, subject: str) -> None:
    if now_ms < not_before_ms:
        raise CertificateError(CertificateFailure.NOT_YET_VALID, subject)
    if now_ms >= not_after_ms:
        raise CertificateError(CertificateFailure.EXPIRED, subject)


def _check_signed(
    key: VerifyKey, context: bytes, tbs: bytes, signature: bytes, subject: str
) -> None:
    try:
        key.verify(context + tbs, signature)
    except BadSignature:
        raise CertificateError(CertificateFailure.BAD_SIGNATURE, subject) from None


_T = TypeVar("_T")


def _decode(data: bytes, subject: str, max_len: int, parse: Callable[[Reader], _T]) -> _T:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedCertificate(subject, "not bytes")
    if len(data) > max_len:
        raise MalformedCertificate(subject, f"longer than {max_len} bytes")
    try:
        reader = Reader(data, f"{subject} certificate")
        certificate = parse(reader)
        reader.finish()
    except (MalformedEncoding, InvalidKey, ValueError) as exc:
        raise MalformedCertificate(subject, str(exc)) from None
    return certificate


def _read_code(reader: Reader, table: dict[int, _T], what: str) -> _T:
    code = reader.u8()
    if code not in table:
        raise MalformedEncoding(f"unknown {what} code {code}")
    return table[code]


# --- clinic key certificates ----------------------------------------------------------------


class _Signed:
    """What every certificate type shares: its encoding is the to-be-signed bytes followed by
    the signature, and its hash (SHA-256 of that encoding) names it."""

    __slots__ = ()
    signature: bytes

    def tbs_bytes(self) -> bytes:
        raise NotImplementedError

    def encode(self) -> bytes:
        return self.tbs_bytes() + self.signature

    def hash(self) -> bytes:
        return sha256(self.encode())


@dataclass(frozen=True, slots=True)
class ClinicKeyCertificate(_Signed):
    """The clinic root key's statement that `key` is the clinic's online key for `purpose`."""

    clinic_id: str
    purpose: ClinicKeyPurpose
    key: VerifyKey
    not_before_ms: int
    not_after_ms: int
    serial: int
    signature: bytes

    def __post_init__(self) -> None:
        check_id(self.clinic_id, "clinic id")
        if not isinstance(self.purpose, ClinicKeyPurpose):
            raise ValueError("purpose must be a ClinicKeyPurpose")
        _check_window(self.not_before_ms, self.not_after_ms)
        _check_u64(self.serial, "serial")
        _check_signature(self.signature)

    def tbs_bytes(self) -> bytes:
        return (
            Writer()
            .u8(CLINIC_KEY_CERTIFICATE_VERSION)
            .text(self.clinic_id, MAX_ID_BYTES)
            .u8(_PURPOSE_CODES[self.purpose])
            .fixed(self.key.encode(), ENCODED_KEY_SIZE)
            .u64(self.not_before_ms)
            .u64(self.not_after_ms)
            .u64(self.serial)
            .to_bytes()
        )

    @classmethod
    def decode(cls, data: bytes) -> ClinicKeyCertificate:
        def parse(reader: Reader) -> ClinicKeyCertificate:
            reader.version(CLINIC_KEY_CERTIFICATE_VERSION)
            return cls(
                clinic_id=reader.text(MAX_ID_BYTES),
                purpose=_read_code(reader, _PURPOSES_BY_CODE, "clinic key purpose"),
                key=VerifyKey.decode(reader.fixed(ENCODED_KEY_SIZE)),
                not_before_ms=reader.u64(),
                not_after_ms=reader.u64(),
                serial=reader.u64(),
                signature=reader.fixed(SIGNATURE_SIZE),
            )

        return _decode(data, SUBJECT_CLINIC_KEY, MAX_CLINIC_KEY_CERTIFICATE_BYTES, parse)


def issue_clinic_key_certificate(
    root: SigningKey,
    *,
    clinic_id: str,
    purpose: ClinicKeyPurpose,
    key: VerifyKey,
    not_before_ms: int,
    not_after_ms: int,
    serial: int,
) -> ClinicKeyCertificate:
    """Certify an online clinic key with the (offline) clinic root key."""
    unsigned = ClinicKeyCertificate(
        clinic_id, purpose, key, not_before_ms, not_after_ms, serial, bytes(SIGNATURE_SIZE)
    )
    signature = root.sign(CLINIC_KEY_CONTEXT + unsigned.tbs_bytes())
    return ClinicKeyCertificate(
        clinic_id, purpose, key, not_before_ms, not_after_ms, serial, signature
    )


def verify_clinic_key(
    root_key: VerifyKey, cert: ClinicKeyCertificate, purpose: ClinicKeyPurpose, now_ms: int
) -> None:
    """Check that the clinic root key certified `cert.key` for `purpose`, valid at `now_ms`.

    A key certified for another purpose fails with WRONG_ROLE: the log key must never pass as the
    issuing key, nor the reverse.
    """
    _check_signed(
        root_key, CLINIC_KEY_CONTEXT, cert.tbs_bytes(), cert.signature, SUBJECT_CLINIC_KEY
    )
    if cert.purpose is not purpose:
        raise CertificateError(
            CertificateFailure.WRONG_ROLE,
            SUBJECT_CLINIC_KEY,
            f"certified for {cert.purpose.value}, needed for {purpose.value}",
        )
    _check_validity(cert.not_before_ms, cert.not_after_ms, now_ms, SUBJECT_CLINIC_KEY)


# --- user certificates ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserCertificate(_Signed):
    """The clinic issuing key's statement binding a user (id, role, names) to an identity key."""

    user_id: str
    role: Role
    display_name: str
    specialty: str
    department: str
    identity_key: VerifyKey
    not_before_ms: int
    not_after_ms: int
    serial: int
    issuer_key_hash: bytes
    previous_certificate_hash: bytes | None
    signature: bytes

    def __post_init__(self) -> None:
        check_id(self.user_id, "user id")
        if not isinstance(self.role, Role):
            raise ValueError("role must be a Role")
        _check_display_text(
            self.display_name, MAX_DISPLAY_NAME_BYTES, "display name", required=True
        )
        _check_display_text(self.specialty, MAX_SPECIALTY_BYTES, "specialty", required=False)
        _check_display_text(self.department, MAX_DEPARTMENT_BYTES, "department", required=False)
        _check_window(self.not_before_ms, self.not_after_ms)
        _check_u64(self.serial, "serial")
        _check_hash(self.issuer_key_hash, "issuer key hash")
        if self.previous_certificate_hash is not None:
            _check_hash(self.previous_certificate_hash, "previous certificate hash")
        _check_signature(self.signature)

    def tbs_bytes(self) -> bytes:
        writer = (
            Writer()
            .u8(USER_CERTIFICATE_VERSION)
            .text(self.user_id, MAX_ID_BYTES)
            .u8(_ROLE_CODES[self.role])
            .text(self.display_name, MAX_DISPLAY_NAME_BYTES)
            .text(self.specialty, MAX_SPECIALTY_BYTES)
            .text(self.department, MAX_DEPARTMENT_BYTES)
            .fixed(self.identity_key.encode(), ENCODED_KEY_SIZE)
            .u64(self.not_before_ms)
            .u64(self.not_after_ms)
            .u64(self.serial)
            .fixed(self.issuer_key_hash, HASH_SIZE)
            .boolean(self.previous_certificate_hash is not None)
        )
        if self.previous_certificate_hash is not None:
            writer.fixed(self.previous_certificate_hash, HASH_SIZE)
        return writer.to_bytes()

    @classmethod
    def decode(cls, data: bytes) -> UserCertificate:
        def parse(reader: Reader) -> UserCertificate:
            reader.version(USER_CERTIFICATE_VERSION)
            user_id = reader.text(MAX_ID_BYTES)
            role = _read_code(reader, _ROLES_BY_CODE, "role")
            display_name = reader.text(MAX_DISPLAY_NAME_BYTES)
            specialty = reader.text(MAX_SPECIALTY_BYTES)
            department = reader.text(MAX_DEPARTMENT_BYTES)
            identity_key = VerifyKey.decode(reader.fixed(ENCODED_KEY_SIZE))
            not_before_ms = reader.u64()
            not_after_ms = reader.u64()
            serial = reader.u64()
            issuer_key_hash = reader.fixed(HASH_SIZE)
            previous = reader.fixed(HASH_SIZE) if reader.boolean() else None
            return cls(
                user_id,
                role,
                display_name,
                specialty,
                department,
                identity_key,
                not_before_ms,
                not_after_ms,
                serial,
                issuer_key_hash,
                previous,
                reader.fixed(SIGNATURE_SIZE),
            )

        return _decode(data, SUBJECT_USER, MAX_USER_CERTIFICATE_BYTES, parse)


def issue_user_certificate(
    issuing: SigningKey,
    *,
    user_id: str,
    role: Role,
    display_name: str,
    identity_key: VerifyKey,
    not_before_ms: int,
    not_after_ms: int,
    serial: int,
    specialty: str = "",
    department: str = "",
    previous_certificate_hash: bytes | None = None,
) -> UserCertificate:
    """Certify a user's identity key with the clinic issuing key."""
    fields = (
        user_id,
        role,
        display_name,
        specialty,
        department,
        identity_key,
        not_before_ms,
        not_after_ms,
        serial,
        key_hash(issuing.verify_key),
        previous_certificate_hash,
    )
    unsigned = UserCertificate(*fields, bytes(SIGNATURE_SIZE))
    return UserCertificate(*fields, issuing.sign(USER_CONTEXT + unsigned.tbs_bytes()))


def verify_user(
    issuing: ClinicKeyCertificate,
    cert: UserCertificate,
    now_ms: int,
    *,
    allowed_roles: Collection[Role] | None = None,
) -> None:
    """Check a user certificate against an already verified clinic issuing-key certificate.

    The issuer is checked before the signature (WRONG_ISSUER rather than BAD_SIGNATURE when the
    certificate names another key, or `issuing` is not an ISSUING key); then the validity window
    at `now_ms`; then, if given, that the role is one of `allowed_roles` (WRONG_ROLE).
    """
    if issuing.purpose is not ClinicKeyPurpose.ISSUING:
        raise CertificateError(
            CertificateFailure.WRONG_ISSUER,
            SUBJECT_USER,
            f"signed by a {issuing.purpose.value} key, not an issuing key",
        )
    if cert.issuer_key_hash != key_hash(issuing.key):
        raise CertificateError(
            CertificateFailure.WRONG_ISSUER, SUBJECT_USER, "issued by another key"
        )
    _check_signed(issuing.key, USER_CONTEXT, cert.tbs_bytes(), cert.signature, SUBJECT_USER)
    _check_validity(cert.not_before_ms, cert.not_after_ms, now_ms, SUBJECT_USER)
    if allowed_roles is not None and cert.role not in allowed_roles:
        raise CertificateError(
            CertificateFailure.WRONG_ROLE, SUBJECT_USER, f"role {cert.role.value} not allowed"
        )


# --- device certificates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceCertificate(_Signed):
    """A user's identity key's statement that this device (signing + DH key) is theirs."""

    user_id: str
    device_id: str
    signing_key: VerifyKey
    dh_key: DHPublicKey
    created_at_ms: int
    identity_key_hash: bytes
    signature: bytes

    def __post_init__(self) -> None:
        check_id(self.user_id, "user id")
        check_id(self.device_id, "device id")
        _check_u64(self.created_at_ms, "created_at_ms")
        _check_hash(self.identity_key_hash, "identity key hash")
        _check_signature(self.signature)

    def tbs_bytes(self) -> bytes:
        return (
            Writer()
            .u8(DEVICE_CERTIFICATE_VERSION)
            .text(self.user_id, MAX_ID_BYTES)
            .text(self.device_id, MAX_ID_BYTES)
            .fixed(self.signing_key.encode(), ENCODED_KEY_SIZE)
            .fixed(self.dh_key.encode(), ENCODED_KEY_SIZE)
            .u64(self.created_at_ms)
            .fixed(self.identity_key_hash, HASH_SIZE)
            .to_bytes()
        )

    @classmethod
    def decode(cls, data: bytes) -> DeviceCertificate:
        def parse(reader: Reader) -> DeviceCertificate:
            reader.version(DEVICE_CERTIFICATE_VERSION)
            return cls(
                user_id=reader.text(MAX_ID_BYTES),
                device_id=reader.text(MAX_ID_BYTES),
                signing_key=VerifyKey.decode(reader.fixed(ENCODED_KEY_SIZE)),
                dh_key=DHPublicKey.decode(reader.fixed(ENCODED_KEY_SIZE)),
                created_at_ms=reader.u64(),
                identity_key_hash=reader.fixed(HASH_SIZE),
                signature=reader.fixed(SIGNATURE_SIZE),
            )

        return _decode(data, SUBJECT_DEVICE, MAX_DEVICE_CERTIFICATE_BYTES, parse)


def issue_device_certificate(
    identity: SigningKey,
    *,
    user_id: str,
    device_id: str,
    signing_key: VerifyKey,
    dh_key: DHPublicKey,
    created_at_ms: int,
) -> DeviceCertificate:
    """Certify a device's keys with the user's identity key."""
    fields = (user_id, device_id, signing_key, dh_key, created_at_ms, key_hash(identity.verify_key))
    unsigned = DeviceCertificate(*fields, bytes(SIGNATURE_SIZE))
    return DeviceCertificate(*fields, identity.sign(DEVICE_CONTEXT + unsigned.tbs_bytes()))


def verify_device(user: UserCertificate, cert: DeviceCertificate) -> DeviceIdentity:
    """Check a device certificate against an already verified user certificate.

    Another user's device fails with WRONG_SUBJECT; a device certified by another identity key of
    the same user (say, one rotated away) with WRONG_ISSUER; a forgery with BAD_SIGNATURE.
    """
    if cert.user_id != user.user_id:
        raise CertificateError(
            CertificateFailure.WRONG_SUBJECT, SUBJECT_DEVICE, "belongs to another user"
        )
    if cert.identity_key_hash != key_hash(user.identity_key):
        raise CertificateError(
            CertificateFailure.WRONG_ISSUER, SUBJECT_DEVICE, "certified by another identity key"
        )
    _check_signed(
        user.identity_key, DEVICE_CONTEXT, cert.tbs_bytes(), cert.signature, SUBJECT_DEVICE
    )
    return DeviceIdentity(
        user_id=cert.user_id,
        device_id=cert.device_id,
        signing_key=cert.signing_key,
        dh_key=cert.dh_key,
        certificate_hash=cert.hash(),
    )


# --- whole chains ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedDevice:
    """A device whose whole chain (root → issuing key → user → device) verified."""

    device: DeviceIdentity
    role: Role
    display_name: str
    specialty: str
    department: str
    user_certificate: UserCertificate

    @property
    def user_id(self) -> str:
        return self.device.user_id


def verify_device_chain(
    root_key: VerifyKey,
    clinic_key_cert: ClinicKeyCertificate,
    user_cert: UserCertificate,
    device_cert: DeviceCertificate,
    now_ms: int,
    *,
    allowed_roles: Collection[Role] | None = None,
) -> VerifiedDevice:
    """Verify the full chain from the clinic root key down to one device, as of `now_ms`."""
    verify_clinic_key(root_key, clinic_key_cert, ClinicKeyPurpose.ISSUING, now_ms)
    verify_user(clinic_key_cert, user_cert, now_ms, allowed_roles=allowed_roles)
    device = verify_device(user_cert, device_cert)
    return VerifiedDevice(
        device=device,
        role=user_cert.role,
        display_name=user_cert.display_name,
        specialty=user_cert.specialty,
        department=user_cert.department,
        user_certificate=user_cert,
    )
