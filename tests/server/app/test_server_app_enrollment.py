"""Enrollment (POST /v1/enroll, docs/protocol.md §10) through the real HTTP resources on a fake
transport, against a migrated SQLite database: a complete enrollment built by the client's own
code and checked with the client's own answer verification; then every refusal, each leaving
nothing half-created; the same answer for an unknown user and a wrong code; at most two Argon2
computations at once."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from server_app_support import (
    CHEAP_HASHER,
    NOW_MS,
    HttpHarness,
    ManualRunner,
    Response,
    account_state,
    cheap_config,
    clock_at,
    enrollment_body,
    make_keys,
    new_account,
    open_database,
    services,
    table_counts,
)
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from medrelay.clients.engine.enrollment import generate_device, verify_enrollment_answer
from medrelay.crypto.certificates import DeviceCertificate, Role, UserCertificate
from medrelay.crypto.keys import SigningKey, VerifyKey
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.protocol.errors import ErrorCode
from medrelay.server.clinic import ClinicKeys
from medrelay.server.config import Config
from medrelay.server.enrollment import (
    EnrollmentAnswer,
    EnrollmentService,
    new_enrollment_code,
    normalize_code,
    parse_enrollment_request,
)
from medrelay.server.hashing import PasswordWorker
from medrelay.server.metrics import RelayMetrics
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.store import InMemoryRelayStore
from medrelay.server.storage.database import Database

HOUR_S = 3600


@dataclass
class World:
    config: Config
    database: Database
    keys: ClinicKeys
    clock: MemoryReactorClock
    rng: Rng
    enrollment: EnrollmentService
    metrics: RelayMetrics
    registry: CollectorRegistry
    http: HttpHarness

    def enroll(self, body: object, **headers: str) -> Response:
        return self.http.post_json("/v1/enroll", body, **headers)

    def counter(self, outcome: str) -> float:
        value = self.registry.get_sample_value("medrelay_enrollments_total", {"outcome": outcome})
        return value or 0.0


def build_world(tmp_path: Path, worker: PasswordWorker | None = None) -> World:
    config = cheap_config(tmp_path)
    database = open_database(config)
    rng = seeded_rng(b"enrollment tests")
    keys = make_keys(config, rng)
    clock = clock_at()
    registry = CollectorRegistry()
    enrollment, blobs, metrics = services(
        config,
        database,
        keys,
        InMemoryRelayStore(),
        clock=clock,
        rng=rng,
        worker=worker,
        registry=registry,
    )
    http = HttpHarness(enrollment=enrollment, blobs=blobs, clock=clock)
    return World(config, database, keys, clock, rng, enrollment, metrics, registry, http)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(tmp_path)
    yield w
    w.database.close()


def assert_nothing_created(world: World, username: str, *, failed_attempts: int = 0) -> None:
    """No device, prekey or certificate exists, and the code is still pending."""
    assert table_counts(world.database) == {
        "devices": 0,
        "signed_prekeys": 0,
        "one_time_prekeys": 0,
        "sessions": 0,
        "blobs": 0,
    }
    state = account_state(world.database, username)
    assert state["identity_key"] is None and state["user_certificate"] is None
    assert state["used_at"] is None
    assert state["failed_attempts"] == failed_attempts


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- the complete enrollment --------------------------------------------------------------------


def test_enrollment_issues_a_certificate_the_client_accepts(world: World) -> None:
    account = new_account(
        world.database,
        "dr.ivanova",
        world.rng,
        display_name="Д-р Иванова",  # noqa: RUF001 (a Cyrillic name on purpose)
        specialty="cardiology",
        department="Ward 3",
    )
    body, device = enrollment_body("dr.ivanova", account.enrollment_code, world.rng)
    response = world.enroll(body)
    assert response.status == 200, response.body
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("r")
    answer = response.json()
    assert set(answer) == {
        "username",
        "device_id",
        "clinic",
        "user_certificate",
        "issuing_certificate",
        "root_key",
        "server_time",
    }
    assert answer["server_time"] == NOW_MS
    # The client's own, complete check of the answer.
    verified = verify_enrollment_answer(
        answer,
        username="dr.ivanova",
        device_id=device.device.identity.device_id,
        identity_key=device.identity_key.verify_key,
        at_ms=NOW_MS,
    )
    assert verified.clinic_id == "clinic.test"
    assert verified.root_key == world.keys.root_key
    cert = verified.user_certificate
    assert (cert.role, cert.display_name, cert.specialty, cert.department) == (
        Role.DOCTOR,
        "Д-р Иванова",  # noqa: RUF001
        "cardiology",
        "Ward 3",
    )
    assert cert.not_after_ms - NOW_MS == 730 * 24 * 3600 * 1000
    # Everything is recorded, and the code is spent.
    counts = table_counts(world.database)
    assert (counts["devices"], counts["signed_prekeys"], counts["one_time_prekeys"]) == (1, 1, 100)
    state = account_state(world.database, "dr.ivanova")
    assert state["identity_key"] == device.identity_key.verify_key.encode()
    assert UserCertificate.decode(state["user_certificate"]) == cert
    assert state["used_at"] == NOW_MS
    assert world.counter("enrolled") == 1.0


def test_enrolled_device_is_what_login_needs(world: World) -> None:
    """The device row carries the raw signing key `auth` is verified with, and the
    certificate the client sent, byte for byte."""
    account = new_account(world.database, "nurse.k", world.rng, role=Role.NURSE)
    body, device = enrollment_body("nurse.k", account.enrollment_code, world.rng)
    assert world.enroll(body).status == 200
    with world.database.engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT device_id, signing_key, certificate FROM devices").one()
    assert row.device_id == device.device.identity.device_id
    assert bytes(row.signing_key) == device.device.signing_key.verify_key.raw
    assert DeviceCertificate.decode(bytes(row.certificate)) == device.device_certificate
    VerifyKey(bytes(row.signing_key)).verify(b"x", device.device.signing_key.sign(b"x"))


def test_code_is_accepted_in_lower_case_and_without_dashes(world: World) -> None:
    account = new_account(world.database, "pat.1", world.rng, role=Role.PATIENT)
    typed = account.enrollment_code.replace("-", "").lower()
    body, _ = enrollment_body("pat.1", f" {typed} ", world.rng)
    assert world.enroll(body).status == 200


def test_codes_look_like_the_protocol_example(rng: Rng) -> None:
    codes = {new_enrollment_code(rng) for _ in range(200)}
    assert len(codes) == 200
    for code in codes:
        groups = code.split("-")
        assert [len(g) for g in groups] == [4, 4, 4]
        assert set(normalize_code(code)) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


# --- refusals -----------------------------------------------------------------------------------


def test_wrong_code_is_refused_and_counted(world: World) -> None:
    new_account(world.database, "alice", world.rng)
    body, _ = enrollment_body("alice", "AAAA-BBBB-CCCC", world.rng)
    response = world.enroll(body)
    assert (response.status, response.error_code) == (403, "enrollment_failed")
    assert_nothing_created(world, "alice", failed_attempts=1)
    assert world.counter("refused") == 1.0


def test_unknown_user_gets_the_same_answer_as_a_wrong_code(world: World) -> None:
    """Byte for byte the same answer: nothing tells whether the account exists."""
    new_account(world.database, "alice", world.rng)
    wrong, _ = enrollment_body("alice", "AAAA-BBBB-CCCC", world.rng)
    unknown, _ = enrollment_body("nobody", "AAAA-BBBB-CCCC", world.rng)
    a, b = world.enroll(wrong), world.enroll(unknown)
    assert (a.status, a.body) == (b.status, b.body)
    assert a.headers.keys() == b.headers.keys()


def test_expired_code_is_refused_with_the_same_answer(world: World) -> None:
    account = new_account(world.database, "alice", world.rng)
    world.clock.advance(72 * HOUR_S)
    body, _ = enrollment_body("alice", account.enrollment_code, world.rng)
    response = world.enroll(body)
    wrong, _ = enrollment_body("alice", "AAAA-BBBB-CCCC", world.rng)
    assert (response.status, response.body) == (403, world.enroll(wrong).body)
    assert_nothing_created(world, "alice", failed_attempts=1)  # only the wrong code counted


def test_used_code_cannot_enroll_a_second_device(world: World) -> None:
    account = new_account(world.database, "alice", world.rng)
    first, device = enrollment_body("alice", account.enrollment_code, world.rng)
    assert world.enroll(first).status == 200
    second, _ = enrollment_body("alice", account.enrollment_code, world.rng)
    response = world.enroll(second)
    assert (response.status, response.error_code) == (403, "enrollment_failed")
    assert table_counts(world.database)["devices"] == 1
    state = account_state(world.database, "alice")
    assert state["identity_key"] == device.identity_key.verify_key.encode()


def test_code_is_burned_after_max_attempts(world: World) -> None:
    account = new_account(world.database, "alice", world.rng)
    for _ in range(world.config.enrollment.max_attempts):
        wrong, _ = enrollment_body("alice", "AAAA-BBBB-CCCC", world.rng)
        assert world.enroll(wrong).status == 403
    right, _ = enrollment_body("alice", account.enrollment_code, world.rng)
    response = world.enroll(right)
    assert (response.status, response.error_code) == (403, "enrollment_failed")
    assert account_state(world.database, "alice")["burned"]
    assert table_counts(world.database)["devices"] == 0


def forged_signature(body: dict[str, object]) -> None:
    raw = bytearray(base64.urlsafe_b64decode(str(body["device_certificate"]) + "=="))
    raw[-1] ^= 1
    body["device_certificate"] = b64(bytes(raw))


def other_identity(body: dict[str, object]) -> None:
    body["identity_key"] = SigningKey.generate(seeded_rng(b"other")).verify_key.to_text()


def other_users_certificate(body: dict[str, object]) -> None:
    other, _ = enrollment_body("mallory", "x", seeded_rng(b"mallory"))
    body["device_certificate"] = other["device_certificate"]
    body["identity_key"] = other["identity_key"]
    body["signed_prekey"] = other["signed_prekey"]


def other_devices_prekey(body: dict[str, object]) -> None:
    other, _ = enrollment_body("alice", "x", seeded_rng(b"second device"))
    body["signed_prekey"] = other["signed_prekey"]


def garbage_one_time_prekey(body: dict[str, object]) -> None:
    prekeys = list(body["one_time_prekeys"])  # type: ignore[call-overload]
    prekeys[3] = b64(b"\x01garbage")
    body["one_time_prekeys"] = prekeys


def too_many_prekeys(body: dict[str, object]) -> None:
    prekeys = list(body["one_time_prekeys"])  # type: ignore[call-overload]
    body["one_time_prekeys"] = prekeys * 3


def padded_base64(body: dict[str, object]) -> None:
    body["signed_prekey"] = str(body["signed_prekey"]) + "="


def missing_field(body: dict[str, object]) -> None:
    del body["signed_prekey"]


def unknown_field(body: dict[str, object]) -> None:
    body["admin"] = True


def bad_identity_text(body: dict[str, object]) -> None:
    body["identity_key"] = "x25519-v1:AAAA"


def long_code(body: dict[str, object]) -> None:
    body["code"] = "A" * 65


def username_with_control(body: dict[str, object]) -> None:
    body["username"] = "alice\n"


REFUSALS = [
    (forged_signature, "device_certificate: signature does not verify"),
    (other_identity, "device_certificate: is not certified by identity_key"),
    (other_users_certificate, "device_certificate: names another user"),
    (other_devices_prekey, "signed_prekey:"),
    (garbage_one_time_prekey, "one_time_prekeys[3]:"),
    (too_many_prekeys, "one_time_prekeys: must be a list of at most 200"),
    (padded_base64, "signed_prekey: is not canonical unpadded base64url"),
    (missing_field, "signed_prekey: missing"),
    (unknown_field, "admin: unknown field"),
    (bad_identity_text, "identity_key:"),
    (long_code, "code: must be a string of 1 to 64 characters"),
    (username_with_control, "username:"),
]


@pytest.mark.parametrize(("mutate", "message"), REFUSALS, ids=[m.__name__ for m, _ in REFUSALS])
def test_invalid_request_is_refused_naming_the_field(
    world: World, mutate: Any, message: str
) -> None:
    """A request that fails a check needing no secret is a 400 naming the field; it costs no
    attempt on the code and creates nothing."""
    account = new_account(world.database, "alice", world.rng)
    body, _ = enrollment_body("alice", account.enrollment_code, world.rng)
    mutate(body)
    response = world.enroll(body)
    assert (response.status, response.error_code) == (400, "invalid_field")
    assert response.json()["error"]["message"].startswith(message)
    assert_nothing_created(world, "alice")
    assert world.counter("refused") == 1.0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "body: is not a JSON object"),
        (b"[1, 2]", "body: is not a JSON object"),
        (b"\xff\xfe", "body: is not a JSON object"),
        (b'{"username": "a", "username": "b"}', "username: appears twice"),
    ],
)
def test_malformed_json_is_refused(world: World, raw: bytes, message: str) -> None:
    response = world.http.request("POST", "/v1/enroll", raw, {"Content-Type": "application/json"})
    assert (response.status, response.error_code) == (400, "invalid_field")
    assert response.json()["error"]["message"] == message


def test_json_content_type_is_required(world: World) -> None:
    """A cross-site form cannot post an enrollment (text/plain needs no CORS preflight)."""
    account = new_account(world.database, "alice", world.rng)
    body, _ = enrollment_body("alice", account.enrollment_code, world.rng)
    response = world.http.request(
        "POST", "/v1/enroll", json.dumps(body).encode(), {"Content-Type": "text/plain"}
    )
    assert (response.status, response.error_code) == (400, "invalid_field")
    assert_nothing_created(world, "alice")


def test_oversized_body_is_refused_before_it_is_read(world: World) -> None:
    """Content-Length over 64 KiB: 413 from the headers alone, nothing buffered."""
    channel, transport = world.http.raw(
        b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 65537\r\n\r\n"
    )
    response_bytes = transport.value()
    assert response_bytes.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"payload_too_large"' in response_bytes
    http_channel = getattr(channel, "_channel", channel)
    assert http_channel.requests[-1].content is None


def test_get_is_not_allowed(world: World) -> None:
    response = world.http.request("GET", "/v1/enroll")
    assert response.status == 405


def test_database_unavailable_is_server_busy(world: World) -> None:
    account = new_account(world.database, "alice", world.rng)
    body, _ = enrollment_body("alice", account.enrollment_code, world.rng)
    world.database.close()
    response = world.enroll(body)
    assert (response.status, response.error_code) == (503, "server_busy")


# --- Argon2 concurrency -------------------------------------------------------------------------


def outcome(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


def test_at_most_two_argon2_computations_at_once(tmp_path: Path) -> None:
    """Five enrollments arrive together: two codes are verified at a time, the others wait
    their turn, and every enrollment completes."""
    runner = ManualRunner()
    world = build_world(tmp_path, PasswordWorker(runner, CHEAP_HASHER))
    try:
        requests = []
        for i in range(5):
            account = new_account(world.database, f"user{i}", world.rng)
            body, _ = enrollment_body(f"user{i}", account.enrollment_code, world.rng)
            requests.append(parse_enrollment_request(json.dumps(body).encode()))
        results = [outcome(world.enrollment.enroll(r)) for r in requests]
        assert len(runner.pending) == 2
        while runner.pending:
            runner.step()
            assert len(runner.pending) <= 2
        assert runner.max_in_flight == 2
        assert all(len(r) == 1 and isinstance(r[0], EnrollmentAnswer) for r in results)
    finally:
        world.database.close()


def test_unknown_user_still_costs_an_argon2_computation(tmp_path: Path) -> None:
    runner = ManualRunner()
    world = build_world(tmp_path, PasswordWorker(runner, CHEAP_HASHER))
    try:
        body, _ = enrollment_body("nobody", "AAAA-BBBB-CCCC", world.rng)
        request = parse_enrollment_request(json.dumps(body).encode())
        for _ in range(2):  # the first hashes the dummy, the second verifies against it
            result = outcome(world.enrollment.enroll(request))
            assert result == [] and len(runner.pending) == 1
            runner.drain()
            assert isinstance(result[0], Failure)
            assert isinstance(result[0].value, RelayError)
            assert result[0].value.code is ErrorCode.ENROLLMENT_FAILED
    finally:
        world.database.close()


def test_beyond_the_waiting_bound_enrollment_is_rate_limited(tmp_path: Path) -> None:
    runner = ManualRunner()
    worker = PasswordWorker(runner, CHEAP_HASHER, concurrency=2, max_waiting=1)
    held = [outcome(worker.verify("$argon2id$x", "code")) for _ in range(3)]
    refused = outcome(worker.verify("$argon2id$x", "code"))
    assert all(r == [] for r in held)
    assert isinstance(refused[0], Failure)
    assert isinstance(refused[0].value, RelayError)
    assert refused[0].value.code is ErrorCode.RATE_LIMITED
    world = build_world(tmp_path, worker)
    try:
        body, _ = enrollment_body("nobody", "AAAA-BBBB-CCCC", world.rng)
        response = world.enroll(body)
        assert (response.status, response.error_code) == (429, "rate_limited")
    finally:
        world.database.close()


def test_two_enrollments_with_one_code_exactly_one_wins(tmp_path: Path) -> None:
    runner = ManualRunner()
    world = build_world(tmp_path, PasswordWorker(runner, CHEAP_HASHER))
    try:
        account = new_account(world.database, "alice", world.rng)
        bodies = [enrollment_body("alice", account.enrollment_code, world.rng)[0] for _ in "ab"]
        results = [
            outcome(world.enrollment.enroll(parse_enrollment_request(json.dumps(b).encode())))
            for b in bodies
        ]
        runner.drain()
        kinds = sorted(type(r[0]).__name__ for r in results)
        assert kinds == ["EnrollmentAnswer", "Failure"]
        assert table_counts(world.database)["devices"] == 1
    finally:
        world.database.close()


def test_a_fresh_device_id_is_taken_from_the_certificate(world: World) -> None:
    account = new_account(world.database, "bob", world.rng)
    device = generate_device("bob", NOW_MS, seeded_rng(b"bob's phone"))
    body, _ = enrollment_body("bob", account.enrollment_code, world.rng, device=device)
    response = world.enroll(body)
    assert response.json()["device_id"] == device.device.identity.device_id
