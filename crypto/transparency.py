"""The identity transparency log's events, and how clients and auditors replay them
(notes/crypto.md §7.2).

Every certificate event is one leaf of an RFC 9162 Merkle log (`medrelay.crypto.merkle`) whose
tree heads the clinic's log key signs as C2SP checkpoints (`medrelay.crypto.checkpoint`). An
event names its *subject* (a user id, or "" for the clinic's own keys), carries that subject's
sequence number and the hash of the subject's previous event, so each user's history is a hash
chain inside the global log: a server that omits, reorders or forks a user's history breaks the
chain or the log's consistency, and either is detectable.

    LogEvent = u8 version | u8 kind | text subject | u64 seq | bool, previous_hash[32]?
               | u64 time_ms | blob payload

The payload is a signed statement, so the log itself never has to be trusted for content:

    kind                   payload                      signed by
    user_certified         UserCertificate              a clinic issuing key
    device_added           DeviceCertificate            the user's identity key
    device_revoked         Revocation (device id set)   a clinic issuing key
    user_revoked           Revocation (device id "")    a clinic issuing key
    clinic_key_certified   ClinicKeyCertificate         the clinic root key

`replay_user_events` is what a client runs before it uses anyone's keys: it checks the chain and
every signature and returns the user's state (current certificate, active devices, revoked or
not). `ClinicTrust` is the set of clinic keys a client accepts: the pinned root key and every
online key the root certified, so clients follow a rotation of the issuing or log key without
losing trust. Every refusal is a `ProofError` with a one-line reason.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from medrelay.crypto import merkle
from medrelay.crypto.certificates import (
    ClinicKeyCertificate,
    ClinicKeyPurpose,
    DeviceCertificate,
    UserCertificate,
    key_hash,
    verify_clinic_key,
    verify_device,
    verify_user,
)
from medrelay.crypto.checkpoint import Checkpoint, NoteVerifier, open_note
from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import (
    BadSignature,
    CertificateError,
    CryptoError,
    InvalidKey,
    MalformedEncoding,
    ProofError,
)
from medrelay.crypto.identity import MAX_ID_BYTES, check_id
from medrelay.crypto.kdf import sha256
from medrelay.crypto.keys import SIGNATURE_SIZE, SigningKey, VerifyKey

EVENT_VERSION: Final = 1
REVOCATION_VERSION: Final = 1
REVOCATION_CONTEXT: Final = b"MEDRELAY/v1/revocation\x00"
HASH_SIZE: Final = 32
MAX_PAYLOAD_BYTES: Final = 4096
MAX_EVENT_BYTES: Final = 1 + 1 + 4 + MAX_ID_BYTES + 8 + 1 + HASH_SIZE + 8 + 4 + MAX_PAYLOAD_BYTES
CLINIC_SUBJECT: Final = ""
"""The subject of events about the clinic's own keys."""
_U64_MAX: Final = 2**64 - 1


class EventKind(enum.Enum):
    USER_CERTIFIED = "user_certified"
    DEVICE_ADDED = "device_added"
    DEVICE_REVOKED = "device_revoked"
    USER_REVOKED = "user_revoked"
    CLINIC_KEY_CERTIFIED = "clinic_key_certified"


# Wire codes: fixed forever.
_KIND_CODES: Final = {
    EventKind.USER_CERTIFIED: 1,
    EventKind.DEVICE_ADDED: 2,
    EventKind.DEVICE_REVOKED: 3,
    EventKind.USER_REVOKED: 4,
    EventKind.CLINIC_KEY_CERTIFIED: 5,
}
_KINDS_BY_CODE: Final = {code: kind for kind, code in _KIND_CODES.items()}


def log_origin(clinic_id: str) -> str:
    """The checkpoint origin (and log key name) of a clinic's identity log."""
    return f"medrelay/{clinic_id}/identity-log"


def _decode_with(data: bytes, what: str, max_len: int) -> Reader:
    if not isinstance(data, bytes):
        raise MalformedEncoding(f"{what} must be bytes")
    if len(data) > max_len:
        raise MalformedEncoding(f"{what} is longer than {max_len} bytes")
    return Reader(data, what)


