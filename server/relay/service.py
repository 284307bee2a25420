"""The relay: logins, sends, acknowledgements, prekeys and delivery to connected devices.

`RelayService` is the policy layer between transport adapters and storage. It holds the table of
connected devices, feeds every write through the group-commit `WriteBatcher`, and pushes what a
commit queued to the devices that are online. Every request is decided by the policy table
(`medrelay.server.policy`): sends inside the store's transaction, the others here before the
store is asked. Time and randomness come from the injected clock and rng; storage is any
`RelayStore`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medrelay.crypto.certificates import Role
from medrelay.crypto.errors import CryptoError
from medrelay.crypto.keys import VerifyKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.x3dh import OneTimePrekey, SignedPrekey
from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import (
    CHALLENGE_SIZE,
    MAX_ACKS_PER_FRAME,
    MAX_CIPHERTEXT_SIZE,
    MAX_ENVELOPES_PER_SEND,
    MAX_FRAME_SIZE,
    TOKEN_SIZE,
)
from medrelay.protocol.messages import (
    AccountCreate,
    Auth,
    Authenticated,
    Bundle,
    BundleGet,
    DeviceBundle,
    DeviceEntry,
    DeviceList,
    DevicesGet,
    DirectorySearch,
    ItemKind,
    Limits,
    LinkCreate,
    LinkEnd,
    LogGet,
    Message,
    PrekeysLow,
    PrekeysPut,
    PrekeysStored,
    Resume,
    Send,
    Sent,
)
from medrelay.server.availability.offhours import OffHours
from medrelay.server.metrics import SEND_OUTCOMES, RelayMetrics
from medrelay.server.policy import (
    Relationship,
    RequestType,
    Standing,
    authorize,
    authorize_standing,
)
from medrelay.server.relay.connection import ClientConnection, ConnectionTransport
from medrelay.server.relay.delivery import DeliveryPump
from medrelay.server.relay.errors import RelayError, unknown_user
from medrelay.server.relay.groupcommit import WriteBatcher
from medrelay.server.relay.store import (
    BundleRecord,
    DeviceListRecord,
    DeviceRecord,
    Envelope,
    QueuedItem,
    RelayStore,
    SendAccepted,
    SendRequest,
    WriteLimits,
    WriteResult,
)
from medrelay.server.transparency import TransparencyLog

if TYPE_CHECKING:
    from medrelay.server.availability.service import AvailabilityRequest, AvailabilityService
    from medrelay.server.staff import StaffService
    from medrelay.server.visits import VisitRequest, VisitService

_log = Logger()


def auth_failed() -> RelayError:
    """The same answer for an unknown device and a bad signature (no oracle for devices)."""
    return RelayError(
        ErrorCode.AUTH_FAILED, "login refused: unknown device or bad signature", fatal=True
    )


def token_invalid() -> RelayError:
    return RelayError(
        ErrorCode.TOKEN_INVALID,
        "the session token is unknown or expired; log in again",
        fatal=True,
    )


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The relay's tunables (parsed from the server configuration)."""

    clinic_id: str
    ttl_s: int = 30 * 24 * 3600
    queue_cap: int = 10_000
    session_ttl_s: int = 30 * 24 * 3600
    auth_timeout_s: float = 10.0
    window_items: int = 256
    window_bytes: int = 1024 * 1024
    max_frame_size: int = MAX_FRAME_SIZE
    prekey_low_water: int = 20
    prekey_target: int = 100
    expiry_interval_s: float = 60.0
    expiry_batch: int = 1000

    def limits(self) -> Limits:
        return Limits(
            max_frame=self.max_frame_size,
            max_ciphertext=MAX_CIPHERTEXT_SIZE,
            max_envelopes=MAX_ENVELOPES_PER_SEND,
            max_acks=MAX_ACKS_PER_FRAME,
        )


def send_digest(envelopes: Sequence[Envelope]) -> bytes:
    """SHA-256 of the envelope set in canonical order: a resend must carry the same bytes.
    Every field is length-prefixed, so no two different sets hash the same input."""
    parts: list[bytes] = []
    for user, device, ciphertext in sorted(
        (e.username, e.device_id, e.ciphertext) for e in envelopes
    ):
        for field in (user.encode(), device.encode(), ciphertext):
            parts.append(len(field).to_bytes(4, "big"))
            parts.append(field)
    # One update over the joined input: the same digest, a fraction of the calls.
    return hashlib.sha256(b"".join(parts)).digest()


