"""What the engine hands to a front end: plain frozen values with no crypto objects in them.

Message text is health data: `MessageView` keeps it (and attachment names) out of its repr so a
log line or a traceback cannot carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from medrelay.crypto.content import KIND_TEXT

KIND_FAILED: Final = "failed"
KIND_EXPIRED: Final = "expired"
KIND_SECURITY: Final = "security"
# Clinic notices (medrelay.crypto.notices.NoticeKind values): signed by the clinic's issuing key.
KIND_AUTO_REPLY: Final = "auto_reply"
KIND_URGENT_ROUTED: Final = "urgent_routed"
KIND_URGENT_UNROUTED: Final = "urgent_unrouted"
CLINIC_NOTICE_KINDS: Final = frozenset({KIND_AUTO_REPLY, KIND_URGENT_ROUTED, KIND_URGENT_UNROUTED})


@dataclass(frozen=True, slots=True)
class AttachmentView:
    index: int
    file_name: str = field(repr=False)
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class MessageView:
    """A stored message, sent or received."""

    message_id: bytes
    sender_user: str
    sender_device: str
    peer_user: str
    """The other party of the conversation (the recipient of our own messages)."""
    outgoing: bool
    thread_id: bytes
    sent_at_ms: int
    """The sender's signed clock."""
    server_ms: int | None
    """When the relay stored it (None while an outgoing message is unconfirmed)."""
    status: str
    text: str = field(repr=False)
    attachments: tuple[AttachmentView, ...] = field(default=(), repr=False)
    error: str | None = None
    flags: tuple[str, ...] = ()
    """What the relay said about a received message: "urgent" (the sender marked it),
    "after_hours" (it reached us outside our hours), "held" (it waited for our hours)."""
    kind: str = KIND_TEXT
    """The signed kind: text, or a visit's (visit_opened, consent, conclusion) or a record's
    (record_bundle, record_receipt) message (medrelay.clients.engine.record_messages)."""
    receipt: ReceiptView | None = None
    """A `record_receipt` from the clinic's records account, decoded."""
    receipt_error: str | None = None
    """A `record_receipt` that cannot be trusted or read: why (shown as failed)."""


@dataclass(frozen=True, slots=True)
class ReceiptView:
    """What the records gateway said about a saved visit (a `RecordReceipt`)."""

    visit_id: str
    saved: bool
    records: tuple[str, ...]
    reason: str | None
    bundle_sha256: str
    summary: str


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A received message in profile order, for programs that poll (the records gateway):
    `row_id` increases with every stored message, so `Engine.received_after(row_id)` resumes."""

    row_id: int
    message_id: bytes
    sender_user: str
    sender_device: str
    recipients: tuple[str, ...]
    thread_id: bytes
    kind: str
    text: str = field(repr=False)
    sent_at_ms: int
    server_ms: int | None
    attachments: int
    """How many attachments it has (`Engine.attachments(message_id)` fetches them)."""
    signed_content: bytes = field(default=b"", repr=False)
    """The exact signed bytes, for a program that keeps the sender's signature as evidence."""


@dataclass(frozen=True, slots=True)
class ClinicNoticeView:
    """The verified content of a clinic notice: the clinic speaking, not a person."""

    clinician: str
    """Who the patient wrote to."""
    reads_at_ms: int | None
    """When that clinician reads it (their next opening), if known."""
    time_zone: str
    """The zone to show times in (the patient's)."""
    text: str
    emergency_numbers: tuple[str, ...]
    on_call: str | None
    """urgent_routed: the on-call clinician who received the urgent message."""


@dataclass(frozen=True, slots=True)
class NoticeView:
    """An item that is not a person's message: `failed` (undecryptable or unverifiable;
    `reason` says why), `expired` (a message of ours that device `user_id/device_id` never
    fetched), `security` (a transparency-log warning: `reason` is the text to show), or a clinic
    notice about our message `message_id` to clinician `user_id` (`auto_reply`, `urgent_routed`,
    `urgent_unrouted`: `clinic` holds its verified content)."""

    kind: str
    message_id: bytes
    user_id: str
    device_id: str
    server_ms: int
    reason: str
    clinic: ClinicNoticeView | None = None


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    """The relay connection came up (`connected`) or went down (`retry_in_s` None: for good)."""

    connected: bool
    detail: str = ""
    retry_in_s: float | None = None


Event = MessageView | NoticeView | ConnectionStatus


@dataclass(frozen=True, slots=True)
class SentMessage:
    message_id: bytes
    server_ms: int
    recipient: str
    devices: int
    held: bool = False
    """The clinician is outside their hours: the message waits for them (`reads_at_ms`)."""
    reads_at_ms: int | None = None
    on_call: str | None = None
    """An urgent message also reached this on-call clinician at once."""


@dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    created_at_ms: int
    this_device: bool
    added_by_you: bool = True
    """Enrolled or linked from a device of this profile's; False is a security warning."""


@dataclass(frozen=True, slots=True)
class Whoami:
    user_id: str
    device_id: str
    display_name: str
    role: str
    clinic_id: str
    server_url: str
    enrolled_at_ms: int


@dataclass(frozen=True, slots=True)
class OutgoingFile:
    file_name: str
    media_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SavedAttachment:
    file_name: str = field(repr=False)
    media_type: str
    data: bytes = field(repr=False)


# --- visits and the medical record ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndicationView:
    code: str
    name: str


@dataclass(frozen=True, slots=True)
class VisitView:
    """A teleconsultation visit as the relay keeps it."""

    visit_id: str
    thread_id: bytes
    patient: str
    clinician: str
    indication: str
    indication_name: str | None
    """The clinic's name for the indication (None if it is no longer on the clinic's list)."""
    consent: str
    """notice (the patient is told the visit is saved) or explicit (they must agree first)."""
    opened_ms: int
    closed_ms: int | None
    conclusion: bytes | None
    """The id of the conclusion message, once closed."""

    @property
    def is_open(self) -> bool:
        return self.closed_ms is None


@dataclass(frozen=True, slots=True)
class VisitsView:
    visits: tuple[VisitView, ...]
    indications: tuple[IndicationView, ...]
    consent: str
    """The clinic's consent mode for new visits."""


@dataclass(frozen=True, slots=True)
class RecordSent:
    """A record bundle sent to the records account (its receipt arrives later, in the thread)."""

    visit_id: str
    thread_id: bytes
    """The thread the bundle documents (where the receipt arrives)."""
    messages: int
    bundle_sha256: str
    bundle_bytes: int
    sent: SentMessage
