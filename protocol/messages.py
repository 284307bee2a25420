"""Protocol v1 message types: one frozen dataclass per frame type, validated by field codecs.

Each frame body is a CBOR map holding "v" (the protocol version), "t" (the type) and the
message's own fields under short wire keys. Requests from a client carry "rid", a client-chosen
request id that the response (or an `error`) echoes. `decode_message` checks the direction: a
server accepts only client-to-server types and a client only server-to-client types.

The table in docs/protocol.md is the reference for every field; keep the two in step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from medrelay.protocol import cbor
from medrelay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from medrelay.protocol.fields import (
    UINT32_MAX,
    Bool,
    Bytes,
    Choice,
    FieldError,
    ListOf,
    Nested,
    Struct,
    Text,
    UInt,
    invalid,
    shown,
    wire,
)
from medrelay.protocol.limits import (
    CHALLENGE_SIZE,
    MAX_ABSENCES,
    MAX_ACKS_PER_FRAME,
    MAX_AUTOREPLY_BYTES,
    MAX_CERTIFICATE_SIZE,
    MAX_CHECKPOINT_SIZE,
    MAX_CIPHERTEXT_SIZE,
    MAX_CLINIC_KEYS,
    MAX_DEVICES_PER_USER,
    MAX_DIRECTORY_ENTRIES,
    MAX_EMERGENCY_NUMBERS,
    MAX_ENVELOPES_PER_SEND,
    MAX_HOURS_INTERVALS,
    MAX_ID_BYTES,
    MAX_INDICATION_CODE_BYTES,
    MAX_INDICATIONS,
    MAX_ITEMS_PER_DELIVER,
    MAX_LOG_EVENT_SIZE,
    MAX_LOG_SIZES,
    MAX_NAME_BYTES,
    MAX_ONE_TIME_PREKEYS_PER_UPLOAD,
    MAX_PREKEY_SIZE,
    MAX_PROOF_HASHES,
    MAX_QUERY_BYTES,
    MAX_ROSTER_SHIFTS,
    MAX_USER_LOG_EVENTS,
    MAX_VISIT_ID_BYTES,
    MAX_VISITS,
    MESSAGE_ID_SIZE,
    SIGNATURE_SIZE,
    TOKEN_SIZE,
)

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)

_RID = UInt(UINT32_MAX)
_USER = Text(MAX_ID_BYTES, identifier=True)
_DEVICE = Text(MAX_ID_BYTES, identifier=True)
_MESSAGE_ID = Bytes(MESSAGE_ID_SIZE, MESSAGE_ID_SIZE)
_TIME_MS = UInt()
_CERTIFICATE = Bytes(MAX_CERTIFICATE_SIZE, 1)
_PREKEY = Bytes(MAX_PREKEY_SIZE, 1)
_PROOF = ListOf(Bytes(32, 32), MAX_PROOF_HASHES)
_DATE = Text(10, identifier=True)
"""A calendar date, YYYY-MM-DD (checked by the server, which knows the clinic's calendar)."""
ACCOUNT_ROLES: Final = ("patient", "doctor", "nurse", "registrar", "admin")
_ZONE = Text(64)
"""An IANA time-zone name (checked by the server against its zone database)."""
OFF_HOURS_POLICIES: Final = ("hold", "deliver-silently")
CONSENT_MODES: Final = ("notice", "explicit")
"""How a visit's patient agrees to the thread being saved in their record: told in the thread
(`notice`), or confirming in the thread before anything is saved (`explicit`)."""
_VISIT_ID = Text(MAX_VISIT_ID_BYTES, identifier=True)
_INDICATION = Text(MAX_INDICATION_CODE_BYTES, identifier=True)


class Direction(enum.Enum):
    CLIENT_TO_SERVER = "client-to-server"
    SERVER_TO_CLIENT = "server-to-client"


class Message(Struct):
    """A frame type. Subclasses set TYPE and DIRECTION and declare their fields."""

    __slots__ = ()
    TYPE: ClassVar[str]
    DIRECTION: ClassVar[Direction]
    _extra_keys: ClassVar[tuple[str, ...]] = ("t", "v")


# -- nested items ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceRef(Struct):
    """A (user, device) pair."""

    user: str = wire("u", _USER)
    device: str = wire("d", _DEVICE)


@dataclass(frozen=True, slots=True)
class OutboundEnvelope(Struct):
    """One ciphertext of a `send`, for one target device."""

    user: str = wire("u", _USER)
    device: str = wire("d", _DEVICE)
    ciphertext: bytes = wire("c", Bytes(MAX_CIPHERTEXT_SIZE, 1))


class ItemKind(enum.StrEnum):
    MESSAGE = "msg"
    EXPIRED = "expired"
    NOTICE = "notice"


class ItemFlag(enum.StrEnum):
    """What the relay knows about a delivered message (it cannot read it)."""

    URGENT = "urgent"
    """The sender marked it urgent."""
    AFTER_HOURS = "after_hours"
    """It reached a clinician outside their hours (delivered silently, or held)."""
    HELD = "held"
    """It waited for the clinician's hours to begin."""


@dataclass(frozen=True, slots=True)
class DeliveredItem(Struct):
    """One queued item pushed to a device.

    kind "msg": an envelope; `user`/`device` are the sender, `ciphertext` is present.
    kind "expired": a server notice that message `message_id` could not be delivered to
    `user`/`device` before it expired; no ciphertext.
    kind "notice": a clinic notice (automatic reply, urgent routing) signed by the clinic's
    issuing key, in `ciphertext` (medrelay.crypto.notices: it is not encrypted); `message_id` is
    the message that caused it, `user` the clinician it is about, `device` empty.
    `flags` (msg only): what the relay knows about the message (`ItemFlag`).
    """

    seq: int = wire("seq", UInt())
    kind: str = wire("k", Choice(frozenset(ItemKind)))
    message_id: bytes = wire("id", _MESSAGE_ID)
    time_ms: int = wire("ts", _TIME_MS)
    user: str = wire("u", _USER)
    device: str = wire("d", Text(MAX_ID_BYTES))
    ciphertext: bytes | None = wire("c", Bytes(MAX_CIPHERTEXT_SIZE, 1), optional=True)
    flags: tuple[str, ...] | None = wire(
        "f", ListOf(Choice(frozenset(ItemFlag)), len(ItemFlag)), optional=True
    )

    def __post_init__(self) -> None:
        carries = self.kind in (ItemKind.MESSAGE, ItemKind.NOTICE)
        if (carries or self.kind == ItemKind.EXPIRED) and carries != (self.ciphertext is not None):
            raise ValueError("a 'msg' or 'notice' item carries bytes and an 'expired' one does not")


@dataclass(frozen=True, slots=True)
class DeviceBundle(Struct):
    """What a sender needs to open a session with one device (crypto encodings, opaque here)."""

    device: str = wire("d", _DEVICE)
    certificate: bytes = wire("cert", _CERTIFICATE)
    signed_prekey: bytes = wire("spk", _PREKEY)
    one_time_prekey: bytes | None = wire("otk", _PREKEY, optional=True)


@dataclass(frozen=True, slots=True)
class DeviceEntry(Struct):
    device: str = wire("d", _DEVICE)
    certificate: bytes = wire("cert", _CERTIFICATE)


@dataclass(frozen=True, slots=True)
class LogLeaf(Struct):
    """One identity-log event, with its inclusion proof into the answer's checkpoint."""

    index: int = wire("i", UInt())
    event: bytes = wire("e", Bytes(MAX_LOG_EVENT_SIZE, 1))
    proof: tuple[bytes, ...] = wire("p", _PROOF)


@dataclass(frozen=True, slots=True)
class ConsistencyProof(Struct):
    """Proof that the tree of `old_size` leaves is a prefix of the answer's checkpoint."""

    old_size: int = wire("old", UInt())
    proof: tuple[bytes, ...] = wire("p", _PROOF)


@dataclass(frozen=True, slots=True)
class DirectoryEntry(Struct):
    """A user found in the directory, with the certificate that says who they are."""

    user: str = wire("u", _USER)
    certificate: bytes = wire("cert", _CERTIFICATE)


@dataclass(frozen=True, slots=True)
class HoursInterval(Struct):
    """One weekly opening: `day` 0 (Monday) to 6, minutes after local midnight [start, end)."""

    day: int = wire("d", UInt(6))
    start: int = wire("s", UInt(1439))
    end: int = wire("e", UInt(1440))


@dataclass(frozen=True, slots=True)
class AbsenceSpan(Struct):
    """Whole local days away, `first` to `last` inclusive (YYYY-MM-DD)."""

    first: str = wire("from", _DATE)
    last: str = wire("to", _DATE)
    reason: str = wire("reason", Choice(frozenset({"vacation", "sick", "other"})))


@dataclass(frozen=True, slots=True)
class RosterShift(Struct):
    """One on-call shift: `clinician` answers urgent messages for `department` in
    [starts, ends)."""

    shift: int = wire("id", UInt())
    clinician: str = wire("clinician", _USER)
    department: str = wire("department", Text(MAX_NAME_BYTES))
    starts_ms: int = wire("starts", _TIME_MS)
    ends_ms: int = wire("ends", _TIME_MS)


@dataclass(frozen=True, slots=True)
class Indication(Struct):
    """One reason the clinic allows a teleconsultation for: a code and its display text."""

    code: str = wire("code", _INDICATION)
    name: str = wire("name", Text(MAX_NAME_BYTES))


@dataclass(frozen=True, slots=True)
class VisitInfo(Struct):
    """A teleconsultation visit as the server keeps it: who, why, its thread and its times. The
    conclusion itself travels end to end as a message of the thread; the server keeps its id."""

    visit: str = wire("id", _VISIT_ID)
    thread: bytes = wire("thread", _MESSAGE_ID)
    patient: str = wire("patient", _USER)
    clinician: str = wire("clinician", _USER)
    indication: str = wire("indication", _INDICATION)
    consent: str = wire("consent", Choice(frozenset(CONSENT_MODES)))
    opened_ms: int = wire("opened", _TIME_MS)
    closed_ms: int | None = wire("closed", _TIME_MS, optional=True)
    conclusion: bytes | None = wire("conclusion", _MESSAGE_ID, optional=True)


@dataclass(frozen=True, slots=True)
class Limits(Struct):
    """The server's limits, announced in `welcome`."""

    max_frame: int = wire("frame", UInt(UINT32_MAX))
    max_ciphertext: int = wire("ciphertext", UInt(UINT32_MAX))
    max_envelopes: int = wire("envelopes", UInt(UINT32_MAX))
    max_acks: int = wire("acks", UInt(UINT32_MAX))


# -- client to server -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame of a connection: the versions the client speaks."""

    TYPE: ClassVar[str] = "hello"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    versions: tuple[int, ...] = wire("versions", ListOf(UInt(255), 8, 1))
    agent: str = wire("agent", Text(64))


@dataclass(frozen=True, slots=True)
class Auth(Message):
    """Log in: the device's signature over the authentication transcript (see `auth_transcript`)."""

    TYPE: ClassVar[str] = "auth"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)
    device: str = wire("device", _DEVICE)
    signature: bytes = wire("sig", Bytes(SIGNATURE_SIZE, SIGNATURE_SIZE))


