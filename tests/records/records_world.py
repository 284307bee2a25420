"""A clinic for the records gateway tests: keys and an identity log in memory (clinic_log), a
doctor (phone, and a laptop revoked at REVOKED_AT), a patient and a nurse, a visit's signed
messages, record bundles, and a fake of the engine the gateway talks to."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import record_world
from record_world import (
    CLINIC,
    DOCTOR,
    MINUTE,
    PATIENT,
    T0,
    attachment,
)
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
from medrelay.crypto.content import (
    SignedContent,
)
from medrelay.crypto.keys import VerifyKey
from medrelay.crypto.records import RecordBundle, RecordVisit
from medrelay.crypto.rng import Rng

RECORDS = "records"
VISIT_ID = "V-2027-000123"
"""The visit id of `World.visit`."""
INDICATIONS = {"I10": "Hypertension follow-up"}


@dataclass
class World(record_world.World):
    """The crypto tests' clinic, plus a visit's exchange with a conclusion and the server's view
    of the visit."""

    def exchange(self) -> list[SignedContent]:
        """Patient, doctor (a reply), patient (with an attachment), doctor's conclusion."""
        first = self.send(PATIENT, DOCTOR, 1)
        return [
            first,
            self.send(DOCTOR, PATIENT, 2, reply_to=first.content.message_id),
            self.send(PATIENT, DOCTOR, 3, attachments=(attachment(self.rng),)),
            self.send(DOCTOR, PATIENT, 4, kind=KIND_CONCLUSION, text="Continue amlodipine 5 mg"),
        ]

    def bundle(
        self,
        messages: Sequence[SignedContent],
        *,
        visit: RecordVisit | None = None,
        users: Sequence[str] = (DOCTOR, PATIENT),
    ) -> RecordBundle:
        """A bundle whose visit (unless given) names the last conclusion among `messages`."""
        if visit is None:
            conclusions = [m for m in messages if m.content.kind == KIND_CONCLUSION]
            visit = self.visit(
                conclusion_message_id=conclusions[-1].content.message_id if conclusions else None
            )
        return super().bundle(messages, visit=visit, users=users)

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
