"""The engine's facade: one open profile, its relay connection and everything a front end needs
(`Engine`), and the factory that assembles it (`open_engine`).

A front end (the CLI, the records gateway, an integration test) calls `open_engine` with the
profile directory, the passphrase, the reactor, the clock and the random source, then uses the
`Engine` methods, each returning a Deferred, and finally `close()`. Nothing here prints or
prompts. Events (messages as they arrive, failure and expiry notices, connection changes) go to
the listeners registered with `subscribe`.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from medrelay.clients.engine import availability, staff
from medrelay.clients.engine.availability import AvailabilityView, ScheduleChange, ShiftView
from medrelay.clients.engine.connection import (
    Connector,
    Credentials,
    Dialer,
    ServerConnection,
)
from medrelay.clients.engine.enrollment import now_ms
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.http import AgentHttpClient, HttpClient, parse_server_url
from medrelay.clients.engine.linking import ExistingDevice, LinkResult, LinkUi
from medrelay.clients.engine.messaging import (
    Directory,
    Messenger,
    PrekeyKeeper,
    Receiver,
    notice_view,
    view_of_stored,
)
from medrelay.clients.engine.record_messages import (
    KIND_RECORD_RECEIPT,
    RECORDS_USER,
    RecordReceipt,
)
from medrelay.clients.engine.staff import CareLinkView, NewAccountView, PersonView
from medrelay.clients.engine.store import (
    NOTICE_SECURITY,
    OpenProfile,
    Runner,
    StoredMessage,
    StoredNotice,
    ThreadRunner,
    clear_token_txn,
    find_messages_txn,
    get_token_txn,
    insert_notice_txn,
    list_messages_txn,
    list_notices_txn,
    list_received_after_txn,
    mark_messages_read_txn,
    mark_notices_read_txn,
    open_profile,
    set_token_txn,
)
from medrelay.clients.engine.transparency import LogVerifier, load_own_devices_txn
from medrelay.clients.engine.views import (
    CLINIC_NOTICE_KINDS,
    ConnectionStatus,
    DeviceView,
    Event,
    MessageView,
    NoticeView,
    OutgoingFile,
    ReceiptView,
    ReceivedMessage,
    RecordSent,
    SavedAttachment,
    SentMessage,
    VisitsView,
    VisitView,
    Whoami,
)
from medrelay.clients.engine.visits import VisitBook
from medrelay.clients.engine.websocket import WebSocketDialer
from medrelay.crypto.attachments import AttachmentDescriptor
from medrelay.crypto.certificates import Role
from medrelay.crypto.content import SignedContent
from medrelay.crypto.rng import Rng
from medrelay.crypto.safety import safety_number
from medrelay.protocol.messages import Deliver, PrekeysLow

SETTLE_S: Final = 0.5
"""How long `sync` waits for further deliveries after the queue looked drained."""

_log = Logger()
_V = TypeVar("_V", MessageView, MessageView | NoticeView)


class Engine:
    """One open profile and its relay connection."""

    def __init__(
        self,
        profile: OpenProfile,
        *,
        dialer: Dialer,
        http: HttpClient,
        clock: IReactorTime,
        rng: Rng,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        info = profile.info
        self.profile = profile
        self.server = parse_server_url(info.server_url)
        self._http = http
        self._clock = clock
        self._rng = rng
        self._on_close = on_close
        self._listeners: list[Callable[[Event], None]] = []
        self._closed = False
        self.connector = Connector(
            dialer=dialer,
            credentials=Credentials(
                info.clinic_id, info.user_id, info.device_id, profile.secrets.device.signing_key
            ),
            tokens=self,
            events=self,
            clock=clock,
            rng=rng,
        )
        self.log = LogVerifier(profile, self.connector)
        self.directory = Directory(profile, self.connector, clock, self.log, self._security_warning)
        self.messenger = Messenger(
            profile,
            self.connector,
            self.directory,
            http,
            self.server,
            clock=clock,
            rng=rng,
            tokens=self.load_token,
        )
        self.receiver = Receiver(
            profile, self.directory, self.log, clock=clock, rng=rng, notify=self._notify
        )
        self.prekeys = PrekeyKeeper(profile, rng=rng)
        self.visit_book = VisitBook(
            profile, self.connector, self.messenger, self.directory, self.log, clock=clock, rng=rng
        )

    # -- facts -----------------------------------------------------------------------------

    @property
    def user_id(self) -> str:
        return self.profile.info.user_id

    @property
    def device_id(self) -> str:
        return self.profile.info.device_id

    def whoami(self) -> Whoami:
        info = self.profile.info
        cert = info.user_certificate
        return Whoami(
            user_id=info.user_id,
            device_id=info.device_id,
            display_name=cert.display_name,
            role=cert.role.value,
            clinic_id=info.clinic_id,
            server_url=info.server_url,
            enrolled_at_ms=info.enrolled_at_ms,
        )

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call `listener` for every event; returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _notify(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                _log.failure("an event listener failed")

    def _security_warning(
        self, user_id: str, device_id: str, message_id: bytes, reason: str
    ) -> Deferred[None]:
        """Keep a security warning as a notice (shown once by `unread`) and emit it now."""
        recorded = now_ms(self._clock)
        d = self.profile.db.run_interaction(
            "security_notice",
            insert_notice_txn,
            kind=NOTICE_SECURITY,
            message_id=message_id,
            user_id=user_id,
            device_id=device_id,
            server_ms=recorded,
            recorded_ms=recorded,
            reason=reason,
        )

        def emit(_: object) -> None:
            self._notify(
                NoticeView(NOTICE_SECURITY, message_id, user_id, device_id, recorded, reason)
            )

        return d.addCallback(emit)

    # -- connection ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and stay connected (reconnecting) until `close`."""
        self.connector.start()

    def connect(self) -> Deferred[None]:
        """Connect and log in; fails on the first failed attempt (SERVER_UNREACHABLE...)."""
        return self.connector.when_ready(fail_fast=True).addCallback(lambda _: None)

    def sync(self, settle_s: float = SETTLE_S) -> Deferred[None]:
        """Connect, then wait until the relay's queue for this device looks drained: every
        delivered batch handled, the outbox flushed, a round trip answered and nothing new for
        `settle_s` seconds. (Protocol v1 has no explicit "queue empty" signal.)"""
        return Deferred.fromCoroutine(self._sync(settle_s))

    async def _sync(self, settle_s: float) -> None:
        await self.connector.when_ready(fail_fast=True)
        while True:
            mark = self.receiver.batches_received
            await self.receiver.idle()
            await self.messenger.idle()
            await self.directory.user(self.user_id, refresh=True)
            await self.receiver.idle()
            await deferLater(self._clock, settle_s)
            await self.receiver.idle()
            await self.messenger.idle()
            if self.receiver.batches_received == mark:
                return

    # TokenStore

    def load_token(self) -> Deferred[bytes | None]:
        return self.profile.db.run_interaction(
            "load_token", get_token_txn, self.profile.sealer, now_ms(self._clock)
        )

    def save_token(self, token: bytes, expires_ms: int) -> Deferred[None]:
        return self.profile.db.run_interaction(
            "save_token", set_token_txn, self.profile.sealer, token, expires_ms
        )

    def clear_token(self) -> Deferred[None]:
        return self.profile.db.run_interaction("clear_token", clear_token_txn)

    # ConnectorEvents

    def connection_ready(self, connection: ServerConnection) -> None:
        self._notify(ConnectionStatus(connected=True))
        self.messenger.kick()

    def deliver(self, connection: ServerConnection, message: Deliver) -> None:
        self.receiver.on_deliver(connection, message.items)

    def prekeys_low(self, connection: ServerConnection, message: PrekeysLow) -> None:
        self.prekeys.on_prekeys_low(connection, message.wanted)

    def connection_down(self, error: ClientError | None, *, retry_in_s: float | None) -> None:
        detail = "" if error is None else error.message
        self._notify(ConnectionStatus(connected=False, detail=detail, retry_in_s=retry_in_s))

    # -- messages --------------------------------------------------------------------------

    def send_message(
        self,
        to_user: str,
        text: str,
        files: Sequence[OutgoingFile] = (),
        *,
        urgent: bool = False,
    ) -> Deferred[SentMessage]:
        """Encrypt, persist and send; fires with the relay's confirmation. A refusal fails with
        a `RemoteError` (`unknown_user`, `forbidden`, `queue_full`...). `urgent`: while the
        clinician is away, the on-call clinician of their department receives it too."""
        return Deferred.fromCoroutine(self.messenger.send(to_user, text, files, urgent=urgent))

    def unread(self, *, mark_read: bool = True) -> Deferred[list[MessageView | NoticeView]]:
        """Messages and notices not shown before (then marked as shown), oldest first."""
        d = self.profile.db.run_interaction("unread", self._unread_txn, mark_read)
        return d.addCallback(lambda items: Deferred.fromCoroutine(self._with_receipts(items)))

    def _unread_txn(
        self, conn: sqlite3.Connection, mark_read: bool
    ) -> list[MessageView | NoticeView]:
        messages = list_messages_txn(conn, self.profile.sealer, unread_only=True)
        notices = list_notices_txn(conn, unread_only=True)
        if mark_read:
            mark_messages_read_txn(conn, [m.row_id for m in messages])
            mark_notices_read_txn(conn, [n.row_id for n in notices])
        return _merge(messages, notices)

    async def _with_receipts(self, items: list[_V]) -> list[_V]:
        """Decode `record_receipt` messages, believed only from an account the clinic
        certified as its records gateway; anything else about them shows as failed."""
        shown: list[_V] = []
        for item in items:
            if isinstance(item, MessageView) and item.kind == KIND_RECORD_RECEIPT:
                shown.append(await self._receipt(item))
            else:
                shown.append(item)
        return shown

    async def _receipt(self, view: MessageView) -> MessageView:
        try:
            sender = await self.directory.user(view.sender_user)
        except ClientError as exc:
            return dataclasses.replace(
                view, receipt_error=f"its sender could not be verified: {exc.message}"
            )
        role = sender.certificate.role
        if role is not Role.RECORDS:
            return dataclasses.replace(
                view,
                receipt_error=f"{view.sender_user} is a {role.value}, not the records gateway",
            )
        try:
            receipt = RecordReceipt.decode(view.text)
        except ValueError as exc:
            return dataclasses.replace(view, receipt_error=f"a malformed receipt ({exc})")
        return dataclasses.replace(
            view,
            receipt=ReceiptView(
                visit_id=receipt.visit_id,
                saved=receipt.saved,
                records=receipt.records,
                reason=receipt.reason,
                bundle_sha256=receipt.bundle_sha256,
                summary=receipt.summary(),
            ),
        )

    def clinic_notices(self, message_id: bytes) -> Deferred[list[NoticeView]]:
        """After `sync`: the clinic's notices about our message `message_id` not shown before
        (an automatic reply, where an urgent message went), then marked as shown."""

        def take(conn: sqlite3.Connection) -> list[NoticeView]:
            found = [
                n
                for n in list_notices_txn(conn, unread_only=True)
                if n.message_id == message_id and n.kind in CLINIC_NOTICE_KINDS
            ]
            mark_notices_read_txn(conn, [n.row_id for n in found])
            return [notice_view(n) for n in found]

        return self.profile.db.run_interaction("clinic_notices", take)

    def history(self, limit: int = 50) -> Deferred[list[MessageView]]:
        """The last `limit` messages, oldest first."""

        def load(conn: sqlite3.Connection) -> list[MessageView]:
            stored = list_messages_txn(conn, self.profile.sealer, unread_only=False, limit=limit)
            return [view_of_stored(m) for m in stored]

        d = self.profile.db.run_interaction("history", load)
        return d.addCallback(lambda items: Deferred.fromCoroutine(self._with_receipts(items)))

    def received_after(self, row_id: int, limit: int = 100) -> Deferred[list[ReceivedMessage]]:
        """Received messages stored after profile row `row_id` (0: from the first), oldest
        first, at most `limit`: for a program that polls, resuming from the last `row_id`."""
        if row_id < 0 or not 0 < limit <= 1000:
            raise ValueError("row_id must be ≥ 0 and limit 1 to 1000")

        def load(conn: sqlite3.Connection) -> list[ReceivedMessage]:
            stored = list_received_after_txn(conn, self.profile.sealer, row_id, limit)
            return [_received(m) for m in stored]

        return self.profile.db.run_interaction("received_after", load)

    def send_in_thread(
        self,
        recipients: Sequence[str],
        thread_id: bytes,
        kind: str,
        text: str,
        files: Sequence[OutgoingFile] = (),
    ) -> Deferred[SentMessage]:
        """One signed content of `kind` in thread `thread_id`, addressed to all `recipients`
        and encrypted for all their devices (and our other ones); our messages in the thread
        chain through `previous_hash`. Fires with the relay's confirmation."""
        return Deferred.fromCoroutine(
            self.messenger.send_to(recipients, text, files, kind=kind, thread_id=thread_id)
        )

    def download(self, descriptor: AttachmentDescriptor) -> Deferred[bytes]:
        """Download one attachment by its signed descriptor, checked and decrypted (the records
        gateway fetches the attachments a record bundle's messages describe)."""
        return Deferred.fromCoroutine(self.messenger.download(descriptor))

    def attachments(self, message_id: bytes) -> Deferred[list[SavedAttachment]]:
        """Download, check and decrypt every attachment of a stored message."""
        return Deferred.fromCoroutine(self._attachments(message_id))

    async def _attachments(self, message_id: bytes) -> list[SavedAttachment]:
        found = await self.profile.db.run_interaction(
            "find_message", find_messages_txn, self.profile.sealer, message_id
        )
        if not found:
            raise ClientError(LocalCode.NOT_FOUND, f"no message {message_id.hex()} in this profile")
        content = SignedContent.decode(found[0].signed_content).content
        if not content.attachments:
            raise ClientError(LocalCode.NOT_FOUND, "that message has no attachments")
        saved = []
        for descriptor in content.attachments:
            data = await self.messenger.download(descriptor)
            saved.append(SavedAttachment(descriptor.file_name, descriptor.media_type, data))
        return saved

    # -- identities ------------------------------------------------------------------------

    def devices(self) -> Deferred[list[DeviceView]]:
        """This account's devices as the relay lists them, each verified."""
        return Deferred.fromCoroutine(self._devices())

    async def _devices(self) -> list[DeviceView]:
        own = await self.directory.user(self.user_id, refresh=True)
        known = await self.profile.db.run_interaction(
            "own_devices", load_own_devices_txn, self.device_id
        )
        return [
            DeviceView(
                device_id,
                own.created_at_ms[device_id],
                device_id == self.device_id,
                added_by_you=device_id in known,
            )
            for device_id in sorted(own.devices)
        ]

    def link_device(self, ui: LinkUi) -> Deferred[LinkResult]:
        """Link a new device to this account from this one (docs/protocol.md §16): `ui` shows
        the code and asks the user to compare the digits."""
        existing = ExistingDevice(
            profile=self.profile,
            http=self._http,
            server=self.server,
            clock=self._clock,
            rng=self._rng,
            login=self.connect,
            tokens=self.load_token,
            forget_token=self.clear_token,
        )
        return Deferred.fromCoroutine(existing.run(ui))

    def safety_number(self, user_id: str) -> Deferred[str]:
        """The 60-digit safety number between this user and `user_id` (verified identity)."""
        return Deferred.fromCoroutine(self._safety_number(user_id))

    async def _safety_number(self, user_id: str) -> str:
        peer = await self.directory.user(user_id, refresh=True)
        info = self.profile.info
        return safety_number(
            info.user_certificate.identity_key,
            info.user_id,
            peer.certificate.identity_key,
            user_id,
        )

    # -- the directory and staff requests ------------------------------------------------

    def search_directory(
        self, query: str, *, specialty: str | None = None, department: str | None = None
    ) -> Deferred[list[PersonView]]:
        """People matching the search, each verified against the identity log."""
        return Deferred.fromCoroutine(
            staff.search_directory(
                self.connector, self.log, query, specialty=specialty, department=department
            )
        )

    def create_account(
        self,
        username: str,
        role: str,
        name: str,
        *,
        specialty: str | None = None,
        department: str | None = None,
    ) -> Deferred[NewAccountView]:
        """Create an account (registrars: patients; admins: staff); fires with its code."""
        return Deferred.fromCoroutine(
            staff.create_account(
                self.connector,
                username,
                role,
                name,
                specialty=specialty,
                department=department,
            )
        )

    def create_care_link(
        self, patient: str, clinician: str, visit_date: str, until: str | None = None
    ) -> Deferred[CareLinkView]:
        return Deferred.fromCoroutine(
            staff.create_link(self.connector, patient, clinician, visit_date, until)
        )

    def end_care_link(self, patient: str, clinician: str) -> Deferred[CareLinkView]:
        return Deferred.fromCoroutine(staff.end_link(self.connector, patient, clinician))

    # -- hours and the on-call roster -----------------------------------------------------

    def availability(self, user_id: str) -> Deferred[AvailabilityView]:
        """A clinician's hours, whether they are available now, and who is on call meanwhile."""
        return Deferred.fromCoroutine(availability.get_availability(self.connector, user_id))

    def set_schedule(self, user_id: str, change: ScheduleChange) -> Deferred[AvailabilityView]:
        """Change a schedule (one's own; admins any clinician's); fires with the new state."""
        return Deferred.fromCoroutine(availability.set_schedule(self.connector, user_id, change))

    def roster_add(
        self, clinician: str, department: str, starts_ms: int, ends_ms: int
    ) -> Deferred[list[ShiftView]]:
        return Deferred.fromCoroutine(
            availability.roster_add(self.connector, clinician, department, starts_ms, ends_ms)
        )

    def roster_remove(self, shift_id: int) -> Deferred[list[ShiftView]]:
        return Deferred.fromCoroutine(availability.roster_remove(self.connector, shift_id))

    def roster(self, after_ms: int | None = None) -> Deferred[list[ShiftView]]:
        """The on-call shifts that have not ended (by `after_ms`, or now)."""
        return Deferred.fromCoroutine(availability.roster_list(self.connector, after_ms))

    # -- visits and the medical record --------------------------------------------------

    def visits(self, *, visit: str | None = None, open_only: bool = False) -> Deferred[VisitsView]:
        """Our visits, newest first (or visit `visit` only), with the clinic's indications and
        consent mode."""
        return Deferred.fromCoroutine(self.visit_book.list_visits(visit=visit, open_only=open_only))

    def open_visit(self, patient: str, indication: str) -> Deferred[VisitView]:
        """Open a teleconsultation visit (doctors, for a patient they saw in person), then tell
        the patient in the visit's thread that it will be saved in their medical record."""
        return Deferred.fromCoroutine(self.visit_book.open(patient, indication))

    def close_visit(
        self, visit: str, conclusion_text: str, files: Sequence[OutgoingFile] = ()
    ) -> Deferred[VisitView]:
        """Send the conclusion in the visit's thread, then close the visit with its id (safe to
        call again after a failure: a conclusion already sent is reused)."""
        return Deferred.fromCoroutine(self.visit_book.close(visit, conclusion_text, files))

    def consent_to_visit(self, visit: str) -> Deferred[SentMessage]:
        """The patient agrees, in the visit's thread, that the visit is saved in their record."""
        return Deferred.fromCoroutine(self.visit_book.consent(visit))

    def save_record(
        self,
        *,
        visit: str | None = None,
        with_user: str | None = None,
        from_ms: int | None = None,
        to_ms: int | None = None,
        records_user: str = RECORDS_USER,
    ) -> Deferred[RecordSent]:
        """Send a closed visit (`visit`), or the conversation with patient `with_user` between
        `from_ms` and `to_ms`, to the records account as a verified record bundle."""
        return Deferred.fromCoroutine(
            self.visit_book.save_record(
                visit=visit,
                with_user=with_user,
                from_ms=from_ms,
                to_ms=to_ms,
                records_user=records_user,
            )
        )

    def now_ms(self) -> int:
        return now_ms(self._clock)

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.connector.stop()
        self.messenger.fail_waiters(ClientError(LocalCode.CLOSED, "the client closed"))
        await self.receiver.idle()
        await self.profile.db.close()
        if self._on_close is not None:
            self._on_close()