@dataclass(frozen=True, slots=True)
class Resume(Message):
    """Log in again with the session token from an earlier `authenticated`."""

    TYPE: ClassVar[str] = "resume"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    token: bytes = wire("token", Bytes(TOKEN_SIZE, TOKEN_SIZE))


@dataclass(frozen=True, slots=True)
class PrekeysPut(Message):
    """Upload a new signed prekey and/or one-time prekeys."""

    TYPE: ClassVar[str] = "prekeys_put"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    one_time_prekeys: tuple[bytes, ...] = wire(
        "otks", ListOf(_PREKEY, MAX_ONE_TIME_PREKEYS_PER_UPLOAD)
    )
    signed_prekey: bytes | None = wire("spk", _PREKEY, optional=True)


@dataclass(frozen=True, slots=True)
class BundleGet(Message):
    """Fetch a prekey bundle for every device of a user (each one-time prekey is served once)."""

    TYPE: ClassVar[str] = "bundle_get"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)


@dataclass(frozen=True, slots=True)
class DevicesGet(Message):
    """List a user's devices and certificates."""

    TYPE: ClassVar[str] = "devices_get"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)


@dataclass(frozen=True, slots=True)
class LogGet(Message):
    """The identity log's newest checkpoint, consistency proofs from `sizes`, and (with `user`)
    that user's whole event chain with inclusion proofs."""

    TYPE: ClassVar[str] = "log_get"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    sizes: tuple[int, ...] = wire("sizes", ListOf(UInt(), MAX_LOG_SIZES))
    user: str | None = wire("user", _USER, optional=True)


