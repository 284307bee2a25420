"""What the records gateway needs from the client engine, as a small `typing.Protocol`.

The gateway is written against `RecordsEngine` so its tests drive it with a fake; the adapter to
the real `medrelay.clients.engine.client.Engine` is `medrelay.clients.records.engine_adapter`.
The value types here are the gateway's own, so an engine change touches only the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred

from medrelay.crypto.attachments import AttachmentDescriptor
from medrelay.crypto.keys import VerifyKey


class AttachmentUnavailable(Exception):
    """An attachment can never be fetched: the relay no longer has it (attachments live as
    long as undelivered messages, 30 days by default) or it does not match its signed
    description. The message is one line, without content."""


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message the records account received, in the engine's row order."""

    row_id: int
    message_id: bytes
    sender_user: str
    sender_device: str
    thread_id: bytes
    kind: str
    text: str = field(repr=False)
    sent_at_ms: int
    attachments: int
    """How many attachments the message's signed content lists."""
    signed_content: bytes = field(default=b"", repr=False)
    """The message exactly as its sender signed it (kept in the record's Provenance)."""


@dataclass(frozen=True, slots=True)
class FetchedAttachment:
    """An attachment as the engine downloaded it: decrypted and checked against the signed
    descriptor (size, SHA-256), so its bytes are what the sender signed."""

    media_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ServerVisit:
    """A visit as the server keeps it (protocol `VisitInfo`)."""

    visit_id: str
    thread_id: bytes
    patient: str
    clinician: str
    indication: str
    consent: str
    """`notice` or `explicit`."""
    opened_ms: int
    closed_ms: int | None
    conclusion: bytes | None


@dataclass(frozen=True, slots=True)
class VisitLookup:
    """The answer about one visit id: the visit (None when the server has no such visit) and the
    clinic's indications (code → display name)."""

    visit: ServerVisit | None
    indications: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class LiveRevocations:
    """What the live identity log says about a user now: when the account was revoked, and
    when each revoked device was. An engine that can only tell which devices are still active
    (not when the others were revoked) sets `active_devices`: the gateway then refuses every
    message of a device not in it (conservative), and an account revoked at an unknown time is
    `account_revoked_at_ms=0`."""

    account_revoked_at_ms: int | None = None
    devices: Mapping[str, int] = field(default_factory=dict)
    active_devices: frozenset[str] | None = None


class RecordsEngine(Protocol):
    """The engine operations the gateway uses."""

    @property
    def user_id(self) -> str: ...

    @property
    def clinic_id(self) -> str: ...

    @property
    def root_key(self) -> VerifyKey: ...

    def received_after(self, row_id: int, limit: int) -> Deferred[list[ReceivedMessage]]:
        """Received messages with a row id above `row_id`, in row order, at most `limit`."""
        ...

    def attachments(self, message_id: bytes) -> Deferred[list[FetchedAttachment]]:
        """Download, check and decrypt every attachment of a received message."""
        ...

    def visit(self, visit_id: str) -> Deferred[VisitLookup]:
        """The server's visit with that id (the records account may read any)."""
        ...

    def download(self, descriptor: AttachmentDescriptor) -> Deferred[bytes]:
        """One attachment a record's message describes, checked against its signed hashes;
        fails with `AttachmentUnavailable` when it never can be fetched."""
        ...

    def revocations(self, user_id: str) -> Deferred[LiveRevocations]:
        """The user's revocations in the live identity log (fetched and verified now)."""
        ...

    def send_in_thread(
        self, recipients: Sequence[str], thread_id: bytes, kind: str, text: str
    ) -> Deferred[object]:
        """Send a signed message in a thread to these users."""
        ...
