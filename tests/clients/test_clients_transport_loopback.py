"""The real network adapters on 127.0.0.1 (integration tests on the global reactor): the
autobahn WebSocket dialer against a tiny autobahn relay stand-in, and the Agent HTTP client
against a twisted.web site, including their failures (refused port, not a WebSocket, an answer
over the size limit)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import pytest_twisted  # type: ignore[import-untyped]
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from medrelay.clients.engine.connection import Connector, Credentials, ServerConnection
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.http import AgentHttpClient, ServerUrl, post_json
from medrelay.clients.engine.websocket import WebSocketDialer
from medrelay.crypto.keys import SigningKey
from medrelay.crypto.rng import seeded_rng
from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.messages import (
    Auth,
    Authenticated,
    Deliver,
    DeliveredItem,
    Direction,
    Hello,
    Limits,
    PrekeysLow,
    Welcome,
)

CHALLENGE = b"w" * 32
_F = TypeVar("_F", bound=Callable[..., Any])


def on_reactor(test: _F) -> _F:
    """Run an async test on the global reactor (pytest-twisted), keeping its type."""
    wrapped: _F = pytest_twisted.ensureDeferred(test)
    return wrapped


KEY = SigningKey.generate(seeded_rng(b"loopback device"))


class MiniRelay(WebSocketServerProtocol):
    """Answers hello and auth, then pushes a delivery and a notice in one WebSocket message."""

    def onOpen(self) -> None:  # noqa: N802 (autobahn API)
        self.decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        assert isBinary
        self.decoder.receive_data(payload)
        for message in self.decoder:
            if isinstance(message, Hello):
                self.sendMessage(  # type: ignore[no-untyped-call]
                    encode_frame(
                        Welcome(
                            version=1,
                            agent="mini",
                            clinic="clinic.test",
                            challenge=CHALLENGE,
                            time_ms=0,
                            limits=Limits(max_frame=1 << 20, max_ciphertext=1, max_envelopes=1,
                                          max_acks=1),
                        )
                    ),
                    isBinary=True,
                )  # fmt: skip
            elif isinstance(message, Auth):
                KEY.verify_key.verify(
                    auth_transcript(CHALLENGE, "clinic.test", message.user, message.device),
                    message.signature,
                )
                item = DeliveredItem(
                    seq=1, kind="msg", message_id=b"i" * 16, time_ms=1, user="bob", device="d",
                    ciphertext=b"c",
                )  # fmt: skip
                self.sendMessage(  # type: ignore[no-untyped-call]
                    encode_frame(
                        Authenticated(
                            rid=message.rid, user="alice", device="dev1", expires_ms=1,
                            token=b"t" * 32,
                        )
                    )
                    + encode_frame(Deliver(items=(item,)))
                    + encode_frame(PrekeysLow(remaining=0, wanted=100)),
                    isBinary=True,
                )  # fmt: skip


class Tokens:
    def __init__(self) -> None:
        self.saved: list[bytes] = []

    def load_token(self) -> Deferred[bytes | None]:
        return Deferred.fromCoroutine(_value(None))

    def save_token(self, token: bytes, expires_ms: int) -> Deferred[None]:
        self.saved.append(token)
        return Deferred.fromCoroutine(_value(None))

    def clear_token(self) -> Deferred[None]:
        return Deferred.fromCoroutine(_value(None))


async def _value(value: Any) -> Any:
    return value


class Events:
    def __init__(self) -> None:
        self.delivered: list[Deliver] = []
        self.low: list[PrekeysLow] = []
        self.ready = 0
        self.down: list[ClientError | None] = []

    def connection_ready(self, connection: ServerConnection) -> None:
        self.ready += 1

    def deliver(self, connection: ServerConnection, message: Deliver) -> None:
        self.delivered.append(message)

    def prekeys_low(self, connection: ServerConnection, message: PrekeysLow) -> None:
        self.low.append(message)

    def connection_down(self, error: ClientError | None, *, retry_in_s: float | None) -> None:
        self.down.append(error)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _connector(reactor: Any, port: int, events: Events, tokens: Tokens) -> Connector:
    return Connector(
        dialer=WebSocketDialer(reactor, ServerUrl("http", "127.0.0.1", port)),
        credentials=Credentials("clinic.test", "alice", "dev1", KEY),
        tokens=tokens,
        events=events,
        clock=reactor,
        rng=seeded_rng(b"loopback"),
    )


@on_reactor
async def test_the_websocket_dialer_logs_in_and_receives_several_frames_per_message() -> None:
    reactor = _reactor()
    factory = WebSocketServerFactory("ws://127.0.0.1")  # type: ignore[no-untyped-call]
    factory.protocol = MiniRelay
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    events, tokens = Events(), Tokens()
    connector = _connector(reactor, listening.getHost().port, events, tokens)
    try:
        connection = await connector.when_ready(fail_fast=True)
        assert connection.ready and events.ready == 1
        assert tokens.saved == [b"t" * 32]
        for _ in range(50):
            if events.delivered and events.low:
                break
            await _sleep(reactor, 0.01)
        assert events.delivered[0].items[0].ciphertext == b"c"
        assert events.low[0].wanted == 100
    finally:
        await connector.stop()
        await listening.stopListening()


async def _sleep(reactor: Any, seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


@on_reactor
async def test_a_refused_port_is_server_unreachable() -> None:
    reactor = _reactor()
    listening = reactor.listenTCP(0, Site(notFound()), interface="127.0.0.1")  # type: ignore[no-untyped-call]
    port = listening.getHost().port
    await listening.stopListening()
    connector = _connector(reactor, port, Events(), Tokens())
    try:
        await connector.when_ready(fail_fast=True)
    except ClientError as exc:
        assert exc.code is LocalCode.SERVER_UNREACHABLE
    else:
        raise AssertionError("connected to a closed port")
    finally:
        await connector.stop()


@on_reactor
async def test_an_http_server_that_is_not_a_relay_is_server_unreachable() -> None:
    reactor = _reactor()
    listening = reactor.listenTCP(0, Site(notFound()), interface="127.0.0.1")  # type: ignore[no-untyped-call]
    connector = _connector(reactor, listening.getHost().port, Events(), Tokens())
    try:
        await connector.when_ready(fail_fast=True)
    except ClientError as exc:
        assert exc.code is LocalCode.SERVER_UNREACHABLE
    else:
        raise AssertionError("a plain web site passed for a relay")
    finally:
        await connector.stop()
        await listening.stopListening()


class Echo(Resource):
    isLeaf = True  # noqa: N815 (twisted.web API)

    def render_POST(self, request: Request) -> bytes:  # noqa: N802 (twisted.web API)
        body = json.loads(request.content.read())  # type: ignore[union-attr]
        if body.get("big"):
            return b"x" * 200_000
        if body.get("refuse"):
            request.setResponseCode(403)
            return b'{"error": {"code": "enrollment_failed", "message": "no"}}'
        return json.dumps({"echo": body}).encode()


@on_reactor
async def test_the_agent_client_posts_json_and_bounds_the_answer() -> None:
    reactor = _reactor()
    listening = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")  # type: ignore[no-untyped-call]
    url = f"http://127.0.0.1:{listening.getHost().port}/v1/enroll"
    http = AgentHttpClient(reactor, reactor, timeout_s=5)
    try:
        assert await post_json(http, url, {"a": 1}) == {"echo": {"a": 1}}
        for payload, code in (({"big": True}, LocalCode.BAD_SERVER_ANSWER),):
            try:
                await post_json(http, url, payload)
            except ClientError as exc:
                assert exc.code is code
            else:
                raise AssertionError("an oversized answer was accepted")
        try:
            await post_json(http, url, {"refuse": True})
        except ClientError as exc:
            assert exc.code == "enrollment_failed"
        else:
            raise AssertionError("a refusal passed")
    finally:
        await listening.stopListening()
    try:
        await post_json(http, url, {"a": 1})
    except ClientError as exc:
        assert exc.code is LocalCode.SERVER_UNREACHABLE
    else:
        raise AssertionError("posted to a closed port")
