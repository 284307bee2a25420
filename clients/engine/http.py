"""The HTTP side of the protocol (enrollment, blob upload and download) and server URLs.

`ServerUrl` parses the base URL a user types (`http://127.0.0.1:8448`) once and derives every
endpoint from it, the WebSocket URL included. `HttpClient` is the small interface the engine
needs; `AgentHttpClient` implements it with `twisted.web.client.Agent`, reading at most a given
number of response bytes (a hostile or broken server cannot make the client buffer more) and
failing with a `ClientError` whose code says what went wrong: unreachable, timed out, refused.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from twisted.internet import error as internet_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from medrelay.clients.engine.errors import ClientError, LocalCode, RemoteError, remote_code
from medrelay.protocol.errors import ErrorCode

DEFAULT_TIMEOUT_S: Final = 30.0
MAX_JSON_RESPONSE: Final = 64 * 1024
WEBSOCKET_PATH: Final = "/v1/ws"
USER_AGENT: Final = b"medrelay-client/0.1"


# --- URLs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerUrl:
    """A relay's base URL: scheme, host and port, nothing else."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def _authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self._authority}"

    def http(self, path: str) -> str:
        return f"{self.scheme}://{self._authority}{path}"

    def websocket(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self._authority}{WEBSOCKET_PATH}"


def parse_server_url(text: str) -> ServerUrl:
    """Parse `http(s)://host[:port][/]`; anything else is a BAD_URL error naming the problem."""

    def bad(problem: str) -> ClientError:
        return ClientError(LocalCode.BAD_URL, f"bad server URL {text!r}: {problem}")

    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parts.scheme not in ("http", "https"):
        raise bad("it must start with http:// or https://")
    if not parts.hostname:
        raise bad("it has no host name")
    if parts.username is not None or parts.password is not None:
        raise bad("credentials do not belong in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("give only the scheme, host and port (no path or query)")
    host = parts.hostname
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not all(c.isalnum() or c in "-._" for c in host):
            raise bad("the host name has characters a host name cannot have") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not 0 < port < 65536:
        raise bad("the port is out of range")
    return ServerUrl(parts.scheme, host, port)


# --- the client interface ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str

    def __repr__(self) -> str:
        return f"HttpResponse(status={self.status}, {len(self.body)} bytes)"


class HttpClient(Protocol):
    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        max_response_bytes: int = MAX_JSON_RESPONSE,
    ) -> Deferred[HttpResponse]:
        """The response (any status); a `ClientError` when no response arrived."""
        ...


def post_json(
    http: HttpClient, url: str, payload: object, headers: Mapping[str, str] | None = None
) -> Deferred[Any]:
    """POST a JSON object and return the decoded JSON answer of a 2xx response; a JSON error
    body (`{"error": {"code", "message"}}`) becomes a `RemoteError`."""
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    d = http.request("POST", url, headers=all_headers, body=body)
    return d.addCallback(json_answer)


def json_answer(response: HttpResponse) -> Any:
    """The decoded JSON of a 2xx response, or the error the response carries."""
    if not 200 <= response.status < 300:
        raise error_from_response(response)
    try:
        return json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        raise ClientError(
            LocalCode.BAD_SERVER_ANSWER, "the server's answer is not valid JSON"
        ) from None


_STATUS_CODES: Final = {
    401: ErrorCode.NOT_AUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.SERVER_BUSY,
}


def error_from_response(response: HttpResponse) -> ClientError:
    """The error an HTTP error response carries (its JSON body's code, else from the status)."""
    try:
        error = json.loads(response.body)["error"]
        code, message = error["code"], error["message"]
        if isinstance(code, str) and isinstance(message, str):
            return RemoteError(remote_code(code), message[:512])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        pass
    code = _STATUS_CODES.get(response.status, ErrorCode.INTERNAL_ERROR)
    return RemoteError(code, f"the server answered HTTP {response.status}")


# --- Agent ------------------------------------------------------------------------------------


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body held in memory (FileBodyProducer would use the global cooperator)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:  # noqa: N802 (Twisted API)
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted API)
        pass

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted API)
        pass

    def stopProducing(self) -> None:  # noqa: N802 (Twisted API)
        pass


class _BoundedBody(TwistedProtocol):
    """Collects a response body, giving up (and dropping the connection) past `limit` bytes."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._failed = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self._failed:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._failed = True
            self._parts.clear()
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            self._done.errback(_too_large(self._limit))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = internet_error.ConnectionDone()) -> None:  # type: ignore[assignment] # noqa: N802, B008
        if self._failed:
            return
        if isinstance(reason.value, ResponseDone):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(
                ClientError(LocalCode.SERVER_UNREACHABLE, "the connection broke mid-answer")
            )


def _too_large(limit: int) -> ClientError:
    return ClientError(
        LocalCode.BAD_SERVER_ANSWER, f"the server's answer is larger than {limit} bytes"
    )


class AgentHttpClient:
    """`HttpClient` over `twisted.web.client.Agent`."""

    def __init__(
        self, reactor: Any, clock: IReactorTime, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._agent = Agent(reactor, connectTimeout=timeout_s)  # type: ignore[no-untyped-call]
        self._clock = clock
        self._timeout_s = timeout_s

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        max_response_bytes: int = MAX_JSON_RESPONSE,
    ) -> Deferred[HttpResponse]:
        raw_headers = Headers({b"User-Agent": [USER_AGENT]})
        for name, value in (headers or {}).items():
            raw_headers.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])
        producer = None if body is None else _BytesProducer(body)
        d: Deferred[Any] = self._agent.request(
            method.encode("ascii"), url.encode("ascii"), raw_headers, producer
        )

        def got_response(response: IResponse) -> Deferred[HttpResponse]:
            length = response.length
            too_long = isinstance(length, int) and length > max_response_bytes
            if length is not UNKNOWN_LENGTH and too_long:
                response.deliverBody(_Discard())  # type: ignore[no-untyped-call]
                raise _too_large(max_response_bytes)
            done: Deferred[bytes] = Deferred()
            response.deliverBody(_BoundedBody(done, max_response_bytes))  # type: ignore[no-untyped-call]
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            return done.addCallback(
                lambda data: HttpResponse(
                    response.code, data, content_type.decode("latin-1", "replace")
                )
            )

        d.addCallback(got_response)
        d.addTimeout(self._timeout_s, self._clock)
        d.addErrback(_translate_failure, url)
        return d


class _Discard(TwistedProtocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def _translate_failure(failure: Failure, url: str) -> Failure:
    exc = failure.value
    if isinstance(exc, ClientError):
        return failure
    if isinstance(exc, CancelledError | internet_error.TimeoutError):
        raise ClientError(LocalCode.TIMEOUT, f"the server did not answer in time ({url})")
    if isinstance(exc, internet_error.DNSLookupError):
        raise ClientError(LocalCode.SERVER_UNREACHABLE, f"cannot resolve the server's name ({url})")
    if isinstance(exc, internet_error.ConnectError):
        raise ClientError(LocalCode.SERVER_UNREACHABLE, f"cannot connect to the server ({url})")
    if isinstance(exc, ResponseNeverReceived | ResponseFailed):
        raise ClientError(
            LocalCode.SERVER_UNREACHABLE, f"the connection to the server failed ({url})"
        )
    return failure
