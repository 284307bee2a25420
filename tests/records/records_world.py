"""A clinic for the records gateway tests: keys and an identity log in memory (clinic_log), a
doctor (phone, and a laptop revoked at REVOKED_AT), a patient and a nurse, a visit's signed
messages, record bundles, and a fake of the engine the gateway talks to."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from clinic_log import ClinicLog
from twisted.internet.defer import Deferred, fail, succeed

from medrelay.clients.engine.record_messages import (
    KIND_CONCLUSION,
    KIND_RECORD_BUNDLE,
    RECORD_BUNDLE_MEDIA_TYPE,
    RecordRequest,
)
from medrelay.clients.records.api import (
    AttachmentUnavailable,
    FetchedAttachment,
    LiveRevocations,
    ReceivedMessage,
    ServerVisit,
    VisitLookup,
)
from medrelay.crypto.attachments import AttachmentDescriptor
from medrelay.crypto.certificates import (
    Role,
    UserCertificate,
    issue_device_certificate,
    issue_user_certificate,
    verify_device,
)
from medrelay.crypto.checkpoint import Checkpoint, sign_checkpoint
from medrelay.crypto.content import (
    KIND_TEXT,
    Content,
    SignedContent,
    canonical_recipients,
    content_hash,
    new_message_id,
    new_thread_id,
    sign_content,
)
from medrelay.crypto.identity import DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, SigningKey, VerifyKey
from medrelay.crypto.merkle import MerkleTree, leaf_hash
from medrelay.crypto.records import RecordBundle, RecordVisit, build_record_bundle
from medrelay.crypto.rng import Rng
from medrelay.crypto.transparency import EventKind, LogEvent, issue_revocation, log_origin

CLINIC = "clinic-a"
DOCTOR = "dr.ivanova"
PATIENT = "petrov"
NURSE = "nurse.orlova"
RECORDS = "records"
T0 = 1_800_000_000_000
MINUTE = 60_000
YEAR = 365 * 24 * 3600 * 1000
REVOKED_AT = T0 + 30 * MINUTE
VISIT_ID = "V-2027-000123"
SECRET_TEXT = "Blood pressure 150/95 since Monday"
INDICATIONS = {"I10": "Hypertension follow-up"}


@dataclass
class World(ClinicLog):
    clinic_id: str = CLINIC
    t0: int = T0
    keys_from: int = T0 - YEAR
    devices: dict[tuple[str, str], DeviceKeys] = field(default_factory=dict)
    user_certs: dict[str, UserCertificate] = field(default_factory=dict)
    last_hash: dict[str, bytes] = field(default_factory=dict)
    thread_id: bytes = b""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.enroll(DOCTOR, Role.DOCTOR, "phone", "laptop")
        self.enroll(PATIENT, Role.PATIENT, "phone")
        self.enroll(NURSE, Role.NURSE, "tablet")
        revocation = issue_revocation(
            self.issuing, user_id=DOCTOR, device_id="laptop", revoked_at_ms=REVOKED_AT
        )
        self.append(EventKind.DEVICE_REVOKED, DOCTOR, revocation.encode())
        self.thread_id = new_thread_id(self.rng)

    def enroll(self, user_id: str, role: Role, *device_ids: str) -> None:
        identity = SigningKey.generate(self.rng)
        user_cert = issue_user_certificate(
            self.issuing,
            user_id=user_id,
            role=role,
            display_name=user_id,
            identity_key=identity.verify_key,
            not_before_ms=T0 - YEAR,
            not_after_ms=T0 + YEAR,
            serial=len(self.user_certs),
        )
        self.user_certs[user_id] = user_cert
        self.append(EventKind.USER_CERTIFIED, user_id, user_cert.encode())
        for device_id in device_ids:
            signing, dh = SigningKey.generate(self.rng), DHPrivateKey.generate(self.rng)
            device_cert = issue_device_certificate(
                identity,
                user_id=user_id,
                device_id=device_id,
                signing_key=signing.verify_key,
                dh_key=dh.public_key,
                created_at_ms=T0,
            )
            self.append(EventKind.DEVICE_ADDED, user_id, device_cert.encode())
            self.devices[user_id, device_id] = DeviceKeys(
                verify_device(user_cert, device_cert), signing, dh
            )

    def send(
        self,
        user_id: str,
        to: str,
        minute: int,
        *,
        device_id: str = "phone",
        attachments: tuple[AttachmentDescriptor, ...] = (),
        **changes: object,
    ) -> SignedContent:
        device = self.devices[user_id, device_id]
        content = Content(
            thread_id=self.thread_id,
            message_id=new_message_id(self.rng),
            sender_user_id=user_id,
            sender_device_id=device_id,
            sender_certificate_hash=device.identity.certificate_hash,
            recipients=canonical_recipients([to]),
            sent_at_ms=T0 + minute * MINUTE,
            previous_hash=self.last_hash.get(user_id),
            log_view=None,
            kind=KIND_TEXT,
            text=f"{SECRET_TEXT} (minute {minute})",
            attachments=attachments,
        )
        content = dataclasses.replace(content, **changes)  # type: ignore[arg-type]
        self.last_hash[user_id] = content_hash(content)
        return sign_content(content, device)

    def exchange(self) -> list[SignedContent]:
        """Patient, doctor (a reply), patient (with an attachment), doctor's conclusion."""
        first = self.send(PATIENT, DOCTOR, 1)
        return [
            first,
            self.send(DOCTOR, PATIENT, 2, reply_to=first.content.message_id),
            self.send(PATIENT, DOCTOR, 3, attachments=(self.attachment(),)),
            self.send(DOCTOR, PATIENT, 4, kind=KIND_CONCLUSION, text="Continue amlodipine 5 mg"),
        ]

    def attachment(self) -> AttachmentDescriptor:
        return AttachmentDescriptor(
            blob_id="blob-" + self.rng(8).hex(),
            key=self.rng(32),
            header=self.rng(24),
            size=48_213,
            media_type="application/pdf",
            file_name="ecg.pdf",
            plaintext_sha256=self.rng(32),
            ciphertext_sha256=self.rng(32),
        )

    def checkpoint_note(self) -> str:
        tree = MerkleTree.from_leaf_hashes(leaf_hash(leaf) for leaf in self.leaves)
        checkpoint = Checkpoint(log_origin(CLINIC), tree.size, tree.root())
        return sign_checkpoint(checkpoint, log_origin(CLINIC), self.log)

    def evidence(self, *users: str) -> dict[str, list[tuple[int, LogEvent | bytes, list[bytes]]]]:
        tree = MerkleTree.from_leaf_hashes(leaf_hash(leaf) for leaf in self.leaves)
        out: dict[str, list[tuple[int, LogEvent | bytes, list[bytes]]]] = {}
        for index, leaf in enumerate(self.leaves):
            event = LogEvent.decode(leaf)
            if event.subject in users:
                out.setdefault(event.subject, []).append(
                    (index, event, list(tree.inclusion_proof(index)))
                )
        return out

    def visit(self, messages: Sequence[SignedContent], **changes: object) -> RecordVisit:
        conclusion = [m for m in messages if m.content.kind == KIND_CONCLUSION]
        visit = RecordVisit(
            visit_id=VISIT_ID,
            indication_code="I10",
            opened_ms=T0,
            closed_ms=T0 + 120 * MINUTE,
            patient=PATIENT,
            clinician=DOCTOR,
            conclusion_message_id=conclusion[-1].content.message_id if conclusion else None,
        )
        return dataclasses.replace(visit, **changes)  # type: ignore[arg-type]

    def bundle(
        self, messages: Sequence[SignedContent], *, visit: RecordVisit | None = None
    ) -> RecordBundle:
        return build_record_bundle(
            visit=visit or self.visit(messages),
            thread_id=self.thread_id,
            checkpoint_note=self.checkpoint_note(),
            clinic_keys=self.certificates,
            evidence=self.evidence(DOCTOR, PATIENT),
            messages=messages,
        )

    def server_visit(self, bundle: RecordBundle, **changes: object) -> ServerVisit:
        visit = bundle.visit
        server = ServerVisit(
            visit_id=visit.visit_id,
            thread_id=bundle.thread_id,
            patient=visit.patient,
            clinician=visit.clinician,
            indication=visit.indication_code,
            consent="notice",
            opened_ms=visit.opened_ms,
            closed_ms=visit.closed_ms,
            conclusion=visit.conclusion_message_id,
        )
        return dataclasses.replace(server, **changes)  # type: ignore[arg-type]


