"""One client connection: bytes in, frames out, requests handed to the `RelayService`.

The handler knows nothing of WebSocket or TCP: a transport adapter
(`medrelay.server.transport.websocket`) gives it a `ConnectionTransport` and feeds it the bytes
of each message. It decodes frames with the sans-IO `FrameDecoder`, moves through the states of
`medrelay.server.relay.states`, and answers every request with exactly one frame (the answer or
an `error`), matched by `rid`. Requests may be pipelined; answers go out as they complete.

Nothing here logs a user name, a token, a key or a ciphertext: log lines carry the connection id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from medrelay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.limits import (
    FRAME_HEADER_SIZE,
    MAX_FRAME_SIZE,
    MAX_ITEMS_PER_DELIVER,
    MAX_UNAUTHENTICATED_FRAME_SIZE,
)
from medrelay.protocol.messages import (
    AccountCreate,
    Ack,
    Auth,
    AvailabilityGet,
    BundleGet,
    Deliver,
    DeliveredItem,
    DeviceRef,
    DevicesGet,
    Direction,
    DirectorySearch,
    Error,
    Hello,
    ItemKind,
    LinkCreate,
    LinkEnd,
    LogGet,
    Message,
    PrekeysPut,
    Resume,
    RosterAdd,
    RosterGet,
    RosterRemove,
    ScheduleSet,
    Send,
    VisitClose,
    VisitList,
    VisitOpen,
    Welcome,
)
from medrelay.protocol.versions import negotiate
from medrelay.server.availability.offhours import flag_names
from medrelay.server.policy import RequestType
from medrelay.server.relay.delivery import DeliveryPump
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.states import REFUSALS, State, next_state
from medrelay.server.relay.store import DeviceRecord, QueuedItem

if TYPE_CHECKING:
    from medrelay.server.relay.service import RelayService

MAX_PENDING_REQUESTS: Final = 32
"""Beyond this many unanswered requests the handler stops reading from the connection."""
_DELIVER_FRAME_BUDGET: Final = 768 * 1024
"""Bytes of ciphertext per deliver frame, well under the frame limit."""
_MESSAGE_BUDGET: Final = MAX_FRAME_SIZE + FRAME_HEADER_SIZE
"""Bytes per transport message: what a client must accept for one maximal frame."""

_log = Logger()


def _clip_utf8(text: str, limit: int) -> str:
    """At most `limit` bytes of UTF-8, cut on a character boundary (the protocol's bound on
    `error.message` counts bytes)."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