def token_digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class RelayService(Service):
    """Everything the connections share."""

    agent: Final = "medrelay/0.1"

    def __init__(
        self,
        *,
        store: RelayStore,
        clock: IReactorTime,
        rng: Rng,
        config: RelayConfig,
        metrics: RelayMetrics,
        identity_log: TransparencyLog | None = None,
        staff: StaffService | None = None,
        availability: AvailabilityService | None = None,
        offhours: OffHours | None = None,
        visits: VisitService | None = None,
    ) -> None:
        self.store = store
        self.visits = visits
        self.identity_log = identity_log
        self.staff = staff
        self.availability = availability
        self.offhours = offhours
        self.clock = clock
        self.rng = rng
        self.config = config
        self.clinic_id = config.clinic_id
        self.metrics = metrics
        self.batcher = WriteBatcher(
            clock,
            store,
            WriteLimits(ttl_ms=config.ttl_s * 1000, queue_cap=config.queue_cap, offhours=offhours),
            metrics,
            on_notices=self._push,
            on_result=self._batch_done,
        )
        self._online: dict[int, ClientConnection] = {}
        # Metric children looked up once: `labels()` on every send is measurable at scale.
        self._send_outcomes = {o: metrics.sends.labels(o) for o in SEND_OUTCOMES}
        # End-of-turn work: items committed this turn, grouped per device, and connections
        # with frames to write (see `flush_soon`).
        self._pending_push: dict[int, list[QueuedItem]] = {}
        self._dirty: list[ClientConnection] = []
        self._end_of_turn: IDelayedCall | None = None
        self._connections: set[ClientConnection] = set()
        self._next_connection = 0
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = clock
        # Held messages: checked at each clinician's next opening, and every few seconds in
        # case hours, absences or the clock changed.
        self._release_check = LoopingCall(self.release_held)
        self._release_check.clock = clock
        self._next_release: IDelayedCall | None = None

    # -- service life cycle ----------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 (Twisted's IService name)
        super().startService()  # type: ignore[no-untyped-call]
        self._expiry.start(self.config.expiry_interval_s, now=True)
        if self.offhours is not None:
            self._release_check.start(self.offhours.config.release_check_s, now=True)

    def stopService(self) -> Deferred[None]:  # noqa: N802 (Twisted's IService name)
        super().stopService()  # type: ignore[no-untyped-call]
        if self._expiry.running:
            self._expiry.stop()
        if self._release_check.running:
            self._release_check.stop()
        if self._next_release is not None and self._next_release.active():
            self._next_release.cancel()
        for connection in list(self._connections):
            connection.close_for(
                "connection_lost", ErrorCode.SERVER_BUSY, "the server is shutting down"
            )
        return self.batcher.when_idle()

    def _expire(self) -> None:
        self.batcher.expire(self.config.expiry_batch)

    def release_held(self) -> None:
        """Deliver the held messages of clinicians whose hours are open now."""
        if self.offhours is not None:
            self.batcher.release()

    def _batch_done(self, result: WriteResult) -> None:
        if result.released:
            self.metrics.released.inc(len(result.released))
        tally = result.after_hours
        if tally is not None:
            self.metrics.after_hours.inc(tally.after_hours)
            self.metrics.held.inc(tally.held)
            self.metrics.auto_replies.inc(tally.auto_replies)
            self.metrics.urgent.labels("routed").inc(tally.urgent_routed)
            self.metrics.urgent.labels("nobody_on_call").inc(tally.urgent_unrouted)
            for seconds in tally.first_reply_s:
                self.metrics.first_reply.observe(seconds)
            if tally.held:
                self.release_held()  # learns when the clinician opens and schedules it
        if result.next_release_ms is not None and self.running:
            delay = max(0.0, result.next_release_ms / 1000 - self.clock.seconds())
            if self._next_release is not None and self._next_release.active():
                if self._next_release.getTime() <= self.clock.seconds() + delay:
                    return
                self._next_release.cancel()
            self._next_release = self.clock.callLater(delay, self.release_held)

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # -- connections -----------------------------------------------------------------------

    def new_connection(self, transport: ConnectionTransport) -> ClientConnection:
        self._next_connection += 1
        connection = ClientConnection(
            self, transport, f"c{self._next_connection}", self.rng(CHALLENGE_SIZE)
        )
        self._connections.add(connection)
        self.metrics.connections.labels("handshaking").inc()
        connection.connection_made()
        return connection

    def connection_closed(self, connection: ClientConnection) -> None:
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        device = connection.device
        if device is not None and self._online.get(device.pk) is connection:
            del self._online[device.pk]
        state = "authenticated" if device is not None else "handshaking"
        self.metrics.connections.labels(state).dec()

    def new_pump(self, device: DeviceRecord, connection: ClientConnection) -> DeliveryPump:
        return DeliveryPump(
            device.pk,
            self.store,
            connection,
            self.clock,
            window_items=self.config.window_items,
            window_bytes=self.config.window_bytes,
            metrics=self.metrics,
        )

    def auth_timed_out(self) -> None:
        self.metrics.auth_failures.labels("timeout").inc()

    @property
    def online_devices(self) -> int:
        return len(self._online)

    def disconnect_device(self, device_pk: int, code: ErrorCode, message: str) -> None:
        """Close the live connection of a device (revocation)."""
        connection = self._online.get(device_pk)
        if connection is not None:
            connection.close_for("revoked", code, message)

    # -- login -----------------------------------------------------------------------------

    def login(
        self, connection: ClientConnection, message: Auth, challenge: bytes
    ) -> Deferred[Message]:
        d = self.store.get_device(message.user, message.device)

        def check(device: DeviceRecord | None) -> Deferred[Message]:
            if device is None:
                self.metrics.auth_failures.labels("unknown_device").inc()
                raise auth_failed()
            if device.revoked:
                self.metrics.auth_failures.labels("revoked").inc()
                raise RelayError(ErrorCode.DEVICE_REVOKED, "this device was revoked", fatal=True)
            transcript = auth_transcript(challenge, self.clinic_id, message.user, message.device)
            try:
                VerifyKey(device.signing_key).verify(transcript, message.signature)
            except CryptoError:
                self.metrics.auth_failures.labels("bad_signature").inc()
                raise auth_failed() from None
            token = self.rng(TOKEN_SIZE)
            now_ms = self.now_ms()
            expires_ms = now_ms + self.config.session_ttl_s * 1000
            saved = self.store.create_session(device.pk, token_digest(token), now_ms, expires_ms)
            return saved.addCallback(
                lambda _: self._logged_in(connection, device, message.rid, expires_ms, token)
            )

        return d.addCallback(check)

    def resume(self, connection: ClientConnection, message: Resume) -> Deferred[Message]:
        now_ms = self.now_ms()
        d = self.store.get_session(token_digest(message.token), now_ms)

        def check(device: DeviceRecord | None) -> Message:
            if device is None:
                self.metrics.auth_failures.labels("token_invalid").inc()
                raise token_invalid()
            # The token's own expiry is in the store; the answer reports the session TTL bound.
            return self._logged_in(
                connection, device, message.rid, now_ms + self.config.session_ttl_s * 1000, None
            )

        return d.addCallback(check)

    def _logged_in(
        self,
        connection: ClientConnection,
        device: DeviceRecord,
        rid: int,
        expires_ms: int,
        token: bytes | None,
    ) -> Message:
        previous = self._online.get(device.pk)
        if previous is not None and previous is not connection:
            previous.close_for(
                "replaced",
                ErrorCode.SESSION_REPLACED,
                "this device logged in on another connection",
            )
        self._online[device.pk] = connection
        self.metrics.connections.labels("handshaking").dec()
        self.metrics.connections.labels("authenticated").inc()
        connection.logged_in(device)
        answer = Authenticated(
            rid=rid, user=device.username, device=device.device_id, expires_ms=expires_ms,
            token=token,
        )  # fmt: skip
        # Queued items go out right after the answer (the pump starts on the next turn).
        self.clock.callLater(0, self._start_delivery, connection)
        self._check_prekeys(device)
        return answer

    def _start_delivery(self, connection: ClientConnection) -> None:
        if connection.pump is not None and connection.device is not None:
            connection.pump.start()

    def _check_prekeys(self, device: DeviceRecord) -> None:
        def check(count: int) -> None:
            connection = self._online.get(device.pk)
            if connection is not None and count < self.config.prekey_low_water:
                connection.send_notice(
                    PrekeysLow(remaining=count, wanted=self.config.prekey_target - count)
                )

        self.store.one_time_prekey_count(device.pk).addCallback(check).addErrback(
            lambda f: _log.failure("counting prekeys failed", f)
        )

    # -- requests --------------------------------------------------------------------------

    def send(self, device: DeviceRecord, message: Send) -> Deferred[Message]:
        envelopes = tuple(Envelope(e.user, e.device, e.ciphertext) for e in message.envelopes)
        request = SendRequest(
            sender=device,
            message_id=message.message_id,
            envelopes=envelopes,
            digest=send_digest(envelopes),
            urgent=bool(message.urgent),
        )

        def stored(outcome: SendAccepted | RelayError) -> Message:
            if isinstance(outcome, RelayError):
                counter = self._send_outcomes.get(outcome.code.value)
                (counter or self.metrics.sends.labels(outcome.code.value)).inc()
                raise outcome
            if outcome.duplicate:
                self._send_outcomes["duplicate"].inc()
            else:
                self._send_outcomes["stored"].inc()
                self.metrics.envelopes_received.inc(
                    sum(1 for i in outcome.items if i.kind is ItemKind.MESSAGE)
                )
                self._push(outcome.items)
            return Sent(
                rid=message.rid,
                message_id=message.message_id,
                time_ms=outcome.time_ms,
                held=True if outcome.held else None,
                reads_at_ms=outcome.reads_at_ms,
                on_call=outcome.on_call,
            )

        return self.batcher.send(request).addCallback(stored)

    def _push(self, items: Sequence[QueuedItem]) -> None:
        """Offer freshly committed items to the devices that are online, at the end of this
        reactor turn, so that everything one commit queued for a device goes out (and is
        acknowledged) together."""
        for item in items:
            if item.device_pk in self._online:
                self._pending_push.setdefault(item.device_pk, []).append(item)
        if self._pending_push:
            self._schedule_end_of_turn()

    def flush_soon(self, connection: ClientConnection) -> None:
        """`connection` queued frames: write them at the end of this reactor turn."""
        self._dirty.append(connection)
        self._schedule_end_of_turn()

    def _schedule_end_of_turn(self) -> None:
        if self._end_of_turn is None:
            self._end_of_turn = self.clock.callLater(0, self.run_end_of_turn)

    def run_end_of_turn(self) -> None:
        """Push this turn's committed items, then write every connection's queued frames."""
        self._end_of_turn = None
        pushes, self._pending_push = self._pending_push, {}
        for device_pk, items in pushes.items():
            connection = self._online.get(device_pk)
            if connection is not None:
                connection.offer(items)
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush()

    # -- the policy table for requests other than sends ------------------------------------

    @staticmethod
    def own_refusal(device: DeviceRecord, request: RequestType) -> RelayError | None:
        """The table's verdict on a request about the device's own account (prekeys_put, ack,
        one's own bundles or devices). The session proves the account is active."""
        role = Role(device.role)
        return authorize(
            request, role, role, Relationship.NONE, target_name=device.username, own_account=True
        )

    def authorized(
        self, device: DeviceRecord, request: RequestType, username: str
    ) -> Deferred[None]:
        """Fires when the table lets `device` make `request` about user `username`; fails with
        the refusal (`unknown_user` for no such account) otherwise."""
        if username == device.username:
            refused = self.own_refusal(device, request)
            return _failed(refused) if refused is not None else succeed(None)

        def check(standing: Standing | None) -> None:
            if standing is None:
                raise unknown_user(username)
            refusal = authorize_standing(request, Role(device.role), standing)
            if refusal is not None:
                raise refusal

        return self.store.standing(device.username, username, self.now_ms()).addCallback(check)

    def acknowledge(self, device: DeviceRecord, seqs: Sequence[int], delivered: int) -> None:
        self.batcher.ack(device.pk, tuple(seqs))
        if delivered:
            self.metrics.envelopes_delivered.inc(delivered)

    def bundle(self, device: DeviceRecord, message: BundleGet) -> Deferred[Message]:
        def answer(record: BundleRecord | None) -> Message:
            if record is None:
                raise unknown_user(message.user)
            for entry in record.devices:
                connection = self._online.get(entry.device_pk)
                if connection is not None and entry.remaining_one_time < (
                    self.config.prekey_low_water
                ):
                    connection.send_notice(
                        PrekeysLow(
                            remaining=entry.remaining_one_time,
                            wanted=self.config.prekey_target - entry.remaining_one_time,
                        )
                    )
            return Bundle(
                rid=message.rid,
                user=record.username,
                user_certificate=record.user_certificate,
                devices=tuple(
                    DeviceBundle(
                        device=e.device_id,
                        certificate=e.certificate,
                        signed_prekey=e.signed_prekey,
                        one_time_prekey=e.one_time_prekey,
                    )
                    for e in record.devices
                ),
            )

        d = self.authorized(device, RequestType.BUNDLE_GET, message.user)
        # Only an allowed request consumes one-time prekeys.
        return d.addCallback(lambda _: self.store.take_bundles(message.user)).addCallback(answer)

    def devices(self, device: DeviceRecord, message: DevicesGet) -> Deferred[Message]:
        def answer(record: DeviceListRecord | None) -> Message:
            if record is None:
                raise unknown_user(message.user)
            return DeviceList(
                rid=message.rid,
                user=record.username,
                user_certificate=record.user_certificate,
                devices=tuple(
                    DeviceEntry(device=d.device_id, certificate=d.certificate)
                    for d in record.devices
                ),
            )

        d = self.authorized(device, RequestType.DEVICES_GET, message.user)
        return d.addCallback(lambda _: self.store.list_devices(message.user)).addCallback(answer)

    def log_get(self, device: DeviceRecord, message: LogGet) -> Deferred[Message]:
        """The identity log's checkpoint, proofs and a user's chain (docs/protocol.md §13)."""
        identity_log = self.identity_log
        if identity_log is None:
            return _failed(RelayError(ErrorCode.NOT_FOUND, "this server serves no identity log"))
        # A user's chain names their devices: the policy table's devices_get rule applies
        # (docs/protocol.md §14); without `user`, the request is about one's own view.
        d = self.authorized(device, RequestType.LOG_GET, message.user or device.username)

        def answer(_: None) -> Deferred[Message]:
            return identity_log.answer(message)  # type: ignore[return-value]

        return d.addCallback(answer)

    def staff_request(
        self,
        device: DeviceRecord,
        message: DirectorySearch | AccountCreate | LinkCreate | LinkEnd,
    ) -> Deferred[Message]:
        """The directory, account creation and care links (`medrelay.server.staff`, which
        applies the policy table to each)."""
        staff = self.staff
        if staff is None:
            return _failed(
                RelayError(ErrorCode.NOT_FOUND, f"this server does not serve {message.TYPE}")
            )
        answer: Deferred[Message]
        if isinstance(message, DirectorySearch):
            answer = staff.search(device, message)  # type: ignore[assignment]
        elif isinstance(message, AccountCreate):
            answer = staff.create_account(device, message)  # type: ignore[assignment]
        elif isinstance(message, LinkCreate):
            answer = staff.create_link(device, message)  # type: ignore[assignment]
        else:
            answer = staff.end_link(device, message)  # type: ignore[assignment]
        return answer

    def availability_request(
        self, device: DeviceRecord, message: AvailabilityRequest
    ) -> Deferred[Message]:
        """Hours, schedules and the on-call roster (`medrelay.server.availability.service`)."""
        if self.availability is None:
            return _failed(
                RelayError(ErrorCode.NOT_FOUND, f"this server does not serve {message.TYPE}")
            )
        return self.availability.handle(device, message)

    def visit_request(self, device: DeviceRecord, message: VisitRequest) -> Deferred[Message]:
        """Teleconsultation visits (`medrelay.server.visits`)."""
        if self.visits is None:
            return _failed(
                RelayError(ErrorCode.NOT_FOUND, f"this server does not serve {message.TYPE}")
            )
        return self.visits.handle(device, message)

    def put_prekeys(self, device: DeviceRecord, message: PrekeysPut) -> Deferred[Message]:
        refused = self.own_refusal(device, RequestType.PREKEYS_PUT)
        if refused is not None:
            return _failed(refused)
        try:
            self._validate_prekeys(device, message)
        except RelayError as exc:
            return _failed(exc)
        d = self.store.put_prekeys(
            device.pk, message.signed_prekey, message.one_time_prekeys, self.now_ms()
        )
        return d.addCallback(lambda count: PrekeysStored(rid=message.rid, one_time_count=count))

    def _validate_prekeys(self, device: DeviceRecord, message: PrekeysPut) -> None:
        """Refuse prekeys that would make session setup fail for every sender: a signed
        prekey not signed by this device, or keys that do not parse."""
        try:
            if message.signed_prekey is not None:
                signed = SignedPrekey.decode(message.signed_prekey)
                if (signed.user_id, signed.device_id) != (device.username, device.device_id):
                    raise RelayError(
                        ErrorCode.INVALID_FIELD, "prekeys_put.spk: belongs to another device"
                    )
                VerifyKey(device.signing_key).verify(signed.signed_bytes(), signed.signature)
            for raw in message.one_time_prekeys:
                OneTimePrekey.decode(raw)
        except CryptoError as exc:
            raise RelayError(
                ErrorCode.INVALID_FIELD, f"prekeys_put: invalid prekey ({exc.code})"
            ) from None


def _failed(error: RelayError) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