class FakeEngine:
    """The gateway's view of the engine, in memory. `received` grows as tests 'deliver'."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.received: list[ReceivedMessage] = []
        self.files: dict[bytes, list[FetchedAttachment]] = {}
        self.visits: dict[str, ServerVisit] = {}
        self.live: dict[str, LiveRevocations] = {}
        self.sent: list[tuple[tuple[str, ...], bytes, str, str]] = []
        self.send_failures = 0
        self.visit_failures = 0
        self.gone_blobs: set[str] = set()
        """Attachments the relay no longer has."""
        self.download_failures = 0
        """Downloads that fail for now (the relay unreachable)."""

    @property
    def user_id(self) -> str:
        return RECORDS

    @property
    def clinic_id(self) -> str:
        return CLINIC

    @property
    def root_key(self) -> VerifyKey:
        return self.world.root.verify_key

    def deliver_bundle(
        self,
        bundle: RecordBundle | bytes,
        *,
        sender: str = DOCTOR,
        visit_id: str | None = None,
        sent_at_ms: int = T0 + 200 * MINUTE,
        media_type: str = RECORD_BUNDLE_MEDIA_TYPE,
    ) -> ReceivedMessage:
        """A record_bundle message from `sender` with `bundle` as its one attachment; the
        server visit is registered from the bundle unless one exists."""
        data = bundle if isinstance(bundle, bytes) else bundle.encode()
        if isinstance(bundle, RecordBundle):
            visit_id = visit_id or bundle.visit.visit_id
            self.visits.setdefault(bundle.visit.visit_id, self.world.server_visit(bundle))
        message = ReceivedMessage(
            row_id=len(self.received) + 1,
            message_id=hashlib.sha256(b"%d" % len(self.received) + data).digest()[:16],
            sender_user=sender,
            sender_device="phone",
            thread_id=b"\x01" * 16,
            kind=KIND_RECORD_BUNDLE,
            text=RecordRequest(visit_id or VISIT_ID).encode(),
            sent_at_ms=sent_at_ms,
            attachments=1,
        )
        self.received.append(message)
        self.files[message.message_id] = [FetchedAttachment(media_type, data)]
        return message

    def received_after(self, row_id: int, limit: int) -> Deferred[list[ReceivedMessage]]:
        return succeed([m for m in self.received if m.row_id > row_id][:limit])

    def attachments(self, message_id: bytes) -> Deferred[list[FetchedAttachment]]:
        return succeed(self.files[message_id])

    def visit(self, visit_id: str) -> Deferred[VisitLookup]:
        if self.visit_failures:
            self.visit_failures -= 1
            return fail(ConnectionError("server unreachable"))
        return succeed(VisitLookup(self.visits.get(visit_id), INDICATIONS))

    def download(self, descriptor: AttachmentDescriptor) -> Deferred[bytes]:
        if descriptor.blob_id in self.gone_blobs:
            return fail(AttachmentUnavailable("it is no longer on the relay"))
        if self.download_failures:
            self.download_failures -= 1
            return fail(ConnectionError("relay unreachable"))
        return succeed(blob_content(descriptor))

    def revocations(self, user_id: str) -> Deferred[LiveRevocations]:
        return succeed(self.live.get(user_id, LiveRevocations()))

    def send_in_thread(
        self, recipients: Sequence[str], thread_id: bytes, kind: str, text: str
    ) -> Deferred[object]:
        if self.send_failures:
            self.send_failures -= 1
            return fail(ConnectionError("not connected"))
        self.sent.append((tuple(recipients), thread_id, kind, text))
        return succeed(None)


def blob_content(descriptor: AttachmentDescriptor) -> bytes:
    """The fake relay's file behind a descriptor (the fake engine does not check hashes)."""
    return b"%PDF-1.7 ECG trace " + descriptor.blob_id.encode()


def make_world(rng: Rng) -> World:
    return World(rng)
