"""Enrollment: what the request carries, every check of the relay's answer, refusals leaving no
profile behind; and server URL parsing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medrelay.clients.engine.enrollment import (
    ONE_TIME_PREKEYS,
    b64url,
    b64url_decode,
    enroll,
    enrollment_request,
    generate_device,
    verify_enrollment_answer,
)
from medrelay.clients.engine.errors import ClientError, LocalCode, RemoteError
from medrelay.clients.engine.http import HttpResponse, error_from_response, parse_server_url
from medrelay.clients.engine.store import database_path, inline_runner
from medrelay.clients.engine.testing import TEST_PASSPHRASE, TEST_SERVER_URL, ClientWorld
from medrelay.crypto.certificates import (
    ClinicKeyPurpose,
    DeviceCertificate,
    Role,
    issue_clinic_key_certificate,
    issue_user_certificate,
    verify_device,
)
from medrelay.crypto.keys import SigningKey, VerifyKey
from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.x3dh import OneTimePrekey, SignedPrekey
from medrelay.protocol.errors import ErrorCode


@pytest.fixture
def world(tmp_path: Path) -> ClientWorld:
    return ClientWorld(tmp_path)


def test_the_request_carries_only_public_keys_that_verify() -> None:
    rng = seeded_rng(b"request")
    new = generate_device("dr.ivanova", 1_000, rng)
    body = enrollment_request(new, "dr.ivanova", "7K2M-Q9XW")
    assert json.loads(json.dumps(body)) == body
    identity_key = VerifyKey.from_text(str(body["identity_key"]))
    cert = DeviceCertificate.decode(b64url_decode(body["device_certificate"], "cert"))
    assert cert.user_id == "dr.ivanova"
    user = issue_user_certificate(
        SigningKey.generate(rng),
        user_id="dr.ivanova",
        role=Role.DOCTOR,
        display_name="Dr",
        identity_key=identity_key,
        not_before_ms=0,
        not_after_ms=10,
        serial=1,
    )
    identity = verify_device(user, cert)
    SignedPrekey.decode(b64url_decode(body["signed_prekey"], "spk")).verify(identity)
    encoded = body["one_time_prekeys"]
    assert isinstance(encoded, list)
    otks = [OneTimePrekey.decode(b64url_decode(o, "otk")) for o in encoded]
    assert len({o.prekey_id for o in otks}) == ONE_TIME_PREKEYS
    text = json.dumps(body)
    for secret in (new.identity_key.seed, new.device.signing_key.seed, new.device.dh_key.raw):
        assert b64url(secret) not in text


def test_enrollment_pins_the_clinic_and_its_root_key(world: ClientWorld) -> None:
    info = world.enroll("alice")
    assert info.clinic_id == "clinic.test"
    assert info.root_key == world.clinic.root.verify_key
    assert info.server_url == TEST_SERVER_URL


def _enroll(world: ClientWorld, user: str, code: str, url: str = TEST_SERVER_URL) -> Any:
    return world.run(
        enroll(
            profile_dir=world.profile_dir(user),
            passphrase=TEST_PASSPHRASE,
            server_url=url,
            username=user,
            code=code,
            http=world.relay.http,
            clock=world.clock,
            rng=world.rng,
            runner=inline_runner,
            seal_params=world.seal_params,
        )
    )


def test_a_refused_code_fails_clearly_and_leaves_no_profile(world: ClientWorld) -> None:
    world.relay.add_user("alice", "RIGHT")
    with pytest.raises(RemoteError) as caught:
        _enroll(world, "alice", "WRONG")
    assert caught.value.code is ErrorCode.ENROLLMENT_FAILED
    assert not database_path(world.profile_dir("alice")).exists()


def test_an_unreachable_server_leaves_no_profile(world: ClientWorld) -> None:
    world.relay.add_user("alice", "RIGHT")
    world.relay.down = True
    with pytest.raises(ClientError) as caught:
        _enroll(world, "alice", "RIGHT")
    assert caught.value.code is LocalCode.SERVER_UNREACHABLE
    assert not database_path(world.profile_dir("alice")).exists()


def test_an_enrolled_profile_is_never_overwritten(world: ClientWorld) -> None:
    world.enroll("alice")
    world.relay.add_user("alice2", "CODE")
    requests = len(world.relay.http.requests)
    with pytest.raises(ClientError) as caught:
        world.run(
            enroll(
                profile_dir=world.profile_dir("alice"),
                passphrase=TEST_PASSPHRASE,
                server_url=TEST_SERVER_URL,
                username="alice2",
                code="CODE",
                http=world.relay.http,
                clock=world.clock,
                rng=world.rng,
                runner=inline_runner,
            )
        )
    assert caught.value.code is LocalCode.ALREADY_ENROLLED
    assert len(world.relay.http.requests) == requests  # the code was not spent


@pytest.mark.parametrize(
    ("user", "code", "url", "expected"),
    [
        ("alice", "C", "ftp://relay.test", LocalCode.BAD_URL),
        ("alice", "C", "relay.test:8448", LocalCode.BAD_URL),
        ("alice", "C", "http://relay.test:8448/v1", LocalCode.BAD_URL),
        ("alice", "C", "http://user:pw@relay.test", LocalCode.BAD_URL),
        ("alice", "C", "http://relay.test:99999", LocalCode.BAD_URL),
        ("bad\nname", "C", TEST_SERVER_URL, LocalCode.INVALID_ARGUMENT),
        ("alice", "  ", TEST_SERVER_URL, LocalCode.INVALID_ARGUMENT),
    ],
)
def test_bad_arguments_are_refused_before_any_request(
    world: ClientWorld, user: str, code: str, url: str, expected: LocalCode
) -> None:
    with pytest.raises(ClientError) as caught:
        _enroll(world, user, code, url)
    assert caught.value.code is expected
    assert world.relay.http.requests == []


# --- checking the answer ----------------------------------------------------------------------


class Answer:
    """A valid answer to tamper with."""

    def __init__(self) -> None:
        rng = seeded_rng(b"answer")
        self.root = SigningKey.generate(rng)
        self.issuing = SigningKey.generate(rng)
        self.identity = SigningKey.generate(rng)
        self.issuing_cert = issue_clinic_key_certificate(
            self.root,
            clinic_id="clinic.test",
            purpose=ClinicKeyPurpose.ISSUING,
            key=self.issuing.verify_key,
            not_before_ms=0,
            not_after_ms=10_000,
            serial=1,
        )
        self.body: dict[str, Any] = {
            "username": "alice",
            "device_id": "dev1",
            "clinic": "clinic.test",
            "root_key": self.root.verify_key.to_text(),
            "issuing_certificate": b64url(self.issuing_cert.encode()),
            "user_certificate": b64url(self.user_cert(self.issuing, self.identity).encode()),
            "server_time": 5,
        }

    def user_cert(self, issuer: SigningKey, identity: SigningKey, user: str = "alice") -> Any:
        return issue_user_certificate(
            issuer,
            user_id=user,
            role=Role.DOCTOR,
            display_name=user,
            identity_key=identity.verify_key,
            not_before_ms=0,
            not_after_ms=10_000,
            serial=2,
        )

    def check(self) -> object:
        return verify_enrollment_answer(
            self.body,
            username="alice",
            device_id="dev1",
            identity_key=self.identity.verify_key,
            at_ms=5,
        )


def test_a_valid_answer_verifies() -> None:
    answer = Answer()
    verified = answer.check()
    assert verified.root_key == answer.root.verify_key  # type: ignore[attr-defined]


def _tamper(answer: Answer, case: str) -> None:
    rogue = SigningKey.generate(seeded_rng(b"rogue"))
    body = answer.body
    if case == "issuing certificate from another root":
        body["root_key"] = rogue.verify_key.to_text()
    elif case == "user certificate from another issuer":
        body["user_certificate"] = b64url(answer.user_cert(rogue, answer.identity).encode())
    elif case == "user certificate for another identity key":
        body["user_certificate"] = b64url(answer.user_cert(answer.issuing, rogue).encode())
    elif case == "user certificate for another user":
        cert = answer.user_cert(answer.issuing, answer.identity, user="mallory")
        body["user_certificate"] = b64url(cert.encode())
    elif case == "another clinic":
        body["clinic"] = "other.clinic"
    elif case == "another username":
        body["username"] = "bob"
    elif case == "another device":
        body["device_id"] = "dev2"
    elif case == "padded base64":
        body["user_certificate"] += "=="
    elif case == "missing certificate":
        del body["issuing_certificate"]
    elif case == "not an object":
        answer.body = ["nope"]  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("issuing certificate from another root", LocalCode.PEER_UNVERIFIED),
        ("user certificate from another issuer", LocalCode.PEER_UNVERIFIED),
        ("user certificate for another identity key", LocalCode.PEER_UNVERIFIED),
        ("user certificate for another user", LocalCode.PEER_UNVERIFIED),
        ("another clinic", LocalCode.PEER_UNVERIFIED),
        ("another username", LocalCode.BAD_SERVER_ANSWER),
        ("another device", LocalCode.BAD_SERVER_ANSWER),
        ("padded base64", LocalCode.BAD_SERVER_ANSWER),
        ("missing certificate", LocalCode.BAD_SERVER_ANSWER),
        ("not an object", LocalCode.BAD_SERVER_ANSWER),
    ],
)
def test_every_check_of_the_answer_refuses_a_tampered_one(case: str, code: LocalCode) -> None:
    answer = Answer()
    _tamper(answer, case)
    with pytest.raises(ClientError) as caught:
        answer.check()
    assert caught.value.code is code


# --- URLs and HTTP errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "base", "websocket"),
    [
        ("http://127.0.0.1:8448", "http://127.0.0.1:8448", "ws://127.0.0.1:8448/v1/ws"),
        (
            "https://relay.clinic.example/",
            "https://relay.clinic.example:443",
            "wss://relay.clinic.example:443/v1/ws",
        ),
        ("http://[::1]:8448", "http://[::1]:8448", "ws://[::1]:8448/v1/ws"),
        ("http://relay", "http://relay:80", "ws://relay:80/v1/ws"),
    ],
)
def test_server_urls_derive_every_endpoint(text: str, base: str, websocket: str) -> None:
    url = parse_server_url(text)
    assert str(url) == base
    assert url.websocket() == websocket
    assert url.http("/v1/enroll") == base + "/v1/enroll"


def test_http_errors_carry_the_servers_code_or_one_from_the_status() -> None:
    body = json.dumps({"error": {"code": "rate_limited", "message": "slow down"}}).encode()
    error = error_from_response(HttpResponse(429, body, "application/json"))
    assert error.code is ErrorCode.RATE_LIMITED and error.message == "slow down"
    error = error_from_response(HttpResponse(503, b"<html>", "text/html"))
    assert error.code is ErrorCode.SERVER_BUSY
    error = error_from_response(
        HttpResponse(400, b'{"error": {"code": "new_code", "message": "x"}}', "")
    )
    assert error.code is ErrorCode.INTERNAL_ERROR  # an unknown code from a newer server