@dataclass(frozen=True, slots=True)
class DirectorySearch(Message):
    """Find users by a part of their name or username, and optionally specialty and
    department; the answer holds only people the requester may see (a patient: their care team)."""

    TYPE: ClassVar[str] = "directory_search"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    query: str = wire("query", Text(MAX_QUERY_BYTES))
    specialty: str | None = wire("specialty", Text(MAX_QUERY_BYTES), optional=True)
    department: str | None = wire("department", Text(MAX_QUERY_BYTES), optional=True)


@dataclass(frozen=True, slots=True)
class AccountCreate(Message):
    """A registrar creates a patient's account, an admin a staff account; the answer carries
    the one-time enrollment code to hand over in person."""

    TYPE: ClassVar[str] = "account_create"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)
    role: str = wire("role", Choice(frozenset(ACCOUNT_ROLES)))
    name: str = wire("name", Text(MAX_NAME_BYTES))
    specialty: str | None = wire("specialty", Text(MAX_NAME_BYTES), optional=True)
    department: str | None = wire("department", Text(MAX_NAME_BYTES), optional=True)


@dataclass(frozen=True, slots=True)
class LinkCreate(Message):
    """Link a patient to a doctor or nurse after an in-person visit (`visit`: YYYY-MM-DD),
    through `until` (YYYY-MM-DD, inclusive; the server's default without it)."""

    TYPE: ClassVar[str] = "link_create"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    patient: str = wire("patient", _USER)
    clinician: str = wire("clinician", _USER)
    visit: str = wire("visit", _DATE)
    until: str | None = wire("until", _DATE, optional=True)


