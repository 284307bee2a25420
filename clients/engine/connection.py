"""The client's side of a relay connection (docs/protocol.md §3-§9): log-in, requests matched by
`rid`, pushed deliveries, and reconnection.

`ServerConnection` is one connection. It knows nothing of WebSocket: a dialer
(`medrelay.clients.engine.websocket`) gives it a `FrameTransport` and feeds it the bytes of each
transport message. It sends `hello`, answers `welcome` with `resume` (when a session token is
stored) or `auth` (the device's signature over `auth_transcript`), then matches answers to
requests by `rid`, with a timeout per request, and hands `deliver` and `prekeys_low` to its
handler.

States (rules of this file: only the transitions below; anything else is ignored or closes):

    AWAITING_WELCOME --welcome--> AUTHENTICATING --authenticated--> READY
    any --connection lost / fatal error--> CLOSED

`Connector` keeps one connection alive: it dials, logs in, and after a loss dials again with
full-jitter exponential backoff (delay uniform in [0, min(cap, base * 2**attempt)], base 1 s,
cap 30 s; the random source and the clock are injected). A refused token is forgotten and the
next connection logs in with `auth` at once; `auth_failed` and `device_revoked` stop it for good
(the user must act). Waiters for a ready connection either wait through failures (`listen`) or
fail on the first one (one-shot commands), as they choose.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from medrelay.clients.engine.errors import (
    FATAL_LOGIN_CODES,
    ClientError,
    LocalCode,
    RemoteError,
    remote_code,
)
from medrelay.crypto.keys import SigningKey
from medrelay.crypto.rng import Rng
from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.errors import ErrorCode, ProtocolError
from medrelay.protocol.fields import UINT32_MAX
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.messages import (
    SUPPORTED_VERSIONS,
    Auth,
    Authenticated,
    Deliver,
    Direction,
    Error,
    Hello,
    Message,
    PrekeysLow,
    Resume,
    Welcome,
)

DEFAULT_REQUEST_TIMEOUT_S: Final = 30.0
LOGIN_TIMEOUT_S: Final = 15.0
BACKOFF_BASE_S: Final = 1.0
BACKOFF_CAP_S: Final = 30.0
AGENT: Final = "medrelay-cli/0.1"

_log = Logger()
_M = TypeVar("_M", bound=Message)


class FrameTransport(Protocol):
    """What a connection needs from the network adapter."""

    def write(self, data: bytes) -> None:
        """Send one transport message holding one whole frame."""

    def close(self) -> None:
        """Close the connection (the adapter then reports `connection_lost`)."""


class FrameSink(Protocol):
    """What the network adapter drives."""

    def connection_made(self) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self) -> None: ...


class Dialer(Protocol):
    def dial(self, attach: Callable[[FrameTransport], FrameSink]) -> Deferred[None]:
        """Open a connection; once it is open call `attach(transport)` and drive the sink it
        returns. Fires when open, or fails with a `ClientError` (SERVER_UNREACHABLE...)."""
        ...


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who logs in, and the clinic we expect to find (pinned at enrollment)."""

    clinic_id: str
    user_id: str
    device_id: str
    signing_key: SigningKey


class ConnectionState(enum.Enum):
    AWAITING_WELCOME = "awaiting_welcome"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


class ConnectionHandler(Protocol):
    def on_authenticated(self, connection: ServerConnection, message: Authenticated) -> None: ...

    def on_login_refused(self, connection: ServerConnection, error: ClientError) -> None: ...

    def on_deliver(self, connection: ServerConnection, message: Deliver) -> None: ...

    def on_prekeys_low(self, connection: ServerConnection, message: PrekeysLow) -> None: ...

    def on_closed(self, connection: ServerConnection) -> None: ...


# Errors without a rid that end the connection (the server closes after sending them).
_CLOSING_CODES: Final = frozenset(
    {
        ErrorCode.AUTH_FAILED,
        ErrorCode.TOKEN_INVALID,
        ErrorCode.DEVICE_REVOKED,
        ErrorCode.SESSION_REPLACED,
        ErrorCode.NOT_AUTHENTICATED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.FRAME_TOO_LARGE,
    }
)