# --- revocations --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revocation:
    """A clinic issuing key's statement that a device (or, with device_id "", the whole account)
    is revoked as of `revoked_at_ms`."""

    user_id: str
    device_id: str
    revoked_at_ms: int
    issuer_key_hash: bytes
    signature: bytes

    def __post_init__(self) -> None:
        check_id(self.user_id, "revoked user id")
        if self.device_id:
            check_id(self.device_id, "revoked device id")
        if not 0 <= self.revoked_at_ms <= _U64_MAX:
            raise ValueError("revocation time must fit in 64 unsigned bits")
        if len(self.issuer_key_hash) != HASH_SIZE or len(self.signature) != SIGNATURE_SIZE:
            raise ValueError("revocation issuer hash or signature has the wrong size")

    def tbs_bytes(self) -> bytes:
        return (
            Writer()
            .u8(REVOCATION_VERSION)
            .text(self.user_id, MAX_ID_BYTES)
            .text(self.device_id, MAX_ID_BYTES)
            .u64(self.revoked_at_ms)
            .fixed(self.issuer_key_hash, HASH_SIZE)
            .to_bytes()
        )

    def encode(self) -> bytes:
        return self.tbs_bytes() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> Revocation:
        reader = _decode_with(data, "revocation", 512)
        try:
            reader.version(REVOCATION_VERSION)
            revocation = cls(
                reader.text(MAX_ID_BYTES),
                reader.text(MAX_ID_BYTES),
                reader.u64(),
                reader.fixed(HASH_SIZE),
                reader.fixed(SIGNATURE_SIZE),
            )
            reader.finish()
        except ValueError as exc:
            raise MalformedEncoding(f"revocation: {exc}") from None
        return revocation

    def verify(self, issuing: ClinicKeyCertificate) -> None:
        if self.issuer_key_hash != key_hash(issuing.key):
            raise ProofError("revocation is signed by another key than the one it names")
        try:
            issuing.key.verify(REVOCATION_CONTEXT + self.tbs_bytes(), self.signature)
        except BadSignature:
            raise ProofError("revocation signature does not verify") from None


def issue_revocation(
    issuing: SigningKey, *, user_id: str, device_id: str, revoked_at_ms: int
) -> Revocation:
    unsigned = Revocation(
        user_id, device_id, revoked_at_ms, key_hash(issuing.verify_key), bytes(SIGNATURE_SIZE)
    )
    signature = issuing.sign(REVOCATION_CONTEXT + unsigned.tbs_bytes())
    return Revocation(user_id, device_id, revoked_at_ms, unsigned.issuer_key_hash, signature)


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One leaf of the identity log."""

    kind: EventKind
    subject: str
    seq: int
    previous_hash: bytes | None
    """The `hash()` of the subject's event `seq - 1`; None exactly for seq 0."""
    time_ms: int
    payload: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, EventKind):
            raise ValueError("kind must be an EventKind")
        if (self.subject == CLINIC_SUBJECT) != (self.kind is EventKind.CLINIC_KEY_CERTIFIED):
            raise ValueError("clinic key events, and only they, have the clinic as subject")
        if self.subject:
            check_id(self.subject, "event subject")
        if not 0 <= self.seq <= _U64_MAX or not 0 <= self.time_ms <= _U64_MAX:
            raise ValueError("event seq and time must fit in 64 unsigned bits")
        if (self.seq == 0) != (self.previous_hash is None):
            raise ValueError("an event has a previous hash exactly when its seq is not 0")
        if self.previous_hash is not None and len(self.previous_hash) != HASH_SIZE:
            raise ValueError(f"previous hash must be {HASH_SIZE} bytes")
        if not isinstance(self.payload, bytes) or not 0 < len(self.payload) <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload must be 1 to {MAX_PAYLOAD_BYTES} bytes")

    def encode(self) -> bytes:
        writer = (
            Writer()
            .u8(EVENT_VERSION)
            .u8(_KIND_CODES[self.kind])
            .text(self.subject, MAX_ID_BYTES)
            .u64(self.seq)
            .boolean(self.previous_hash is not None)
        )
        if self.previous_hash is not None:
            writer.fixed(self.previous_hash, HASH_SIZE)
        return writer.u64(self.time_ms).blob(self.payload, MAX_PAYLOAD_BYTES).to_bytes()

    @classmethod
    def decode(cls, data: bytes) -> LogEvent:
        reader = _decode_with(data, "log event", MAX_EVENT_BYTES)
        try:
            reader.version(EVENT_VERSION)
            code = reader.u8()
            if code not in _KINDS_BY_CODE:
                raise MalformedEncoding(f"unknown log event kind {code}")
            subject = reader.text(MAX_ID_BYTES)
            seq = reader.u64()
            previous = reader.fixed(HASH_SIZE) if reader.boolean() else None
            event = cls(
                _KINDS_BY_CODE[code],
                subject,
                seq,
                previous,
                reader.u64(),
                reader.blob(MAX_PAYLOAD_BYTES),
            )
            reader.finish()
        except ValueError as exc:
            raise MalformedEncoding(f"log event: {exc}") from None
        return event

    def hash(self) -> bytes:
        """What the subject's next event names as `previous_hash`."""
        return sha256(self.encode())

    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.encode())


