"""Device linking on the server (POST/GET /v1/link..., docs/protocol.md §16) through the real HTTP
resources on a fake transport and fake clock, against a migrated SQLite database and the SQL
relay store: the whole flow adds the device with its prekeys, its `device_added` log event and a
`device_link` audit record in one transaction; sessions expire, codes work once, failed joins
and open links are capped; wrong tokens, foreign accounts and wrong secrets learn nothing; and a
certificate the account's identity key did not sign is refused with nothing created."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from server_app_support import (
    HttpHarness,
    Response,
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
from store_worlds import NO_POSTGRES, POSTGRES_URL, postgres_schema
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import Resource

from medrelay.clients.engine.enrollment import NewDevice
from medrelay.crypto.certificates import DeviceCertificate, issue_device_certificate
from medrelay.crypto.identity import DeviceIdentity, DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.linking import commitment
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.transparency import EventKind
from medrelay.crypto.transparency import LogEvent as IdentityEvent
from medrelay.crypto.x3dh import generate_one_time_prekeys, generate_signed_prekey
from medrelay.server import linking as linking_module
from medrelay.server.audit import list_audit_txn
from medrelay.server.clinic import ClinicKeys
from medrelay.server.linking import LINK_TTL_S, LinkService
from medrelay.server.relay.service import token_digest
from medrelay.server.storage.database import Database
from medrelay.server.storage.relay_store import SqlRelayStore
from medrelay.server.transparency import verify_log_txn
from medrelay.server.transport.http import BodyLimits, RelaySite, build_root, route_of

DAY_MS = 24 * 3600 * 1000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bearer(secret: bytes) -> dict[str, str]:
    return {"Authorization": f"Bearer {b64(secret)}"}


@dataclass
class Enrolled:
    username: str
    device: NewDevice
    token: bytes

    @property
    def device_id(self) -> str:
        return self.device.device.identity.device_id


@dataclass
class World:
    database: Database
    keys: ClinicKeys
    clock: MemoryReactorClock
    rng: Rng
    store: SqlRelayStore
    linking: LinkService
    http: HttpHarness

    def post(self, path: str, value: object, headers: dict[str, str] | None = None) -> Response:
        return self.http.post_json(path, value, **(headers or {}))

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return self.http.request("GET", path, headers=headers)

    def enroll(self, username: str) -> Enrolled:
        account = new_account(self.database, username, self.rng)
        body, device = enrollment_body(username, account.enrollment_code, self.rng)
        assert self.post("/v1/enroll", body).status == 200
        record = value(self.store.get_device(username, device.device.identity.device_id))
        assert record is not None
        token = self.rng(32)
        now = int(self.clock.seconds() * 1000)
        value(self.store.create_session(record.pk, token_digest(token), now, now + DAY_MS))
        return Enrolled(username, device, token)


def build_world(tmp_path: Path, database_url: str | None = None, **options: int) -> World:
    env = {"MEDRELAY_STORAGE_DATABASE_URL": database_url} if database_url else {}
    config = cheap_config(tmp_path, **env)
    database = open_database(config)
    rng = seeded_rng(b"linking tests")
    keys = make_keys(config, rng)
    clock = clock_at()
    store = SqlRelayStore(database)
    enrollment, blobs, _ = services(config, database, keys, store, clock=clock, rng=rng)
    linking = LinkService(database=database, store=store, clock=clock, rng=rng, **options)
    http = HttpHarness(enrollment=enrollment, blobs=blobs, clock=clock)
    stand_in: Resource = Resource()  # type: ignore[no-untyped-call]
    root = build_root(websocket=stand_in, enrollment=enrollment, blobs=blobs, linking=linking)
    http.site = RelaySite(root, clock=clock, body_limits=BodyLimits(blobs=blobs.max_size_bytes))
    return World(database, keys, clock, rng, store, linking, http)


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """The flow on each production database (the transaction's locks and RETURNING differ)."""
    if request.param == "sqlite":
        w = build_world(tmp_path)
        yield w
        w.database.close()
        return
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    with postgres_schema() as url:
        w = build_world(tmp_path, url)
        yield w
        w.database.close()


@pytest.fixture
def alice(world: World) -> Enrolled:
    return world.enroll("alice")


# --- one link, step by step ---------------------------------------------------------------------


@dataclass
class Link:
    """One link driven over HTTP: E is `existing`, N the keys made here."""

    world: World
    existing: Enrolled
    ephemeral: DHPrivateKey = field(init=False)
    code: str = ""
    secret: bytes = b""
    username: str = ""
    new_ephemeral: DHPrivateKey = field(init=False)
    signing: SigningKey = field(init=False)
    dh: DHPrivateKey = field(init=False)
    device_id: str = "newdev01"

    def __post_init__(self) -> None:
        rng = self.world.rng
        self.ephemeral = DHPrivateKey.generate(rng)
        self.new_ephemeral = DHPrivateKey.generate(rng)
        self.signing = SigningKey.generate(rng)
        self.dh = DHPrivateKey.generate(rng)

    @property
    def e_auth(self) -> dict[str, str]:
        return bearer(self.existing.token)

    @property
    def n_auth(self) -> dict[str, str]:
        return bearer(self.secret)

    def create(self) -> Response:
        response = self.world.post(
            "/v1/link", {"commitment": b64(commitment(self.ephemeral.public_key))}, self.e_auth
        )
        if response.status == 201:
            self.code = response.json()["code"]
        return response

    def join(self, code: str | None = None) -> Response:
        response = self.world.post(f"/v1/link/{code or self.code}/join", {})
        if response.status == 200:
            self.secret = base64.urlsafe_b64decode(response.json()["secret"] + "=")
            self.username = response.json()["username"]
        return response

    def device_body(self, username: str | None = None) -> dict[str, Any]:
        identity = DeviceIdentity(
            username or self.existing.username,
            self.device_id,
            self.signing.verify_key,
            self.dh.public_key,
            bytes(32),
        )
        keys = DeviceKeys(identity, self.signing, self.dh)
        spk = generate_signed_prekey(keys, 1, 0, self.world.rng).record
        otks = generate_one_time_prekeys(1, 5, self.world.rng)
        return {
            "ephemeral_key": self.new_ephemeral.public_key.to_text(),
            "device": {
                "device_id": self.device_id,
                "signing_key": self.signing.verify_key.to_text(),
                "dh_key": self.dh.public_key.to_text(),
            },
            "signed_prekey": b64(spk.encode()),
            "one_time_prekeys": [b64(p.record.encode()) for p in otks],
        }

    def device(self) -> Response:
        return self.world.post(f"/v1/link/{self.code}/device", self.device_body(), self.n_auth)

    def status(self) -> Response:
        return self.world.get(f"/v1/link/{self.code}", self.e_auth)

    def peer(self) -> Response:
        return self.world.get(f"/v1/link/{self.code}/peer", self.n_auth)

    def reveal(self, key: DHPrivateKey | None = None) -> Response:
        shown = (key or self.ephemeral).public_key.to_text()
        return self.world.post(
            f"/v1/link/{self.code}/reveal", {"ephemeral_key": shown}, self.e_auth
        )

    def confirm(self) -> Response:
        return self.world.post(f"/v1/link/{self.code}/confirm", {}, self.n_auth)

    def certificate(self, identity: SigningKey | None = None, user: str = "") -> DeviceCertificate:
        return issue_device_certificate(
            identity or self.existing.device.identity_key,
            user_id=user or self.existing.username,
            device_id=self.device_id,
            signing_key=self.signing.verify_key,
            dh_key=self.dh.public_key,
            created_at_ms=1_763_884_800_000,
        )

    def complete(self, certificate: bytes | None = None) -> Response:
        cert = certificate if certificate is not None else self.certificate().encode()
        body = {"device_certificate": b64(cert), "payload": b64(b"sealed for the new device")}
        return self.world.post(f"/v1/link/{self.code}/complete", body, self.e_auth)

    def up_to_confirmed(self) -> None:
        for step in (self.create, self.join, self.device, self.reveal, self.confirm):
            response = step()
            assert response.status in (200, 201), response.body


def log_size(world: World) -> int:
    with world.database.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM log_entries")).scalar_one())


def device_link_audit(world: World) -> list[tuple[str, str, str]]:
    with world.database.engine.connect() as conn:
        entries = list_audit_txn(conn, action="device_link")
    return [(e.record.target, e.record.result, e.record.detail) for e in entries]


def snapshot(world: World) -> tuple[dict[str, int], int]:
    return table_counts(world.database), log_size(world)


# --- the whole flow -----------------------------------------------------------------------------


def test_a_complete_link_adds_the_device_with_prekeys_log_event_and_audit(
    world: World, alice: Enrolled
) -> None:
    link = Link(world, alice)
    created = link.create()
    assert created.status == 201
    assert set(created.json()) == {"code", "expires"}
    code = created.json()["code"]
    assert len(code) == 9 and code[4] == "-"
    assert created.json()["expires"] == int(world.clock.seconds() * 1000) + LINK_TTL_S * 1000
    assert link.status().json()["state"] == "waiting"

    joined = link.join()
    assert joined.status == 200
    assert joined.json()["username"] == "alice"
    assert joined.json()["commitment"] == b64(commitment(link.ephemeral.public_key))
    assert link.status().json()["state"] == "claimed"  # no keys yet: nothing to reveal to

    assert link.device().status == 200
    status = link.status().json()
    assert status["state"] == "joined"
    assert status["ephemeral_key"] == link.new_ephemeral.public_key.to_text()
    assert status["device"] == link.device_body()["device"]
    assert "ephemeral_key" not in link.peer().json()  # E has not revealed yet

    assert link.reveal().status == 200
    assert link.peer().json()["ephemeral_key"] == link.ephemeral.public_key.to_text()
    assert link.confirm().status == 200
    assert link.status().json()["state"] == "confirmed"

    before_counts, before_log = snapshot(world)
    completed = link.complete()
    assert completed.status == 200, completed.body
    assert completed.json()["device_id"] == "newdev01"
    counts, size = snapshot(world)
    assert counts["devices"] == before_counts["devices"] + 1
    assert counts["signed_prekeys"] == before_counts["signed_prekeys"] + 1
    assert counts["one_time_prekeys"] == before_counts["one_time_prekeys"] + 5
    assert size == before_log + 1
    with world.database.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT event FROM log_entries ORDER BY leaf_index DESC")
        ).first()
        assert row is not None
        event = IdentityEvent.decode(bytes(row.event))
        assert (event.kind, event.subject) == (EventKind.DEVICE_ADDED, "alice")
        assert DeviceCertificate.decode(event.payload).device_id == "newdev01"
        assert verify_log_txn(conn, world.keys).problem is None
    assert device_link_audit(world) == [("alice/newdev01", "ok", f"from={alice.device_id}")]
    # The new device fetches the payload; the link is used up.
    peer = link.peer().json()
    assert (peer["state"], peer["payload"]) == ("completed", b64(b"sealed for the new device"))
    record = value(world.store.get_device("alice", "newdev01"))
    assert record is not None and record.signing_key == link.signing.verify_key.raw
    assert link.complete().status == 409