def expect(message: Message, cls: type[_M]) -> _M:
    """The answer as the type the request expects, else BAD_SERVER_ANSWER."""
    if not isinstance(message, cls):
        raise ClientError(
            LocalCode.BAD_SERVER_ANSWER,
            f"the server answered {message.TYPE} where {cls.TYPE} was expected",
        )
    return message


class ServerConnection:
    """One connection to the relay (a `FrameSink`)."""

    def __init__(
        self,
        transport: FrameTransport,
        handler: ConnectionHandler,
        *,
        credentials: Credentials,
        token: bytes | None,
        clock: IReactorTime,
        agent: str = AGENT,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self._transport = transport
        self._handler = handler
        self._credentials = credentials
        self._token = token
        self._clock = clock
        self._agent = agent
        self._request_timeout_s = request_timeout_s
        self._decoder = FrameDecoder(Direction.SERVER_TO_CLIENT)
        self.state = ConnectionState.AWAITING_WELCOME
        self.welcome: Welcome | None = None
        self.resumed = False
        self._next_rid = 1
        self._pending: dict[int, tuple[Deferred[Message], IDelayedCall]] = {}
        self._login_timer: IDelayedCall | None = None

    @property
    def ready(self) -> bool:
        return self.state is ConnectionState.READY

    @property
    def closed(self) -> bool:
        return self.state is ConnectionState.CLOSED

    # -- events from the adapter -----------------------------------------------------------

    def connection_made(self) -> None:
        self._login_timer = self._clock.callLater(LOGIN_TIMEOUT_S, self._login_timed_out)
        self._write(Hello(versions=tuple(SUPPORTED_VERSIONS), agent=self._agent))

    def data_received(self, data: bytes) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        try:
            self._decoder.receive_data(data)
        except ProtocolError as exc:
            self._abort(f"the server sent an invalid frame: {exc.message}")
            return
        while not self.closed:
            try:
                message = self._decoder.next_message()
            except ProtocolError as exc:
                self._invalid_frame(exc)
                continue
            if message is None:
                break
            self._dispatch(message)
        if self._decoder.has_partial_frame and not self.closed:
            self._abort("the server split a frame across transport messages")

    def connection_lost(self) -> None:
        if self.state is ConnectionState.CLOSED and not self._pending:
            self._cancel_login_timer()
            return
        self.state = ConnectionState.CLOSED
        self._cancel_login_timer()
        pending, self._pending = self._pending, {}
        for d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(ClientError(LocalCode.CONNECTION_LOST, "the connection to the server broke"))
        self._handler.on_closed(self)

    # -- requests --------------------------------------------------------------------------

    def request(
        self, build: Callable[[int], Message], timeout_s: float | None = None
    ) -> Deferred[Message]:
        """Send the request `build(rid)` and fire with its answer; an `error` answer fails with
        a `RemoteError`, a silent server with TIMEOUT, a broken connection with CONNECTION_LOST."""
        if self.state is ConnectionState.CLOSED:
            return _failed(ClientError(LocalCode.CONNECTION_LOST, "the connection is closed"))
        rid = self._allocate_rid()
        d: Deferred[Message] = Deferred()
        timer = self._clock.callLater(
            self._request_timeout_s if timeout_s is None else timeout_s, self._timed_out, rid
        )
        self._pending[rid] = (d, timer)
        try:
            self._write(build(rid))
        except ProtocolError as exc:
            del self._pending[rid]
            timer.cancel()
            return _failed(ClientError(LocalCode.INVALID_ARGUMENT, exc.message))
        return d

    def send(self, message: Message) -> None:
        """A frame that has no answer (`ack`)."""
        if self.state is not ConnectionState.CLOSED:
            self._write(message)

    def close(self) -> None:
        if self.state is not ConnectionState.CLOSED:
            self._transport.close()

    def _allocate_rid(self) -> int:
        while True:
            rid = self._next_rid
            self._next_rid = 1 if rid >= UINT32_MAX else rid + 1
            if rid not in self._pending:
                return rid

    def _timed_out(self, rid: int) -> None:
        entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[0].errback(ClientError(LocalCode.TIMEOUT, "the server did not answer in time"))

    def _answer(self, rid: int) -> Deferred[Message] | None:
        entry = self._pending.pop(rid, None)
        if entry is None:
            return None
        d, timer = entry
        if timer.active():
            timer.cancel()
        return d

    # -- frames from the server ------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Welcome):
            self._welcome(message)
        elif self.state is ConnectionState.AWAITING_WELCOME:
            if isinstance(message, Error):
                self._error(message)
            else:
                self._abort(f"the server sent {message.TYPE} before welcome")
        elif isinstance(message, Error):
            self._error(message)
        elif isinstance(message, Deliver):
            self._handler.on_deliver(self, message)
        elif isinstance(message, PrekeysLow):
            self._handler.on_prekeys_low(self, message)
        else:
            rid = getattr(message, "rid", None)
            d = self._answer(rid) if isinstance(rid, int) else None
            if d is None:
                _log.debug("ignoring an unsolicited {type} frame", type=message.TYPE)
            else:
                d.callback(message)

    def _welcome(self, message: Welcome) -> None:
        if self.state is not ConnectionState.AWAITING_WELCOME:
            self._abort("the server sent a second welcome")
            return
        if message.version not in SUPPORTED_VERSIONS:
            self._abort(f"the server chose protocol version {message.version}")
            return
        if message.clinic != self._credentials.clinic_id:
            self._refuse_login(
                ClientError(
                    LocalCode.PEER_UNVERIFIED,
                    f"the server is for clinic {message.clinic!r}, "
                    f"not {self._credentials.clinic_id!r} pinned at enrollment",
                )
            )
            return
        self.welcome = message
        self._decoder.version = message.version
        self.state = ConnectionState.AUTHENTICATING
        credentials = self._credentials
        token = self._token
        if token is not None:
            self.resumed = True
            d = self.request(lambda rid: Resume(rid=rid, token=token), LOGIN_TIMEOUT_S)
        else:
            signature = credentials.signing_key.sign(
                auth_transcript(
                    message.challenge, message.clinic, credentials.user_id, credentials.device_id
                )
            )
            d = self.request(
                lambda rid: Auth(
                    rid=rid,
                    user=credentials.user_id,
                    device=credentials.device_id,
                    signature=signature,
                ),
                LOGIN_TIMEOUT_S,
            )
        d.addCallbacks(self._authenticated, self._login_failed)

    def _authenticated(self, message: Message) -> None:
        if not isinstance(message, Authenticated):
            self._abort(f"the server answered the login with {message.TYPE}")
            return
        if (message.user, message.device) != (
            self._credentials.user_id,
            self._credentials.device_id,
        ):
            self._abort("the server logged us in as another device")
            return
        if not self.resumed and message.token is None:
            self._abort("the server sent no session token after auth")
            return
        self._cancel_login_timer()
        self.state = ConnectionState.READY
        self._handler.on_authenticated(self, message)

    def _login_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, ClientError):
            if error.code is LocalCode.CONNECTION_LOST:
                return  # on_closed reports it
            self._refuse_login(error)
        else:  # pragma: no cover - a bug in the callbacks above
            failure.raiseException()

    def _error(self, message: Error) -> None:
        code = remote_code(message.code)
        error = RemoteError(
            code, message.message, missing=message.missing or (), extra=message.extra or ()
        )
        if message.rid is not None:
            d = self._answer(message.rid)
            if d is not None:
                d.errback(error)
                return
        if code in _CLOSING_CODES:
            self._refuse_login(error)
        else:
            _log.info("the server reported {code}", code=code.value)

    def _refuse_login(self, error: ClientError) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self._handler.on_login_refused(self, error)
        self._transport.close()

    def _invalid_frame(self, exc: ProtocolError) -> None:
        d = self._answer(exc.rid) if exc.rid is not None else None
        if d is not None:
            d.errback(ClientError(LocalCode.BAD_SERVER_ANSWER, f"invalid answer: {exc.message}"))
        elif exc.fatal:
            self._abort(exc.message)
        else:
            _log.info("ignoring an invalid frame from the server: {problem}", problem=exc.message)

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.state in (ConnectionState.AWAITING_WELCOME, ConnectionState.AUTHENTICATING):
            self._refuse_login(ClientError(LocalCode.TIMEOUT, "logging in took too long"))

    def _cancel_login_timer(self) -> None:
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None

    def _abort(self, reason: str) -> None:
        self._refuse_login(ClientError(LocalCode.BAD_SERVER_ANSWER, reason))

    def _write(self, message: Message) -> None:
        self._transport.write(encode_frame(message, self._decoder.version))


