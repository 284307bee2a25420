"""The real server on 127.0.0.1 (integration tests on the global reactor, pytest-twisted):
`make_service` with the SQL store, real thread pools and sockets, exercised with the client's
own HTTP client and WebSocket dialer - health, metrics, an account created by the admin code
while the server runs, enrollment, WebSocket hello/welcome and login, a blob with the session
token - and a clean stop. Then TLS (1.2 and 1.3 only) and `medrelay-server serve` as a process
stopped by SIGTERM."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry
from server_app_support import CHEAP_ENV, cheap_config
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IListeningPort

from medrelay.clients.engine.connection import FrameTransport
from medrelay.clients.engine.enrollment import (
    enrollment_request,
    generate_device,
    verify_enrollment_answer,
)
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.http import AgentHttpClient, json_answer, parse_server_url, post_json
from medrelay.clients.engine.websocket import WebSocketDialer
from medrelay.crypto.certificates import Role
from medrelay.crypto.passwords import PasswordHasher, PasswordParams
from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.sealing import SealParams
from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.messages import (
    Auth,
    Authenticated,
    Direction,
    Error,
    Hello,
    Message,
    VisitList,
    Visits,
    Welcome,
)
from medrelay.server.admin import add_user, open_admin_database
from medrelay.server.app import ServerService, make_service
from medrelay.server.config import Config

_F = TypeVar("_F", bound=Callable[..., Any])
TIMEOUT_S = 10.0


def on_reactor(test: _F) -> _F:
    """Run an async test on the global reactor (pytest-twisted), keeping its type."""
    wrapped: _F = pytest_twisted.ensureDeferred(test)
    return wrapped


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


def port_of(listening: IListeningPort) -> int:
    port: int = listening.getHost().port  # type: ignore[attr-defined]
    return port


async def start(config: Config) -> tuple[ServerService, int, int | None]:
    service = make_service(
        config,
        reactor=reactor(),
        rng=seeded_rng(b"service test"),
        registry=CollectorRegistry(),
        seal_params=SealParams.for_tests(),
    )
    service.startService()
    web = port_of(await service.web.when_listening())
    metrics = None
    if service.metrics is not None:
        metrics = port_of(await service.metrics.when_listening())
    return service, web, metrics


class Sink:
    """A client-side frame sink: collects the server's messages."""

    def __init__(self, transport: FrameTransport) -> None:
        self.transport = transport
        self.decoder = FrameDecoder(Direction.SERVER_TO_CLIENT)
        self.messages: DeferredQueue[Message] = DeferredQueue()
        self.lost: Deferred[None] = Deferred()

    def connection_made(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.decoder.receive_data(data)
        for message in self.decoder:
            self.messages.put(message)

    def connection_lost(self) -> None:
        if not self.lost.called:
            self.lost.callback(None)

    def send(self, message: Message) -> None:
        self.transport.write(encode_frame(message))

    async def next(self) -> Message:
        d = self.messages.get()
        d.addTimeout(TIMEOUT_S, reactor())
        return await d


@on_reactor
async def test_the_real_service_enrolls_logs_in_and_stores_a_blob(tmp_path: Path) -> None:
    config = cheap_config(tmp_path)
    service, web_port, metrics_port = await start(config)
    http = AgentHttpClient(reactor(), reactor(), timeout_s=TIMEOUT_S)
    base = f"http://127.0.0.1:{web_port}"
    try:
        health = await http.request("GET", f"{base}/healthz")
        assert (health.status, json.loads(health.body)) == (200, {"status": "ok"})

        # The admin command's code path, on the same SQLite file, while the server runs.
        admin_db = open_admin_database(config)
        try:
            account = add_user(
                admin_db,
                username="alice",
                role=Role.DOCTOR,
                display_name="Dr. Alice",
                specialty=None,
                department=None,
                now_ms=int(time.time() * 1000),
                code_ttl_hours=1,
                hasher=PasswordHasher(PasswordParams.for_tests()),
                rng=seeded_rng(b"admin"),
            )
        finally:
            admin_db.close()

        now_ms = int(time.time() * 1000)
        device = generate_device("alice", now_ms, seeded_rng(b"alice's device"))
        answer = await post_json(
            http, f"{base}/v1/enroll", enrollment_request(device, "alice", account.enrollment_code)
        )
        verified = verify_enrollment_answer(
            answer,
            username="alice",
            device_id=device.device.identity.device_id,
            identity_key=device.identity_key.verify_key,
            at_ms=int(time.time() * 1000),
        )
        assert verified.root_key == service.keys.root_key

        sinks: list[Sink] = []

        def attach(transport: FrameTransport) -> Sink:
            sinks.append(Sink(transport))
            return sinks[-1]

        await WebSocketDialer(reactor(), parse_server_url(base)).dial(attach)
        (sink,) = sinks
        sink.send(Hello(versions=(1,), agent="service-test"))
        welcome = await sink.next()
        assert isinstance(welcome, Welcome)
        assert (welcome.version, welcome.clinic) == (1, "clinic.test")
        device_id = device.device.identity.device_id
        transcript = auth_transcript(welcome.challenge, welcome.clinic, "alice", device_id)
        sink.send(
            Auth(
                rid=1,
                user="alice",
                device=device_id,
                signature=device.device.signing_key.sign(transcript),
            )
        )
        authenticated = await sink.next()
        assert isinstance(authenticated, Authenticated) and authenticated.token is not None
        token = authenticated.token
        # Visits are wired in: the answer names the clinic's default indications.
        sink.send(VisitList(rid=2))
        visits = await sink.next()
        assert isinstance(visits, Visits) and visits.rid == 2, visits
        assert (visits.visits, visits.consent) == ((), "notice")
        assert len(visits.indications) == 6 and visits.indications[0].code == "test-results"

        bearer = {"Authorization": "Bearer " + _b64(token)}
        uploaded = json_answer(
            await http.request("POST", f"{base}/v1/blobs", headers=bearer, body=b"ciphertext")
        )
        downloaded = await http.request(
            "GET", f"{base}/v1/blobs/{uploaded['blob_id']}", headers=bearer
        )
        assert (downloaded.status, downloaded.body) == (200, b"ciphertext")

        assert metrics_port is not None
        scraped = await http.request("GET", f"http://127.0.0.1:{metrics_port}/metrics")
        text = scraped.body.decode()
        assert 'medrelay_enrollments_total{outcome="enrolled"} 1.0' in text
        assert 'medrelay_connections{state="authenticated"} 1.0' in text
        assert 'medrelay_visits_total{event="opened"} 0.0' in text
        assert "alice" not in text
    finally:
        await service.stopService()
    # Stopping told the live connection why and closed it, and closed both ports.
    notice = await sinks[0].next()
    assert isinstance(notice, Error) and notice.code == ErrorCode.SERVER_BUSY
    await sinks[0].lost.addTimeout(TIMEOUT_S, reactor())
    with pytest.raises(ClientError) as refused:
        await http.request("GET", f"{base}/healthz")
    assert refused.value.code is LocalCode.SERVER_UNREACHABLE


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- TLS ----------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_handshake(port: int, cafile: Path, version: ssl.TLSVersion) -> str:
    """Blocking (run in a thread): GET /healthz over TLS pinned to one version."""
    import socket

    context = ssl.create_default_context(cafile=str(cafile))
    context.minimum_version = version
    context.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.endswith(b'{"status":"ok"}')
        version_name: str = tls.version() or ""
        return version_name


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@on_reactor
async def test_tls_serves_1_2_and_1_3_and_refuses_older(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = cheap_config(
        tmp_path,
        MEDRELAY_SERVER_TLS_CERTIFICATE_PATH=str(cert),
        MEDRELAY_SERVER_TLS_KEY_PATH=str(key),
        MEDRELAY_METRICS_ENABLED="false",
    )
    service, port, metrics = await start(config)
    assert metrics is None
    try:
        versions = ((ssl.TLSVersion.TLSv1_3, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2"))
        for version, name in versions:
            negotiated = await threads.deferToThread(tls_handshake, port, cert, version)
            assert negotiated == name
        with pytest.raises(ssl.SSLError):
            await threads.deferToThread(tls_handshake, port, cert, ssl.TLSVersion.TLSv1_1)
    finally:
        await service.stopService()


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(tmp_path: Path) -> None:
    from medrelay.server.app import tls_options
    from medrelay.server.config import ConfigError

    cert, _ = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = self_signed(tmp_path / "other")
    with pytest.raises(ConfigError) as caught:
        tls_options(cert, other_key)
    assert str(caught.value).startswith("server.tls_key_path: ")
    with pytest.raises(ConfigError) as missing:
        tls_options(tmp_path / "absent.pem", other_key)
    assert str(missing.value).startswith("server.tls_certificate_path: cannot read")


def test_startup_refuses_an_undurable_database(tmp_path: Path) -> None:
    from medrelay.server.app import StartupError

    config = cheap_config(tmp_path, MEDRELAY_STORAGE_DATABASE_URL="sqlite://")
    with pytest.raises(StartupError, match="journal_mode"):
        make_service(config, reactor=reactor(), rng=seeded_rng(b"x"), registry=CollectorRegistry())


# --- the process --------------------------------------------------------------------------------


def test_serve_process_starts_on_defaults_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`medrelay-server serve` from an empty directory: creates ./var (keys with a warning,
    the database), listens, logs JSON lines, and exits 0 after SIGTERM with an orderly stop."""
    env = {
        **os.environ,
        **CHEAP_ENV,
        "MEDRELAY_SERVER_PORT": "0",
        "MEDRELAY_METRICS_PORT": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-c", "from medrelay.server.main import main; main()", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    events: list[dict[str, Any]] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            events.append(json.loads(line.strip(b"\x1e\n")))
            if events[-1].get("what") == "metrics":
                break
        listening = [e for e in events if e.get("log_format", "").startswith("listening")]
        assert [e["what"] for e in listening] == ["clients", "metrics"], events
        assert all(e["host"] == "127.0.0.1" for e in listening)
        assert any(e.get("log_level", {}).get("name") == "warn" for e in events)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    rest = [json.loads(chunk) for chunk in out.split(b"\x1e") if chunk.strip()]
    assert any(e.get("log_format") == "stopped" for e in rest)
    assert not any(e.get("log_level", {}).get("name") in ("error", "critical") for e in rest)
    assert (tmp_path / "var" / "medrelay.db").exists()
    assert (tmp_path / "var" / "keys" / "issuing.key").exists()
