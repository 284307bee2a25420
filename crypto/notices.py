"""Signed clinic notices: the replies the server itself sends to a patient.

A notice is the clinic speaking, not a clinician: the automatic reply when a clinician is outside
their hours ("your message will be read at ..."), and the urgent-path notices when a patient's
urgent message either reached the on-call clinician or found nobody on call (then: call the
emergency numbers). The server builds it from a template and signs it with the clinic's online
ISSUING key, the key the clinic root certified (`ClinicKeyCertificate`, purpose ISSUING); the
client checks it against its `ClinicTrust` before showing it, so an urgent-path instruction on a
patient's screen ("nobody is on call: call 112") is provably the clinic's: nobody without the
issuing key can invent one or change its text, times or numbers.

A notice carries no health data: only ids (clinic, patient, clinician written to, on-call
clinician), the id of the message that caused it, times, the time zone to show them in, the
clinic's rendered template text and the emergency numbers. It is not end-to-end encrypted
content and never quotes the patient's message.

The recipient and the causing message id are inside the signature: a notice is a statement to one
patient about one message, so it cannot be replayed to another patient (who would be told, say,
that their urgent message reached someone) or passed off as the answer to a different message.
`verify` takes the recipient the client expects (its own user id); matching `in_reply_to` to a
message the client actually sent is the client's check.

    sig          = Ed25519_issuing(b"MEDRELAY/v1/clinic-notice\\x00" ‖ tbs)
    tbs          = u8 version | u8 kind | text clinic_id | text recipient | text clinician
                   | in_reply_to[16] | u64 issued_at_ms | bool, u64 reads_at_ms?
                   | text time_zone | text text | u8 n, then n emergency numbers as text (0..8)
                   | bool, text on_call? | issuer_key_hash[32]
    ClinicNotice = tbs ‖ sig[64]

Invalid values raise `ValueError`; `decode` turns every failure into `MalformedEncoding` and
`verify` every refusal into a `ProofError` with a one-line reason.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from medrelay.crypto.certificates import (
    ClinicKeyPurpose,
    key_hash,
    verify_clinic_key,
)
from medrelay.crypto.content import ID_SIZE
from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import BadSignature, CertificateError, MalformedEncoding, ProofError
from medrelay.crypto.identity import MAX_ID_BYTES, check_id
from medrelay.crypto.keys import SIGNATURE_SIZE, SigningKey
from medrelay.crypto.transparency import ClinicTrust

NOTICE_VERSION: Final = 1
NOTICE_CONTEXT: Final = b"MEDRELAY/v1/clinic-notice\x00"
HASH_SIZE: Final = 32
MESSAGE_ID_SIZE: Final = ID_SIZE
MAX_TIME_ZONE_BYTES: Final = 64
MAX_TEXT_BYTES: Final = 1000
MAX_EMERGENCY_NUMBERS: Final = 8
MAX_NUMBER_CHARS: Final = 16
_NUMBER_CHARS: Final = frozenset("0123456789+ -")
_U64_MAX: Final = 2**64 - 1

# Upper bound of an encoding, checked before any parsing (well under 4 KiB).
_TEXT_PREFIX = 4
MAX_NOTICE_BYTES: Final = (
    1
    + 1
    + 3 * (_TEXT_PREFIX + MAX_ID_BYTES)
    + MESSAGE_ID_SIZE
    + 8
    + 1
    + 8
    + (_TEXT_PREFIX + MAX_TIME_ZONE_BYTES)
    + (_TEXT_PREFIX + MAX_TEXT_BYTES)
    + 1
    + MAX_EMERGENCY_NUMBERS * (_TEXT_PREFIX + MAX_NUMBER_CHARS)
    + 1
    + (_TEXT_PREFIX + MAX_ID_BYTES)
    + HASH_SIZE
    + SIGNATURE_SIZE
)


class NoticeKind(enum.Enum):
    AUTO_REPLY = "auto_reply"
    """The clinician is outside their hours: when they will read the message."""
    URGENT_ROUTED = "urgent_routed"
    """An urgent message reached the on-call clinician `on_call`."""
    URGENT_UNROUTED = "urgent_unrouted"
    """An urgent message, but nobody is on call: call the emergency numbers."""


# Wire codes: fixed forever.
_KIND_CODES: Final = {
    NoticeKind.AUTO_REPLY: 1,
    NoticeKind.URGENT_ROUTED: 2,
    NoticeKind.URGENT_UNROUTED: 3,
}
_KINDS_BY_CODE: Final = {code: kind for kind, code in _KIND_CODES.items()}


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _is_surrogate(char: str) -> bool:
    return 0xD800 <= ord(char) <= 0xDFFF


def _check_u64(value: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} must fit in 64 unsigned bits")


def _check_fixed(value: bytes, size: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{what} must be {size} bytes")


def _check_time_zone(value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError("time zone must be a non-empty str")
    # isprintable() is False for control, format, surrogate and non-ASCII space characters.
    if not value.isprintable():
        raise ValueError("time zone contains control or non-printable characters")
    if len(value.encode("utf-8")) > MAX_TIME_ZONE_BYTES:
        raise ValueError(f"time zone is longer than {MAX_TIME_ZONE_BYTES} bytes")


def _check_text(value: str) -> None:
    if not isinstance(value, str):
        raise ValueError("notice text must be a str")
    if any((_is_control(c) and c != "\n") or _is_surrogate(c) for c in value):
        raise ValueError("notice text contains control characters (only newlines are allowed)")
    if len(value.encode("utf-8")) > MAX_TEXT_BYTES:
        raise ValueError(f"notice text is longer than {MAX_TEXT_BYTES} bytes")


def _check_numbers(numbers: tuple[str, ...]) -> None:
    if not isinstance(numbers, tuple):
        raise ValueError("emergency numbers must be a tuple")
    if len(numbers) > MAX_EMERGENCY_NUMBERS:
        raise ValueError(f"a notice has at most {MAX_EMERGENCY_NUMBERS} emergency numbers")
    for number in numbers:
        if (
            not isinstance(number, str)
            or not 1 <= len(number) <= MAX_NUMBER_CHARS
            or not set(number) <= _NUMBER_CHARS
            or not any(c.isdigit() for c in number)
        ):
            raise ValueError(
                f"emergency number {number!r} must be 1 to {MAX_NUMBER_CHARS} characters of"
                " digits, '+', ' ' and '-', with at least one digit"
            )


@dataclass(frozen=True, slots=True)
class ClinicNotice:
    """A clinic issuing key's notice to one patient about one of their messages."""

    kind: NoticeKind
    clinic_id: str
    recipient: str
    """The patient's user id: a notice is only ever valid for them."""
    clinician: str
    """The clinician the patient wrote to."""
    in_reply_to: bytes
    """The 16-byte id of the message that caused the notice."""
    issued_at_ms: int
    reads_at_ms: int | None
    """When the clinician will read the message (their next opening); None if unknown."""
    time_zone: str
    """The IANA zone the client shows times in (the patient's)."""
    text: str
    """The rendered template: plain text, newlines allowed."""
    emergency_numbers: tuple[str, ...]
    on_call: str | None
    """URGENT_ROUTED only: the on-call clinician's user id."""
    issuer_key_hash: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kind, NoticeKind):
            raise ValueError("kind must be a NoticeKind")
        check_id(self.clinic_id, "clinic id")
        check_id(self.recipient, "recipient user id")
        check_id(self.clinician, "clinician user id")
        _check_fixed(self.in_reply_to, MESSAGE_ID_SIZE, "in_reply_to message id")
        _check_u64(self.issued_at_ms, "issued_at_ms")
        if self.reads_at_ms is not None:
            _check_u64(self.reads_at_ms, "reads_at_ms")
        _check_time_zone(self.time_zone)
        _check_text(self.text)
        _check_numbers(self.emergency_numbers)
        if self.kind is NoticeKind.URGENT_ROUTED:
            if self.on_call is None:
                raise ValueError("an urgent_routed notice must name the on-call clinician")
            check_id(self.on_call, "on-call user id")
        elif self.on_call is not None:
            raise ValueError(f"a {self.kind.value} notice must not name an on-call clinician")
        _check_fixed(self.issuer_key_hash, HASH_SIZE, "issuer key hash")
        _check_fixed(self.signature, SIGNATURE_SIZE, "signature")

    def tbs_bytes(self) -> bytes:
        writer = (
            Writer()
            .u8(NOTICE_VERSION)
            .u8(_KIND_CODES[self.kind])
            .text(self.clinic_id, MAX_ID_BYTES)
            .text(self.recipient, MAX_ID_BYTES)
            .text(self.clinician, MAX_ID_BYTES)
            .fixed(self.in_reply_to, MESSAGE_ID_SIZE)
            .u64(self.issued_at_ms)
            .boolean(self.reads_at_ms is not None)
        )
        if self.reads_at_ms is not None:
            writer.u64(self.reads_at_ms)
        writer.text(self.time_zone, MAX_TIME_ZONE_BYTES).text(self.text, MAX_TEXT_BYTES)
        writer.u8(len(self.emergency_numbers))
        for number in self.emergency_numbers:
            writer.text(number, MAX_NUMBER_CHARS)
        writer.boolean(self.on_call is not None)
        if self.on_call is not None:
            writer.text(self.on_call, MAX_ID_BYTES)
        return writer.fixed(self.issuer_key_hash, HASH_SIZE).to_bytes()

    def encode(self) -> bytes:
        return self.tbs_bytes() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> ClinicNotice:
        if not isinstance(data, bytes):
            raise MalformedEncoding("clinic notice must be bytes")
        if len(data) > MAX_NOTICE_BYTES:
            raise MalformedEncoding(f"clinic notice is longer than {MAX_NOTICE_BYTES} bytes")
        reader = Reader(data, "clinic notice")
        try:
            reader.version(NOTICE_VERSION)
            code = reader.u8()
            if code not in _KINDS_BY_CODE:
                raise MalformedEncoding(f"unknown clinic notice kind {code}")
            clinic_id = reader.text(MAX_ID_BYTES)
            recipient = reader.text(MAX_ID_BYTES)
            clinician = reader.text(MAX_ID_BYTES)
            in_reply_to = reader.fixed(MESSAGE_ID_SIZE)
            issued_at_ms = reader.u64()
            reads_at_ms = reader.u64() if reader.boolean() else None
            time_zone = reader.text(MAX_TIME_ZONE_BYTES)
            text = reader.text(MAX_TEXT_BYTES)
            count = reader.u8()
            if count > MAX_EMERGENCY_NUMBERS:
                raise MalformedEncoding(f"clinic notice has {count} emergency numbers")
            numbers = tuple(reader.text(MAX_NUMBER_CHARS) for _ in range(count))
            on_call = reader.text(MAX_ID_BYTES) if reader.boolean() else None
            notice = cls(
                _KINDS_BY_CODE[code],
                clinic_id,
                recipient,
                clinician,
                in_reply_to,
                issued_at_ms,
                reads_at_ms,
                time_zone,
                text,
                numbers,
                on_call,
                reader.fixed(HASH_SIZE),
                reader.fixed(SIGNATURE_SIZE),
            )
            reader.finish()
        except ValueError as exc:
            raise MalformedEncoding(f"clinic notice: {exc}") from None
        return notice

    def verify(self, trust: ClinicTrust, *, recipient: str) -> None:
        """Check that this clinic's issuing key, valid at `issued_at_ms`, signed this notice for
        `recipient` (the user id of whoever is about to show it). Raises `ProofError`."""
        if self.clinic_id != trust.clinic_id:
            raise ProofError("notice is from another clinic")
        if self.recipient != recipient:
            raise ProofError("notice is addressed to another user")
        issuing = trust.issuing_certificate(self.issuer_key_hash)
        if issuing.clinic_id != self.clinic_id:
            raise ProofError("notice's issuing key is certified for another clinic")
        try:
            # Root signature, ISSUING purpose, and the window at the notice's own issue time.
            verify_clinic_key(trust.root_key, issuing, ClinicKeyPurpose.ISSUING, self.issued_at_ms)
        except CertificateError as exc:
            raise ProofError(
                f"notice's issuing key was not valid when it was issued ({exc})"
            ) from None
        try:
            issuing.key.verify(NOTICE_CONTEXT + self.tbs_bytes(), self.signature)
        except BadSignature:
            raise ProofError("notice signature does not verify") from None


def issue_notice(
    issuing: SigningKey,
    *,
    kind: NoticeKind,
    clinic_id: str,
    recipient: str,
    clinician: str,
    in_reply_to: bytes,
    issued_at_ms: int,
    reads_at_ms: int | None,
    time_zone: str,
    text: str,
    emergency_numbers: Sequence[str],
    on_call: str | None = None,
) -> ClinicNotice:
    """Sign a notice with the clinic's online issuing key."""
    if isinstance(emergency_numbers, str):
        raise ValueError("emergency numbers must be a sequence of numbers, not one str")
    fields = (
        kind,
        clinic_id,
        recipient,
        clinician,
        in_reply_to,
        issued_at_ms,
        reads_at_ms,
        time_zone,
        text,
        tuple(emergency_numbers),
        on_call,
        key_hash(issuing.verify_key),
    )
    unsigned = ClinicNotice(*fields, bytes(SIGNATURE_SIZE))
    return ClinicNotice(*fields, issuing.sign(NOTICE_CONTEXT + unsigned.tbs_bytes()))