def _failed(error: Exception) -> Deferred[Message]:
    d: Deferred[Message] = Deferred()
    d.errback(error)
    return d


# --- backoff ----------------------------------------------------------------------------------


def uniform(rng: Rng) -> float:
    """A float uniform in [0, 1) from 53 random bits."""
    return (int.from_bytes(rng(7), "big") >> 3) / float(1 << 53)


class Backoff:
    """Full-jitter exponential backoff (AWS architecture blog, "Exponential Backoff And
    Jitter"): the n-th retry waits uniform(0, min(cap, base * 2**n))."""

    def __init__(self, rng: Rng, *, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S):
        self._rng = rng
        self._base_s = base_s
        self._cap_s = cap_s
        self.attempt = 0

    def ceiling(self) -> float:
        return min(self._cap_s, self._base_s * (1 << min(self.attempt, 32)))

    def next_delay(self) -> float:
        delay = uniform(self._rng) * self.ceiling()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


# --- the connector ----------------------------------------------------------------------------


class TokenStore(Protocol):
    def load_token(self) -> Deferred[bytes | None]: ...

    def save_token(self, token: bytes, expires_ms: int) -> Deferred[None]: ...

    def clear_token(self) -> Deferred[None]: ...


class ConnectorEvents(Protocol):
    """What the engine hears from the connector."""

    def connection_ready(self, connection: ServerConnection) -> None: ...

    def deliver(self, connection: ServerConnection, message: Deliver) -> None: ...

    def prekeys_low(self, connection: ServerConnection, message: PrekeysLow) -> None: ...

    def connection_down(self, error: ClientError | None, *, retry_in_s: float | None) -> None:
        """The connection failed or was lost (`error` says why, when known); it is retried in
        `retry_in_s` seconds, or never (None: stopped, or a fatal refusal)."""


