"""The WebSocket dialer (autobahn): connects to `ws(s)://host:port/v1/ws` and moves binary
WebSocket messages between the socket and a `FrameSink` (a `ServerConnection`).

It only moves bytes: one frame per outgoing binary message; every incoming binary message goes to
the sink whole (the sink refuses a frame split across messages); a text message is a protocol
error that closes the connection. Limits: a message is at most one maximal frame; the client
pings an idle server so a half-open TCP connection is noticed. No compression is offered:
ciphertext does not compress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.python.failure import Failure

from medrelay.clients.engine.connection import FrameSink, FrameTransport
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.http import ServerUrl
from medrelay.protocol.limits import FRAME_HEADER_SIZE, MAX_FRAME_SIZE

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CONNECT_TIMEOUT_S: Final = 10
PING_INTERVAL_S: Final = 30
PING_TIMEOUT_S: Final = 30


class _RelayClientProtocol(WebSocketClientProtocol):
    """One WebSocket connection; also the `FrameTransport` of its sink."""

    factory: _RelayClientFactory

    def __init__(self) -> None:
        super().__init__()
        self._sink: FrameSink | None = None
        self._closing = False

    def onOpen(self) -> None:  # noqa: N802 (autobahn API)
        self._sink = self.factory.attach(cast(FrameTransport, self))
        self.factory.opened()
        self._sink.connection_made()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803 (autobahn API)
        if self._sink is None:
            return
        if not isBinary:
            self._closing = True
            self.sendClose(code=CLOSE_PROTOCOL_ERROR, reason="text messages are not allowed")
            return
        self._sink.data_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803 (autobahn API)
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.connection_lost()
        else:
            self.factory.failed(reason)

    def write(self, data: bytes) -> None:
        if not self._closing:
            self.sendMessage(data, isBinary=True)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.sendClose(code=CLOSE_NORMAL)


class _RelayClientFactory(WebSocketClientFactory):
    protocol = _RelayClientProtocol  # type: ignore[assignment]

    def __init__(
        self,
        url: str,
        *,
        reactor: Any,
        attach: Callable[[FrameTransport], FrameSink],
        agent: str,
    ) -> None:
        super().__init__(url, reactor=reactor, useragent=agent)
        self.attach = attach
        self.open: Deferred[None] = Deferred()
        max_message = MAX_FRAME_SIZE + FRAME_HEADER_SIZE
        self.setProtocolOptions(
            maxFramePayloadSize=max_message,
            maxMessagePayloadSize=max_message,
            openHandshakeTimeout=CONNECT_TIMEOUT_S,
            closeHandshakeTimeout=5,
            autoPingInterval=PING_INTERVAL_S,
            autoPingTimeout=PING_TIMEOUT_S,
            perMessageCompressionOffers=[],
            tcpNoDelay=True,
        )

    def opened(self) -> None:
        if not self.open.called:
            self.open.callback(None)

    def failed(self, reason: str | None) -> None:
        if not self.open.called:
            detail = f": {reason}" if reason else ""
            self.open.errback(
                ClientError(
                    LocalCode.SERVER_UNREACHABLE,
                    f"the server refused the WebSocket connection{detail}",
                )
            )


def _tls_options(host: str) -> Any:
    try:
        # Imported here: twisted.internet.ssl needs pyOpenSSL (twisted[tls]), only for wss://.
        from twisted.internet.ssl import optionsForClientTLS  # noqa: PLC0415
    except ImportError:
        raise ClientError(
            LocalCode.SERVER_UNREACHABLE,
            "https:// servers need TLS support: install twisted[tls] (pyOpenSSL)",
        ) from None
    return optionsForClientTLS(host)


class WebSocketDialer:
    """A `Dialer` for one relay URL."""

    def __init__(self, reactor: Any, server: ServerUrl, *, agent: str = "medrelay-cli/0.1"):
        self._reactor = reactor
        self._server = server
        self._agent = agent

    def dial(self, attach: Callable[[FrameTransport], FrameSink]) -> Deferred[None]:
        server = self._server
        factory = _RelayClientFactory(
            server.websocket(), reactor=self._reactor, attach=attach, agent=self._agent
        )
        endpoint: Any = HostnameEndpoint(
            self._reactor, server.host, server.port, timeout=CONNECT_TIMEOUT_S
        )
        if server.tls:
            endpoint = wrapClientTLS(_tls_options(server.host), endpoint)
        connected: Deferred[Any] = endpoint.connect(factory)

        def unreachable(failure: Failure) -> Failure:
            if isinstance(failure.value, ClientError):
                return failure
            if isinstance(failure.value, internet_error.DNSLookupError):
                message = f"cannot resolve {server.host}"
            else:
                message = f"cannot connect to {server}"
            raise ClientError(LocalCode.SERVER_UNREACHABLE, message)

        connected.addCallback(lambda _: factory.open)
        connected.addErrback(unreachable)
        return cast(Deferred[None], connected)
