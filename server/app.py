"""The composition root: `make_service` wires a `Config` into the running server.

    ServerService (stops its children one after the other, last started first)
      ├─ Database            thread-pool runner; migrated and durability-checked before anything
      ├─ PasswordWorker      Argon2id, 2 at a time, on its own small pool
      ├─ RelayService        the relay core (group commit drains when it stops)
      ├─ BlobService         attachments and their expiry
      ├─ ListenerService     the clients' port: /healthz, /readyz, /v1/ws, /v1/enroll, /v1/link,
      │                      /v1/blobs (TLS when configured; link sessions in memory)
      └─ ListenerService     the metrics port (loopback by default)

Everything outside - the reactor, the random source, the metrics registry - is passed in;
`medrelay.server.main` hands in the real ones. Startup problems that an operator must fix (a
database that is not durable, damaged keys, a TLS key that does not match its certificate) raise
`StartupError` with one line saying what is wrong, before any port is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from twisted.application.service import MultiService, Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from medrelay.crypto.passwords import PasswordHasher
from medrelay.crypto.rng import Rng
from medrelay.crypto.sealing import SealParams
from medrelay.server.availability.offhours import OffHours
from medrelay.server.availability.service import AvailabilityService
from medrelay.server.blobs import BlobService
from medrelay.server.clinic import (
    AUTO_PASSPHRASE,
    ClinicKeyError,
    ClinicKeys,
    ensure_clinic_keys,
    ensure_private_directory,
)
from medrelay.server.config import Config, ConfigError, ServerSection
from medrelay.server.enrollment import EnrollmentService
from medrelay.server.hashing import PasswordWorker
from medrelay.server.linking import LinkService
from medrelay.server.metrics import RelayMetrics
from medrelay.server.readiness import Readiness
from medrelay.server.relay.service import RelayService
from medrelay.server.relay.store import RelayStore
from medrelay.server.revocation import RevocationWatcher
from medrelay.server.staff import StaffService
from medrelay.server.storage.database import (
    Database,
    Runner,
    ThreadPoolRunner,
    check_durability,
    open_database,
)
from medrelay.server.storage.errors import StorageError
from medrelay.server.storage.migrate import upgrade_to_head
from medrelay.server.storage.relay_store import SqlRelayStore
from medrelay.server.transparency import TransparencyLog
from medrelay.server.transport.http import BodyLimits, MetricsPage, RelaySite, build_root
from medrelay.server.transport.websocket import RelayWebSocketFactory, websocket_resource
from medrelay.server.visits import VisitService

_log = Logger()

ARGON2_THREADS: Final = 2
# Mozilla's "intermediate" TLS 1.2 suites (ECDHE with AEAD only); TLS 1.3 suites are all AEAD.
TLS12_CIPHERS: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

StoreFactory = Callable[[Database], RelayStore]


class StartupError(Exception):
    """The server cannot start as configured; the message is one line for the operator."""


def default_store(database: Database) -> RelayStore:
    """The SQL relay store on `database`."""
    return SqlRelayStore(database)


# --- services -----------------------------------------------------------------------------------


class ListenerService(Service):
    """Listens on an endpoint while running; `when_listening()` gives the port (its address
    when the configured port was 0) or the reason listening failed."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, what: str):
        self._endpoint = endpoint
        self._factory = factory
        self._what = what
        self._port: IListeningPort | None = None
        self._outcome: IListeningPort | Failure | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:  # noqa: N802 (IService)
        super().startService()  # type: ignore[no-untyped-call]
        self._outcome = None
        d = self._endpoint.listen(self._factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        address = port.getHost()
        _log.info(
            "listening for {what} on {host}:{port}",
            what=self._what,
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
        )
        self._settle(port)

    def _failed(self, failure: Failure) -> None:
        _log.error("cannot listen for {what}: {reason}", what=self._what, reason=failure.value)
        self._settle(failure)

    def _settle(self, outcome: IListeningPort | Failure) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def when_listening(self) -> Deferred[IListeningPort]:
        outcome = self._outcome
        if outcome is None:
            d: Deferred[IListeningPort] = Deferred()
            self._waiters.append(d)
            return d
        if isinstance(outcome, Failure):
            failed: Deferred[IListeningPort] = Deferred()
            failed.errback(outcome)
            return failed
        return succeed(outcome)

    def stopService(self) -> Deferred[object]:  # noqa: N802 (IService)
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


class SequentialMultiService(MultiService):
    """A MultiService whose children stop one after the other, last started first, each
    waiting for the previous one's Deferred (a plain MultiService stops them all at once)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def startService(self) -> None:  # noqa: N802 (IService)
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:  # noqa: N802 (IService)
        Service.stopService(self)  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure("stopping {service} failed", service=type(child).__name__)


class ServerService(SequentialMultiService):
    """The whole server: the ports close first, then the relay drains its group commit, and
    only then does the database close."""

    def __init__(
        self,
        *,
        config: Config,
        keys: ClinicKeys,
        database: Database,
        relay: RelayService,
        blobs: BlobService,
        enrollment: EnrollmentService,
        web: ListenerService,
        metrics: ListenerService | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.keys = keys
        self.database = database
        self.relay = relay
        self.blobs = blobs
        self.enrollment = enrollment
        self.web = web
        self.metrics = metrics

    async def _stop_children(self) -> None:
        await super()._stop_children()
        _log.info("stopped")


class QuietSite(server.Site):
    """A Site without twisted.web's access log (which would log client addresses)."""

    def log(self, request: Any) -> None:
        pass


# --- construction -------------------------------------------------------------------------------


def make_service(
    config: Config,
    *,
    reactor: Any,
    rng: Rng,
    registry: CollectorRegistry,
    store_factory: StoreFactory | None = None,
    seal_params: SealParams | None = None,
    password_runner: Runner | None = None,
) -> ServerService:
    """The server for `config`, not yet started.

    `reactor` provides IReactorTime, IReactorTCP, IReactorSSL and callFromThread. Before this
    returns, the database is migrated and its durability checked, and the clinic keys are loaded
    (or, on a first start without any, created - see `medrelay.server.clinic`). `store_factory`
    replaces the SQL relay store (tests); `seal_params` the Argon2 cost of sealing first-start
    root keys; `password_runner` where Argon2id runs (default: a pool of 2 threads).
    """
    ensure_private_directory(config.storage.data_dir)
    database = _open_database(config, reactor, registry)
    try:
        keys = _clinic_keys(config, reactor, rng, seal_params)
    except StartupError:
        database.close()
        raise
    store = (store_factory or default_store)(database)
    metrics = RelayMetrics.create(registry)
    identity_log = TransparencyLog(database=database, keys=keys, clock=reactor)
    worker = PasswordWorker(
        password_runner or ThreadPoolRunner.create(reactor, ARGON2_THREADS, "medrelay-argon2"),
        PasswordHasher(config.passwords),
        concurrency=ARGON2_THREADS,
    )
    staff = StaffService(
        database=database, worker=worker, clock=reactor, rng=rng, enrollment=config.enrollment
    )
    offhours = OffHours(
        clinic_id=config.server.clinic_id,
        config=config.availability,
        issuing_key=lambda: keys.issuing_key,
    )
    availability = AvailabilityService(database=database, clock=reactor, offhours=offhours)
    visits = VisitService(
        database=database, clock=reactor, rng=rng, config=config.visits, metrics=metrics
    )
    relay = RelayService(
        store=store,
        clock=reactor,
        rng=rng,
        config=config.relay,
        metrics=metrics,
        identity_log=identity_log,
        staff=staff,
        availability=availability,
        offhours=offhours,
        visits=visits,
    )
    availability.set_changed(relay.release_held)
    enrollment = EnrollmentService(
        database=database,
        keys=keys,
        clock=reactor,
        rng=rng,
        worker=worker,
        config=config.enrollment,
        metrics=metrics,
    )
    blobs = BlobService(
        database=database,
        store=store,
        clock=reactor,
        rng=rng,
        ttl_ms=config.relay.ttl_s * 1000,
        max_size_bytes=config.blobs.max_size_bytes,
        expiry_interval_s=config.relay.expiry_interval_s,
    )
    factory = RelayWebSocketFactory(
        relay,
        url=websocket_url(config.server),
        trust_x_forwarded_for=config.server.trust_x_forwarded_for,
    )
    # Link sessions live in memory only: a restart aborts the links in progress.
    linking = LinkService(database=database, store=store, clock=reactor, rng=rng)
    root = build_root(
        websocket=websocket_resource(factory),
        enrollment=enrollment,
        blobs=blobs,
        linking=linking,
        readiness=Readiness(database=database, keys=keys, clock=reactor),
    )
    site = RelaySite(root, clock=reactor, body_limits=BodyLimits(blobs=config.blobs.max_size_bytes))
    web = ListenerService(client_endpoint(reactor, config.server), site, "clients")
    metrics_listener: ListenerService | None = None
    if config.metrics.enabled:
        metrics_site = QuietSite(MetricsPage(registry), reactor=reactor)  # type: ignore[no-untyped-call]
        metrics_listener = ListenerService(
            _tcp_endpoint(reactor, config.metrics.port, config.metrics.host),
            metrics_site,
            "metrics",
        )
    service = ServerService(
        config=config,
        keys=keys,
        database=database,
        relay=relay,
        blobs=blobs,
        enrollment=enrollment,
        web=web,
        metrics=metrics_listener,
    )
    revocations = RevocationWatcher(database=database, relay=relay, clock=reactor)
    # Started in this order: the identity log is loaded before the ports listen.
    for child in (database, worker, identity_log, relay, revocations, blobs, web, metrics_listener):
        if child is not None:
            child.setServiceParent(service)  # type: ignore[no-untyped-call]
    return service


def _open_database(config: Config, reactor: Any, registry: CollectorRegistry) -> Database:
    try:
        database = open_database(config.storage.database_url, reactor, registry=registry)
    except StorageError as exc:
        raise StartupError(f"storage.database_url: {exc}") from None
    try:
        upgrade_to_head(database.engine)
        check_durability(database.engine)
    except StorageError as exc:
        database.close()
        raise StartupError(f"database: {exc}") from None
    except sa_exc.SQLAlchemyError as exc:
        database.close()
        raise StartupError(f"cannot open the database: {describe_database_error(exc)}") from None
    return database


def describe_database_error(exc: sa_exc.SQLAlchemyError) -> str:
    """One line about a database error, without the URL (which may hold a password)."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else type(exc).__name__
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:300]


def _clinic_keys(
    config: Config, reactor: Any, rng: Rng, seal_params: SealParams | None
) -> ClinicKeys:
    now_ms = int(reactor.seconds() * 1000)
    try:
        keys, created = ensure_clinic_keys(
            config.keys.dir,
            clinic_id=config.server.clinic_id,
            now_ms=now_ms,
            rng=rng,
            seal_params=seal_params,
        )
    except ClinicKeyError as exc:
        raise StartupError(str(exc)) from None
    if created:
        _log.warn(
            "created clinic keys in {keys_dir} with the root key sealed under a random "
            "passphrase stored next to it ({passphrase_file}); fine for a trial, not for a "
            "clinic: run `medrelay-server init --reseal` and move root-key.sealed offline "
            "(docs/operations.md)",
            keys_dir=str(config.keys.dir),
            passphrase_file=AUTO_PASSPHRASE,
        )
    elif keys.automatic:
        _log.warn(
            "the clinic root key in {keys_dir} is still sealed under the automatic passphrase "
            "stored next to it; run `medrelay-server init --reseal` (docs/operations.md)",
            keys_dir=str(config.keys.dir),
        )
    return keys


# --- endpoints ----------------------------------------------------------------------------------


def websocket_url(section: ServerSection) -> str:
    """The WebSocket URL autobahn is told it serves (informative: no Host check is made)."""
    if section.public_url is not None:
        scheme, rest = section.public_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/v1/ws"
    host = f"[{section.host}]" if ":" in section.host else section.host
    port = f":{section.port}" if section.port else ""  # autobahn refuses port 0
    return f"{'wss' if section.tls else 'ws'}://{host}{port}/v1/ws"


def client_endpoint(reactor: Any, section: ServerSection) -> IStreamServerEndpoint:
    """TCP on `host:port`, with TLS 1.2/1.3 when a certificate and key are configured."""
    if section.tls_certificate_path is None or section.tls_key_path is None:
        return _tcp_endpoint(reactor, section.port, section.host)
    options = tls_options(section.tls_certificate_path, section.tls_key_path)
    tls: IStreamServerEndpoint = SSL4ServerEndpoint(  # type: ignore[no-untyped-call]
        reactor, section.port, options, interface=section.host
    )
    return tls


def _tcp_endpoint(reactor: Any, port: int, host: str) -> IStreamServerEndpoint:
    # listenTCP picks IPv6 by itself when the interface is an IPv6 address.
    endpoint: IStreamServerEndpoint = TCP4ServerEndpoint(  # type: ignore[no-untyped-call]
        reactor, port, interface=host
    )
    return endpoint


def tls_options(certificate_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """TLS settings from PEM files: the certificate chain (server certificate first) and its
    private key (unencrypted); TLS 1.2 and 1.3 only, AEAD suites only. Problems are
    `ConfigError`s naming the file's key."""
    cert_key, key_key = "server.tls_certificate_path", "server.tls_key_path"
    chain_pem = _read_pem(certificate_path, cert_key)
    key_pem = _read_pem(key_path, key_key)
    try:
        certificates = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ConfigError(
            cert_key, f"{certificate_path} holds no readable PEM certificate"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            key_key, f"{key_path} is encrypted; give the server an unencrypted key file (0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(key_key, f"{key_path} holds no readable PEM private key") from None
    try:
        # pyOpenSSL now wants cryptography objects (its own X509/PKey are deprecated); Twisted's
        # annotations still name the old types, but it only hands them on to pyOpenSSL.
        options = ssl.CertificateOptions(
            privateKey=key,  # type: ignore[arg-type]
            certificate=certificates[0],  # type: ignore[arg-type]
            extraCertChain=certificates[1:],  # type: ignore[arg-type]
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),  # type: ignore[no-untyped-call]
        )
        options.getContext()  # builds the OpenSSL context now: a mismatched key fails here
    except (SSL.Error, ValueError, TypeError):
        raise ConfigError(key_key, f"{key_path} does not match the certificate") from None
    return options


def _read_pem(path: Path, key: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path} ({exc.strerror})") from None
    if len(data) > 1024 * 1024:
        raise ConfigError(key, f"{path} is too large for a PEM file")
    return data
