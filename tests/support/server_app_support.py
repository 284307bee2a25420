"""Helpers for the tests of the server's program (tests/server/app/): a cheap configuration,
a migrated SQLite database on the synchronous runner, accounts with enrollment codes, real
enrollment requests built by the client's own code, controllable Argon2 runners, and an HTTP
harness that drives the real `RelaySite` over a `StringTransport` (no sockets, no threads)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from medrelay.clients.engine.enrollment import NewDevice, enrollment_request, generate_device
from medrelay.crypto.certificates import Role
from medrelay.crypto.passwords import PasswordHasher, PasswordParams
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.sealing import SealParams
from medrelay.server.admin import NewAccount, add_user, open_admin_database, resolved
from medrelay.server.blobs import BlobService
from medrelay.server.clinic import ClinicKeys, create_clinic_keys
from medrelay.server.config import Config, load_config
from medrelay.server.enrollment import EnrollmentService
from medrelay.server.hashing import PasswordWorker
from medrelay.server.metrics import RelayMetrics
from medrelay.server.readiness import Readiness
from medrelay.server.relay.store import InMemoryRelayStore, RelayStore
from medrelay.server.storage.database import Database, SynchronousRunner
from medrelay.server.transport.http import BodyLimits, RelaySite, build_root

T = TypeVar("T")

NOW_S = 1_763_884_800.0
NOW_MS = int(NOW_S * 1000)
CLINIC = "clinic.test"
CHEAP_ENV: Mapping[str, str] = {
    "MEDRELAY_PASSWORDS_TIME_COST": "1",
    "MEDRELAY_PASSWORDS_MEMORY_COST_KIB": "8",
    "MEDRELAY_PASSWORDS_PARALLELISM": "1",
    "MEDRELAY_SERVER_CLINIC_ID": CLINIC,
}
CHEAP_HASHER = PasswordHasher(PasswordParams.for_tests())


def cheap_config(tmp_path: Path, **env: str) -> Config:
    """The default configuration under `tmp_path`, with test-cost Argon2 and ports 0."""
    environ = {
        **CHEAP_ENV,
        "MEDRELAY_SERVER_PORT": "0",
        "MEDRELAY_METRICS_PORT": "0",
        **env,
    }
    return load_config(environ=environ, cwd=tmp_path)


def value(d: Deferred[T]) -> T:
    """The result of an already-fired Deferred, or its exception raised."""
    return resolved(d)


def failure_of(d: Deferred[Any]) -> BaseException:
    """The exception of an already-failed Deferred."""
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    assert result.value is not None
    return result.value


# --- storage, keys and accounts -----------------------------------------------------------------


def open_database(config: Config) -> Database:
    """The configured database, migrated, on the synchronous runner."""
    return open_admin_database(config)


def make_keys(config: Config, rng: Rng) -> ClinicKeys:
    return create_clinic_keys(
        config.keys.dir,
        clinic_id=config.server.clinic_id,
        passphrase="a passphrase for the tests",
        now_ms=NOW_MS - 24 * 3600 * 1000,
        rng=rng,
        seal_params=SealParams.for_tests(),
    )


def new_account(
    database: Database,
    username: str,
    rng: Rng,
    *,
    role: Role = Role.DOCTOR,
    display_name: str = "Dr. Test",
    specialty: str | None = None,
    department: str | None = None,
    now_ms: int = NOW_MS,
    code_ttl_hours: int = 72,
) -> NewAccount:
    return add_user(
        database,
        username=username,
        role=role,
        display_name=display_name,
        specialty=specialty,
        department=department,
        now_ms=now_ms,
        code_ttl_hours=code_ttl_hours,
        hasher=CHEAP_HASHER,
        rng=rng,
    )


def enrollment_body(
    username: str, code: str, rng: Rng, *, device: NewDevice | None = None
) -> tuple[dict[str, object], NewDevice]:
    """The JSON object the real client POSTs, and the device it generated."""
    new = device or generate_device(username, NOW_MS, rng)
    return enrollment_request(new, username, code), new


def table_counts(database: Database) -> dict[str, int]:
    with database.engine.connect() as conn:
        return {
            table: int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())  # noqa: S608
            for table in ("devices", "signed_prekeys", "one_time_prekeys", "sessions", "blobs")
        }


def account_state(database: Database, username: str) -> dict[str, Any]:
    """The enrollment-relevant columns of an account and its code."""
    with database.engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT a.identity_key, a.user_certificate, c.used_at, c.burned, "
                "c.failed_attempts FROM accounts a JOIN enrollment_codes c "
                "ON c.account_pk = a.pk WHERE a.username = :u"
            ),
            {"u": username},
        ).one()
    return dict(row._mapping)


# --- Argon2 runners -----------------------------------------------------------------------------


@dataclass
class ManualRunner:
    """A `Runner` whose work runs only when the test says so, recording how much ran at once."""

    pending: list[tuple[Callable[[], Any], Deferred[Any]]] = field(default_factory=list)
    max_in_flight: int = 0

    def run(self, fn: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.pending.append((fn, d))
        self.max_in_flight = max(self.max_in_flight, len(self.pending))
        return d

    def step(self) -> None:
        """Run the oldest pending work and fire its Deferred."""
        fn, d = self.pending.pop(0)
        try:
            result = fn()
        except Exception:
            d.errback(Failure())  # type: ignore[no-untyped-call]
        else:
            d.callback(result)

    def drain(self) -> None:
        while self.pending:
            self.step()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def sync_worker(runner: Any | None = None) -> PasswordWorker:
    return PasswordWorker(runner or SynchronousRunner(), CHEAP_HASHER)


# --- HTTP over a StringTransport ----------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        code: str = self.json()["error"]["code"]
        return code


def parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, val = line.partition(":")
        headers[name.strip().lower()] = val.strip()
    return Response(status, headers, body)


class HttpHarness:
    """The real clients' `RelaySite` on a fake clock; each request on its own fake connection."""

    def __init__(
        self,
        *,
        enrollment: EnrollmentService,
        blobs: BlobService,
        clock: MemoryReactorClock,
        websocket: Resource | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.clock = clock
        stand_in: Resource = Resource()  # type: ignore[no-untyped-call]
        root = build_root(
            websocket=websocket or stand_in,
            enrollment=enrollment,
            blobs=blobs,
            readiness=readiness,
        )
        self.site = RelaySite(root, clock=clock, body_limits=BodyLimits(blobs=blobs.max_size_bytes))

    def connect(self) -> tuple[Any, Any]:
        """An HTTP channel of the site on a new `StringTransport` (both untyped in Twisted)."""
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.site.buildProtocol(address)  # type: ignore[no-untyped-call]
        transport: Any = StringTransport()  # type: ignore[no-untyped-call]
        channel.makeConnection(transport)
        return channel, transport

    def raw(self, data: bytes) -> tuple[Any, Any]:
        channel, transport = self.connect()
        channel.dataReceived(data)
        return channel, transport

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        all_headers = {"Content-Length": str(len(body)), **(headers or {})}
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        _, transport = self.raw(raw)
        return parse_response(transport.value())

    def post_json(self, path: str, value: object, **headers: str) -> Response:
        return self.request(
            "POST",
            path,
            json.dumps(value).encode(),
            {"Content-Type": "application/json", **headers},
        )


def services(
    config: Config,
    database: Database,
    keys: ClinicKeys,
    store: RelayStore,
    *,
    clock: MemoryReactorClock,
    rng: Rng,
    worker: PasswordWorker | None = None,
    registry: CollectorRegistry | None = None,
) -> tuple[EnrollmentService, BlobService, RelayMetrics]:
    metrics = RelayMetrics.create(registry or CollectorRegistry())
    enrollment = EnrollmentService(
        database=database,
        keys=keys,
        clock=clock,
        rng=rng,
        worker=worker or sync_worker(),
        config=config.enrollment,
        metrics=metrics,
    )
    blobs = BlobService(
        database=database,
        store=store,
        clock=clock,
        rng=rng,
        ttl_ms=config.relay.ttl_s * 1000,
        max_size_bytes=config.blobs.max_size_bytes,
    )
    return enrollment, blobs, metrics


def clock_at(seconds: float = NOW_S) -> MemoryReactorClock:
    clock = MemoryReactorClock()  # type: ignore[no-untyped-call]
    clock.advance(seconds)
    return clock


def rng_for(label: str) -> Rng:
    return seeded_rng(label.encode())


# --- a whole identity-authority world -----------------------------------------------------------


@dataclass
class IdentityWorld:
    """A migrated SQLite database, clinic keys, a fake clock and the enrollment endpoint: what
    the identity tests (log, revocation, staff requests) start from."""

    config: Config
    database: Database
    keys: ClinicKeys
    clock: MemoryReactorClock
    rng: Rng
    http: HttpHarness

    def enroll(
        self,
        username: str,
        role: Role = Role.DOCTOR,
        *,
        display_name: str = "",
        specialty: str | None = None,
        department: str | None = None,
    ) -> NewDevice:
        """Create the account and enroll a device for it through POST /v1/enroll."""
        account = new_account(
            self.database,
            username,
            self.rng,
            role=role,
            display_name=display_name or username,
            specialty=specialty,
            department=department,
        )
        return self.enroll_with(username, account.enrollment_code)

    def enroll_with(self, username: str, code: str) -> NewDevice:
        body, device = enrollment_body(username, code, self.rng)
        response = self.http.post_json("/v1/enroll", body)
        assert response.status == 200, response.body
        return device

    def use_keys(self, keys: ClinicKeys) -> None:
        """Serve enrollment with other clinic keys (a restart after a key rotation)."""
        enrollment, blobs, _ = services(
            self.config, self.database, keys, InMemoryRelayStore(), clock=self.clock, rng=self.rng
        )
        self.keys = keys
        self.http = HttpHarness(enrollment=enrollment, blobs=blobs, clock=self.clock)


def identity_world(tmp_path: Path, seed: bytes) -> IdentityWorld:
    config = cheap_config(tmp_path)
    database = open_database(config)
    rng = seeded_rng(seed)
    keys = make_keys(config, rng)
    clock = clock_at()
    enrollment, blobs, _ = services(
        config, database, keys, InMemoryRelayStore(), clock=clock, rng=rng
    )
    http = HttpHarness(enrollment=enrollment, blobs=blobs, clock=clock)
    return IdentityWorld(config, database, keys, clock, rng, http)