def next_event(
    previous: LogEvent | None, kind: EventKind, subject: str, time_ms: int, payload: bytes
) -> LogEvent:
    """The subject's next event after `previous` (None for its first)."""
    if previous is None:
        return LogEvent(kind, subject, 0, None, time_ms, payload)
    if previous.subject != subject:
        raise ValueError("the previous event is another subject's")
    return LogEvent(kind, subject, previous.seq + 1, previous.hash(), time_ms, payload)


# --- what a client trusts -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClinicTrust:
    """The pinned clinic root key and the online keys it certified (current and retired)."""

    clinic_id: str
    root_key: VerifyKey
    issuing: tuple[ClinicKeyCertificate, ...]
    log: tuple[ClinicKeyCertificate, ...]

    @classmethod
    def build(
        cls, clinic_id: str, root_key: VerifyKey, certificates: Iterable[ClinicKeyCertificate]
    ) -> ClinicTrust:
        """Keep the certificates the root key signed for this clinic (each checked at its own
        start time: expiry is checked when a key is used, against that use's time)."""
        issuing: dict[bytes, ClinicKeyCertificate] = {}
        log: dict[bytes, ClinicKeyCertificate] = {}
        for cert in certificates:
            if cert.clinic_id != clinic_id:
                raise ProofError("a clinic key certificate names another clinic")
            try:
                verify_clinic_key(root_key, cert, cert.purpose, cert.not_before_ms)
            except CertificateError as exc:
                raise ProofError(f"a clinic key certificate does not verify ({exc})") from None
            target = issuing if cert.purpose is ClinicKeyPurpose.ISSUING else log
            target.setdefault(key_hash(cert.key), cert)
        return cls(clinic_id, root_key, tuple(issuing.values()), tuple(log.values()))

    def issuing_certificate(self, issuer_key_hash: bytes) -> ClinicKeyCertificate:
        for cert in self.issuing:
            if key_hash(cert.key) == issuer_key_hash:
                return cert
        raise ProofError("signed by an issuing key the clinic root never certified")

    def log_verifiers(self) -> tuple[NoteVerifier, ...]:
        origin = log_origin(self.clinic_id)
        return tuple(NoteVerifier(origin, cert.key) for cert in self.log)

    def open_checkpoint(self, note: str | bytes) -> Checkpoint:
        """Open a checkpoint signed by any log key the root certified."""
        if not self.log:
            raise ProofError("no log key is known for this clinic")
        text, _ = open_note(note, self.log_verifiers())
        checkpoint = Checkpoint.from_body(text)
        if checkpoint.origin != log_origin(self.clinic_id):
            raise ProofError("checkpoint is for another log (its origin differs)")
        return checkpoint


# --- replaying a user's history ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserState:
    """What a user's verified event chain says now."""

    user_id: str
    certificate: UserCertificate
    devices: dict[str, DeviceCertificate]
    """The active devices (added and not revoked), by device id."""
    revoked: bool
    events: int
    head_hash: bytes
    """`hash()` of the user's last event: pins the history seen so far."""


def replay_user_events(user_id: str, events: Sequence[LogEvent], trust: ClinicTrust) -> UserState:
    """Check a user's whole event chain (seq 0 onwards) and every signature in it; return the
    state it leads to. Raises `ProofError` naming the first event that is wrong."""
    if not events:
        raise ProofError(f"the log has no events for {user_id}")
    certificate: UserCertificate | None = None
    devices: dict[str, DeviceCertificate] = {}
    revoked = False
    previous: LogEvent | None = None
    for position, event in enumerate(events):
        where = f"event {position} of {user_id}"
        if event.subject != user_id:
            raise ProofError(f"{where} is about another subject")
        if event.seq != position:
            raise ProofError(f"{where} has seq {event.seq} (an event is missing or repeated)")
        if previous is not None and event.previous_hash != previous.hash():
            raise ProofError(f"{where} does not chain to the event before it")
        if previous is not None and event.time_ms < previous.time_ms:
            raise ProofError(f"{where} is older than the event before it")
        if revoked:
            raise ProofError(f"{where} follows the revocation of the account")
        try:
            certificate = _apply(event, certificate, devices, trust)
        except (CryptoError, ValueError) as exc:
            raise ProofError(f"{where} ({event.kind.value}) does not verify: {exc}") from None
        revoked = event.kind is EventKind.USER_REVOKED
        previous = event
    if certificate is None or previous is None:  # unreachable: the loop ran at least once
        raise ProofError(f"the log has no events for {user_id}")
    return UserState(user_id, certificate, devices, revoked, len(events), previous.hash())


