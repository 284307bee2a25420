"""Record bundles: a visit's messages with everything needed to prove them later
(notes/crypto.md §9.8, "Mirroring into the medical record").

A doctor's client builds a `RecordBundle` from one thread and sends it, end-to-end encrypted, to
the clinic's records gateway. The gateway, or anyone years later, checks it with nothing but the
clinic id and the clinic root public key (`verify_record_bundle`): no server, no database, no
clock. The bundle carries

- the visit: visit id, indication code, opened/closed times, the patient and the clinician, and
  optionally the id of the message that is the visit's conclusion;
- the thread id, and the messages as the senders' devices signed them (`SignedContent` bytes,
  exactly what every recipient decrypted), ordered by sent time;
- a checkpoint of the identity log (a C2SP note signed by a clinic log key) and the clinic key
  certificates (issuing and log keys) the root signed;
- for every user who sent a message: that user's whole event chain from seq 0 (user
  certificates, devices, revocations), each event with its leaf index and an RFC 9162 inclusion
  proof against the checkpoint.

Verification, in order; the first failure is a `ProofError` with a one-line reason that names the
message (index and id, never its text), user or log event:

1. the clinic key certificates verify under the root key and name this clinic
   (`ClinicTrust.build`); the checkpoint is signed by one of its log keys, for this clinic's log;
2. every event is included in the checkpoint (`merkle.verify_inclusion`), leaf indices rise
   along each chain, and each chain replays (`replay_user_events`: seq, previous hashes, every
   certificate and revocation signature);
3. each message decodes, belongs to the bundle's thread, is sent by the patient or the clinician
   (certified as a patient, respectively a doctor or nurse) and addressed to the other one, lies
   within [opened_ms, closed_ms] (when closed), is not older than the message before it, and has
   a message id not seen before;
4. its sender device was certified in its user's chain, the chain root → issuing key → user
   certificate → device certificate is valid at the message's sent time
   (`verify_device_chain`), and the signature verifies (`verify_signed_content`);
5. the device was not revoked (nor its account, nor its identity key replaced) at or before the
   sent time, and the sender's log view, when present, neither includes the revocation's leaf nor
   is larger than the bundle's checkpoint;
6. each sender's messages chain: every message after the sender's first in the bundle names the
   previous one of the same sender as `previous_hash` (the first may point before the range);
7. the conclusion message id, when given, is one of the bundle's messages.

The visit header (visit id, indication, times, conclusion id) is not signed inside the bundle:
on its own it is the claim of whoever built it, checked only for consistency with the messages.
The bundle therefore travels as the attachment of a `record_bundle` message signed by the
clinician's device (clients/engine/record_messages.py): the signed attachment descriptor holds
the bundle's SHA-256, and the gateway compares that message's sender with `visit.clinician` and
keeps its signed content with the record.

What it cannot show: that the log holds no event of a sender *after* the last one in the bundle
(a log proves inclusion, not absence; the gateway checks the live log for that), that a stolen
device did not backdate `sent_at_ms` (step 5's log-view check narrows it), and that nothing was
sent after the last message or before the first one (only gaps between them are detected).

Canonical encoding (version 1), through `medrelay.crypto.encoding`:

    RecordBundle = u8 version | visit | thread_id[16] | blob checkpoint note
                   | u8 k, then k clinic key certificates as blobs (1..16)
                   | u8 u, then u UserEvidence (1..64) | u16 m, then m signed contents as blobs
                     (1..2,000)
    visit        = text visit_id | text indication_code | u64 opened_ms | bool, u64 closed_ms?
                   | text patient | text clinician | bool, conclusion_message_id[16]?
    UserEvidence = text user_id | u16 e, then e LoggedEvent (1..1,024)
    LoggedEvent  = u64 leaf_index | blob event | u8 p, then p hashes[32] (0..64)

A whole bundle is at most 64 MiB, checked before parsing. `decode` checks the outer structure;
the nested certificates, events and messages are decoded by `verify_record_bundle`, which turns
their failures into `ProofError`s too. Invalid values raise `ValueError`; `decode` turns every
failure into `MalformedEncoding`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from medrelay.crypto import merkle
from medrelay.crypto.certificates import (
    MAX_CLINIC_KEY_CERTIFICATE_BYTES,
    ClinicKeyCertificate,
    DeviceCertificate,
    Role,
    UserCertificate,
    VerifiedDevice,
    verify_device_chain,
)
from medrelay.crypto.checkpoint import MAX_NOTE_BYTES, Checkpoint
from medrelay.crypto.content import (
    ID_SIZE,
    MAX_SIGNED_CONTENT_BYTES,
    Content,
    SignedContent,
    content_hash,
    verify_signed_content,
)
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
from medrelay.crypto.keys import VerifyKey
from medrelay.crypto.transparency import (
    MAX_EVENT_BYTES,
    ClinicTrust,
    EventKind,
    LogEvent,
    Revocation,
    replay_user_events,
)

RECORD_BUNDLE_VERSION: Final = 1
HASH_SIZE: Final = merkle.HASH_SIZE
MAX_MESSAGES: Final = 2000
MAX_USERS: Final = 64
MAX_EVENTS_PER_USER: Final = 1024
MAX_CLINIC_KEYS: Final = 16
MAX_VISIT_ID_BYTES: Final = 128
MAX_INDICATION_CODE_BYTES: Final = 64
MAX_RECORD_BUNDLE_BYTES: Final = 64 * 1024 * 1024
_U64_MAX: Final = 2**64 - 1

CLINICIAN_ROLES: Final = frozenset({Role.DOCTOR, Role.NURSE})
# Keyed by "is the sender the visit's patient".
_ALLOWED_ROLES: Final = {True: frozenset({Role.PATIENT}), False: CLINICIAN_ROLES}


def _check_u64(value: int, what: str) -> None:
    if type(value) is not int or not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} must fit in 64 unsigned bits")


def _check_label(value: str, limit: int, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str")
    if not value.isprintable():
        raise ValueError(f"{what} contains control or non-printable characters")
    if len(value.encode("utf-8")) > limit:
        raise ValueError(f"{what} is longer than {limit} bytes")


def _check_bytes(value: object, limit: int, what: str) -> None:
    if not isinstance(value, bytes) or not 0 < len(value) <= limit:
        raise ValueError(f"{what} must be 1 to {limit} bytes")


@dataclass(frozen=True, slots=True)
class RecordVisit:
    """The visit a bundle documents: who, why, when, and which message concludes it."""

    visit_id: str
    indication_code: str
    opened_ms: int
    closed_ms: int | None
    patient: str
    clinician: str
    conclusion_message_id: bytes | None = None

    def __post_init__(self) -> None:
        _check_label(self.visit_id, MAX_VISIT_ID_BYTES, "visit id")
        _check_label(self.indication_code, MAX_INDICATION_CODE_BYTES, "indication code")
        _check_u64(self.opened_ms, "opened_ms")
        if self.closed_ms is not None:
            _check_u64(self.closed_ms, "closed_ms")
            if self.closed_ms < self.opened_ms:
                raise ValueError("a visit cannot close before it opened")
        check_id(self.patient, "patient user id")
        check_id(self.clinician, "clinician user id")
        if self.patient == self.clinician:
            raise ValueError("the patient and the clinician must be different users")
        if self.conclusion_message_id is not None and (
            not isinstance(self.conclusion_message_id, bytes)
            or len(self.conclusion_message_id) != ID_SIZE
        ):
            raise ValueError(f"conclusion message id must be {ID_SIZE} bytes")

    def contains(self, time_ms: int) -> bool:
        """Whether `time_ms` lies within the visit (an open visit has no end)."""
        return self.opened_ms <= time_ms and (self.closed_ms is None or time_ms <= self.closed_ms)

    def write(self, writer: Writer) -> None:
        writer.text(self.visit_id, MAX_VISIT_ID_BYTES)
        writer.text(self.indication_code, MAX_INDICATION_CODE_BYTES)
        writer.u64(self.opened_ms).boolean(self.closed_ms is not None)
        if self.closed_ms is not None:
            writer.u64(self.closed_ms)
        writer.text(self.patient, MAX_ID_BYTES).text(self.clinician, MAX_ID_BYTES)
        writer.boolean(self.conclusion_message_id is not None)
        if self.conclusion_message_id is not None:
            writer.fixed(self.conclusion_message_id, ID_SIZE)

    @classmethod
    def read(cls, reader: Reader) -> RecordVisit:
        visit_id = reader.text(MAX_VISIT_ID_BYTES)
        indication_code = reader.text(MAX_INDICATION_CODE_BYTES)
        opened_ms = reader.u64()
        closed_ms = reader.u64() if reader.boolean() else None
        patient = reader.text(MAX_ID_BYTES)
        clinician = reader.text(MAX_ID_BYTES)
        conclusion = reader.fixed(ID_SIZE) if reader.boolean() else None
        return cls(visit_id, indication_code, opened_ms, closed_ms, patient, clinician, conclusion)


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One identity-log event with where it is in the log and the proof that it is there."""

    leaf_index: int
    event: bytes = field(repr=False)
    """The event's encoding (`LogEvent.encode()`), the exact leaf data."""
    proof: tuple[bytes, ...] = field(repr=False)
    """Its RFC 9162 inclusion proof against the bundle's checkpoint."""

    def __post_init__(self) -> None:
        _check_u64(self.leaf_index, "leaf index")
        _check_bytes(self.event, MAX_EVENT_BYTES, "log event")
        if not isinstance(self.proof, tuple) or len(self.proof) > merkle.MAX_INCLUSION_PROOF_HASHES:
            raise ValueError(
                f"an inclusion proof is a tuple of at most {merkle.MAX_INCLUSION_PROOF_HASHES}"
                " hashes"
            )
        for item in self.proof:
            if not isinstance(item, bytes) or len(item) != HASH_SIZE:
                raise ValueError(f"inclusion proof hashes must be {HASH_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class UserEvidence:
    """A user's whole event chain (seq 0 onwards), each event proven in the checkpoint."""

    user_id: str
    events: tuple[LoggedEvent, ...]

    def __post_init__(self) -> None:
        check_id(self.user_id, "evidence user id")
        if not isinstance(self.events, tuple) or not 1 <= len(self.events) <= MAX_EVENTS_PER_USER:
            raise ValueError(f"a user's evidence has 1 to {MAX_EVENTS_PER_USER} events (a tuple)")
        if not all(isinstance(e, LoggedEvent) for e in self.events):
            raise ValueError("evidence events must be LoggedEvent values")


@dataclass(frozen=True, slots=True)
class RecordBundle:
    """A visit's messages with the evidence that proves them; see the module docstring."""

    visit: RecordVisit
    thread_id: bytes
    checkpoint_note: bytes = field(repr=False)
    clinic_keys: tuple[bytes, ...] = field(repr=False)
    """Encoded `ClinicKeyCertificate`s (issuing and log keys)."""
    evidence: tuple[UserEvidence, ...]
    messages: tuple[bytes, ...] = field(repr=False)
    """Encoded `SignedContent`s, ordered by sent time. Health data: never in repr."""

    def __post_init__(self) -> None:
        if not isinstance(self.visit, RecordVisit):
            raise ValueError("visit must be a RecordVisit")
        if not isinstance(self.thread_id, bytes) or len(self.thread_id) != ID_SIZE:
            raise ValueError(f"thread id must be {ID_SIZE} bytes")
        _check_bytes(self.checkpoint_note, MAX_NOTE_BYTES, "checkpoint note")
        if not isinstance(self.clinic_keys, tuple) or not 1 <= len(self.clinic_keys) <= (
            MAX_CLINIC_KEYS
        ):
            raise ValueError(f"a bundle has 1 to {MAX_CLINIC_KEYS} clinic key certificates")
        for cert in self.clinic_keys:
            _check_bytes(cert, MAX_CLINIC_KEY_CERTIFICATE_BYTES, "clinic key certificate")
        if not isinstance(self.evidence, tuple) or not 1 <= len(self.evidence) <= MAX_USERS:
            raise ValueError(f"a bundle has evidence for 1 to {MAX_USERS} users (a tuple)")
        if not all(isinstance(e, UserEvidence) for e in self.evidence):
            raise ValueError("evidence must be UserEvidence values")
        if not isinstance(self.messages, tuple) or not 1 <= len(self.messages) <= MAX_MESSAGES:
            raise ValueError(f"a bundle has 1 to {MAX_MESSAGES} messages (a tuple)")
        for message in self.messages:
            _check_bytes(message, MAX_SIGNED_CONTENT_BYTES, "signed message")

    def encode(self) -> bytes:
        writer = Writer().u8(RECORD_BUNDLE_VERSION)
        self.visit.write(writer)
        writer.fixed(self.thread_id, ID_SIZE).blob(self.checkpoint_note, MAX_NOTE_BYTES)
        writer.u8(len(self.clinic_keys))
        for cert in self.clinic_keys:
            writer.blob(cert, MAX_CLINIC_KEY_CERTIFICATE_BYTES)
        writer.u8(len(self.evidence))
        for evidence in self.evidence:
            writer.text(evidence.user_id, MAX_ID_BYTES).u16(len(evidence.events))
            for logged in evidence.events:
                writer.u64(logged.leaf_index).blob(logged.event, MAX_EVENT_BYTES)
                writer.u8(len(logged.proof))
                for item in logged.proof:
                    writer.fixed(item, HASH_SIZE)
        writer.u16(len(self.messages))
        for message in self.messages:
            writer.blob(message, MAX_SIGNED_CONTENT_BYTES)
        data = writer.to_bytes()
        if len(data) > MAX_RECORD_BUNDLE_BYTES:
            raise ValueError(
                f"record bundle is larger than {MAX_RECORD_BUNDLE_BYTES} bytes; split the visit"
            )
        return data

    @classmethod
    def decode(cls, data: bytes) -> RecordBundle:
        """Parse the outer structure strictly (bounded counts and sizes, no trailing bytes)."""
        if not isinstance(data, bytes):
            raise MalformedEncoding("record bundle must be bytes")
        if len(data) > MAX_RECORD_BUNDLE_BYTES:
            raise MalformedEncoding(f"record bundle is longer than {MAX_RECORD_BUNDLE_BYTES} bytes")
        reader = Reader(data, "record bundle")
        try:
            reader.version(RECORD_BUNDLE_VERSION)
            visit = RecordVisit.read(reader)
            thread_id = reader.fixed(ID_SIZE)
            note = reader.blob(MAX_NOTE_BYTES)
            key_count = _count(reader.u8(), 1, MAX_CLINIC_KEYS, "clinic key certificates")
            keys = tuple(reader.blob(MAX_CLINIC_KEY_CERTIFICATE_BYTES) for _ in range(key_count))
            user_count = _count(reader.u8(), 1, MAX_USERS, "users with evidence")
            evidence = tuple(_read_evidence(reader) for _ in range(user_count))
            message_count = _count(reader.u16(), 1, MAX_MESSAGES, "messages")
            messages = tuple(reader.blob(MAX_SIGNED_CONTENT_BYTES) for _ in range(message_count))
            reader.finish()
            return cls(visit, thread_id, note, keys, evidence, messages)
        except ValueError as exc:
            raise MalformedEncoding(f"record bundle: {exc}") from None


def _count(value: int, low: int, high: int, what: str) -> int:
    if not low <= value <= high:
        raise MalformedEncoding(f"record bundle: {value} {what} (allowed {low} to {high})")
    return value


def _read_evidence(reader: Reader) -> UserEvidence:
    user_id = reader.text(MAX_ID_BYTES)
    count = _count(reader.u16(), 1, MAX_EVENTS_PER_USER, f"log events for {user_id!r}")
    events = []
    for _ in range(count):
        leaf_index = reader.u64()
        event = reader.blob(MAX_EVENT_BYTES)
        hashes = _count(reader.u8(), 0, merkle.MAX_INCLUSION_PROOF_HASHES, "proof hashes")
        proof = tuple(reader.fixed(HASH_SIZE) for _ in range(hashes))
        events.append(LoggedEvent(leaf_index, event, proof))
    return UserEvidence(user_id, tuple(events))


def build_record_bundle(
    *,
    visit: RecordVisit,
    thread_id: bytes,
    checkpoint_note: str | bytes,
    clinic_keys: Iterable[ClinicKeyCertificate],
    evidence: Mapping[str, Iterable[tuple[int, LogEvent | bytes, Sequence[bytes]]]],
    messages: Iterable[SignedContent],
) -> RecordBundle:
    """Assemble a bundle: messages sorted by sent time (stable), users sorted by id, each user's
    events given as (leaf index, event, inclusion proof against `checkpoint_note`) in chain
    order. Nothing is verified here; `verify_record_bundle` is the check."""
    note = checkpoint_note.encode("utf-8") if isinstance(checkpoint_note, str) else checkpoint_note
    ordered = sorted(messages, key=lambda signed: signed.content.sent_at_ms)
    return RecordBundle(
        visit=visit,
        thread_id=thread_id,
        checkpoint_note=note,
        clinic_keys=tuple(cert.encode() for cert in clinic_keys),
        evidence=tuple(
            UserEvidence(
                user_id,
                tuple(
                    LoggedEvent(
                        index,
                        event.encode() if isinstance(event, LogEvent) else event,
                        tuple(proof),
                    )
                    for index, event, proof in evidence[user_id]
                ),
            )
            for user_id in sorted(evidence)
        ),
        messages=tuple(signed.encode() for signed in ordered),
    )


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedMessage:
    """One message whose signature, sender chain and place in the thread verified."""

    content: Content
    content_hash: bytes
    sender: VerifiedDevice

    @property
    def sender_device_id(self) -> str:
        return self.content.sender_device_id


@dataclass(frozen=True, slots=True)
class VerifiedRecord:
    """What `verify_record_bundle` proved: the visit and its messages in sent order."""

    visit: RecordVisit
    thread_id: bytes
    checkpoint: Checkpoint
    messages: tuple[VerifiedMessage, ...]


@dataclass(slots=True)
class _DeviceSpan:
    """When a device certificate was usable, from its user's verified chain."""

    certificate: DeviceCertificate
    user_certificates: list[tuple[int, UserCertificate]]
    """(event time, certificate) of the user certificates in force while the device was active,
    oldest first: the one it was added under, then renewals with the same identity key."""
    ended_ms: int | None = None
    ended_leaf: int | None = None
    ended_by: str = ""

    def end(self, time_ms: int, leaf: int, reason: str) -> None:
        self.ended_ms, self.ended_leaf, self.ended_by = time_ms, leaf, reason

    def user_certificate_at(self, time_ms: int) -> UserCertificate:
        """The newest certificate logged at or before `time_ms` (else the one it was added
        under: its own validity window then decides)."""
        chosen = self.user_certificates[0][1]
        for logged_ms, cert in self.user_certificates:
            if logged_ms <= time_ms:
                chosen = cert
        return chosen


def _device_spans(events: Sequence[tuple[int, LogEvent]]) -> dict[bytes, _DeviceSpan]:
    """Every device a (replayed, hence verified) chain certified, by certificate hash, with when
    it stopped being usable: its revocation, the account's, or an identity key replacement."""
    spans: dict[bytes, _DeviceSpan] = {}
    active: dict[str, _DeviceSpan] = {}
    current: UserCertificate | None = None
    for leaf, event in events:
        if event.kind is EventKind.USER_CERTIFIED:
            cert = UserCertificate.decode(event.payload)
            if current is not None and cert.identity_key != current.identity_key:
                for span in active.values():
                    span.end(event.time_ms, leaf, "its user's identity key was replaced")
                active.clear()
            for span in active.values():
                span.user_certificates.append((event.time_ms, cert))
            current = cert
        elif event.kind is EventKind.DEVICE_ADDED and current is not None:
            device = DeviceCertificate.decode(event.payload)
            span = _DeviceSpan(device, [(event.time_ms, current)])
            spans[device.hash()] = span
            active[device.device_id] = span
        elif event.kind in (EventKind.DEVICE_REVOKED, EventKind.USER_REVOKED):
            revocation = Revocation.decode(event.payload)
            if event.kind is EventKind.USER_REVOKED:
                for span in active.values():
                    span.end(revocation.revoked_at_ms, leaf, "its user was revoked")
                active.clear()
            else:
                revoked = active.pop(revocation.device_id, None)
                if revoked is not None:
                    revoked.end(revocation.revoked_at_ms, leaf, "its device was revoked")
    return spans


@dataclass(frozen=True, slots=True)
class RevocationTimes:
    """When a user's keys stopped being usable, from their verified chain: the account's
    revocation (None while it stands) and, by device id, each device that was revoked, lost its
    account or had its user's identity key replaced."""

    account_revoked_at_ms: int | None
    devices: Mapping[str, int]


def revocation_times(events: Sequence[LogEvent]) -> RevocationTimes:
    """`RevocationTimes` of a user's event chain, in chain order (replay it first: this
    trusts the events). The records gateway checks a bundle's senders against the live log
    with it, where the bundle's own checkpoint may predate a revocation."""
    account: int | None = None
    for event in events:
        if event.kind is EventKind.USER_REVOKED:
            account = Revocation.decode(event.payload).revoked_at_ms
    ended: dict[str, int] = {}
    for span in _device_spans(list(enumerate(events))).values():
        if span.ended_ms is not None:
            device = span.certificate.device_id
            ended[device] = min(span.ended_ms, ended.get(device, span.ended_ms))
    return RevocationTimes(account, ended)


def _message_name(index: int, content: Content) -> str:
    return f"message {index} (id {content.message_id.hex()})"


def _verify_evidence(
    evidence: UserEvidence, checkpoint: Checkpoint, trust: ClinicTrust
) -> dict[bytes, _DeviceSpan]:
    user_id = evidence.user_id
    events: list[tuple[int, LogEvent]] = []
    previous_leaf = -1
    for position, logged in enumerate(evidence.events):
        where = f"log event {position} of {user_id} (leaf {logged.leaf_index})"
        if logged.leaf_index <= previous_leaf:
            raise ProofError(f"{where} is not after the event before it in the log")
        previous_leaf = logged.leaf_index
        try:
            merkle.verify_inclusion(
                merkle.leaf_hash(logged.event),
                logged.leaf_index,
                checkpoint.size,
                logged.proof,
                checkpoint.root_hash,
            )
        except ProofError as exc:
            raise ProofError(f"{where} is not included in the checkpoint ({exc})") from None
        try:
            events.append((logged.leaf_index, LogEvent.decode(logged.event)))
        except (MalformedEncoding, InvalidKey) as exc:
            raise ProofError(f"{where} does not decode ({exc})") from None
    replay_user_events(user_id, [event for _, event in events], trust)
    try:
        return _device_spans(events)
    except (CryptoError, ValueError) as exc:  # unreachable after a successful replay
        raise ProofError(f"the log events of {user_id} do not decode ({exc})") from None


def _open_trust(
    bundle: RecordBundle, clinic_id: str, root_key: VerifyKey
) -> tuple[ClinicTrust, Checkpoint]:
    try:
        certificates = [ClinicKeyCertificate.decode(data) for data in bundle.clinic_keys]
    except MalformedEncoding as exc:
        raise ProofError(f"a clinic key certificate does not decode ({exc})") from None
    trust = ClinicTrust.build(clinic_id, root_key, certificates)
    try:
        checkpoint = trust.open_checkpoint(bundle.checkpoint_note)
    except CryptoError as exc:
        raise ProofError(f"the checkpoint does not verify ({exc})") from None
    return trust, checkpoint


def _verify_sender(
    name: str,
    signed: SignedContent,
    span: _DeviceSpan,
    trust: ClinicTrust,
    root_key: VerifyKey,
) -> VerifiedDevice:
    content = signed.content
    user_certificate = span.user_certificate_at(content.sent_at_ms)
    try:
        issuing = trust.issuing_certificate(user_certificate.issuer_key_hash)
        sender = verify_device_chain(
            root_key, issuing, user_certificate, span.certificate, content.sent_at_ms
        )
    except (CertificateError, ProofError) as exc:
        raise ProofError(
            f"{name}: the certificate chain of {content.sender_user_id}'s device "
            f"{content.sender_device_id} was not valid when it was sent ({exc})"
        ) from None
    try:
        verify_signed_content(signed, sender.device)
    except BadSignature:
        raise ProofError(f"{name} signature does not verify") from None
    return sender


def _check_not_revoked(name: str, content: Content, span: _DeviceSpan) -> None:
    if span.ended_ms is None or span.ended_leaf is None:
        return
    user = content.sender_user_id
    if content.sent_at_ms >= span.ended_ms:
        raise ProofError(f"{name} from {user} sent after {span.ended_by}")
    view = content.log_view
    if view is not None and view.tree_size > span.ended_leaf:
        raise ProofError(
            f"{name} from {user} sent after {span.ended_by} "
            f"(its log view of size {view.tree_size} already includes leaf {span.ended_leaf})"
        )


def verify_record_bundle(
    bundle: RecordBundle, *, clinic_id: str, root_key: VerifyKey
) -> VerifiedRecord:
    """Check everything the module docstring lists, with only the clinic id and root key.
    Returns the verified messages in order; raises `ProofError` naming the first failure."""
    visit = bundle.visit
    participants = {visit.patient: visit.clinician, visit.clinician: visit.patient}
    trust, checkpoint = _open_trust(bundle, clinic_id, root_key)

    spans: dict[str, dict[bytes, _DeviceSpan]] = {}
    for evidence in bundle.evidence:
        user_id = evidence.user_id
        if user_id in spans:
            raise ProofError(f"the bundle has evidence for {user_id} twice")
        if user_id not in participants:
            raise ProofError(f"the bundle has evidence for {user_id}, who is not in the visit")
        spans[user_id] = _verify_evidence(evidence, checkpoint, trust)

    verified: list[VerifiedMessage] = []
    seen_ids: set[bytes] = set()
    last_by_sender: dict[str, tuple[str, bytes]] = {}
    previous_sent_ms = -1
    for index, data in enumerate(bundle.messages):
        try:
            signed = SignedContent.decode(data)
        except (MalformedEncoding, InvalidKey) as exc:
            raise ProofError(f"message {index} does not decode ({exc})") from None
        content = signed.content
        name = _message_name(index, content)
        sender = content.sender_user_id
        if content.thread_id != bundle.thread_id:
            raise ProofError(f"{name} belongs to another thread")
        if content.message_id in seen_ids:
            raise ProofError(f"{name} appears twice")
        seen_ids.add(content.message_id)
        if sender not in participants:
            raise ProofError(
                f"{name} is from {sender}, who is not the visit's patient or clinician"
            )
        if not content.is_addressed_to(participants[sender]):
            raise ProofError(f"{name} from {sender} is not addressed to {participants[sender]}")
        if not visit.contains(content.sent_at_ms):
            raise ProofError(f"{name} was sent outside the visit's time")
        if content.sent_at_ms < previous_sent_ms:
            raise ProofError(f"{name} is out of order (sent before the message before it)")
        previous_sent_ms = content.sent_at_ms
        if content.log_view is not None and content.log_view.tree_size > checkpoint.size:
            raise ProofError(f"{name} saw a larger log than the bundle's checkpoint (too old)")
        if sender not in spans:
            raise ProofError(f"{name} has no log evidence for {sender}")
        span = spans[sender].get(content.sender_certificate_hash)
        if span is None:
            raise ProofError(f"{name} is signed by a device the log never certified for {sender}")
        device = _verify_sender(name, signed, span, trust, root_key)
        if device.role not in _ALLOWED_ROLES[sender == visit.patient]:
            what = "patient" if sender == visit.patient else "clinician"
            raise ProofError(f"{name}: {sender} is certified as {device.role.value}, not a {what}")
        _check_not_revoked(name, content, span)
        digest = content_hash(content)
        last = last_by_sender.get(sender)
        if last is not None and content.previous_hash != last[1]:
            raise ProofError(
                f"a message of {sender} is missing between {last[0]} and {name} "
                "(previous_hash does not match)"
            )
        last_by_sender[sender] = (name, digest)
        verified.append(VerifiedMessage(content, digest, device))

    conclusion = visit.conclusion_message_id
    if conclusion is not None and conclusion not in seen_ids:
        raise ProofError(f"the conclusion message {conclusion.hex()} is not in the bundle")
    return VerifiedRecord(visit, bundle.thread_id, checkpoint, tuple(verified))