class ConnectionTransport(Protocol):
    """What the handler needs from the network adapter."""

    def write(self, data: bytes) -> None:
        """Send one transport message holding one or more whole frames."""

    def close(self) -> None:
        """Close the connection after the bytes already written."""

    @property
    def writable(self) -> bool:
        """False while the send buffer is full (the adapter calls `resume_writing` later)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ClientConnection:
    """The relay side of one connection."""

    def __init__(
        self,
        service: RelayService,
        transport: ConnectionTransport,
        connection_id: str,
        challenge: bytes,
    ) -> None:
        self._service = service
        self._transport = transport
        self.connection_id = connection_id
        self._challenge = challenge
        self._decoder = FrameDecoder(
            Direction.CLIENT_TO_SERVER, max_frame_size=MAX_UNAUTHENTICATED_FRAME_SIZE
        )
        self.state = State.AWAITING_HELLO
        self.device: DeviceRecord | None = None
        self.pump: DeliveryPump | None = None
        self._pending = 0
        self._reading_paused = False
        self._auth_timer: IDelayedCall | None = None
        self._cleaned_up = False
        self._out: list[bytes] = []

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # -- events from the adapter -----------------------------------------------------------

    def connection_made(self) -> None:
        self._auth_timer = self._service.clock.callLater(
            self._service.config.auth_timeout_s, self._auth_timed_out
        )

    def data_received(self, data: bytes, *, whole_frames: bool = True) -> None:
        """Bytes from the peer. With `whole_frames` (WebSocket), a frame split across two
        transport messages is a protocol error."""
        if self.state is State.CLOSED:
            return
        try:
            self._decoder.receive_data(data)
        except ProtocolError as exc:
            self._fail(exc.code, exc.message)
            return
        while not self.closed:
            try:
                message = self._decoder.next_message()
            except RemoteProtocolError as exc:
                self._refuse(exc.code, exc.message, exc.rid, fatal=exc.fatal)
                continue
            if message is None:
                break
            self._dispatch(message)
        if whole_frames and self._decoder.has_partial_frame and not self.closed:
            self._fail(ErrorCode.MALFORMED_FRAME, "a frame must not span transport messages")

    def connection_lost(self) -> None:
        if self.state is State.CLOSED:
            self._cleanup()
            return
        self._advance("connection_lost")

    def resume_writing(self) -> None:
        if self.pump is not None:
            self.pump.resume()

    # -- events from the service -----------------------------------------------------------

    def close_for(self, event: str, code: ErrorCode, message: str) -> None:
        """Close because of a server-side event (another login of this device, revocation)."""
        if self.state is State.CLOSED:
            return
        self._write(Error(code=code, message=_clip_utf8(message, 512)))
        self._advance(event)

    def send_notice(self, message: Message) -> None:
        """A server-initiated frame (e.g. `prekeys_low`)."""
        if self.state is State.READY:
            self._write(message)

    def offer(self, items: Sequence[QueuedItem]) -> None:
        if self.pump is not None:
            self.pump.offer(items)

    # -- DeliverySink ----------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self._transport.writable

    def deliver(self, items: Sequence[QueuedItem]) -> None:
        frames: list[bytes] = []
        batch: list[DeliveredItem] = []
        size = 0
        for item in items:
            if batch and (
                len(batch) >= MAX_ITEMS_PER_DELIVER or size + item.size > _DELIVER_FRAME_BUDGET
            ):
                frames.append(encode_frame(Deliver(items=tuple(batch)), self._decoder.version))
                batch, size = [], 0
            batch.append(
                DeliveredItem(
                    seq=item.seq,
                    kind=item.kind,
                    message_id=item.message_id,
                    time_ms=item.time_ms,
                    user=item.peer_user,
                    device=item.peer_device,
                    ciphertext=item.ciphertext,
                    flags=flag_names(item.flags) if item.kind is ItemKind.MESSAGE else None,
                )
            )
            size += item.size
        frames.append(encode_frame(Deliver(items=tuple(batch)), self._decoder.version))
        for frame in frames:
            self._queue_frame(frame)

    # -- state machine ---------------------------------------------------------------------

    def _advance(self, event: str) -> bool:
        target = next_state(self.state, event)
        if target is None:
            return False
        self.state = target
        if target is State.CLOSED:
            self.flush()  # the closing error goes out before the close
            self._transport.close()
            self._cleanup()
        return True

    def _dispatch(self, message: Message) -> None:
        rid = getattr(message, "rid", None)
        if next_state(self.state, message.TYPE) is None:
            code, fatal = REFUSALS[self.state]
            self._refuse(code, f"{message.TYPE} is not allowed now", rid, fatal=fatal)
            return
        self._advance(message.TYPE)
        if isinstance(message, Hello):
            self._hello(message)
        elif isinstance(message, Auth):
            self._track(self._service.login(self, message, self._challenge), message.rid)
        elif isinstance(message, Resume):
            self._track(self._service.resume(self, message), message.rid)
        elif isinstance(message, Ack):
            self._ack(message)
        else:
            device = self._require_device()
            if isinstance(message, Send):
                answer = self._service.send(device, message)
            elif isinstance(message, BundleGet):
                answer = self._service.bundle(device, message)
            elif isinstance(message, DevicesGet):
                answer = self._service.devices(device, message)
            elif isinstance(message, PrekeysPut):
                answer = self._service.put_prekeys(device, message)
            elif isinstance(message, LogGet):
                answer = self._service.log_get(device, message)
            elif isinstance(message, DirectorySearch | AccountCreate | LinkCreate | LinkEnd):
                answer = self._service.staff_request(device, message)
            elif isinstance(
                message, AvailabilityGet | ScheduleSet | RosterAdd | RosterRemove | RosterGet
            ):
                answer = self._service.availability_request(device, message)
            elif isinstance(message, VisitOpen | VisitClose | VisitList):
                answer = self._service.visit_request(device, message)
            else:  # pragma: no cover - the transition table admits nothing else
                raise TypeError(f"no handler for {message.TYPE}")
            self._track(answer, message.rid)

    def _hello(self, message: Hello) -> None:
        try:
            version = negotiate(message.versions)
        except ProtocolError as exc:
            self._fail(exc.code, exc.message)
            return
        self._decoder.version = version
        config = self._service.config
        self._write(
            Welcome(
                version=version,
                agent=self._service.agent,
                clinic=self._service.clinic_id,
                challenge=self._challenge,
                time_ms=self._service.now_ms(),
                limits=config.limits(),
            )
        )

    def _ack(self, message: Ack) -> None:
        device = self._require_device()
        refused = self._service.own_refusal(device, RequestType.ACK)
        if refused is not None:  # ack has no rid: the refusal names none
            self._refuse(refused.code, refused.message, None)
            return
        delivered = self.pump.acknowledged(message.seqs) if self.pump is not None else 0
        self._service.acknowledge(device, message.seqs, delivered)

    def _require_device(self) -> DeviceRecord:
        if self.device is None:  # the transition table only admits requests when READY
            raise RuntimeError("request dispatched before login")
        return self.device

    def logged_in(self, device: DeviceRecord) -> None:
        """Called by the service when `auth`/`resume` succeeded, before the answer is sent."""
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self.device = device
        self._advance("login_succeeded")
        self._decoder.max_frame_size = self._service.config.max_frame_size
        self.pump = self._service.new_pump(device, self)

    # -- requests --------------------------------------------------------------------------

    def _track(self, answer: Deferred[Message], rid: int) -> None:
        """Send the request's answer when it is ready, applying backpressure meanwhile."""
        self._pending += 1
        if self._pending >= MAX_PENDING_REQUESTS and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

        def answered(message: Message) -> None:
            self._write(message)

        def refused(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, RelayError):
                self._refuse(
                    error.code,
                    error.message,
                    rid,
                    fatal=error.fatal,
                    missing=error.missing,
                    extra=error.extra,
                )
            else:
                _log.failure(
                    "request failed on connection {connection_id}",
                    failure,
                    connection_id=self.connection_id,
                )
                self._refuse(ErrorCode.INTERNAL_ERROR, "the server failed; try again", rid)

        def done(_: object) -> None:
            self._pending -= 1
            if self._reading_paused and self._pending < MAX_PENDING_REQUESTS // 2:
                self._reading_paused = False
                if self.state is not State.CLOSED:
                    self._transport.resume_reading()

        answer.addCallbacks(answered, refused).addBoth(done)

    # -- output ----------------------------------------------------------------------------

    def _write(self, message: Message) -> None:
        if self.state is State.CLOSED and not isinstance(message, Error):
            return
        self._queue_frame(encode_frame(message, self._decoder.version))

    def _queue_frame(self, frame: bytes) -> None:
        """Frames are written at the end of the reactor turn, all of a turn's frames for this
        connection in as few transport messages as the size bound allows: a committed batch
        answers a pipelining client with many `sent` frames and a device with many items, and
        each transport message has a fixed cost on both sides."""
        if not self._out:
            self._service.flush_soon(self)
        self._out.append(frame)

    def flush(self) -> None:
        """Write the queued frames, packed into messages of at most one frame's maximum size."""
        if not self._out:
            return
        frames, self._out = self._out, []
        message: list[bytes] = []
        size = 0
        for frame in frames:
            if message and size + len(frame) > _MESSAGE_BUDGET:
                self._transport.write(b"".join(message))
                message, size = [], 0
            message.append(frame)
            size += len(frame)
        self._transport.write(b"".join(message))

    def _refuse(
        self,
        code: ErrorCode,
        message: str,
        rid: int | None,
        *,
        fatal: bool = False,
        missing: tuple[tuple[str, str], ...] = (),
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if self.state is State.CLOSED:
            return
        self._write(
            Error(
                code=code,
                message=_clip_utf8(message, 512),
                rid=rid,
                missing=tuple(DeviceRef(u, d) for u, d in missing) or None,
                extra=tuple(DeviceRef(u, d) for u, d in extra) or None,
            )
        )
        if fatal:
            self._advance("fatal_error")

    def _fail(self, code: ErrorCode, message: str) -> None:
        self._refuse(code, message, None, fatal=True)

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        if self.state in (State.AWAITING_HELLO, State.AWAITING_AUTH, State.AUTHENTICATING):
            self._service.auth_timed_out()
            self._refuse(ErrorCode.NOT_AUTHENTICATED, "login took too long", None, fatal=False)
            self._advance("auth_timeout")

    def _cleanup(self) -> None:
        if self._cleaned_up:
            return
        self._cleaned_up = True
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None
        if self.pump is not None:
            self.pump.stop()
        self._service.connection_closed(self)
