"""The HTTP adapter: enrollment, device linking, blobs and health as JSON over twisted.web, on
the port that also upgrades `/v1/ws` to the WebSocket protocol (docs/protocol.md §1, §10, §11,
§16).

This is the only place that knows HTTP status codes: domain errors carry a wire `ErrorCode` and
`STATUS` maps it. Every error answer is `{"error": {"code": ..., "message": ...}}`, every answer
carries the request's `X-Request-Id`, and the log line per request names the request id, the
method, the route template (never a blob id), the status and the duration - no address, no
header, no body.

Request bodies are bounded before they are buffered. twisted.web's `Request` normally spools any
body to memory or a temporary file; `RelayRequest` learns the declared `Content-Length` in
`gotLength` (before the first body byte) and compares it with the limit of the request's route
(`BodyLimits`); a chunked body is counted as it arrives. Over the limit, it answers
`413 payload_too_large` at once, discards (without storing) whatever the client still sends for
at most `LINGER_S` seconds or `LINGER_BYTES` bytes - closing at once would reset the connection
and could destroy the answer before the client reads it - then closes the connection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final, Protocol, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import IResource, Resource

from medrelay.protocol.errors import ErrorCode
from medrelay.server.blobs import BlobService, parse_bearer
from medrelay.server.enrollment import EnrollmentService
from medrelay.server.linking import MAX_LINK_BODY, LinkService
from medrelay.server.readiness import Readiness
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.store import DeviceRecord
from medrelay.server.storage.errors import StorageError

_log = Logger()

STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.INVALID_FIELD: 400,
    ErrorCode.MALFORMED_FRAME: 400,
    ErrorCode.NOT_AUTHENTICATED: 401,
    ErrorCode.TOKEN_INVALID: 401,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.ENROLLMENT_FAILED: 403,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNEXPECTED_MESSAGE: 409,
    ErrorCode.DEVICE_REVOKED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_USER: 404,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.SERVER_BUSY: 503,
}
METHOD_NOT_ALLOWED: Final = 405
LINGER_S: Final = 5.0
LINGER_BYTES: Final = 1024 * 1024
REQUEST_TIMEOUT_S: Final = 60.0
"""An idle HTTP connection (or one trickling a body) is closed after this long."""
SERVER_HEADER: Final = b"medrelay"
ENROLL_BODY_LIMIT: Final = 64 * 1024
DEFAULT_BODY_LIMIT: Final = 16 * 1024
LINK_ACTIONS: Final = frozenset(
    {"join", "device", "reveal", "confirm", "complete", "cancel", "peer"}
)
"""The last path segment of `/v1/link/{code}/...` routes."""

_KNOWN_METHODS: Final = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"})


def status_for(code: ErrorCode) -> int:
    return STATUS.get(code, 400)


def error_body(code: ErrorCode | str, message: str) -> bytes:
    return json.dumps(
        {"error": {"code": str(code), "message": message}}, separators=(",", ":")
    ).encode("utf-8")


# --- bounded requests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """The largest body accepted per route, in bytes."""

    blobs: int
    enroll: int = ENROLL_BODY_LIMIT
    link: int = MAX_LINK_BODY
    default: int = DEFAULT_BODY_LIMIT

    def for_path(self, path: bytes) -> int:
        route = _route(path)
        if route == b"/v1/blobs":
            return self.blobs
        if route == b"/v1/enroll":
            return self.enroll
        if route == b"/v1/link" or route.startswith(b"/v1/link/"):
            return self.link
        return self.default


def _route(path: bytes) -> bytes:
    """The path of a request target without query or trailing slash; an absolute-form target
    (`POST http://host/v1/blobs`, as some proxies send) is reduced to its path."""
    if b"://" in path[:16]:
        path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
    return path.split(b"?", 1)[0].rstrip(b"/")


def route_of(path: bytes) -> str:
    """The route template of a path, for logs (ids are never logged)."""
    route = _route(path)
    if route.startswith(b"/v1/blobs/"):
        return "/v1/blobs/{id}"
    if route.startswith(b"/v1/link/"):  # the code is a secret: never logged
        parts = route.split(b"/")[3:]
        if len(parts) == 1:
            return "/v1/link/{code}"
        if len(parts) == 2 and parts[1].decode("ascii", "replace") in LINK_ACTIONS:
            return "/v1/link/{code}/" + parts[1].decode("ascii")
        return "(other)"
    if route in (b"/v1/blobs", b"/v1/enroll", b"/v1/link", b"/v1/ws", b"/healthz", b"/readyz", b""):
        return route.decode("ascii") or "/"
    return "(other)"


class WebRequest(Protocol):
    """The parts of twisted.web's (untyped) `Request` the resources use."""

    method: bytes
    postpath: list[bytes]
    content: IO[bytes] | None
    finished: bool

    def setHeader(self, name: bytes, value: bytes) -> None: ...  # noqa: N802

    def setResponseCode(self, code: int) -> None: ...  # noqa: N802

    def getHeader(self, key: bytes) -> bytes | None: ...  # noqa: N802

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...  # noqa: N802


