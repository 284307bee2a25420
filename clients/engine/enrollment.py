"""Enrollment of this device's first profile with a one-time code (docs/protocol.md §10).

The client generates every key itself (the user identity key, the device signing and DH keys, a
signed prekey and `ONE_TIME_PREKEYS` one-time prekeys) and certifies the device with the identity
key; the relay only ever sees public keys. The relay answers with the user's certificate, the
clinic's issuing-key certificate and the clinic root key. Before anything is stored the answer is
checked completely: the issuing certificate against the root key, the user certificate against
the issuing certificate, and that the user certificate is for our identity key and username. The
clinic id and root key are then pinned in the profile: every peer is verified against them.

The Argon2id derivation of the storage key runs before the request, so a failure there cannot
waste the single-use code; the profile is written in one transaction only after the answer
verified, and removed again if that write fails.
"""

from __future__ import annotations

import base64
import binascii
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.http import HttpClient, parse_server_url, post_json
from medrelay.clients.engine.store import (
    Database,
    ProfileInfo,
    ProfileSecrets,
    Runner,
    Sealer,
    connect,
    create_schema_txn,
    database_path,
    profile_exists,
    write_enrollment_txn,
)
from medrelay.clients.engine.transparency import add_own_devices_txn
from medrelay.crypto.certificates import (
    ClinicKeyCertificate,
    ClinicKeyPurpose,
    DeviceCertificate,
    UserCertificate,
    issue_device_certificate,
    verify_clinic_key,
    verify_user,
)
from medrelay.crypto.errors import CryptoError
from medrelay.crypto.identity import DeviceIdentity, DeviceKeys, check_id
from medrelay.crypto.keys import DHPrivateKey, SigningKey, VerifyKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.sealing import KeyDerivationHeader, SealParams, new_key_derivation
from medrelay.crypto.sessions import InMemoryPrekeyStore
from medrelay.crypto.x3dh import generate_one_time_prekeys, generate_signed_prekey

ONE_TIME_PREKEYS: Final = 100
DEVICE_ID_BYTES: Final = 5
"""Eight base32 characters: short enough to read out, unique enough within one account."""
MAX_CODE_LENGTH: Final = 64
ENROLL_PATH: Final = "/v1/enroll"


def now_ms(clock: IReactorTime) -> int:
    return int(clock.seconds() * 1000)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: object, what: str) -> bytes:
    """Strict unpadded base64url (one text per value), else BAD_SERVER_ANSWER naming `what`."""
    if not isinstance(text, str) or len(text) > 16384:
        raise _bad_answer(f"{what} is missing or not text")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raise _bad_answer(f"{what} is not base64url") from None
    if b64url(data) != text:
        raise _bad_answer(f"{what} is not canonical unpadded base64url")
    return data


def _bad_answer(problem: str) -> ClientError:
    return ClientError(LocalCode.BAD_SERVER_ANSWER, f"the enrollment answer is invalid: {problem}")


def new_device_id(rng: Rng) -> str:
    return base64.b32encode(rng(DEVICE_ID_BYTES)).decode("ascii").lower()


@dataclass(frozen=True, slots=True)
class NewDevice:
    """Everything generated locally before the request."""

    identity_key: SigningKey
    device: DeviceKeys
    device_certificate: DeviceCertificate
    prekeys: InMemoryPrekeyStore

    def __repr__(self) -> str:
        return f"NewDevice({self.device.identity.user_id}/{self.device.identity.device_id})"