@dataclass(frozen=True, slots=True)
class LinkEnd(Message):
    """End the pair's active care link now (messages already sent are still delivered)."""

    TYPE: ClassVar[str] = "link_end"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    patient: str = wire("patient", _USER)
    clinician: str = wire("clinician", _USER)


@dataclass(frozen=True, slots=True)
class AvailabilityGet(Message):
    """Is `user` (a clinician) available now, when does that change, who is on call meanwhile."""

    TYPE: ClassVar[str] = "availability_get"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)


@dataclass(frozen=True, slots=True)
class ScheduleSet(Message):
    """Change `user`'s schedule: only the fields present change. `autoreply` "" and
    `available_until` 0 clear them; `absences` replaces the whole list."""

    TYPE: ClassVar[str] = "schedule_set"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)
    time_zone: str | None = wire("tz", _ZONE, optional=True)
    hours: tuple[HoursInterval, ...] | None = wire(
        "hours", ListOf(Nested(HoursInterval), MAX_HOURS_INTERVALS), optional=True
    )
    autoreply: str | None = wire("autoreply", Text(MAX_AUTOREPLY_BYTES), optional=True)
    available_until_ms: int | None = wire("until", _TIME_MS, optional=True)
    absences: tuple[AbsenceSpan, ...] | None = wire(
        "absences", ListOf(Nested(AbsenceSpan), MAX_ABSENCES), optional=True
    )