def test_the_transaction_is_all_or_nothing(
    world: World, alice: Enrolled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the device and its log event were written rolls all of it back."""
    link = Link(world, alice)
    link.up_to_confirmed()
    before = snapshot(world)

    def broken_audit(*args: object, **kwargs: object) -> int:
        raise RuntimeError("the audit log failed")

    monkeypatch.setattr(linking_module, "append_audit_txn", broken_audit)
    response = link.complete()
    assert (response.status, response.error_code) == (500, "internal_error")
    assert snapshot(world) == before
    monkeypatch.undo()
    assert link.status().json()["state"] == "confirmed"  # E may try again
    assert link.complete().status == 200


# --- the certificate: only the account's identity key can add a device ---------------------------


def test_a_certificate_signed_by_another_identity_key_is_refused(
    world: World, alice: Enrolled
) -> None:
    link = Link(world, alice)
    link.up_to_confirmed()
    before = snapshot(world)
    forged = link.certificate(identity=SigningKey.generate(world.rng)).encode()
    response = link.complete(forged)
    assert (response.status, response.error_code) == (403, "forbidden")
    assert "not signed by the current identity key of alice" in response.json()["error"]["message"]
    assert snapshot(world) == before
    assert [(t, r) for t, r, _ in device_link_audit(world)] == [("alice/newdev01", "refused")]
    assert link.status().json()["state"] == "confirmed"


def test_a_certificate_with_a_forged_signature_is_refused(world: World, alice: Enrolled) -> None:
    """What a server without the identity key could make: the right issuer hash, a bad
    signature."""
    link = Link(world, alice)
    link.up_to_confirmed()
    before = snapshot(world)
    genuine = link.certificate()
    forged = dataclasses.replace(genuine, signature=bytes(64))
    response = link.complete(forged.encode())
    assert (response.status, response.error_code) == (403, "forbidden")
    assert "signature does not verify" in response.json()["error"]["message"]
    assert snapshot(world) == before


def test_a_certificate_for_another_user_or_other_keys_is_refused(
    world: World, alice: Enrolled
) -> None:
    bob = world.enroll("bob")
    link = Link(world, alice)
    link.up_to_confirmed()
    before = snapshot(world)
    other_user = link.certificate(identity=bob.device.identity_key, user="bob")
    response = link.complete(other_user.encode())
    assert (response.status, response.error_code) == (403, "forbidden")
    assert "names another user" in response.json()["error"]["message"]
    other_keys = issue_device_certificate(
        alice.device.identity_key,
        user_id="alice",
        device_id="newdev01",
        signing_key=SigningKey.generate(world.rng).verify_key,
        dh_key=link.dh.public_key,
        created_at_ms=0,
    )
    response = link.complete(other_keys.encode())
    assert (response.status, response.error_code) == (400, "invalid_field")
    assert "does not certify the keys the new device sent" in response.body.decode()
    assert snapshot(world) == before


def test_a_device_id_the_account_already_has_is_refused(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.device_id = alice.device_id
    link.up_to_confirmed()
    before = snapshot(world)
    response = link.complete()
    assert (response.status, response.error_code) == (403, "forbidden")
    assert "already has a device" in response.json()["error"]["message"]
    assert snapshot(world) == before


def test_the_new_devices_signed_prekey_must_be_its_own(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.create()
    link.join()
    body = link.device_body(username="bob")  # a prekey signed for another account
    response = world.post(f"/v1/link/{link.code}/device", body, link.n_auth)
    assert (response.status, response.error_code) == (400, "invalid_field")
    body = link.device_body()
    body["device"]["signing_key"] = SigningKey.generate(world.rng).verify_key.to_text()
    response = world.post(f"/v1/link/{link.code}/device", body, link.n_auth)
    assert "not signed by the device's signing key" in response.json()["error"]["message"]
    assert link.status().json()["state"] == "claimed"


# --- order, expiry, single use ------------------------------------------------------------------


def test_steps_out_of_order_are_refused(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.create()
    assert link.reveal().status == 409  # nobody joined
    link.join()
    link.device()
    assert link.complete().status == 409  # nothing revealed, nothing confirmed
    assert link.confirm().status == 409  # N cannot confirm digits it cannot compute yet
    link.reveal()
    response = link.complete()
    assert (response.status, response.error_code) == (409, "unexpected_message")
    assert "it is revealed" in response.json()["error"]["message"]


def test_a_reveal_must_match_the_commitment(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.create()
    link.join()
    link.device()
    response = link.reveal(DHPrivateKey.generate(world.rng))
    assert (response.status, response.error_code) == (400, "invalid_field")
    assert link.status().json()["state"] == "joined"
    assert link.reveal().status == 200


def test_links_expire_after_ten_minutes(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.create()
    world.clock.advance(LINK_TTL_S - 1)
    assert link.status().status == 200
    world.clock.advance(1)
    response = link.join()
    assert (response.status, response.error_code) == (404, "not_found")
    assert "expired" in response.json()["error"]["message"]
    assert link.status().status == 404
    assert world.linking.open_links == 0


def test_a_code_joins_once_and_answers_like_an_unknown_one(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.create()
    assert link.join().status == 200
    again = world.post(f"/v1/link/{link.code}/join", {})
    unknown = world.post("/v1/link/0000-0000/join", {})
    malformed = world.post("/v1/link/not-a-code/join", {})
    assert again.status == unknown.status == malformed.status == 404
    assert again.body == unknown.body == malformed.body


def test_codes_are_accepted_as_people_type_them(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.create()
    assert link.join(link.code.replace("-", "").lower()).status == 200


def test_failed_joins_are_capped_for_the_whole_server(tmp_path: Path) -> None:
    world = build_world(tmp_path, max_failed_joins=3)
    try:
        alice = world.enroll("alice")
        link = Link(world, alice)
        link.create()
        for guess in ("0000-0001", "0000-0002", "0000-0003"):
            assert world.post(f"/v1/link/{guess}/join", {}).status == 404
        # Past the cap every join is refused alike, the right code too: no oracle.
        for code in ("0000-0004", link.code):
            response = world.post(f"/v1/link/{code}/join", {})
            assert (response.status, response.error_code) == (429, "rate_limited")
        world.clock.advance(LINK_TTL_S)
        fresh = Link(world, alice)
        fresh.create()
        assert fresh.join().status == 200
    finally:
        world.database.close()


def test_open_links_are_capped_and_a_devices_new_link_replaces_its_old_one(
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, max_open=2)
    try:
        alice, bob, carol = (world.enroll(name) for name in ("alice", "bob", "carol"))
        first = Link(world, alice)
        first.create()
        again = Link(world, alice)
        again.create()
        assert first.join().status == 404  # replaced
        assert world.linking.open_links == 1
        assert Link(world, bob).create().status == 201
        response = Link(world, carol).create()
        assert (response.status, response.error_code) == (429, "rate_limited")
        world.clock.advance(LINK_TTL_S)
        assert Link(world, carol).create().status == 201
    finally:
        world.database.close()


# --- who may do what ----------------------------------------------------------------------------


def test_the_existing_side_needs_the_owners_valid_token(world: World, alice: Enrolled) -> None:
    bob = world.enroll("bob")
    link = Link(world, alice)
    link.create()
    link.join()
    link.device()
    no_token = world.post("/v1/link", {"commitment": b64(bytes(32))})
    assert (no_token.status, no_token.error_code) == (401, "not_authenticated")
    unknown = world.get(f"/v1/link/{link.code}", bearer(bytes(32)))
    assert (unknown.status, unknown.error_code) == (401, "token_invalid")
    # Another account's device sees nothing, and can neither reveal, complete nor cancel.
    foreign = bearer(bob.token)
    assert world.get(f"/v1/link/{link.code}", foreign).status == 404
    reveal = {"ephemeral_key": link.ephemeral.public_key.to_text()}
    assert world.post(f"/v1/link/{link.code}/reveal", reveal, foreign).status == 404
    assert world.post(f"/v1/link/{link.code}/cancel", {}, foreign).status == 404
    assert link.status().json()["state"] == "joined"


def test_the_new_side_needs_the_secret_its_join_received(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.create()
    link.join()
    wrong = bearer(bytes(32))
    assert world.get(f"/v1/link/{link.code}/peer", wrong).status == 404
    assert world.post(f"/v1/link/{link.code}/device", link.device_body(), wrong).status == 404
    assert world.get(f"/v1/link/{link.code}/peer").status == 401
    # E's session token is no secret of N's either.
    assert world.get(f"/v1/link/{link.code}/peer", link.e_auth).status == 404


def test_either_side_can_cancel_and_the_other_sees_it(world: World, alice: Enrolled) -> None:
    by_new = Link(world, alice)
    by_new.up_to_confirmed()
    assert world.post(f"/v1/link/{by_new.code}/cancel", {}, by_new.n_auth).status == 200
    assert by_new.status().json()["state"] == "cancelled"
    before = snapshot(world)
    assert by_new.complete().status == 409
    assert snapshot(world) == before
    by_existing = Link(world, alice)
    by_existing.create()
    by_existing.join()
    assert world.post(f"/v1/link/{by_existing.code}/cancel", {}, by_existing.e_auth).status == 200
    assert by_existing.peer().json()["state"] == "cancelled"


def test_a_revoked_existing_device_cannot_complete(world: World, alice: Enrolled) -> None:
    link = Link(world, alice)
    link.up_to_confirmed()
    with world.database.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE devices SET revoked_at = 1 WHERE device_id = :d"),
            {"d": alice.device_id},
        )
    before = snapshot(world)
    response = link.complete()
    assert (response.status, response.error_code) == (401, "token_invalid")
    assert snapshot(world) == before


# --- bounds and logs ----------------------------------------------------------------------------


def test_link_bodies_are_bounded_before_buffering(world: World, alice: Enrolled) -> None:
    limits = BodyLimits(blobs=1000)
    assert limits.for_path(b"/v1/link") == limits.for_path(b"/v1/link/AAAA-BBBB/device") == 32768
    _, transport = world.http.raw(
        b"POST /v1/link/AAAA-BBBB/device HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: 40000\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")


def test_codes_never_reach_the_log(world: World, alice: Enrolled) -> None:
    assert route_of(b"/v1/link/7K2M-Q9XW") == "/v1/link/{code}"
    assert route_of(b"/v1/link/7K2M-Q9XW/join") == "/v1/link/{code}/join"
    assert route_of(b"/v1/link/7K2M-Q9XW/other") == "(other)"
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        link = Link(world, alice)
        link.up_to_confirmed()
        link.complete()
    finally:
        globalLogPublisher.removeObserver(observer)
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) for e in events)
    assert "/v1/link/{code}/complete" in text
    assert link.code not in text and link.code.replace("-", "") not in text
    assert "alice" not in text
