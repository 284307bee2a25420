"""The WebSocket adapter (autobahn): binary WebSocket messages in and out of a `ClientConnection`.

It only moves bytes and flow-control signals: each binary message goes to the connection's
frame decoder; the connection's frames go out as one binary message per write. A text message is
a protocol error. Backpressure both ways: while the TCP send buffer is full the connection is told
it cannot write (its delivery pump stops), and while too many requests are pending the connection
asks us to stop reading from the socket.
"""

from __future__ import annotations

from typing import Any, Final, Protocol, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import FRAME_HEADER_SIZE, MAX_FRAME_SIZE
from medrelay.server.relay.connection import ClientConnection
from medrelay.server.relay.service import RelayService

_log = Logger()

CLOSE_NORMAL: Final = 1000


class _TCPTransport(Protocol):
    """The parts of Twisted's TCP transport (IConsumer and IPushProducer) used here."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...  # noqa: N802

    def pauseProducing(self) -> None: ...  # noqa: N802

    def resumeProducing(self) -> None: ...  # noqa: N802


@implementer(IPushProducer)
class _SendBufferWatch:
    """Registered on the TCP transport: Twisted calls pause/resume as its send buffer fills and
    drains, which is exactly the 'writable' signal the delivery pump needs."""

    def __init__(self, protocol: RelayWebSocketProtocol) -> None:
        self._protocol = protocol
        self.paused = False

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted interface)
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted interface)
        self.paused = False
        connection = self._protocol.connection
        if connection is not None:
            connection.resume_writing()

    def stopProducing(self) -> None:  # noqa: N802 (Twisted interface)
        self.paused = True


class RelayWebSocketProtocol(WebSocketServerProtocol):
    """One WebSocket connection; also the `ConnectionTransport` of its `ClientConnection`."""

    factory: RelayWebSocketFactory

    def __init__(self) -> None:
        super().__init__()
        self.connection: ClientConnection | None = None
        self._watch = _SendBufferWatch(self)
        self._closing = False

    # autobahn callbacks

    def onConnect(self, request: ConnectionRequest) -> None:  # noqa: N802 (autobahn API)
        # No subprotocol and no compression: ciphertext does not compress, and compressing
        # attacker-influenced data next to secrets is how CRIME-style attacks start.
        if request.extensions:
            _log.debug("ignoring offered WebSocket extensions")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        # autobahn's own dataReceived formats a debug line (type names, colours) for every TCP
        # read, before the logger drops it: about a tenth of the reactor's time under load.
        self._dataReceived(data)

    def sendData(  # noqa: N802 (autobahn API)
        self, data: bytes, sync: bool = False, chopsize: int | None = None
    ) -> None:
        # The common case (an open connection, nothing queued) without autobahn's per-write
        # debug formatting; anything else goes through autobahn unchanged.
        transport = self.transport
        if (
            transport is None
            or chopsize
            or sync
            or self.send_queue
            or getattr(self, "logOctets", False)
            or self.state != self.STATE_OPEN
        ):
            super().sendData(data, sync, chopsize)
            return
        transport.write(data)
        self.trafficStats.outgoingOctetsWireLevel += len(data)

    @property
    def _tcp(self) -> _TCPTransport:
        return cast(_TCPTransport, self.transport)

    def onOpen(self) -> None:  # noqa: N802 (autobahn API)
        self._tcp.registerProducer(self._watch, True)
        self.connection = self.factory.service.new_connection(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803 (autobahn API)
        if self.connection is None:
            return
        if not isBinary:
            self._protocol_error("text messages are not part of the protocol")
            return
        self.connection.data_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        if self.connection is not None:
            self.connection.connection_lost()
            self.connection = None

    # ConnectionTransport

    def write(self, data: bytes) -> None:
        if not self._closing:
            self.sendMessage(data, isBinary=True)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.sendClose(code=CLOSE_NORMAL)

    @property
    def writable(self) -> bool:
        return not self._watch.paused and not self._closing

    def pause_reading(self) -> None:
        self._tcp.pauseProducing()

    def resume_reading(self) -> None:
        self._tcp.resumeProducing()

    def _protocol_error(self, reason: str) -> None:
        if self.connection is not None:
            self.connection.close_for("fatal_error", ErrorCode.MALFORMED_FRAME, reason)


class RelayWebSocketFactory(WebSocketServerFactory):
    protocol = RelayWebSocketProtocol  # type: ignore[assignment]

    def __init__(
        self,
        service: RelayService,
        *,
        url: str,
        ping_interval_s: float = 30.0,
        ping_timeout_s: float = 30.0,
        trust_x_forwarded_for: int = 0,
    ) -> None:
        super().__init__(url)
        self.service = service
        max_message = MAX_FRAME_SIZE + FRAME_HEADER_SIZE
        self.setProtocolOptions(
            maxFramePayloadSize=max_message,
            maxMessagePayloadSize=max_message,
            autoPingInterval=ping_interval_s,
            autoPingTimeout=ping_timeout_s,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            perMessageCompressionAccept=lambda offers: None,
            trustXForwardedFor=trust_x_forwarded_for,
            # Our frames are small and latency matters more than packing.
            tcpNoDelay=True,
            # Text messages are refused unread (onMessage): no UTF-8 validator per message.
            utf8validateIncoming=False,
        )


def websocket_resource(factory: RelayWebSocketFactory) -> Any:
    """The twisted.web resource that upgrades `/v1/ws` requests."""
    return WebSocketResource(factory)


__all__ = [
    "RelayWebSocketFactory",
    "RelayWebSocketProtocol",
    "websocket_resource",
]