class RelayRequest(server.Request):
    """A `Request` that refuses an oversized body before buffering it, and carries a request
    id."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)  # type: ignore[no-untyped-call]
        site = cast(RelaySite, channel.site)
        self._site = site
        self.request_id: str = site.next_request_id()
        self.started_s: float = site.clock.seconds()
        self._limit = site.body_limits.default
        self._received = 0
        self._refused = False
        self._discarded = 0
        self._linger: IDelayedCall | None = None

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted API)
        site = self._site
        # The request line is parsed but `self.path` is only set once the body is complete:
        # the channel holds it meanwhile (a private attribute; without it, the largest limit).
        path = getattr(self.channel, "_path", None)
        self._limit = (
            site.body_limits.for_path(path) if isinstance(path, bytes) else site.body_limits.blobs
        )
        if length is not None and length > self._limit:
            self._refuse_body()
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self._refused:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._close()
            return
        self._received += len(data)
        if self._received > self._limit:  # a chunked body that grew too large
            self._refuse_body()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self._refused:
            self._close()
            return
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self._cancel_linger()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _refuse_body(self) -> None:
        self._refused = True
        self.content = None
        # The channel would otherwise invite the body with "100 Continue" after gotLength.
        self.requestHeaders.removeHeader(b"expect")
        body = error_body(
            ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is larger than {self._limit} bytes"
        )
        head = (
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
            b"X-Request-Id: " + self.request_id.encode("ascii") + b"\r\n"
            b"Server: " + SERVER_HEADER + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        transport = self.channel.transport
        if transport is not None:
            transport.write(head + body)
        _log.info(
            "http {request_id} refused a body over {limit} bytes (413)",
            request_id=self.request_id,
            limit=self._limit,
        )
        self._linger = self._site.clock.callLater(LINGER_S, self._close)

    def _cancel_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None

    def _close(self) -> None:
        self._cancel_linger()
        self.channel.loseConnection()  # type: ignore[no-untyped-call]


class RelaySite(server.Site):
    """The clients' site: bounded requests, request ids, and a log line without personal data."""

    requestFactory = RelayRequest  # noqa: N815 (twisted.web API)
    displayTracebacks = False  # noqa: N815 (twisted.web API)

    def __init__(
        self,
        root: IResource,
        *,
        clock: IReactorTime,
        body_limits: BodyLimits,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        super().__init__(root, timeout=timeout_s, reactor=clock, parsePOSTFormSubmission=False)  # type: ignore[no-untyped-call]
        self.clock = clock
        self.body_limits = body_limits
        self._next_id = 0

    def next_request_id(self) -> str:
        self._next_id += 1
        return f"r{self._next_id}"

    def log(self, request: Any) -> None:
        method = request.method if request.method in _KNOWN_METHODS else b"OTHER"
        duration_ms = (self.clock.seconds() - getattr(request, "started_s", 0.0)) * 1000
        _log.info(
            "http {request_id} {method} {route} {status} {duration_ms:.1f}ms",
            request_id=getattr(request, "request_id", "-"),
            method=method.decode("ascii"),
            route=route_of(request.path or b""),
            status=request.code,
            duration_ms=duration_ms,
        )


# --- answers ------------------------------------------------------------------------------------


def _common_headers(request: WebRequest) -> None:
    request.setHeader(b"server", SERVER_HEADER)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request_id = getattr(request, "request_id", None)
    if isinstance(request_id, str):
        request.setHeader(b"x-request-id", request_id.encode("ascii"))


def json_answer(request: WebRequest, status: int, value: object) -> bytes:
    """Set the status and headers of a JSON answer; returns the body for `render_*`."""
    body = json.dumps(value, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(status)
    _common_headers(request)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    return body


def error_answer(request: WebRequest, code: ErrorCode, message: str) -> bytes:
    request.setResponseCode(status_for(code))
    _common_headers(request)
    body = error_body(code, message)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    return body


def error_of(failure: Failure, request_id: str) -> tuple[ErrorCode, str]:
    """The wire code and message for a failure; unexpected ones are logged (with the request id
    only) and become `internal_error`."""
    exc = failure.value
    if isinstance(exc, RelayError):
        return exc.code, exc.message
    if isinstance(exc, StorageError) and exc.code is ErrorCode.SERVER_BUSY:
        return exc.code, "the server cannot take this request right now; try again shortly"
    _log.failure("http {request_id} failed", failure, request_id=request_id)
    return ErrorCode.INTERNAL_ERROR, "the server failed to carry out the request"


def finish_later(
    request: WebRequest,
    d: Deferred[Any],
    answer: Callable[[Any], tuple[int, bytes, bytes]],
) -> int:
    """Answer `request` when `d` fires: `answer(result)` gives (status, content type, body); a
    failure becomes an error answer. Returns NOT_DONE_YET for `render_*`."""
    lost: list[bool] = []
    request.notifyFinish().addErrback(lambda _: lost.append(True))
    request_id = getattr(request, "request_id", "-")

    def write(status: int, content_type: bytes, body: bytes) -> None:
        if lost or request.finished:
            return
        request.setResponseCode(status)
        _common_headers(request)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()

    def succeeded(result: Any) -> None:
        write(*answer(result))

    def failed(failure: Failure) -> None:
        code, message = error_of(failure, request_id)
        write(status_for(code), b"application/json", error_body(code, message))

    d.addCallbacks(succeeded, failed).addErrback(
        lambda f: _log.failure("http {request_id}: answering failed", f, request_id=request_id)
    )
    return server.NOT_DONE_YET


def _json(status: int, value: object) -> tuple[int, bytes, bytes]:
    return status, b"application/json", json.dumps(value, separators=(",", ":")).encode("utf-8")


# --- resources ----------------------------------------------------------------------------------


class NotFoundPage(Resource):
    isLeaf = True  # noqa: N815 (twisted.web API)

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: WebRequest) -> bytes:
        return error_answer(request, ErrorCode.NOT_FOUND, "no such path")


class JsonResource(Resource):
    """A resource whose unknown children and unsupported methods answer in JSON."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def getChild(self, path: bytes, request: WebRequest) -> IResource:  # noqa: N802
        return NotFoundPage()

    def render(self, request: WebRequest) -> bytes:
        handler = getattr(self, "render_" + request.method.decode("ascii", "replace"), None)
        if handler is None:
            request.setResponseCode(METHOD_NOT_ALLOWED)
            _common_headers(request)
            body = error_body(ErrorCode.NOT_FOUND, "this method is not allowed on this path")
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", str(len(body)).encode("ascii"))
            return body
        result: bytes = handler(request)
        return result


class HealthPage(JsonResource):
    """`/healthz`: the process is up and serving (liveness)."""

    isLeaf = True  # noqa: N815 (twisted.web API)

    def render_GET(self, request: WebRequest) -> bytes:  # noqa: N802 (twisted.web API)
        return json_answer(request, 200, {"status": "ok"})


class ReadyPage(JsonResource):
    """`/readyz`: 200 when the database, its schema and the clinic keys are usable now, else 503;
    the body names each check (medrelay.server.readiness)."""

    isLeaf = True  # noqa: N815 (twisted.web API)

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: WebRequest) -> int:  # noqa: N802 (twisted.web API)
        def answer(report: dict[str, object]) -> tuple[int, bytes, bytes]:
            return _json(200 if report["status"] == "ready" else 503, report)

        return finish_later(request, self._readiness.check(), answer)


class EnrollPage(JsonResource):
    """POST `/v1/enroll` (docs/protocol.md §10)."""

    isLeaf = True  # noqa: N815 (twisted.web API)

    def __init__(self, service: EnrollmentService) -> None:
        super().__init__()
        self._service = service

    def render_POST(self, request: WebRequest) -> bytes | int:  # noqa: N802 (twisted.web API)
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type.lower() != b"application/json":
            return error_answer(
                request, ErrorCode.INVALID_FIELD, "Content-Type: must be application/json"
            )
        body = request.content.read(ENROLL_BODY_LIMIT + 1) if request.content else b""
        d = self._service.enroll_body(body, getattr(request, "request_id", "-"))
        return finish_later(request, d, lambda answer: _json(200, answer.to_json()))


class BlobsPage(JsonResource):
    """POST `/v1/blobs` and GET `/v1/blobs/{blob_id}` (docs/protocol.md §11)."""

    isLeaf = True  # noqa: N815 (twisted.web API)

    def __init__(self, service: BlobService) -> None:
        super().__init__()
        self._service = service

    def _authenticated(self, request: WebRequest) -> Deferred[DeviceRecord]:
        token = parse_bearer(request.getHeader(b"authorization"))
        return self._service.authenticate(token)

    def render_POST(self, request: WebRequest) -> bytes | int:  # noqa: N802 (twisted.web API)
        if any(request.postpath):
            return error_answer(request, ErrorCode.NOT_FOUND, "no such path")
        try:
            d = self._authenticated(request)
        except RelayError as exc:
            return error_answer(request, exc.code, exc.message)
        limit = self._service.max_size_bytes
        content = request.content

        def store(device: DeviceRecord) -> Deferred[str]:
            data = content.read(limit + 1) if content is not None else b""
            return self._service.upload(device, data)

        d2 = d.addCallback(store)
        return finish_later(request, d2, lambda blob_id: _json(201, {"blob_id": blob_id}))

    def render_GET(self, request: WebRequest) -> bytes | int:  # noqa: N802 (twisted.web API)
        segments = request.postpath
        if len(segments) != 1 or not segments[0]:
            return error_answer(request, ErrorCode.NOT_FOUND, "no such path")
        blob_id = segments[0].decode("ascii", "replace")
        try:
            d = self._authenticated(request)
        except RelayError as exc:
            return error_answer(request, exc.code, exc.message)
        d2 = d.addCallback(lambda device: self._service.download(device, blob_id))
        return finish_later(request, d2, lambda data: (200, b"application/octet-stream", data))


class LinkPage(JsonResource):
    """`/v1/link` and below: linking a device (docs/protocol.md §16). Every route answers 200
    except the creation of a link (201)."""

    isLeaf = True  # noqa: N815 (twisted.web API)

    def __init__(self, service: LinkService) -> None:
        super().__init__()
        self._service = service

    @staticmethod
    def _segments(request: WebRequest) -> list[str]:
        segments = [s.decode("ascii", "replace") for s in request.postpath]
        while segments and not segments[-1]:
            segments.pop()
        return segments

    def render_GET(self, request: WebRequest) -> bytes | int:  # noqa: N802 (twisted.web API)
        segments = self._segments(request)
        authorization = request.getHeader(b"authorization")
        if len(segments) == 1:
            d = self._service.status(authorization, segments[0])
        elif len(segments) == 2 and segments[1] == "peer":
            d = self._service.peer(authorization, segments[0])
        else:
            return error_answer(request, ErrorCode.NOT_FOUND, "no such path")
        return finish_later(request, d, lambda answer: _json(200, answer))

    def render_POST(self, request: WebRequest) -> bytes | int:  # noqa: N802 (twisted.web API)
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type.lower() != b"application/json":
            return error_answer(
                request, ErrorCode.INVALID_FIELD, "Content-Type: must be application/json"
            )
        segments = self._segments(request)
        authorization = request.getHeader(b"authorization")
        body = request.content.read(MAX_LINK_BODY + 1) if request.content else b""
        service = self._service
        if not segments:
            d = service.create(authorization, body)
            return finish_later(request, d, lambda answer: _json(201, answer))
        if len(segments) != 2:
            return error_answer(request, ErrorCode.NOT_FOUND, "no such path")
        code, action = segments
        if action == "join":
            d = service.join(code, body)
        elif action == "device":
            d = service.submit_device(authorization, code, body)
        elif action == "reveal":
            d = service.reveal(authorization, code, body)
        elif action == "confirm":
            d = service.confirm(authorization, code)
        elif action == "complete":
            d = service.complete(authorization, code, body)
        elif action == "cancel":
            d = service.cancel(authorization, code)
        else:
            return error_answer(request, ErrorCode.NOT_FOUND, "no such path")
        return finish_later(request, d, lambda answer: _json(200, answer))


class WebSocketUpgrade(Resource):
    """Hands `/v1/ws` requests to the WebSocket resource, after releasing the connection from
    twisted.web: the HTTPChannel registered itself as the transport's producer when the
    connection opened, and the WebSocket protocol that takes the transport over registers its own
    (a transport holds one producer; the second registration would fail)."""

    isLeaf = True  # noqa: N815 (twisted.web API)

    def __init__(self, websocket: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._websocket = websocket

    def render(self, request: Any) -> Any:
        transport = request.channel.transport
        if transport is not None:
            transport.unregisterProducer()
        return self._websocket.render(request)  # type: ignore[no-untyped-call]


def build_root(
    *,
    websocket: IResource,
    enrollment: EnrollmentService,
    blobs: BlobService,
    linking: LinkService | None = None,
    readiness: Readiness | None = None,
) -> Resource:
    """The resource tree of the clients' port (`/v1/link` only with a `LinkService`, `/readyz`
    only with a `Readiness`)."""
    root = JsonResource()
    root.putChild(b"healthz", HealthPage())
    if readiness is not None:
        root.putChild(b"readyz", ReadyPage(readiness))
    v1 = JsonResource()
    root.putChild(b"v1", v1)
    v1.putChild(b"ws", WebSocketUpgrade(websocket))
    v1.putChild(b"enroll", EnrollPage(enrollment))
    v1.putChild(b"blobs", BlobsPage(blobs))
    if linking is not None:
        v1.putChild(b"link", LinkPage(linking))
    return root


class MetricsPage(Resource):
    """The Prometheus exposition of `registry` (served on the metrics port only).

    Rendered on the reactor thread: collecting a registry of a few dozen metrics takes well under
    a millisecond, and this avoids `prometheus_client.twisted.MetricsResource`, which binds the
    global reactor and its thread pool at import."""

    isLeaf = True  # noqa: N815 (twisted.web API)

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: WebRequest) -> bytes:  # noqa: N802 (twisted.web API)
        body = generate_latest(self._registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