@dataclass(slots=True)
class _Waiter:
    deferred: Deferred[ServerConnection]
    fail_fast: bool


class Connector:
    """Keeps one authenticated connection to the relay, reconnecting with backoff."""

    def __init__(
        self,
        *,
        dialer: Dialer,
        credentials: Credentials,
        tokens: TokenStore,
        events: ConnectorEvents,
        clock: IReactorTime,
        rng: Rng,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self._dialer = dialer
        self._credentials = credentials
        self._tokens = tokens
        self._events = events
        self._clock = clock
        self.backoff = Backoff(rng)
        self._request_timeout_s = request_timeout_s
        self._running = False
        self._dialing = False
        self._current: ServerConnection | None = None
        self._retry: IDelayedCall | None = None
        self._waiters: list[_Waiter] = []
        self._fatal: ClientError | None = None
        self._login_error: ClientError | None = None
        self._retry_at_once = False
        self._closed_waiters: list[Deferred[None]] = []

    @property
    def connection(self) -> ServerConnection | None:
        """The ready connection, if there is one."""
        current = self._current
        return current if current is not None and current.ready else None

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._running or self._fatal is not None:
            return
        self._running = True
        self._dial()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._fail_waiters(ClientError(LocalCode.CLOSED, "the client is shutting down"), all_=True)
        current = self._current
        if current is None or current.state is ConnectionState.CLOSED:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        current.close()
        return d

    def when_ready(self, *, fail_fast: bool) -> Deferred[ServerConnection]:
        """The ready connection, now or once logged in. With `fail_fast` the first failed
        attempt fails the wait (one-shot commands); without it only a fatal refusal or `stop`
        does (a listener)."""
        if self._fatal is not None:
            return _failed_connection(self._fatal)
        ready = self.connection
        if ready is not None:
            return succeed(ready)
        d: Deferred[ServerConnection] = Deferred()
        self._waiters.append(_Waiter(d, fail_fast))
        if fail_fast and self._retry is not None and self._retry.active():
            # A one-shot caller does not sit out the backoff: try again now, and fail it if
            # this attempt fails.
            self._retry.cancel()
            self._retry_now()
        self.start()
        return d

    def request(
        self,
        build: Callable[[int], Message],
        *,
        fail_fast: bool = True,
        timeout_s: float | None = None,
    ) -> Deferred[Message]:
        """A request on the ready connection (waiting for one first)."""
        d = self.when_ready(fail_fast=fail_fast)
        return d.addCallback(lambda connection: connection.request(build, timeout_s))

    # -- dialing ---------------------------------------------------------------------------

    def _dial(self) -> None:
        if not self._running or self._dialing or self._current is not None:
            return
        self._dialing = True
        self._login_error = None
        d = self._tokens.load_token()
        d.addCallback(self._dial_with)
        d.addErrback(self._dial_failed)

    def _dial_with(self, token: bytes | None) -> Deferred[None]:
        def attach(transport: FrameTransport) -> FrameSink:
            connection = ServerConnection(
                transport,
                self,
                credentials=self._credentials,
                token=token,
                clock=self._clock,
                request_timeout_s=self._request_timeout_s,
            )
            self._current = connection
            return connection

        def opened(_: None) -> None:
            self._dialing = False

        return self._dialer.dial(attach).addCallback(opened)

    def _dial_failed(self, failure: Failure) -> None:
        self._dialing = False
        error = failure.value
        if not isinstance(error, ClientError):
            _log.failure("dialing the relay failed", failure)
            error = ClientError(LocalCode.SERVER_UNREACHABLE, "cannot connect to the server")
        self._current = None
        self._schedule_retry(error)

    def _schedule_retry(self, error: ClientError | None) -> None:
        if self._fatal is not None:
            return
        if error is not None and not self._retry_at_once:
            # (A refused token is not a failure: logging in again with auth is part of it.)
            self._fail_waiters(error, all_=False)
        if not self._running:
            self._events.connection_down(error, retry_in_s=None)
            return
        if self._retry_at_once:
            self._retry_at_once = False
            delay = 0.0
        else:
            delay = self.backoff.next_delay()
        self._events.connection_down(error, retry_in_s=delay)
        self._retry = self._clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._dial()

    def _fail_waiters(self, error: ClientError, *, all_: bool) -> None:
        keep: list[_Waiter] = []
        failing: list[_Waiter] = []
        for waiter in self._waiters:
            (failing if all_ or waiter.fail_fast else keep).append(waiter)
        self._waiters = keep
        for waiter in failing:
            waiter.deferred.errback(error)

    # -- ConnectionHandler -----------------------------------------------------------------

    def on_authenticated(self, connection: ServerConnection, message: Authenticated) -> None:
        self.backoff.reset()
        if message.token is not None:
            saved = self._tokens.save_token(message.token, message.expires_ms)
            saved.addErrback(lambda f: _log.failure("storing the session token failed", f))
        waiters, self._waiters = self._waiters, []
        self._events.connection_ready(connection)
        for waiter in waiters:
            if connection.ready:
                waiter.deferred.callback(connection)
            else:
                self._waiters.append(waiter)

    def on_login_refused(self, connection: ServerConnection, error: ClientError) -> None:
        if error.code is ErrorCode.TOKEN_INVALID:
            self._tokens.clear_token().addErrback(
                lambda f: _log.failure("forgetting the session token failed", f)
            )
            self._retry_at_once = True
            return
        if error.code in FATAL_LOGIN_CODES or error.code is LocalCode.PEER_UNVERIFIED:
            self._fatal = error
            self._running = False
            self._fail_waiters(error, all_=True)
            self._events.connection_down(error, retry_in_s=None)
            return
        self._login_error = error

    def on_deliver(self, connection: ServerConnection, message: Deliver) -> None:
        self._events.deliver(connection, message)

    def on_prekeys_low(self, connection: ServerConnection, message: PrekeysLow) -> None:
        self._events.prekeys_low(connection, message)

    def on_closed(self, connection: ServerConnection) -> None:
        if connection is not self._current:
            return
        self._current = None
        self._dialing = False
        closed, self._closed_waiters = self._closed_waiters, []
        for d in closed:
            d.callback(None)
        if self._fatal is not None:
            return
        error = self._login_error or ClientError(
            LocalCode.CONNECTION_LOST, "the connection to the server was lost"
        )
        self._login_error = None
        self._schedule_retry(error if self._running or self._waiters else None)


def _failed_connection(error: ClientError) -> Deferred[ServerConnection]:
    d: Deferred[ServerConnection] = Deferred()
    d.errback(error)
    return d