def generate_device(
    username: str, created_at_ms: int, rng: Rng, *, identity_key: SigningKey | None = None
) -> NewDevice:
    """Fresh device keys certified by `identity_key` (a new identity key by default)."""
    if identity_key is None:
        identity_key = SigningKey.generate(rng)
    signing_key = SigningKey.generate(rng)
    dh_key = DHPrivateKey.generate(rng)
    device_id = new_device_id(rng)
    certificate = issue_device_certificate(
        identity_key,
        user_id=username,
        device_id=device_id,
        signing_key=signing_key.verify_key,
        dh_key=dh_key.public_key,
        created_at_ms=created_at_ms,
    )
    identity = DeviceIdentity(
        user_id=username,
        device_id=device_id,
        signing_key=signing_key.verify_key,
        dh_key=dh_key.public_key,
        certificate_hash=certificate.hash(),
    )
    device = DeviceKeys(identity=identity, signing_key=signing_key, dh_key=dh_key)
    prekeys = InMemoryPrekeyStore()
    prekeys.add_signed_prekey(generate_signed_prekey(device, 1, created_at_ms, rng))
    prekeys.add_one_time_prekeys(generate_one_time_prekeys(1, ONE_TIME_PREKEYS, rng))
    return NewDevice(identity_key, device, certificate, prekeys)


def enrollment_request(new: NewDevice, username: str, code: str) -> dict[str, object]:
    """The JSON body of POST /v1/enroll."""
    signed = new.prekeys.current_signed_prekey
    assert signed is not None  # noqa: S101 (generate_device always adds one)
    return {
        "username": username,
        "code": code,
        "identity_key": new.identity_key.verify_key.to_text(),
        "device_certificate": b64url(new.device_certificate.encode()),
        "signed_prekey": b64url(signed.encode()),
        "one_time_prekeys": [b64url(r.encode()) for r in new.prekeys.one_time_prekey_records()],
    }


@dataclass(frozen=True, slots=True)
class VerifiedEnrollment:
    clinic_id: str
    root_key: VerifyKey
    issuing_certificate: ClinicKeyCertificate
    user_certificate: UserCertificate


def verify_enrollment_answer(
    answer: Any, *, username: str, device_id: str, identity_key: VerifyKey, at_ms: int
) -> VerifiedEnrollment:
    """Check the relay's answer completely; any failure is BAD_SERVER_ANSWER or PEER_UNVERIFIED
    naming the check."""
    if not isinstance(answer, dict):
        raise _bad_answer("not a JSON object")
    if answer.get("username") != username:
        raise _bad_answer("it names another user")
    if answer.get("device_id") != device_id:
        raise _bad_answer("it names another device")
    clinic_id = answer.get("clinic")
    if not isinstance(clinic_id, str):
        raise _bad_answer("clinic is missing")
    try:
        check_id(clinic_id, "clinic id")
        root_text = answer.get("root_key")
        if not isinstance(root_text, str):
            raise _bad_answer("root_key is missing")
        root_key = VerifyKey.from_text(root_text)
        issuing = ClinicKeyCertificate.decode(
            b64url_decode(answer.get("issuing_certificate"), "issuing_certificate")
        )
        user = UserCertificate.decode(
            b64url_decode(answer.get("user_certificate"), "user_certificate")
        )
    except (CryptoError, ValueError) as exc:
        raise _bad_answer(str(exc)) from None
    try:
        verify_clinic_key(root_key, issuing, ClinicKeyPurpose.ISSUING, at_ms)
        verify_user(issuing, user, at_ms)
    except CryptoError as exc:
        raise ClientError(
            LocalCode.PEER_UNVERIFIED, f"the clinic's certificates do not verify: {exc}"
        ) from None
    if issuing.clinic_id != clinic_id:
        raise ClientError(
            LocalCode.PEER_UNVERIFIED, "the issuing certificate belongs to another clinic"
        )
    if user.user_id != username:
        raise ClientError(LocalCode.PEER_UNVERIFIED, "the user certificate names another user")
    if user.identity_key != identity_key:
        raise ClientError(
            LocalCode.PEER_UNVERIFIED, "the user certificate certifies another identity key"
        )
    return VerifiedEnrollment(clinic_id, root_key, issuing, user)