@dataclass(frozen=True, slots=True)
class RosterAdd(Message):
    """Put `clinician` on call for `department` in [starts, ends) (registrars and admins)."""

    TYPE: ClassVar[str] = "roster_add"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    clinician: str = wire("clinician", _USER)
    department: str = wire("department", Text(MAX_NAME_BYTES))
    starts_ms: int = wire("starts", _TIME_MS)
    ends_ms: int = wire("ends", _TIME_MS)


@dataclass(frozen=True, slots=True)
class RosterRemove(Message):
    TYPE: ClassVar[str] = "roster_remove"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    shift: int = wire("id", UInt())


@dataclass(frozen=True, slots=True)
class RosterGet(Message):
    """The shifts that have not ended by `after` (now without it)."""

    TYPE: ClassVar[str] = "roster_get"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    after_ms: int | None = wire("after", _TIME_MS, optional=True)


@dataclass(frozen=True, slots=True)
class VisitOpen(Message):
    """A doctor opens a teleconsultation visit with a linked patient for one of the clinic's
    indications; the server names the visit and its thread."""

    TYPE: ClassVar[str] = "visit_open"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    patient: str = wire("patient", _USER)
    indication: str = wire("indication", _INDICATION)


@dataclass(frozen=True, slots=True)
class VisitClose(Message):
    """The visit's doctor closes it; `conclusion` is the id of the conclusion message already
    sent in the visit's thread."""

    TYPE: ClassVar[str] = "visit_close"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    visit: str = wire("visit", _VISIT_ID)
    conclusion: bytes = wire("conclusion", _MESSAGE_ID)


@dataclass(frozen=True, slots=True)
class VisitList(Message):
    """The requester's visits (as clinician or patient), newest first; with `visit`, that one
    visit only (the records gateway may ask about any)."""

    TYPE: ClassVar[str] = "visit_list"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    visit: str | None = wire("visit", _VISIT_ID, optional=True)
    open_only: bool | None = wire("open", Bool(), optional=True)


@dataclass(frozen=True, slots=True)
class Send(Message):
    """One message, as one ciphertext per target device; `message_id` makes resends idempotent.
    `urgent`: the sender marked it urgent; while the clinician addressed is outside their hours
    the send must also address the devices of the on-call clinician `availability` named."""

    TYPE: ClassVar[str] = "send"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    rid: int = wire("rid", _RID)
    message_id: bytes = wire("id", _MESSAGE_ID)
    envelopes: tuple[OutboundEnvelope, ...] = wire(
        "env", ListOf(Nested(OutboundEnvelope), MAX_ENVELOPES_PER_SEND, 1)
    )
    urgent: bool | None = wire("urgent", Bool(), optional=True)

    def __post_init__(self) -> None:
        targets = {(e.user, e.device) for e in self.envelopes}
        if len(targets) != len(self.envelopes):
            raise ValueError("two envelopes for the same device")


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """The device stored these items durably; the server may delete them."""

    TYPE: ClassVar[str] = "ack"
    DIRECTION: ClassVar[Direction] = Direction.CLIENT_TO_SERVER
    seqs: tuple[int, ...] = wire("seqs", ListOf(UInt(), MAX_ACKS_PER_FRAME, 1))


# -- server to client -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Answer to hello: the chosen version, the login challenge and the server's limits."""

    TYPE: ClassVar[str] = "welcome"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    version: int = wire("version", UInt(255))
    agent: str = wire("agent", Text(64))
    clinic: str = wire("clinic", Text(MAX_ID_BYTES, identifier=True))
    challenge: bytes = wire("challenge", Bytes(CHALLENGE_SIZE, CHALLENGE_SIZE))
    time_ms: int = wire("time", _TIME_MS)
    limits: Limits = wire("limits", Nested(Limits))  # noqa: RUF009 (a field declaration)