def _apply(
    event: LogEvent,
    certificate: UserCertificate | None,
    devices: dict[str, DeviceCertificate],
    trust: ClinicTrust,
) -> UserCertificate:
    """Apply one event to the state (mutating `devices`); returns the user certificate."""
    if event.kind is EventKind.USER_CERTIFIED:
        cert = UserCertificate.decode(event.payload)
        if cert.user_id != event.subject:
            raise ProofError("the certificate is another user's")
        verify_user(trust.issuing_certificate(cert.issuer_key_hash), cert, event.time_ms)
        if certificate is not None:
            if cert.previous_certificate_hash != certificate.hash():
                raise ProofError("a new certificate does not name the one it replaces")
            if cert.identity_key != certificate.identity_key:
                devices.clear()  # certified by the old identity key: they must be added again
        elif cert.previous_certificate_hash is not None:
            raise ProofError("the first certificate names a predecessor")
        return cert
    if certificate is None:
        raise ProofError("the chain does not start with a user certificate")
    if event.kind is EventKind.DEVICE_ADDED:
        device = DeviceCertificate.decode(event.payload)
        verify_device(certificate, device)
        if device.device_id in devices:
            raise ProofError(f"device {device.device_id} is added twice")
        devices[device.device_id] = device
    elif event.kind in (EventKind.DEVICE_REVOKED, EventKind.USER_REVOKED):
        revocation = Revocation.decode(event.payload)
        revocation.verify(trust.issuing_certificate(revocation.issuer_key_hash))
        if revocation.user_id != event.subject:
            raise ProofError("the revocation is about another user")
        whole_account = event.kind is EventKind.USER_REVOKED
        if whole_account != (revocation.device_id == ""):
            raise ProofError("the revocation's scope does not match the event kind")
        if whole_account:
            devices.clear()
        elif devices.pop(revocation.device_id, None) is None:
            raise ProofError(f"device {revocation.device_id} is revoked but not active")
    else:
        raise ProofError("a clinic key event in a user's chain")
    return certificate


# --- the whole log, as an auditor replays it --------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogAudit:
    size: int
    root_hash: bytes
    states: dict[str, UserState]
    """Every user's state after the whole log."""

    @property
    def users(self) -> int:
        return len(self.states)

    @property
    def active_devices(self) -> int:
        return sum(len(state.devices) for state in self.states.values())

    @property
    def revoked_users(self) -> int:
        return sum(state.revoked for state in self.states.values())


def audit_log(events: Iterable[bytes], trust: ClinicTrust) -> LogAudit:
    """Replay the whole log in leaf order: every event decodes, every subject's chain is intact
    and every signature verifies. Returns the size and root to compare with a checkpoint."""
    tree = merkle.MerkleTree()
    chains: dict[str, list[LogEvent]] = {}
    for index, data in enumerate(events):
        try:
            event = LogEvent.decode(data)
        except (MalformedEncoding, InvalidKey) as exc:
            raise ProofError(f"leaf {index} is not a log event ({exc})") from None
        tree.append(merkle.leaf_hash(data))
        chain = chains.setdefault(event.subject, [])
        # Cheap ordering checks per leaf (so the leaf is named); signatures once per chain below.
        if (event.seq, event.previous_hash) != next_event_seq(chain[-1] if chain else None):
            raise ProofError(f"leaf {index}: the chain of its subject is broken here")
        if event.kind is EventKind.CLINIC_KEY_CERTIFIED:
            _check_clinic_key_event(event, trust, index)
        chain.append(event)
    chains.pop(CLINIC_SUBJECT, None)
    states = {
        subject: replay_user_events(subject, chain, trust) for subject, chain in chains.items()
    }
    return LogAudit(size=tree.size, root_hash=tree.root(), states=states)


def next_event_seq(previous: LogEvent | None) -> tuple[int, bytes | None]:
    """The (seq, previous_hash) the event after `previous` must carry."""
    return (0, None) if previous is None else (previous.seq + 1, previous.hash())


def _check_clinic_key_event(event: LogEvent, trust: ClinicTrust, index: int) -> None:
    try:
        cert = ClinicKeyCertificate.decode(event.payload)
        verify_clinic_key(trust.root_key, cert, cert.purpose, cert.not_before_ms)
    except CryptoError as exc:
        raise ProofError(
            f"leaf {index}: a clinic key certificate does not verify ({exc})"
        ) from None
    if cert.clinic_id != trust.clinic_id:
        raise ProofError(f"leaf {index}: a clinic key certificate names another clinic")