def _received(stored: StoredMessage) -> ReceivedMessage:
    content = SignedContent.decode(stored.signed_content).content
    return ReceivedMessage(
        row_id=stored.row_id,
        message_id=content.message_id,
        sender_user=stored.sender_user,
        sender_device=stored.sender_device,
        recipients=content.recipients,
        thread_id=content.thread_id,
        kind=content.kind,
        text=content.text,
        sent_at_ms=content.sent_at_ms,
        server_ms=stored.server_ms,
        attachments=len(content.attachments),
        signed_content=stored.signed_content,
    )


def _merge(
    messages: Sequence[StoredMessage], notices: Sequence[StoredNotice]
) -> list[MessageView | NoticeView]:
    timed: list[tuple[int, int, MessageView | NoticeView]] = []
    for m in messages:
        timed.append((m.stored_ms, 0, view_of_stored(m)))
    for n in notices:
        timed.append((n.recorded_ms, 1, notice_view(n)))
    timed.sort(key=lambda entry: (entry[0], entry[1]))
    return [view for _, _, view in timed]


def open_engine(
    profile_dir: Path,
    passphrase: str,
    *,
    reactor: Any,
    clock: IReactorTime,
    rng: Rng,
    runner: Runner | None = None,
    http: HttpClient | None = None,
    dialer: Dialer | None = None,
) -> Deferred[Engine]:
    """Unlock the profile in `profile_dir` and assemble its engine (not yet connected).

    Without `runner`, database work and Argon2id run on a private one-thread pool, stopped by
    `Engine.close`; `http` and `dialer` default to the real Agent and WebSocket ones.
    """
    own_runner: ThreadRunner | None = None
    if runner is None:
        own_runner = ThreadRunner(reactor)
        runner = own_runner

    def opened(profile: OpenProfile) -> Engine:
        server = parse_server_url(profile.info.server_url)
        return Engine(
            profile,
            dialer=dialer if dialer is not None else WebSocketDialer(reactor, server),
            http=http if http is not None else AgentHttpClient(reactor, clock),
            clock=clock,
            rng=rng,
            on_close=None if own_runner is None else own_runner.stop,
        )

    def failed(failure: Failure) -> Failure:
        if own_runner is not None:
            own_runner.stop()
        return failure

    d = open_profile(profile_dir, passphrase, runner=runner, rng=rng)
    return d.addCallbacks(opened, failed)
