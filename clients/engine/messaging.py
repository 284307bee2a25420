"""Messaging: verified peers, sending through a durable outbox, receiving, prekey top-up.

Directory. A peer's keys are used only after its whole chain verified: the clinic root key pinned
at enrollment → the issuing-key certificate → the user certificate → each device certificate
(`verify_device_chain`). Lists come from `devices_get` or `bundle_get`; the certificates are
cached in the profile and verified again whenever they are loaded. A user whose list does not
verify is refused whole: a relay that forges one device of a user is attacking.

Sending. `Content` (thread of the last message exchanged with that user, `previous_hash` = hash of
our previous content in the thread) → `sign_content` → `encrypt_for_devices` for every device of
the recipient and our own other devices (bundles fetched for devices without a session) → a
`send` frame with a fresh 16-byte message id. The sealed message, the session changes and the
outbox row (the frame's body) commit in one transaction before anything is sent; the outbox is
flushed on every new connection and resends identical envelopes until `sent` arrives (the relay
is idempotent on the message id). `stale_devices` refreshes the device lists, keeps the envelopes
of devices still current, encrypts for the new ones and resends under the same id.

Kinds and threads (`send_to`). A content may carry another kind than text (a visit's
`visit_opened`, `consent`, `conclusion`; `record_bundle`, `record_receipt`), name an explicit
thread and be addressed to several users at once (one signature, encrypted for every device of
them all). Whatever the thread, our messages in it chain through `thread_heads`: each names the
hash of our previous content in the same thread as `previous_hash`, which is what lets a record
bundle show that nothing was left out.

Urgent. A message marked urgent asks the relay for the clinician's availability first: while
they are away and someone is on call for their department, the content names both as its signed
recipients and is encrypted for both users' devices, so the on-call clinician can read it at
once (docs/protocol.md §17). When the relay refuses because the roster changed meanwhile
(`on_call_changed`), the queued message is re-addressed: asked again, signed again for the new
recipients under the same id and previous hash, and resent.

Receiving. Items of a `deliver` are handled one at a time, in order: deduplicated by (sender
user, sender device, message id); the sender's device resolved and verified (fetched when
unknown); decrypted, decoded, its signature verified, its message id and recipients checked; the
message stored (sealed) — and only then acknowledged, in one `ack` per batch. An item that cannot
be decrypted or verified is recorded as a failure notice (never shown as a message) and
acknowledged. A transient failure (the connection broke, a lookup timed out) stops the batch
without acknowledging the rest and drops the connection, so the relay delivers them again.

Clinic notices (`notice` items: automatic replies, urgent routing) are the clinic speaking, not a
person: each is checked against the clinic's keys (the issuing key certified by the pinned root,
valid when it was signed), must be addressed to this user, and must be about a message this
profile sent to the clinician it names. Only then is it kept and shown, as an automatic clinic
notice; one that fails is recorded as a failure and never shown as the clinic's word.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar
from urllib.parse import quote

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from medrelay.clients.engine.availability import get_availability
from medrelay.clients.engine.connection import Connector, ServerConnection, expect
from medrelay.clients.engine.enrollment import b64url, now_ms
from medrelay.clients.engine.errors import ClientError, LocalCode, RemoteError
from medrelay.clients.engine.http import HttpClient, ServerUrl, json_answer
from medrelay.clients.engine.record_messages import THREAD_KINDS
from medrelay.clients.engine.store import (
    NOTICE_EXPIRED,
    NOTICE_FAILED,
    STATUS_FAILED,
    STATUS_RECEIVED,
    STATUS_SENDING,
    STATUS_SENT,
    OpenProfile,
    OutboxEntry,
    SqlSessionStore,
    StoredMessage,
    StoredNotice,
    allocate_one_time_prekey_ids_txn,
    delete_outbox_txn,
    find_messages_txn,
    get_conversation_txn,
    get_message_txn,
    get_thread_head_txn,
    insert_message_txn,
    insert_notice_txn,
    item_seen_txn,
    list_outbox_txn,
    load_peer_txn,
    load_prekeys_txn,
    note_outbox_attempt_txn,
    put_outbox_txn,
    replace_signed_content_txn,
    save_peer_txn,
    save_prekeys_txn,
    set_conversation_txn,
    set_message_status_txn,
    set_thread_head_txn,
)
from medrelay.clients.engine.transparency import LogVerifier, load_own_devices_txn
from medrelay.clients.engine.views import (
    CLINIC_NOTICE_KINDS,
    AttachmentView,
    ClinicNoticeView,
    Event,
    MessageView,
    NoticeView,
    OutgoingFile,
    SentMessage,
)
from medrelay.crypto.attachments import (
    MAX_BLOB_ID_BYTES,
    AttachmentDescriptor,
    decrypt_attachment,
    encrypt_attachment,
    encrypted_size,
)
from medrelay.crypto.certificates import (
    DeviceCertificate,
    UserCertificate,
    verify_device_chain,
)
from medrelay.crypto.content import (
    ID_SIZE,
    KIND_TEXT,
    MAX_ATTACHMENTS,
    MAX_KIND_BYTES,
    MAX_TEXT_BYTES,
    Content,
    LogView,
    SignedContent,
    canonical_recipients,
    content_hash,
    new_message_id,
    new_thread_id,
    sign_content,
    verify_signed_content,
)
from medrelay.crypto.errors import CryptoError, ProofError
from medrelay.crypto.identity import DeviceAddress, DeviceIdentity, check_id
from medrelay.crypto.keys import DHPrivateKey
from medrelay.crypto.notices import ClinicNotice
from medrelay.crypto.rng import Rng
from medrelay.crypto.sessions import (
    MAX_ONE_TIME_PREKEYS,
    InMemoryPrekeyStore,
    MissingPrekeyBundle,
    decrypt_from_device,
    encrypt_for_devices,
)
from medrelay.crypto.transparency import ClinicTrust, UserState
from medrelay.crypto.x3dh import (
    OneTimePrekey,
    PrekeyBundle,
    SignedPrekey,
    generate_one_time_prekeys,
)
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import MAX_ONE_TIME_PREKEYS_PER_UPLOAD
from medrelay.protocol.messages import (
    Ack,
    Bundle,
    DeliveredItem,
    DeviceList,
    DevicesGet,
    Direction,
    ItemKind,
    OutboundEnvelope,
    PrekeysPut,
    PrekeysStored,
    Send,
    Sent,
    decode_body,
    encode_body,
)
from medrelay.protocol.messages import BundleGet as BundleGetMessage

MAX_STALE_RETRIES: Final = 3
"""Resends of one queued message after `stale_devices` or `on_call_changed`."""
MAX_BUNDLE_ROUNDS: Final = 3
MAX_BLOB_SIZE: Final = 25 * 1024 * 1024
BLOBS_PATH: Final = "/v1/blobs"

# A refusal that retrying cannot fix: the message is marked failed and leaves the outbox.
_TERMINAL_SEND_CODES: Final = frozenset(
    {
        ErrorCode.UNKNOWN_USER,
        ErrorCode.FORBIDDEN,
        ErrorCode.QUEUE_FULL,
        ErrorCode.ID_CONFLICT,
        ErrorCode.INVALID_FIELD,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.MALFORMED_FRAME,
        ErrorCode.NON_CANONICAL,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.STALE_DEVICES,
    }
)
# Failures of the sender's verification that make an item permanently unreadable.
_PERMANENT_LOOKUP_CODES: Final = frozenset(
    {LocalCode.PEER_UNVERIFIED, ErrorCode.UNKNOWN_USER, LocalCode.BAD_SERVER_ANSWER}
)

_KIND: Final = re.compile(r"[a-z0-9][a-z0-9._-]*")
"""What `Content` accepts as a kind (checked here so a bad one is a clean refusal)."""

_log = Logger()
_T = TypeVar("_T")

Notify = Callable[[Event], None]
Warn = Callable[[str, str, bytes, str], Deferred[None]]
"""Record and show a security warning: (user, device, message id or 16 zero bytes, text)."""


# --- the directory ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class PeerUser:
    """A user whose certificate chain and every listed device verified."""

    user_id: str
    certificate: UserCertificate
    devices: Mapping[str, DeviceIdentity]
    created_at_ms: Mapping[str, int]
    identity_changed: bool
    """The clinic certified another identity key than the one first seen (a new safety number)."""


def verify_peer(
    trust: ClinicTrust,
    user_id: str,
    user_certificate: bytes,
    devices: Sequence[tuple[str, bytes]],
    at_ms: int,
) -> tuple[UserCertificate, dict[str, DeviceIdentity], dict[str, int]]:
    """Verify a user's certificate and every device's chain to the pinned root (through any
    issuing key the root certified)."""
    try:
        user = UserCertificate.decode(user_certificate)
        issuing = trust.issuing_certificate(user.issuer_key_hash)
        if user.user_id != user_id:
            raise ClientError(
                LocalCode.PEER_UNVERIFIED,
                f"the server sent another user's certificate for {user_id}",
            )
        identities: dict[str, DeviceIdentity] = {}
        created: dict[str, int] = {}
        for device_id, cert_bytes in devices:
            cert = DeviceCertificate.decode(cert_bytes)
            if cert.device_id != device_id or device_id in identities:
                raise ClientError(
                    LocalCode.PEER_UNVERIFIED,
                    f"the server's device list for {user_id} is inconsistent",
                )
            verified = verify_device_chain(trust.root_key, issuing, user, cert, at_ms)
            identities[device_id] = verified.device
            created[device_id] = cert.created_at_ms
    except CryptoError as exc:
        raise ClientError(
            LocalCode.PEER_UNVERIFIED,
            f"the certificates of {user_id} do not verify ({exc}); refusing to use them",
        ) from None
    return user, identities, created


class Directory:
    """Verified identities of peers (and of our own other devices), cached in memory and in the
    profile."""

    def __init__(
        self,
        profile: OpenProfile,
        connector: Connector,
        clock: IReactorTime,
        log: LogVerifier,
        warn: Warn,
    ) -> None:
        self._profile = profile
        self._connector = connector
        self._clock = clock
        self._transparency = log
        self._warn = warn
        self._cache: dict[str, PeerUser] = {}

    def cached(self, user_id: str) -> PeerUser | None:
        return self._cache.get(user_id)

    async def user(self, user_id: str, *, refresh: bool = False) -> PeerUser:
        if not refresh:
            cached = self._cache.get(user_id)
            if cached is not None:
                return cached
            stored = await self._profile.db.run_interaction("load_peer", load_peer_txn, user_id)
            if stored is not None:
                await self._transparency.load()
                try:
                    cert, devices, created = verify_peer(
                        self._transparency.trust,
                        user_id,
                        stored.user_certificate,
                        stored.devices,
                        now_ms(self._clock),
                    )
                except ClientError:
                    pass  # expired or damaged: fetch afresh below
                else:
                    peer = PeerUser(
                        user_id,
                        cert,
                        devices,
                        created,
                        cert.identity_key.to_text() != stored.first_identity_key,
                    )
                    self._cache[user_id] = peer
                    return peer
        answer = expect(
            await self._connector.request(lambda rid: DevicesGet(rid=rid, user=user_id)),
            DeviceList,
        )
        return await self._accept(
            user_id,
            answer.user,
            answer.user_certificate,
            [(entry.device, entry.certificate) for entry in answer.devices],
        )

    async def device(self, user_id: str, device_id: str) -> DeviceIdentity:
        """A device's verified identity; the list is fetched again once if it is unknown."""
        peer = await self.user(user_id)
        if device_id not in peer.devices:
            peer = await self.user(user_id, refresh=True)
        identity = peer.devices.get(device_id)
        if identity is None:
            raise ClientError(
                LocalCode.PEER_UNVERIFIED, f"{device_id} is not a certified device of {user_id}"
            )
        return identity

    async def bundles(self, user_id: str) -> tuple[PeerUser, dict[DeviceAddress, PrekeyBundle]]:
        """Fresh prekey bundles for every device of a user, each verified."""
        answer = expect(
            await self._connector.request(lambda rid: BundleGetMessage(rid=rid, user=user_id)),
            Bundle,
        )
        peer = await self._accept(
            user_id,
            answer.user,
            answer.user_certificate,
            [(b.device, b.certificate) for b in answer.devices],
        )
        bundles: dict[DeviceAddress, PrekeyBundle] = {}
        for entry in answer.devices:
            identity = peer.devices[entry.device]
            try:
                signed = SignedPrekey.decode(entry.signed_prekey)
                signed.verify(identity)
                one_time = (
                    None
                    if entry.one_time_prekey is None
                    else OneTimePrekey.decode(entry.one_time_prekey)
                )
            except CryptoError as exc:
                raise ClientError(
                    LocalCode.PEER_UNVERIFIED,
                    f"the prekeys of {user_id}/{entry.device} do not verify ({exc})",
                ) from None
            bundles[identity.address] = PrekeyBundle(identity, signed, one_time)
        return peer, bundles

    async def _accept(
        self,
        user_id: str,
        answered_user: str,
        user_certificate: bytes,
        devices: Sequence[tuple[str, bytes]],
    ) -> PeerUser:
        if answered_user != user_id:
            raise ClientError(LocalCode.BAD_SERVER_ANSWER, "the server answered for another user")
        at_ms = now_ms(self._clock)
        # The log first: its answer may bring clinic keys rotated in since (trust follows).
        state = await self._transparency.user_state(user_id)
        if user_id == self._profile.info.user_id:
            await self._monitor_own(state)
        cert, identities, created = verify_peer(
            self._transparency.trust, user_id, user_certificate, devices, at_ms
        )
        # The relay's list must be exactly what the transparency log proves: a key the log does
        # not show, or a device the relay leaves out, is refused whole.
        check_against_log(state, user_id, user_certificate, devices)
        identity_key = cert.identity_key.to_text()
        first = await self._profile.db.run_interaction(
            "save_peer",
            save_peer_txn,
            user_id,
            user_certificate=user_certificate,
            identity_key=identity_key,
            devices=list(devices),
            now_ms=at_ms,
        )
        peer = PeerUser(user_id, cert, identities, created, first != identity_key)
        self._cache[user_id] = peer
        return peer

    def log_view(self) -> LogView | None:
        """Our transparency-log checkpoint, for the messages we sign."""
        return self._transparency.view()

    async def check_view(self, item: DeliveredItem, view: LogView) -> None:
        """Report a sender's log view that conflicts with ours (a split view). A transient
        failure is let go: the next message from anyone checks again."""
        try:
            warning = await self._transparency.check_view(view)
        except ClientError as exc:
            if exc.code is not LocalCode.LOG_CONFLICT:
                _log.info("could not check a sender's log view: {code}", code=exc.code)
                return
            warning = exc.message
        if warning is not None:
            await self._warn(item.user, item.device, item.message_id, warning)

    async def _monitor_own(self, state: UserState) -> None:
        """Warn, once each, about what our own account's log shows that we did not do: a new
        identity key certified for us (only the clinic's issuing key and the server are needed
        for that: someone may be impersonating us), or a device we do not know."""
        info = self._profile.info
        own_identity = self._profile.secrets.identity_key.verify_key
        if state.certificate.identity_key != own_identity:
            await self._warn(
                info.user_id,
                "",
                state.head_hash[:16],
                "SECURITY WARNING: the clinic's log shows your account certified with an "
                "identity key that is not yours; someone may be impersonating you: tell "
                "clinic IT at once",
            )
        known = await self._profile.db.run_interaction(
            "own_devices", load_own_devices_txn, info.device_id
        )
        for device_id in sorted(set(state.devices) - known):
            await self._warn(
                info.user_id,
                device_id,
                bytes(16),
                f"SECURITY WARNING: device {device_id} was added to your account, but not "
                "from this device; if you did not link it yourself, tell clinic IT at once",
            )