def _check_arguments(username: str, code: str) -> None:
    try:
        check_id(username, "username")
    except (TypeError, ValueError) as exc:
        raise ClientError(LocalCode.INVALID_ARGUMENT, str(exc)) from None
    if not code.strip() or len(code) > MAX_CODE_LENGTH:
        raise ClientError(LocalCode.INVALID_ARGUMENT, "the enrollment code is empty or too long")


def enroll(
    *,
    profile_dir: Path,
    passphrase: str,
    server_url: str,
    username: str,
    code: str,
    http: HttpClient,
    clock: IReactorTime,
    rng: Rng,
    runner: Runner,
    seal_params: SealParams | None = None,
) -> Deferred[ProfileInfo]:
    """Enroll this device; fires with the new profile's `ProfileInfo`."""
    return Deferred.fromCoroutine(
        _enroll(
            profile_dir=profile_dir,
            passphrase=passphrase,
            server_url=server_url,
            username=username,
            code=code,
            http=http,
            clock=clock,
            rng=rng,
            runner=runner,
            seal_params=seal_params,
        )
    )


async def _enroll(
    *,
    profile_dir: Path,
    passphrase: str,
    server_url: str,
    username: str,
    code: str,
    http: HttpClient,
    clock: IReactorTime,
    rng: Rng,
    runner: Runner,
    seal_params: SealParams | None = None,
) -> ProfileInfo:
    server = parse_server_url(server_url)
    _check_arguments(username, code)
    if profile_exists(profile_dir):
        raise ClientError(
            LocalCode.ALREADY_ENROLLED,
            f"{profile_dir} already holds a profile; choose another --profile directory",
        )
    started_ms = now_ms(clock)
    new = generate_device(username, started_ms, rng)
    header, storage_key = await runner(lambda: new_key_derivation(passphrase, rng, seal_params))
    answer = await post_json(
        http, server.http(ENROLL_PATH), enrollment_request(new, username, code.strip())
    )
    finished_ms = now_ms(clock)
    verified = verify_enrollment_answer(
        answer,
        username=username,
        device_id=new.device.identity.device_id,
        identity_key=new.identity_key.verify_key,
        at_ms=finished_ms,
    )
    info = ProfileInfo(
        server_url=str(server),
        clinic_id=verified.clinic_id,
        root_key=verified.root_key,
        user_id=username,
        device_id=new.device.identity.device_id,
        issuing_certificate=verified.issuing_certificate,
        user_certificate=verified.user_certificate,
        device_certificate=new.device_certificate,
        enrolled_at_ms=finished_ms,
    )
    secrets = ProfileSecrets(identity_key=new.identity_key, device=new.device)
    await write_profile(
        profile_dir,
        runner,
        header=header,
        sealer=Sealer(storage_key, rng),
        info=info,
        secrets=secrets,
        prekeys=new.prekeys,
    )
    return info


async def write_profile(
    profile_dir: Path,
    runner: Runner,
    *,
    header: KeyDerivationHeader,
    sealer: Sealer,
    info: ProfileInfo,
    secrets: ProfileSecrets,
    prekeys: InMemoryPrekeyStore,
    own_devices: Collection[str] = (),
) -> None:
    """Write a new profile in one transaction (enrollment, or a linked device with the devices
    it may call its own); on any failure nothing of it is left on disk."""
    conn = await runner(lambda: connect(profile_dir, create=True))
    db = Database(conn, runner)

    def write(txn: sqlite3.Connection) -> None:
        create_schema_txn(txn, header)
        write_enrollment_txn(
            txn,
            sealer,
            info,
            secrets,
            prekeys,
            next_one_time_prekey_id=ONE_TIME_PREKEYS + 1,
            next_signed_prekey_id=2,
        )
        if own_devices:
            add_own_devices_txn(txn, info.device_id, own_devices)

    try:
        await db.run_interaction("write_profile", write)
    except BaseException:
        await db.close()
        _remove_database(profile_dir)
        raise
    await db.close()


def _remove_database(profile_dir: Path) -> None:
    path = database_path(profile_dir)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
