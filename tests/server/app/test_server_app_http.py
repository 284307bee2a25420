"""The HTTP adapter on a fake transport, with the SQL relay store: blob upload and download with
a session token, refusals without a valid token, bodies over the limit refused from the headers
(before buffering) and the connection closed after a bounded linger, expiry of blobs, `/healthz`,
JSON 404/405 answers, the error-code-to-status map, and log lines without personal data."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import CollectorRegistry
from server_app_support import (
    HttpHarness,
    cheap_config,
    clock_at,
    enrollment_body,
    make_keys,
    new_account,
    open_database,
    services,
    table_counts,
    value,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from medrelay.crypto.rng import seeded_rng
from medrelay.protocol.errors import ErrorCode
from medrelay.server.blobs import BlobService
from medrelay.server.config import Config
from medrelay.server.readiness import Readiness
from medrelay.server.relay.service import token_digest
from medrelay.server.storage.database import Database
from medrelay.server.storage.relay_store import SqlRelayStore
from medrelay.server.transport.http import LINGER_S, STATUS, BodyLimits, MetricsPage, route_of

DAY_S = 24 * 3600


@dataclass
class World:
    config: Config
    database: Database
    clock: MemoryReactorClock
    blobs: BlobService
    http: HttpHarness
    token: bytes
    store: SqlRelayStore

    def auth(self, token: bytes | None = None) -> dict[str, str]:
        raw = self.token if token is None else token
        return {"Authorization": "Bearer " + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    config = cheap_config(tmp_path, MEDRELAY_BLOBS_MAX_SIZE_BYTES="4096")
    database = open_database(config)
    rng = seeded_rng(b"http tests")
    keys = make_keys(config, rng)
    clock = clock_at()
    store = SqlRelayStore(database)
    enrollment, blobs, _ = services(config, database, keys, store, clock=clock, rng=rng)
    readiness = Readiness(database=database, keys=keys, clock=clock)
    http = HttpHarness(enrollment=enrollment, blobs=blobs, clock=clock, readiness=readiness)
    account = new_account(database, "alice", rng)
    body, device = enrollment_body("alice", account.enrollment_code, rng)
    assert http.post_json("/v1/enroll", body).status == 200
    record = value(store.get_device("alice", device.device.identity.device_id))
    assert record is not None
    token = rng(32)
    now_ms = int(clock.seconds() * 1000)
    value(store.create_session(record.pk, token_digest(token), now_ms, now_ms + DAY_S * 1000))
    yield World(config, database, clock, blobs, http, token, store)
    database.close()


# --- blobs --------------------------------------------------------------------------------------


def test_upload_then_download_with_a_token(world: World) -> None:
    data = bytes(range(256)) * 8
    uploaded = world.http.request("POST", "/v1/blobs", data, world.auth())
    assert uploaded.status == 201, uploaded.body
    blob_id = uploaded.json()["blob_id"]
    assert len(blob_id) == 22 and len(base64.urlsafe_b64decode(blob_id + "==")) == 16
    downloaded = world.http.request("GET", f"/v1/blobs/{blob_id}", headers=world.auth())
    assert downloaded.status == 200
    assert downloaded.headers["content-type"] == "application/octet-stream"
    assert downloaded.body == data


def test_blob_ids_are_distinct(world: World) -> None:
    ids = {
        world.http.request("POST", "/v1/blobs", b"x", world.auth()).json()["blob_id"]
        for _ in range(20)
    }
    assert len(ids) == 20


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "not_authenticated"),
        ({"Authorization": "Basic YWxpY2U6eA"}, "not_authenticated"),
        ({"Authorization": "Bearer "}, "not_authenticated"),
        ({"Authorization": "Bearer not-a-token"}, "token_invalid"),
        ({"Authorization": "Bearer " + "A" * 43}, "token_invalid"),  # well-formed, unknown
    ],
)
def test_upload_without_a_valid_token_is_refused(
    world: World, headers: dict[str, str], code: str
) -> None:
    response = world.http.request("POST", "/v1/blobs", b"data", headers)
    assert (response.status, response.error_code) == (401, code)
    assert table_counts(world.database)["blobs"] == 0


def test_download_without_a_valid_token_is_refused(world: World) -> None:
    blob_id = world.http.request("POST", "/v1/blobs", b"x", world.auth()).json()["blob_id"]
    response = world.http.request("GET", f"/v1/blobs/{blob_id}")
    assert (response.status, response.error_code) == (401, "not_authenticated")
    other = world.http.request("GET", f"/v1/blobs/{blob_id}", headers=world.auth(b"\x00" * 32))
    assert (other.status, other.error_code) == (401, "token_invalid")


def test_expired_session_cannot_use_blobs(world: World) -> None:
    world.clock.advance(DAY_S + 1)
    response = world.http.request("POST", "/v1/blobs", b"x", world.auth())
    assert (response.status, response.error_code) == (401, "token_invalid")


@pytest.mark.parametrize("blob_id", ["A" * 22, "short", "A" * 21 + "!", "x/y"])
def test_unknown_or_malformed_blob_is_not_found(world: World, blob_id: str) -> None:
    response = world.http.request("GET", f"/v1/blobs/{blob_id}", headers=world.auth())
    assert (response.status, response.error_code) == (404, "not_found")


def test_blobs_expire_with_the_envelope_ttl(world: World) -> None:
    blob_id = world.http.request("POST", "/v1/blobs", b"x", world.auth()).json()["blob_id"]
    now_ms = int(world.clock.seconds() * 1000)
    value(
        world.store.create_session(
            1, token_digest(b"\x01" * 32), now_ms, now_ms + 40 * DAY_S * 1000
        )
    )
    world.clock.advance(world.config.relay.ttl_s)
    response = world.http.request("GET", f"/v1/blobs/{blob_id}", headers=world.auth(b"\x01" * 32))
    assert response.status == 404
    assert table_counts(world.database)["blobs"] == 1
    world.blobs.startService()
    try:
        world.clock.advance(world.config.relay.expiry_interval_s)
        assert table_counts(world.database)["blobs"] == 0
    finally:
        world.blobs.stopService()


def test_empty_upload_is_refused(world: World) -> None:
    response = world.http.request("POST", "/v1/blobs", b"", world.auth())
    assert (response.status, response.error_code) == (400, "invalid_field")


# --- bounded bodies -----------------------------------------------------------------------------


def test_oversized_blob_is_refused_from_content_length(world: World) -> None:
    """The 413 leaves as soon as the headers arrive (the body was never sent), nothing is
    buffered, no "100 Continue" invites the body, and the request never reaches a resource."""
    channel, transport = world.http.raw(
        b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Authorization: Bearer " + b"A" * 43 + b"\r\nContent-Length: 4097\r\n\r\n"
    )
    raw = transport.value()
    assert raw.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b"100 Continue" not in raw
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "payload_too_large"
    http_channel = getattr(channel, "_channel", channel)
    assert http_channel.requests[-1].content is None
    # What the client sends anyway is discarded (so closing does not reset the connection under
    # the answer), and the connection closes after the linger at the latest ...
    channel.dataReceived(b"z" * 2000)
    assert not transport.disconnecting
    world.clock.advance(LINGER_S)
    assert transport.disconnecting
    assert table_counts(world.database)["blobs"] == 0


def test_refused_body_closes_the_connection_once_fully_discarded(world: World) -> None:
    """... or as soon as the whole refused body has arrived."""
    channel, transport = world.http.raw(
        b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
    )
    channel.dataReceived(b"z" * 5000)
    assert transport.disconnecting
    linger_at = world.clock.seconds() + LINGER_S
    assert all(c.getTime() != linger_at for c in world.clock.getDelayedCalls())


def test_a_limit_sized_blob_is_accepted(world: World) -> None:
    response = world.http.request("POST", "/v1/blobs", b"y" * 4096, world.auth())
    assert response.status == 201


def test_oversized_chunked_blob_is_refused_as_it_arrives(world: World) -> None:
    channel, transport = world.http.raw(
        b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for _ in range(3):
        channel.dataReceived(b"800\r\n" + b"q" * 0x800 + b"\r\n")
    raw = transport.value()
    assert raw.startswith(b"HTTP/1.1 413 ")
    http_channel = getattr(channel, "_channel", channel)
    assert http_channel.requests[-1].content is None
    channel.dataReceived(b"0\r\n\r\n")  # the end of the refused body closes the connection
    assert transport.disconnecting


def test_body_limits_follow_the_route() -> None:
    limits = BodyLimits(blobs=1000, enroll=100, default=10)
    assert limits.for_path(b"/v1/blobs") == 1000
    assert limits.for_path(b"/v1/blobs/?x=1") == 1000
    assert limits.for_path(b"http://relay.example:8448/v1/blobs") == 1000
    assert limits.for_path(b"/v1/enroll") == 100
    assert limits.for_path(b"/v1/blobs/abc") == 10
    assert limits.for_path(b"/healthz") == 10
    assert route_of(b"/v1/blobs/AAAAAAAAAAAAAAAAAAAAAA") == "/v1/blobs/{id}"
    assert route_of(b"/v1/enroll?x") == "/v1/enroll"
    assert route_of(b"/secret/path") == "(other)"


def test_small_bodies_elsewhere_are_bounded_too(world: World) -> None:
    _, transport = world.http.raw(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")


# --- other resources ----------------------------------------------------------------------------


def test_healthz(world: World) -> None:
    response = world.http.request("GET", "/healthz")
    assert (response.status, response.json()) == (200, {"status": "ok"})
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["server"] == "medrelay"


def test_readyz_names_every_check_when_ready(world: World) -> None:
    response = world.http.request("GET", "/readyz")
    assert response.status == 200, response.body
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "migrations": "ok", "keys": "ok"},
    }


def test_readyz_is_503_with_the_reason_when_the_schema_or_keys_are_not_usable(
    world: World,
) -> None:
    with world.database.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0001'")
    world.clock.advance(20 * 365 * DAY_S)  # past the clinic keys' validity
    response = world.http.request("GET", "/readyz")
    assert response.status == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["migrations"].startswith("schema at 0001, this relay needs ")
    assert checks["keys"] == "the clinic issuing key certificate is not valid now"


@pytest.mark.parametrize("path", ["/", "/v1", "/v2/enroll", "/metrics", "/v1/blobs/a/b"])
def test_unknown_paths_answer_json_404(world: World, path: str) -> None:
    response = world.http.request("GET", path, headers=world.auth())
    assert response.status in (404, 405)
    assert response.error_code == "not_found"


def test_unsupported_method_is_405_in_json(world: World) -> None:
    response = world.http.request("DELETE", "/v1/blobs")
    assert (response.status, response.error_code) == (405, "not_found")


def test_every_error_code_has_one_status() -> None:
    """The map lives here only; codes a client can meet over HTTP are all in it."""
    http_codes = {
        ErrorCode.INVALID_FIELD: 400,
        ErrorCode.NOT_AUTHENTICATED: 401,
        ErrorCode.TOKEN_INVALID: 401,
        ErrorCode.ENROLLMENT_FAILED: 403,
        ErrorCode.NOT_FOUND: 404,
        ErrorCode.PAYLOAD_TOO_LARGE: 413,
        ErrorCode.RATE_LIMITED: 429,
        ErrorCode.INTERNAL_ERROR: 500,
        ErrorCode.SERVER_BUSY: 503,
    }
    for code, status in http_codes.items():
        assert STATUS[code] == status


def test_metrics_page_renders_the_injected_registry() -> None:
    from prometheus_client import Counter
    from twisted.web.test.requesthelper import DummyRequest

    registry = CollectorRegistry()
    Counter("medrelay_test_total", "A test counter.", registry=registry).inc()
    request = DummyRequest([b""])
    body = MetricsPage(registry).render_GET(request)  # type: ignore[arg-type]
    assert b"medrelay_test_total 1.0" in body


def test_log_lines_carry_request_ids_not_names_or_tokens(world: World) -> None:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        world.http.request("POST", "/v1/blobs", b"secret-ciphertext", world.auth())
        body, _ = enrollment_body("zelda", "AAAA-BBBB-CCCC", seeded_rng(b"z"))
        world.http.post_json("/v1/enroll", body)
    finally:
        globalLogPublisher.removeObserver(observer)
    text = json.dumps([{k: repr(v) for k, v in e.items()} for e in events])
    token_text = base64.urlsafe_b64encode(world.token).rstrip(b"=").decode()
    for forbidden in ("alice", "zelda", "secret-ciphertext", token_text, "127.0.0.1"):
        assert forbidden not in text
    routes = [e.get("route") for e in events if "route" in e]
    assert routes == ["/v1/blobs", "/v1/enroll"]
    assert all(str(e.get("request_id", "r")).startswith("r") for e in events)
