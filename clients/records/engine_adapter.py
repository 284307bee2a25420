"""`RecordsEngine` over the real client engine (`medrelay.clients.engine.client.Engine`):
`received_after`, `attachments`, `visits(visit=...)`, `send_in_thread` and `log.user_state`.

The live-log revocation check uses `Engine.log.user_state(user)`, which proves the user's state
now but not *when* a device was revoked, so it is conservative (`LiveRevocations.active_devices`):
a message from a device revoked after the bundle's checkpoint is refused even if it was sent
before the revocation. An engine method returning revocation times would make it exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred

from medrelay.clients.engine.client import Engine
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.views import ReceivedMessage as EngineReceived
from medrelay.clients.records.api import (
    AttachmentUnavailable,
    FetchedAttachment,
    LiveRevocations,
    ReceivedMessage,
    ServerVisit,
    VisitLookup,
)
from medrelay.crypto.attachments import AttachmentDescriptor
from medrelay.crypto.keys import VerifyKey
from medrelay.crypto.records import revocation_times
from medrelay.crypto.transparency import LogEvent


class EngineAdapter:
    """The real engine seen through the gateway's `RecordsEngine` protocol."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def user_id(self) -> str:
        return self.engine.user_id

    @property
    def clinic_id(self) -> str:
        return self.engine.profile.info.clinic_id

    @property
    def root_key(self) -> VerifyKey:
        return self.engine.profile.info.root_key

    def received_after(self, row_id: int, limit: int) -> Deferred[list[ReceivedMessage]]:
        def convert(rows: Sequence[EngineReceived]) -> list[ReceivedMessage]:
            return [
                ReceivedMessage(
                    row_id=row.row_id,
                    message_id=row.message_id,
                    sender_user=row.sender_user,
                    sender_device=row.sender_device,
                    thread_id=row.thread_id,
                    kind=row.kind,
                    text=row.text,
                    sent_at_ms=row.sent_at_ms,
                    attachments=row.attachments,
                    signed_content=row.signed_content,
                )
                for row in rows
            ]

        return self.engine.received_after(row_id, limit).addCallback(convert)

    def attachments(self, message_id: bytes) -> Deferred[list[FetchedAttachment]]:
        d = self.engine.attachments(message_id)
        return d.addCallback(lambda saved: [FetchedAttachment(s.media_type, s.data) for s in saved])

    def download(self, descriptor: AttachmentDescriptor) -> Deferred[bytes]:
        async def fetch() -> bytes:
            try:
                return await self.engine.download(descriptor)
            except ClientError as exc:
                if exc.code.value == "not_found":
                    raise AttachmentUnavailable("it is no longer on the relay") from None
                if exc.code is LocalCode.ATTACHMENT_INVALID:
                    raise AttachmentUnavailable(
                        "it does not match its signed description"
                    ) from None
                raise

        return Deferred.fromCoroutine(fetch())

    def visit(self, visit_id: str) -> Deferred[VisitLookup]:
        async def lookup() -> VisitLookup:
            try:
                view = await self.engine.visits(visit=visit_id, open_only=False)
            except ClientError as exc:
                if exc.code.value == "not_found":
                    return VisitLookup(None, {})
                raise
            indications = {i.code: i.name for i in view.indications}
            for info in view.visits:
                if info.visit_id == visit_id:
                    return VisitLookup(
                        ServerVisit(
                            visit_id=visit_id,
                            thread_id=info.thread_id,
                            patient=info.patient,
                            clinician=info.clinician,
                            indication=info.indication,
                            consent=info.consent,
                            opened_ms=info.opened_ms,
                            closed_ms=info.closed_ms,
                            conclusion=info.conclusion,
                        ),
                        indications,
                    )
            return VisitLookup(None, indications)

        return Deferred.fromCoroutine(lookup())

    def revocations(self, user_id: str) -> Deferred[LiveRevocations]:
        async def check() -> LiveRevocations:
            # `evidence` verifies the chain against a fresh checkpoint (and keeps it).
            evidence = await self.engine.log.evidence(user_id)
            times = revocation_times([LogEvent.decode(event) for _, event, _ in evidence.events])
            return LiveRevocations(
                account_revoked_at_ms=times.account_revoked_at_ms, devices=times.devices
            )

        return Deferred.fromCoroutine(check())

    def send_in_thread(
        self, recipients: Sequence[str], thread_id: bytes, kind: str, text: str
    ) -> Deferred[object]:
        d = self.engine.send_in_thread(list(recipients), thread_id, kind, text)
        return d.addCallback(lambda sent: sent)