@dataclass(frozen=True, slots=True)
class Authenticated(Message):
    """Login succeeded. After `auth` it carries a new session token; after `resume` it does not."""

    TYPE: ClassVar[str] = "authenticated"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)
    device: str = wire("device", _DEVICE)
    expires_ms: int = wire("expires", _TIME_MS)
    token: bytes | None = wire("token", Bytes(TOKEN_SIZE, TOKEN_SIZE), optional=True)


@dataclass(frozen=True, slots=True)
class PrekeysStored(Message):
    TYPE: ClassVar[str] = "prekeys_stored"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    one_time_count: int = wire("otk_count", UInt(UINT32_MAX))


@dataclass(frozen=True, slots=True)
class PrekeysLow(Message):
    """The server holds few one-time prekeys for this device; upload `wanted` more."""

    TYPE: ClassVar[str] = "prekeys_low"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    remaining: int = wire("remaining", UInt(UINT32_MAX))
    wanted: int = wire("wanted", UInt(UINT32_MAX))


@dataclass(frozen=True, slots=True)
class Bundle(Message):
    TYPE: ClassVar[str] = "bundle"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)
    user_certificate: bytes = wire("user_cert", _CERTIFICATE)
    devices: tuple[DeviceBundle, ...] = wire(
        "devices", ListOf(Nested(DeviceBundle), MAX_DEVICES_PER_USER)
    )


@dataclass(frozen=True, slots=True)
class DeviceList(Message):
    TYPE: ClassVar[str] = "device_list"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)
    user_certificate: bytes = wire("user_cert", _CERTIFICATE)
    devices: tuple[DeviceEntry, ...] = wire(
        "devices", ListOf(Nested(DeviceEntry), MAX_DEVICES_PER_USER)
    )


@dataclass(frozen=True, slots=True)
class LogAnswer(Message):
    TYPE: ClassVar[str] = "log"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    checkpoint: bytes = wire("checkpoint", Bytes(MAX_CHECKPOINT_SIZE, 1))
    clinic_keys: tuple[bytes, ...] = wire("keys", ListOf(_CERTIFICATE, MAX_CLINIC_KEYS, 1))
    consistency: tuple[ConsistencyProof, ...] = wire(
        "consistency", ListOf(Nested(ConsistencyProof), MAX_LOG_SIZES)
    )
    events: tuple[LogLeaf, ...] = wire("events", ListOf(Nested(LogLeaf), MAX_USER_LOG_EVENTS))
    user: str | None = wire("user", _USER, optional=True)


@dataclass(frozen=True, slots=True)
class Directory(Message):
    TYPE: ClassVar[str] = "directory"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    entries: tuple[DirectoryEntry, ...] = wire(
        "entries", ListOf(Nested(DirectoryEntry), MAX_DIRECTORY_ENTRIES)
    )


@dataclass(frozen=True, slots=True)
class AccountCreated(Message):
    TYPE: ClassVar[str] = "account_created"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)
    code: str = wire("code", Text(64, identifier=True))
    expires_ms: int = wire("expires", _TIME_MS)


@dataclass(frozen=True, slots=True)
class LinkState(Message):
    """A care link as it now stands (`ended` set once it was ended early)."""

    TYPE: ClassVar[str] = "link_state"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    patient: str = wire("patient", _USER)
    clinician: str = wire("clinician", _USER)
    visit: str = wire("visit", _DATE)
    ends_ms: int = wire("ends", _TIME_MS)
    ended_ms: int | None = wire("ended", _TIME_MS, optional=True)


@dataclass(frozen=True, slots=True)
class Sent(Message):
    """The message and all its envelopes are durably stored (or already were: a resend).
    `reads_at`: the clinician addressed is outside their hours and reads it from then (absent
    when unknown); `on_call`: an urgent message also reached this on-call clinician at once."""

    TYPE: ClassVar[str] = "sent"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    message_id: bytes = wire("id", _MESSAGE_ID)
    time_ms: int = wire("time", _TIME_MS)
    held: bool | None = wire("held", Bool(), optional=True)
    reads_at_ms: int | None = wire("reads_at", _TIME_MS, optional=True)
    on_call: str | None = wire("on_call", _USER, optional=True)