def check_against_log(
    state: UserState,
    user_id: str,
    user_certificate: bytes,
    devices: Sequence[tuple[str, bytes]],
) -> None:
    """Refuse a relay answer that differs from the user's state in the transparency log."""
    if state.revoked:
        raise ClientError(
            LocalCode.PEER_UNVERIFIED, f"the account {user_id} is revoked; it cannot be used"
        )
    listed = dict(devices)
    logged = {device_id: cert.encode() for device_id, cert in state.devices.items()}
    if state.certificate.encode() != user_certificate or listed != logged:
        unlogged = sorted(set(listed) - set(logged))
        hidden = sorted(set(logged) - set(listed))
        detail = ", ".join(
            part
            for part in (
                f"devices not in the log: {', '.join(unlogged)}" if unlogged else "",
                f"logged devices left out: {', '.join(hidden)}" if hidden else "",
            )
            if part
        )
        raise ClientError(
            LocalCode.PEER_UNVERIFIED,
            f"SECURITY WARNING: the server's keys for {user_id} differ from the transparency "
            f"log ({detail or 'other certificates'}); refusing to use them: tell clinic IT",
        )


# --- sending ----------------------------------------------------------------------------------


class _TrackingPrekeys:
    """The prekey store of one transaction, remembering whether a one-time prekey was used."""

    def __init__(self, store: InMemoryPrekeyStore) -> None:
        self.store = store
        self.changed = False

    def signed_prekey(self, prekey_id: int) -> DHPrivateKey | None:
        return self.store.signed_prekey(prekey_id)

    def one_time_prekey(self, prekey_id: int) -> DHPrivateKey | None:
        return self.store.one_time_prekey(prekey_id)

    def consume_one_time_prekey(self, prekey_id: int) -> None:
        self.store.consume_one_time_prekey(prekey_id)
        self.changed = True