@dataclass(frozen=True, slots=True)
class Availability(Message):
    """A clinician's schedule and whether they are available now. `changes_at`: when that
    changes (the end of the current opening, or the next one); `on_call`: while they are
    away, who answers urgent messages for their department. `autoreply` only for the
    clinician and admins."""

    TYPE: ClassVar[str] = "availability"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    user: str = wire("user", _USER)
    time_zone: str = wire("tz", _ZONE)
    viewer_time_zone: str = wire("viewer_tz", _ZONE)
    hours: tuple[HoursInterval, ...] = wire(
        "hours", ListOf(Nested(HoursInterval), MAX_HOURS_INTERVALS)
    )
    absences: tuple[AbsenceSpan, ...] = wire("absences", ListOf(Nested(AbsenceSpan), MAX_ABSENCES))
    open_now: bool = wire("open", Bool())
    policy: str = wire("policy", Choice(frozenset(OFF_HOURS_POLICIES)))
    emergency: tuple[str, ...] = wire("emergency", ListOf(Text(16), MAX_EMERGENCY_NUMBERS))
    scheduled: bool = wire("scheduled", Bool())
    """False: no hours were ever set, and the clinician counts as always available."""
    changes_at_ms: int | None = wire("changes_at", _TIME_MS, optional=True)
    available_until_ms: int | None = wire("until", _TIME_MS, optional=True)
    department: str | None = wire("department", Text(MAX_NAME_BYTES), optional=True)
    on_call: str | None = wire("on_call", _USER, optional=True)
    autoreply: str | None = wire("autoreply", Text(MAX_AUTOREPLY_BYTES), optional=True)


@dataclass(frozen=True, slots=True)
class Roster(Message):
    TYPE: ClassVar[str] = "roster"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    shifts: tuple[RosterShift, ...] = wire("shifts", ListOf(Nested(RosterShift), MAX_ROSTER_SHIFTS))


@dataclass(frozen=True, slots=True)
class Visits(Message):
    """The answer to every visit request: the visits concerned, and the clinic's indications
    and consent mode (so a client can say which codes are allowed)."""

    TYPE: ClassVar[str] = "visits"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    rid: int = wire("rid", _RID)
    visits: tuple[VisitInfo, ...] = wire("visits", ListOf(Nested(VisitInfo), MAX_VISITS))
    indications: tuple[Indication, ...] = wire(
        "indications", ListOf(Nested(Indication), MAX_INDICATIONS)
    )
    consent: str = wire("consent", Choice(frozenset(CONSENT_MODES)))


@dataclass(frozen=True, slots=True)
class Deliver(Message):
    """Queued items for this device, in queue order."""

    TYPE: ClassVar[str] = "deliver"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    items: tuple[DeliveredItem, ...] = wire(
        "items", ListOf(Nested(DeliveredItem), MAX_ITEMS_PER_DELIVER, 1)
    )


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A refused request (`rid` set) or a connection-level problem (no `rid`).

    For `stale_devices`, `missing` lists current devices the send left out and `extra` the
    addressed devices that are not current.
    """

    TYPE: ClassVar[str] = "error"
    DIRECTION: ClassVar[Direction] = Direction.SERVER_TO_CLIENT
    code: str = wire("code", Text(64, identifier=True))
    message: str = wire("message", Text(512))
    rid: int | None = wire("rid", _RID, optional=True)
    missing: tuple[DeviceRef, ...] | None = wire(
        "missing", ListOf(Nested(DeviceRef), MAX_ENVELOPES_PER_SEND), optional=True
    )
    extra: tuple[DeviceRef, ...] | None = wire(
        "extra", ListOf(Nested(DeviceRef), MAX_ENVELOPES_PER_SEND), optional=True
    )


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Auth,
        Resume,
        PrekeysPut,
        BundleGet,
        DevicesGet,
        LogGet,
        DirectorySearch,
        AccountCreate,
        LinkCreate,
        LinkEnd,
        AvailabilityGet,
        ScheduleSet,
        RosterAdd,
        RosterRemove,
        RosterGet,
        VisitOpen,
        VisitClose,
        VisitList,
        Send,
        Ack,
        Welcome,
        Authenticated,
        PrekeysStored,
        PrekeysLow,
        Bundle,
        DeviceList,
        LogAnswer,
        Directory,
        AccountCreated,
        LinkState,
        Availability,
        Roster,
        Visits,
        Sent,
        Deliver,
        Error,
    )
}


def encode_body(message: Message, version: int = PROTOCOL_VERSION) -> bytes:
    """The deterministic CBOR body of one frame."""
    return cbor.encode(message.to_map({"t": message.TYPE, "v": version}))


def decode_body(body: bytes, accept: Direction, version: int = PROTOCOL_VERSION) -> Message:
    """Validate one frame body into a message travelling in direction `accept`.

    Every refusal is a non-fatal `RemoteProtocolError` carrying the request id whenever the body
    could be read as a map, so the connection can answer with an `error` frame and carry on.
    """
    try:
        value = cbor.decode(body)
    except cbor.BodyError as exc:
        if type(exc.value) is dict:
            exc.rid = _peek_rid(exc.value)
        raise
    if type(value) is not dict:
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "a frame body must be a CBOR map")
    rid = _peek_rid(value)
    frame_version = value.get("v")
    if frame_version != version or type(frame_version) is not int:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"frame version {shown(frame_version)}; this connection speaks version {version}",
            rid=rid,
        )
    type_name = value.get("t")
    cls = MESSAGE_TYPES.get(type_name) if type(type_name) is str else None
    if cls is None or cls.DIRECTION is not accept:
        raise RemoteProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown frame type {shown(type_name)}", rid=rid
        )
    try:
        return cls.from_map(value)
    except FieldError as exc:
        exc.within(cls.TYPE).rid = rid
        raise


def _peek_rid(value: dict[Any, Any]) -> int | None:
    rid = value.get("rid")
    if type(rid) is int and 0 <= rid <= UINT32_MAX:
        return rid
    return None


def check_outgoing(message: Message) -> None:
    """Round-trip an outgoing message through validation: a bug here is a LocalProtocolError.

    Fields holding values of the wrong Python type (a list where a tuple of structs belongs,
    None in a required nested field...) are refused the same way rather than escaping as
    TypeError or AttributeError.
    """
    try:
        wire_map = message.to_map({"t": message.TYPE, "v": 0})
    except (TypeError, AttributeError, ValueError) as exc:
        raise LocalProtocolError(
            ErrorCode.INVALID_FIELD,
            f"{message.TYPE}: a field cannot be encoded ({type(exc).__name__})",
        ) from None
    try:
        type(message).from_map(wire_map)
    except FieldError as exc:
        exc.within(message.TYPE)
        raise LocalProtocolError(exc.code, exc.message) from None
    except RemoteProtocolError as exc:
        raise LocalProtocolError(exc.code, exc.message) from None


__all__ = [
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "AbsenceSpan",
    "Ack",
    "Auth",
    "Authenticated",
    "Availability",
    "AvailabilityGet",
    "Bundle",
    "BundleGet",
    "Deliver",
    "DeliveredItem",
    "DeviceBundle",
    "DeviceEntry",
    "DeviceList",
    "DeviceRef",
    "DevicesGet",
    "Direction",
    "Error",
    "Hello",
    "HoursInterval",
    "ItemFlag",
    "ItemKind",
    "Limits",
    "Message",
    "OutboundEnvelope",
    "PrekeysLow",
    "PrekeysPut",
    "PrekeysStored",
    "Resume",
    "Roster",
    "RosterAdd",
    "RosterGet",
    "RosterRemove",
    "RosterShift",
    "ScheduleSet",
    "Send",
    "Sent",
    "Welcome",
    "decode_body",
    "encode_body",
    "invalid",
]