def _missing_sessions_txn(
    conn: sqlite3.Connection, profile: OpenProfile, targets: Sequence[DeviceIdentity]
) -> list[DeviceAddress]:
    own = profile.secrets.device.identity
    sessions = SqlSessionStore(conn, profile.sealer)
    missing = []
    for target in targets:
        record = sessions.load(target.address)
        if record is None or not record.active.belongs_to(own, target):
            missing.append(target.address)
    return missing


def message_view(
    content: Content,
    *,
    peer_user: str,
    outgoing: bool,
    server_ms: int | None,
    status: str,
    error: str | None = None,
    flags: tuple[str, ...] = (),
) -> MessageView:
    return MessageView(
        message_id=content.message_id,
        sender_user=content.sender_user_id,
        sender_device=content.sender_device_id,
        peer_user=peer_user,
        outgoing=outgoing,
        thread_id=content.thread_id,
        sent_at_ms=content.sent_at_ms,
        server_ms=server_ms,
        status=status,
        text=content.text,
        attachments=tuple(
            AttachmentView(i, a.file_name, a.media_type, a.size)
            for i, a in enumerate(content.attachments)
        ),
        error=error,
        flags=flags,
        kind=content.kind,
    )


def view_of_stored(stored: StoredMessage) -> MessageView:
    """The view of a stored row (its signed content decoded; it verified when it was stored)."""
    content = SignedContent.decode(stored.signed_content).content
    return message_view(
        content,
        peer_user=stored.peer_user,
        outgoing=stored.outgoing,
        server_ms=stored.server_ms,
        status=stored.status,
        error=stored.error,
        flags=stored.flags,
    )


class Messenger:
    """Composes, encrypts, persists and sends messages; owns the outbox."""

    def __init__(
        self,
        profile: OpenProfile,
        connector: Connector,
        directory: Directory,
        http: HttpClient,
        server: ServerUrl,
        *,
        clock: IReactorTime,
        rng: Rng,
        tokens: Callable[[], Deferred[bytes | None]],
    ) -> None:
        self._profile = profile
        self._connector = connector
        self._directory = directory
        self._http = http
        self._server = server
        self._clock = clock
        self._rng = rng
        self._tokens = tokens
        self._waiters: dict[bytes, list[Deferred[SentMessage]]] = {}
        self._flushing = False
        self._flush_again = False
        self._idle_waiters: list[Deferred[None]] = []

    @property
    def _own(self) -> DeviceIdentity:
        return self._profile.secrets.device.identity

    # -- public ----------------------------------------------------------------------------

    async def send(
        self,
        to_user: str,
        text: str,
        files: Sequence[OutgoingFile] = (),
        *,
        urgent: bool = False,
    ) -> SentMessage:
        return await self.send_to((to_user,), text, files, urgent=urgent)

    async def send_to(
        self,
        to_users: Sequence[str],
        text: str,
        files: Sequence[OutgoingFile] = (),
        *,
        urgent: bool = False,
        kind: str = KIND_TEXT,
        thread_id: bytes | None = None,
    ) -> SentMessage:
        """One signed content for every user of `to_users` (encrypted for all their devices and
        our own other ones). Without `thread_id` it goes in the conversation thread with the
        first of them. A visit's kinds (`THREAD_KINDS`) make `thread_id` the conversation thread
        with each recipient, so replies land in it."""
        own = self._own
        users = tuple(to_users)
        if not users or len(set(users)) != len(users):
            raise ClientError(LocalCode.INVALID_ARGUMENT, "give each recipient once")
        if urgent and len(users) != 1:
            raise ClientError(LocalCode.INVALID_ARGUMENT, "an urgent message has one recipient")
        for user_id in users:
            _check_message(user_id, text, files, own.user_id)
        if len(kind.encode("utf-8")) > MAX_KIND_BYTES or not _KIND.fullmatch(kind):
            raise ClientError(LocalCode.INVALID_ARGUMENT, f"{kind!r} is not a message kind")
        if thread_id is not None and len(thread_id) != ID_SIZE:
            raise ClientError(LocalCode.INVALID_ARGUMENT, f"a thread id is {ID_SIZE} bytes")
        await self._connector.when_ready(fail_fast=True)
        for user_id in users:
            recipient = await self._directory.user(user_id)
            if not recipient.devices:
                raise ClientError(
                    LocalCode.NOT_SENT, f"{user_id} has no enrolled device yet; nothing was sent"
                )
        to_user = users[0]
        recipients = (
            await self._recipients(to_user, urgent) if urgent else canonical_recipients(users)
        )
        for user_id in recipients:
            await self._directory.user(user_id)
        await self._directory.user(own.user_id)
        descriptors = [await self.upload(f) for f in files]
        message_id = new_message_id(self._rng)
        sent_at_ms = now_ms(self._clock)
        conversations = users if kind in THREAD_KINDS else ()

        def persist(
            targets: Sequence[DeviceIdentity], bundles: Mapping[DeviceAddress, PrekeyBundle]
        ) -> Deferred[OutboxEntry]:
            return self._profile.db.run_interaction(
                "compose_message",
                self._compose_txn,
                to_user=to_user,
                recipients=recipients,
                urgent=urgent,
                kind=kind,
                text=text,
                descriptors=descriptors,
                message_id=message_id,
                sent_at_ms=sent_at_ms,
                thread_id=thread_id,
                conversations=conversations,
                targets=targets,
                bundles=bundles,
            )

        entry = await self._with_sessions(recipients, persist)
        waiter: Deferred[SentMessage] = Deferred()
        self._waiters.setdefault(entry.message_id, []).append(waiter)
        self.kick()
        return await waiter

    async def wait_sent(self, message_id: bytes) -> None:
        """Until our queued message `message_id` is confirmed by the relay (sent now if the
        connection is up); fails if it was refused for good."""
        own = self._own
        waiter: Deferred[SentMessage] = Deferred()
        self._waiters.setdefault(message_id, []).append(waiter)
        self.kick()
        stored = await self._profile.db.run_interaction(
            "load_own_message",
            get_message_txn,
            self._profile.sealer,
            own.user_id,
            own.device_id,
            message_id,
        )
        if stored is None or stored.status != STATUS_SENDING:
            waiting = self._waiters.get(message_id, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if stored is None or stored.status == STATUS_FAILED:
                reason = "it is not in this profile" if stored is None else stored.error
                raise ClientError(
                    LocalCode.NOT_SENT, f"message {message_id.hex()} was not sent: {reason}"
                )
            return
        await waiter

    async def _recipients(self, to_user: str, urgent: bool) -> tuple[str, ...]:
        """Who the message is signed for: `to_user`, and for an urgent message while they are
        away, the clinician on call for their department (the relay says who)."""
        if not urgent:
            return (to_user,)
        availability = await get_availability(self._connector, to_user)
        on_call = availability.on_call
        if availability.open_now or on_call is None or on_call in (to_user, self._own.user_id):
            return (to_user,)
        return canonical_recipients((to_user, on_call))

    def kick(self) -> None:
        """Flush the outbox on the ready connection (or note that another pass is needed)."""
        if self._flushing:
            self._flush_again = True
            return
        connection = self._connector.connection
        if connection is None:
            return
        self._flushing = True

        def done(result: object) -> None:
            self._flushing = False
            if isinstance(result, Failure):
                _log.failure("flushing the outbox failed", result)
            if self._flush_again:
                self._flush_again = False
                self.kick()
            if not self._flushing:
                idle, self._idle_waiters = self._idle_waiters, []
                for d in idle:
                    d.callback(None)

        Deferred.fromCoroutine(self._flush(connection)).addBoth(done)

    def idle(self) -> Deferred[None]:
        """Fires when no outbox flush is running."""
        if not self._flushing:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def fail_waiters(self, error: ClientError) -> None:
        waiters, self._waiters = self._waiters, {}
        for ds in waiters.values():
            for d in ds:
                if not d.called:  # a caller may have cancelled its wait
                    d.errback(error)

    # -- attachments -----------------------------------------------------------------------

    async def upload(self, file: OutgoingFile) -> AttachmentDescriptor:
        descriptor, blob = encrypt_attachment(file.data, file.media_type, file.file_name, self._rng)
        answer = json_answer(
            await self._http.request(
                "POST",
                self._server.http(BLOBS_PATH),
                headers={
                    **(await self._authorization()),
                    "Content-Type": "application/octet-stream",
                },
                body=blob,
            )
        )
        blob_id = answer.get("blob_id") if isinstance(answer, dict) else None
        if (
            not isinstance(blob_id, str)
            or not blob_id
            or len(blob_id.encode("utf-8")) > MAX_BLOB_ID_BYTES
        ):
            raise ClientError(
                LocalCode.BAD_SERVER_ANSWER, "the server's upload answer has no blob id"
            )
        return dataclasses.replace(descriptor, blob_id=blob_id)

    async def download(self, descriptor: AttachmentDescriptor) -> bytes:
        await self._connector.when_ready(fail_fast=True)
        response = await self._http.request(
            "GET",
            self._server.http(f"{BLOBS_PATH}/{quote(descriptor.blob_id, safe='')}"),
            headers=await self._authorization(),
            max_response_bytes=encrypted_size(descriptor.size),
        )
        if response.status != 200:
            json_answer(response)  # raises the error it carries
        try:
            return decrypt_attachment(descriptor, response.body)
        except CryptoError as exc:
            raise ClientError(
                LocalCode.ATTACHMENT_INVALID,
                f"the attachment does not match its signed description ({exc})",
            ) from None

    async def _authorization(self) -> dict[str, str]:
        await self._connector.when_ready(fail_fast=True)
        token = await self._tokens()
        if token is None:
            raise ClientError(LocalCode.CONNECTION_LOST, "no session with the server")
        return {"Authorization": f"Bearer {b64url(token)}"}

    # -- composing -------------------------------------------------------------------------

    def _targets(self, users: Iterable[str]) -> list[DeviceIdentity]:
        own = self._own
        targets: list[DeviceIdentity] = []
        for user_id in sorted(set(users)):
            peer = self._directory.cached(user_id)
            if peer is None:
                continue
            for device_id in sorted(peer.devices):
                identity = peer.devices[device_id]
                if identity.address != own.address:
                    targets.append(identity)
        return targets

    async def _with_sessions(
        self,
        recipients: Sequence[str],
        persist: Callable[
            [Sequence[DeviceIdentity], Mapping[DeviceAddress, PrekeyBundle]], Deferred[_T]
        ],
        only: Callable[[DeviceIdentity], bool] | None = None,
    ) -> _T:
        """Run `persist(targets, bundles)` with bundles for every target lacking a session,
        fetching them (and retrying) when a device appeared meanwhile."""
        users = (*recipients, self._own.user_id)
        bundles: dict[DeviceAddress, PrekeyBundle] = {}
        for _ in range(MAX_BUNDLE_ROUNDS):
            targets = [t for t in self._targets(users) if only is None or only(t)]
            missing = await self._profile.db.run_interaction(
                "plan_sessions", _missing_sessions_txn, self._profile, targets
            )
            for user_id in sorted({a.user_id for a in missing if a not in bundles}):
                _, fetched = await self._directory.bundles(user_id)
                bundles.update(fetched)
            targets = [t for t in self._targets(users) if only is None or only(t)]
            usable = {a: b for a, b in bundles.items() if any(t == b.identity for t in targets)}
            try:
                return await persist(targets, usable)
            except MissingPrekeyBundle:
                continue
        raise ClientError(
            LocalCode.NOT_SENT, "could not set up sessions with every device; nothing was sent"
        )

    def _compose_txn(
        self,
        conn: sqlite3.Connection,
        *,
        to_user: str,
        recipients: Sequence[str],
        urgent: bool,
        kind: str = KIND_TEXT,
        text: str,
        descriptors: Sequence[AttachmentDescriptor],
        message_id: bytes,
        sent_at_ms: int,
        thread_id: bytes | None = None,
        conversations: Sequence[str] = (),
        targets: Sequence[DeviceIdentity],
        bundles: Mapping[DeviceAddress, PrekeyBundle],
    ) -> OutboxEntry:
        profile = self._profile
        own = profile.secrets.device
        if thread_id is None:
            thread_id = get_conversation_txn(conn, to_user) or new_thread_id(self._rng)
            conversations = (to_user,)
        content = Content(
            thread_id=thread_id,
            message_id=message_id,
            sender_user_id=own.identity.user_id,
            sender_device_id=own.identity.device_id,
            sender_certificate_hash=own.identity.certificate_hash,
            recipients=canonical_recipients(recipients),
            sent_at_ms=sent_at_ms,
            previous_hash=get_thread_head_txn(conn, thread_id),
            log_view=self._directory.log_view(),
            kind=kind,
            text=text,
            attachments=tuple(descriptors),
        )
        signed = sign_content(content, own).encode()
        ciphertexts = encrypt_for_devices(
            own, signed, targets, SqlSessionStore(conn, profile.sealer), bundles, self._rng
        )
        body = _send_body(message_id, ciphertexts.items(), urgent=urgent)
        now = now_ms(self._clock)
        insert_message_txn(
            conn,
            profile.sealer,
            message_id=message_id,
            sender_user=own.identity.user_id,
            sender_device=own.identity.device_id,
            peer_user=to_user,
            outgoing=True,
            thread_id=thread_id,
            sent_at_ms=sent_at_ms,
            server_ms=None,
            stored_ms=now,
            status=STATUS_SENDING,
            signed_content=signed,
            read=True,  # written here: never "new" on this device
        )
        put_outbox_txn(conn, message_id, to_user, body, now)
        for user_id in conversations:
            set_conversation_txn(conn, user_id, thread_id, now)
        # Our messages in one thread chain through its head, whoever they are addressed to.
        set_thread_head_txn(conn, thread_id, content_hash(content), sent_at_ms)
        return OutboxEntry(message_id, to_user, body, now, 0)

    # -- the outbox ------------------------------------------------------------------------

    async def _flush(self, connection: ServerConnection) -> None:
        while True:
            self._flush_again = False
            entries = await self._profile.db.run_interaction("list_outbox", list_outbox_txn)
            for entry in entries:
                if connection.closed:
                    return
                await self._push(connection, entry)
            if not self._flush_again:
                return

    async def _push(self, connection: ServerConnection, entry: OutboxEntry) -> None:
        for _ in range(MAX_STALE_RETRIES + 1):
            send = decode_body(entry.body, Direction.CLIENT_TO_SERVER)
            assert isinstance(send, Send)  # noqa: S101 (we stored it)
            await self._profile.db.run_interaction(
                "note_attempt", note_outbox_attempt_txn, entry.message_id
            )
            try:
                answer = expect(await connection.request(functools.partial(_with_rid, send)), Sent)
            except RemoteError as exc:
                if exc.code is ErrorCode.STALE_DEVICES or (
                    exc.code is ErrorCode.ON_CALL_CHANGED and send.urgent
                ):
                    try:
                        if exc.code is ErrorCode.STALE_DEVICES:
                            entry = await self._reencrypt(entry, send, exc)
                        else:
                            entry = await self._readdress(entry)
                    except ClientError as failure:
                        await self._give_up(entry, failure)
                        return
                    continue
                if exc.code in _TERMINAL_SEND_CODES:
                    await self._give_up(entry, exc)
                    return
                self._resolve(
                    entry.message_id,
                    ClientError(
                        LocalCode.NOT_SENT,
                        f"the server could not take the message now ({exc.code.value}); "
                        "it stays queued and is sent on the next connection",
                    ),
                )
                return
            except ClientError:
                return  # connection lost or timed out: the next connection resends it
            if answer.message_id != entry.message_id:
                _log.warn("the server confirmed another message id; keeping ours queued")
                return
            own = self._own
            await self._profile.db.run_interaction(
                "message_sent", _mark_sent_txn, own, entry.message_id, answer.time_ms
            )
            self._resolve(
                entry.message_id,
                SentMessage(
                    entry.message_id,
                    answer.time_ms,
                    entry.peer_user,
                    len(send.envelopes),
                    held=bool(answer.held),
                    reads_at_ms=answer.reads_at_ms,
                    on_call=answer.on_call,
                ),
            )
            return
        await self._give_up(
            entry,
            ClientError(
                LocalCode.NOT_SENT,
                "the recipients' devices or the on-call roster kept changing; not sent",
            ),
        )

    async def _own_queued(self, entry: OutboxEntry) -> tuple[StoredMessage, Content]:
        own = self._own
        stored = await self._profile.db.run_interaction(
            "load_own_message",
            get_message_txn,
            self._profile.sealer,
            own.user_id,
            own.device_id,
            entry.message_id,
        )
        if stored is None:
            raise ClientError(LocalCode.NOT_SENT, "the queued message is gone from the profile")
        return stored, SignedContent.decode(stored.signed_content).content

    async def _reencrypt(self, entry: OutboxEntry, send: Send, refusal: RemoteError) -> OutboxEntry:
        own = self._own
        stored, content = await self._own_queued(entry)
        users = {*content.recipients, own.user_id}
        for user_id in sorted(users | {ref.user for ref in (*refusal.missing, *refusal.extra)}):
            await self._directory.user(user_id, refresh=True)
        current = {t.address for t in self._targets(users)}
        kept = {
            DeviceAddress(e.user, e.device): e.ciphertext
            for e in send.envelopes
            if DeviceAddress(e.user, e.device) in current
        }

        def persist(
            targets: Sequence[DeviceIdentity], bundles: Mapping[DeviceAddress, PrekeyBundle]
        ) -> Deferred[OutboxEntry]:
            return self._profile.db.run_interaction(
                "reencrypt_message",
                self._reencrypt_txn,
                entry=entry,
                plaintext=stored.signed_content,
                kept=kept,
                urgent=bool(send.urgent),
                targets=targets,
                bundles=bundles,
            )

        return await self._with_sessions(
            content.recipients, persist, only=lambda t: t.address not in kept
        )

    async def _readdress(self, entry: OutboxEntry) -> OutboxEntry:
        """An urgent message the relay refused because the on-call roster changed: ask who is
        on call now and sign the same message (id, thread, time, previous hash) for them."""
        _, content = await self._own_queued(entry)
        recipients = await self._recipients(entry.peer_user, urgent=True)
        for user_id in (*recipients, self._own.user_id):
            await self._directory.user(user_id, refresh=True)
        readdressed = dataclasses.replace(content, recipients=recipients)

        def persist(
            targets: Sequence[DeviceIdentity], bundles: Mapping[DeviceAddress, PrekeyBundle]
        ) -> Deferred[OutboxEntry]:
            return self._profile.db.run_interaction(
                "readdress_message",
                self._readdress_txn,
                entry=entry,
                before=content,
                after=readdressed,
                targets=targets,
                bundles=bundles,
            )

        return await self._with_sessions(recipients, persist)

    def _readdress_txn(
        self,
        conn: sqlite3.Connection,
        *,
        entry: OutboxEntry,
        before: Content,
        after: Content,
        targets: Sequence[DeviceIdentity],
        bundles: Mapping[DeviceAddress, PrekeyBundle],
    ) -> OutboxEntry:
        profile = self._profile
        own = profile.secrets.device
        signed = sign_content(after, own).encode()
        ciphertexts = encrypt_for_devices(
            own, signed, targets, SqlSessionStore(conn, profile.sealer), bundles, self._rng
        )
        body = _send_body(entry.message_id, ciphertexts.items(), urgent=True)
        replace_signed_content_txn(
            conn,
            profile.sealer,
            sender_user=own.identity.user_id,
            sender_device=own.identity.device_id,
            message_id=entry.message_id,
            signed_content=signed,
        )
        # The thread's chain goes through the message as it is finally sent. (A later message
        # already chained to the refused version keeps that hash: a gap a record would show.)
        if get_thread_head_txn(conn, after.thread_id) == content_hash(before):
            set_thread_head_txn(conn, after.thread_id, content_hash(after), after.sent_at_ms)
        put_outbox_txn(conn, entry.message_id, entry.peer_user, body, entry.created_ms)
        return dataclasses.replace(entry, body=body)

    def _reencrypt_txn(
        self,
        conn: sqlite3.Connection,
        *,
        entry: OutboxEntry,
        plaintext: bytes,
        kept: Mapping[DeviceAddress, bytes],
        urgent: bool,
        targets: Sequence[DeviceIdentity],
        bundles: Mapping[DeviceAddress, PrekeyBundle],
    ) -> OutboxEntry:
        fresh = encrypt_for_devices(
            self._profile.secrets.device,
            plaintext,
            targets,
            SqlSessionStore(conn, self._profile.sealer),
            bundles,
            self._rng,
        )
        envelopes = {**kept, **fresh}
        if not envelopes:
            raise ClientError(LocalCode.NOT_SENT, f"{entry.peer_user} has no devices left")
        body = _send_body(entry.message_id, envelopes.items(), urgent=urgent)
        put_outbox_txn(conn, entry.message_id, entry.peer_user, body, entry.created_ms)
        return dataclasses.replace(entry, body=body)

    async def _give_up(self, entry: OutboxEntry, error: ClientError) -> None:
        own = self._own
        await self._profile.db.run_interaction(
            "message_failed", _mark_failed_txn, own, entry.message_id, error.message
        )
        self._resolve(entry.message_id, error)

    def _resolve(self, message_id: bytes, outcome: SentMessage | ClientError) -> None:
        for d in self._waiters.pop(message_id, []):
            if d.called:
                continue  # the caller cancelled its wait (a timeout); the outcome is stored
            if isinstance(outcome, ClientError):
                d.errback(outcome)
            else:
                d.callback(outcome)


def _with_rid(send: Send, rid: int) -> Send:
    return dataclasses.replace(send, rid=rid)


def _send_body(
    message_id: bytes, ciphertexts: Iterable[tuple[DeviceAddress, bytes]], *, urgent: bool
) -> bytes:
    envelopes = tuple(
        OutboundEnvelope(user=a.user_id, device=a.device_id, ciphertext=c)
        for a, c in sorted(ciphertexts, key=lambda item: (item[0].user_id, item[0].device_id))
    )
    return encode_body(
        Send(rid=0, message_id=message_id, envelopes=envelopes, urgent=True if urgent else None)
    )


def _mark_sent_txn(
    conn: sqlite3.Connection, own: DeviceIdentity, message_id: bytes, server_ms: int
) -> None:
    set_message_status_txn(
        conn, own.user_id, own.device_id, message_id, STATUS_SENT, server_ms=server_ms
    )
    delete_outbox_txn(conn, message_id)


def _mark_failed_txn(
    conn: sqlite3.Connection, own: DeviceIdentity, message_id: bytes, reason: str
) -> None:
    set_message_status_txn(
        conn, own.user_id, own.device_id, message_id, STATUS_FAILED, error=reason
    )
    delete_outbox_txn(conn, message_id)


def _check_message(to_user: str, text: str, files: Sequence[OutgoingFile], own_user: str) -> None:
    try:
        check_id(to_user, "username")
    except (TypeError, ValueError) as exc:
        raise ClientError(LocalCode.INVALID_ARGUMENT, str(exc)) from None
    if to_user == own_user:
        raise ClientError(LocalCode.INVALID_ARGUMENT, "you cannot send a message to yourself")
    if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise ClientError(
            LocalCode.INVALID_ARGUMENT, f"the text is longer than {MAX_TEXT_BYTES} bytes"
        )
    if len(files) > MAX_ATTACHMENTS:
        raise ClientError(
            LocalCode.INVALID_ARGUMENT, f"at most {MAX_ATTACHMENTS} attachments per message"
        )
    for file in files:
        if len(file.data) > MAX_BLOB_SIZE:
            raise ClientError(
                LocalCode.INVALID_ARGUMENT,
                f"an attachment is larger than {MAX_BLOB_SIZE // (1024 * 1024)} MiB",
            )


# --- receiving --------------------------------------------------------------------------------


class _Undecryptable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _crypto_reason(exc: CryptoError) -> str:
    return f"cannot decrypt ({exc.code}: {exc})"


class Receiver:
    """Handles delivered items in order; acknowledges each only once it is stored."""

    def __init__(
        self,
        profile: OpenProfile,
        directory: Directory,
        log: LogVerifier,
        *,
        clock: IReactorTime,
        rng: Rng,
        notify: Notify,
    ) -> None:
        self._profile = profile
        self._directory = directory
        self._log = log
        self._clock = clock
        self._rng = rng
        self._notify = notify
        self._lock = DeferredLock()
        self.batches_received = 0

    def on_deliver(self, connection: ServerConnection, items: Sequence[DeliveredItem]) -> None:
        self.batches_received += 1

        def process() -> Deferred[None]:
            return Deferred.fromCoroutine(self._process(connection, items))

        d = self._lock.run(process)
        d.addErrback(lambda f: _log.failure("handling delivered items failed", f))

    def idle(self) -> Deferred[None]:
        """Fires once every batch received so far is handled."""
        return self._lock.run(lambda: succeed(None))

    async def _process(self, connection: ServerConnection, items: Sequence[DeliveredItem]) -> None:
        acks: list[int] = []
        try:
            for item in items:
                event = await self._handle(item)
                acks.append(item.seq)
                if event is not None:
                    self._notify(event)
        except ClientError as exc:
            # Transient: acknowledge what is stored and let the relay deliver the rest again.
            _log.info("stopped handling a delivery: {code}", code=exc.code.value)
            if acks:
                connection.send(Ack(seqs=tuple(acks)))
            connection.close()
            return
        if acks:
            connection.send(Ack(seqs=tuple(acks)))

    async def _handle(self, item: DeliveredItem) -> Event | None:
        db = self._profile.db
        if item.kind == ItemKind.EXPIRED:
            row = await db.run_interaction(
                "record_expired",
                insert_notice_txn,
                kind=NOTICE_EXPIRED,
                message_id=item.message_id,
                user_id=item.user,
                device_id=item.device,
                server_ms=item.time_ms,
                recorded_ms=now_ms(self._clock),
                reason="the message expired before this device fetched it",
            )
            if row is None:
                return None
            return NoticeView(
                NOTICE_EXPIRED,
                item.message_id,
                item.user,
                item.device,
                item.time_ms,
                "the message expired before this device fetched it",
            )
        if item.kind == ItemKind.NOTICE:
            return await self._clinic_notice(item)
        if await db.run_interaction("seen", item_seen_txn, item.user, item.device, item.message_id):
            return None
        try:
            sender = await self._directory.device(item.user, item.device)
        except ClientError as exc:
            if exc.code in _PERMANENT_LOOKUP_CODES:
                return await self._record_failure(
                    item, f"the sender could not be verified: {exc.message}"
                )
            raise
        try:
            event, view = await db.run_interaction("receive", self._receive_txn, item, sender)
        except _Undecryptable as exc:
            return await self._record_failure(item, exc.reason)
        if event is not None and view is not None:
            await self._directory.check_view(item, view)
        return event

    def _receive_txn(
        self, conn: sqlite3.Connection, item: DeliveredItem, sender: DeviceIdentity
    ) -> tuple[Event | None, LogView | None]:
        """Decrypt, verify and store one item; returns its event and the sender's log view."""
        profile = self._profile
        own = profile.secrets.device
        assert item.ciphertext is not None  # noqa: S101 (a "msg" item carries one)
        if item_seen_txn(conn, item.user, item.device, item.message_id):
            return None, None  # stored meanwhile by another process on this profile
        prekeys = _TrackingPrekeys(load_prekeys_txn(conn, profile.sealer))
        try:
            plaintext = decrypt_from_device(
                own,
                sender,
                item.ciphertext,
                SqlSessionStore(conn, profile.sealer),
                prekeys,
                self._rng,
            )
        except CryptoError as exc:
            raise _Undecryptable(_crypto_reason(exc)) from None
        if prekeys.changed:
            save_prekeys_txn(conn, profile.sealer, prekeys.store)
        # From here the ratchet has advanced: failures are recorded in this same transaction.
        reason: str | None = None
        content: Content | None = None
        try:
            content = verify_signed_content(SignedContent.decode(plaintext), sender)
        except CryptoError as exc:
            reason = f"the sender's signature or content does not verify ({exc.code})"
        own_user = own.identity.user_id
        if content is not None:
            if content.message_id != item.message_id:
                reason = "the signed message id differs from the one the relay gave"
            elif content.sender_user_id != own_user and not content.is_addressed_to(own_user):
                reason = "the message was signed for other recipients (forwarded?)"
        if reason is not None or content is None:
            return self._failure_txn(conn, item, reason or "unverifiable"), None
        outgoing = content.sender_user_id == own_user
        if outgoing:
            others = [r for r in content.recipients if r != own_user]
            peer_user = others[0] if others else own_user
        else:
            peer_user = content.sender_user_id
        now = now_ms(self._clock)
        insert_message_txn(
            conn,
            profile.sealer,
            message_id=content.message_id,
            sender_user=item.user,
            sender_device=item.device,
            peer_user=peer_user,
            outgoing=outgoing,
            thread_id=content.thread_id,
            sent_at_ms=content.sent_at_ms,
            server_ms=item.time_ms,
            stored_ms=now,
            status=STATUS_SENT if outgoing else STATUS_RECEIVED,
            signed_content=plaintext,
            read=False,  # a copy of what our other device sent is news here too
            flags=item.flags or (),
        )
        set_conversation_txn(conn, peer_user, content.thread_id, now)
        if outgoing:
            set_thread_head_txn(conn, content.thread_id, content_hash(content), content.sent_at_ms)
        view = message_view(
            content,
            peer_user=peer_user,
            outgoing=outgoing,
            server_ms=item.time_ms,
            status=STATUS_SENT if outgoing else STATUS_RECEIVED,
            flags=tuple(sorted(item.flags or ())),
        )
        return view, content.log_view

    async def _clinic_notice(self, item: DeliveredItem) -> Event | None:
        assert item.ciphertext is not None  # noqa: S101 (a "notice" item carries one)
        own_user = self._profile.info.user_id
        try:
            notice = ClinicNotice.decode(item.ciphertext)
        except CryptoError as exc:
            return await self._record_failure(item, f"a damaged clinic notice ({exc})")
        await self._log.load()
        try:
            notice.verify(self._log.trust, recipient=own_user)
        except ProofError:
            # Perhaps signed by an issuing key this device has not seen yet: refresh the
            # clinic's keys through the identity log once, then decide.
            await self._log.user_state(own_user)
            try:
                notice.verify(self._log.trust, recipient=own_user)
            except ProofError as exc:
                return await self._record_failure(
                    item,
                    f"SECURITY WARNING: a clinic notice that is not the clinic's ({exc}); "
                    "it is not shown. Tell clinic IT",
                )
        return await self._profile.db.run_interaction(
            "clinic_notice", self._clinic_notice_txn, item, notice
        )

    def _clinic_notice_txn(
        self, conn: sqlite3.Connection, item: DeliveredItem, notice: ClinicNotice
    ) -> Event | None:
        own_user = self._profile.info.user_id
        # Sent from this device or (a copy) from another of ours.
        about = next(
            (m for m in find_messages_txn(conn, self._profile.sealer, item.message_id)
             if m.outgoing and m.sender_user == own_user),
            None,
        )  # fmt: skip
        recipients = (
            () if about is None else SignedContent.decode(about.signed_content).content.recipients
        )
        if (
            notice.in_reply_to != item.message_id
            or notice.clinician != item.user
            or notice.clinician not in recipients
        ):
            return self._failure_txn(
                conn,
                item,
                "a clinic notice about a message this profile did not send to that clinician",
            )
        if notice.on_call is not None and notice.on_call not in recipients:
            # We encrypted the urgent message to whoever we were told is on call: a notice
            # naming someone else would tell the patient a wrong name.
            return self._failure_txn(
                conn,
                item,
                f"a clinic notice naming {notice.on_call} as on call, but the urgent message "
                "went to someone else",
            )
        row = insert_notice_txn(
            conn,
            kind=notice.kind.value,
            message_id=item.message_id,
            user_id=notice.clinician,
            device_id="",
            server_ms=item.time_ms,
            recorded_ms=now_ms(self._clock),
            reason=notice.text,
            detail=item.ciphertext,
        )
        if row is None:
            return None  # delivered again
        return NoticeView(
            notice.kind.value,
            item.message_id,
            notice.clinician,
            "",
            item.time_ms,
            notice.text,
            clinic=clinic_view(notice),
        )

    def _failure_txn(self, conn: sqlite3.Connection, item: DeliveredItem, reason: str) -> Event:
        insert_notice_txn(
            conn,
            kind=NOTICE_FAILED,
            message_id=item.message_id,
            user_id=item.user,
            device_id=item.device,
            server_ms=item.time_ms,
            recorded_ms=now_ms(self._clock),
            reason=reason,
        )
        return NoticeView(
            NOTICE_FAILED, item.message_id, item.user, item.device, item.time_ms, reason
        )

    async def _record_failure(self, item: DeliveredItem, reason: str) -> Event:
        return await self._profile.db.run_interaction(
            "record_failure", self._failure_txn, item, reason
        )


def clinic_view(notice: ClinicNotice) -> ClinicNoticeView:
    return ClinicNoticeView(
        clinician=notice.clinician,
        reads_at_ms=notice.reads_at_ms,
        time_zone=notice.time_zone,
        text=notice.text,
        emergency_numbers=notice.emergency_numbers,
        on_call=notice.on_call,
    )


def notice_view(notice: StoredNotice) -> NoticeView:
    clinic = None
    if notice.kind in CLINIC_NOTICE_KINDS and notice.detail is not None:
        # Verified when it arrived; decoded again only to show it. A damaged row shows as a
        # plain notice rather than breaking every later `inbox`.
        try:
            clinic = clinic_view(ClinicNotice.decode(notice.detail))
        except CryptoError:
            clinic = None
    return NoticeView(
        notice.kind,
        notice.message_id,
        notice.user_id,
        notice.device_id,
        notice.server_ms,
        notice.reason,
        clinic=clinic,
    )


# --- prekeys ----------------------------------------------------------------------------------


class PrekeyKeeper:
    """Answers `prekeys_low`: generates, stores (sealed) and then uploads one-time prekeys."""

    def __init__(self, profile: OpenProfile, *, rng: Rng) -> None:
        self._profile = profile
        self._rng = rng
        self._busy = False

    def on_prekeys_low(self, connection: ServerConnection, wanted: int) -> Deferred[None] | None:
        count = min(wanted, MAX_ONE_TIME_PREKEYS_PER_UPLOAD)
        if self._busy or count <= 0:
            return None
        self._busy = True

        def done(result: object) -> None:
            self._busy = False
            if isinstance(result, Failure):
                _log.info("topping up prekeys failed: {error}", error=result.getErrorMessage())

        d = Deferred.fromCoroutine(self._top_up(connection, count))
        d.addBoth(done)
        return d

    async def _top_up(self, connection: ServerConnection, count: int) -> None:
        records = await self._profile.db.run_interaction("new_prekeys", self._generate_txn, count)
        if not records:
            return
        expect(
            await connection.request(
                lambda rid: PrekeysPut(rid=rid, one_time_prekeys=tuple(records))
            ),
            PrekeysStored,
        )

    def _generate_txn(self, conn: sqlite3.Connection, count: int) -> list[bytes]:
        sealer = self._profile.sealer
        prekeys = load_prekeys_txn(conn, sealer)
        room = MAX_ONE_TIME_PREKEYS - len(prekeys.one_time_prekey_records())
        count = max(0, min(count, room))
        if not count:
            return []
        first = allocate_one_time_prekey_ids_txn(conn, count)
        pairs = generate_one_time_prekeys(first, count, self._rng)
        prekeys.add_one_time_prekeys(pairs)
        save_prekeys_txn(conn, sealer, prekeys)
        return [pair.record.encode() for pair in pairs]
