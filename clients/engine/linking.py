"""Linking a further device to an account (docs/protocol.md §16): both sides of the flow.

`ExistingDevice` runs on the existing device E (an open profile, logged in), `join_link` on the
new device N (nothing yet but the server URL and the code E shows). The cryptography is
`medrelay.crypto.linking`; the relay only carries messages and may lie, which the digits the
user compares on both screens expose:

    E: create {commitment to EK_E}          -> code, shown to the user
    N: join (code)                          -> secret, username, E's commitment
    N: device {EK_N, device keys, prekeys}
    E: polls status until N's keys arrive, then reveals EK_E
    N: polls peer for EK_E, checks it against the commitment
    both: show the digits; the user compares and confirms on both devices
    N: confirm (its user said yes)
    E: once its own user said yes and N confirmed: certifies N's device with the identity key,
       records it as its own, and completes with the payload (identity key, certificates,
       clinic, own devices) encrypted for N
    N: polls peer for the payload, verifies the chain, writes its profile exactly as an
       enrollment does and records E's own devices as its own

Either side that gives up (the user answers no, an error, Ctrl-C) cancels the link, so the other
side stops at once instead of at the 10-minute expiry. The device is added only once the user
said yes on both screens: E's yes is what protects the account (a relay could fake N's), N's
spares the account a device its user turned down.

A front end drives the flow through `LinkUi`: it shows the code (E), progress lines, and asks the
user to compare the digits (`confirm`, a Deferred so a front end may ask without blocking).
"""

from __future__ import annotations

import base64
import binascii
import sqlite3
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from medrelay.clients.engine.enrollment import (
    ONE_TIME_PREKEYS,
    b64url,
    new_device_id,
    now_ms,
    verify_enrollment_answer,
    write_profile,
)
from medrelay.clients.engine.errors import ClientError, LocalCode, RemoteError
from medrelay.clients.engine.http import (
    HttpClient,
    ServerUrl,
    json_answer,
    parse_server_url,
    post_json,
)
from medrelay.clients.engine.store import (
    OpenProfile,
    ProfileInfo,
    ProfileSecrets,
    Runner,
    Sealer,
    profile_exists,
)
from medrelay.clients.engine.transparency import add_own_devices_txn, load_own_devices_txn
from medrelay.crypto.certificates import issue_device_certificate, verify_device
from medrelay.crypto.errors import CryptoError
from medrelay.crypto.identity import DeviceIdentity, DeviceKeys, check_id
from medrelay.crypto.keys import DHPrivateKey, DHPublicKey, SigningKey, VerifyKey
from medrelay.crypto.linking import (
    MAX_OWN_DEVICES,
    MAX_SEALED_PAYLOAD,
    LinkPayload,
    LinkSecrets,
    LinkTranscript,
    check_commitment,
    commitment,
    derive_link_secrets,
    display_code,
    format_sas,
    normalize_link_code,
    open_payload,
    seal_payload,
)
from medrelay.crypto.rng import Rng
from medrelay.crypto.sealing import SealParams, new_key_derivation
from medrelay.crypto.sessions import InMemoryPrekeyStore
from medrelay.crypto.x3dh import generate_one_time_prekeys, generate_signed_prekey
from medrelay.protocol.errors import ErrorCode

_log = Logger()

LINK_PATH: Final = "/v1/link"
POLL_INTERVAL_S: Final = 1.0
EXPIRY_SLACK_MS: Final = 60_000
"""How long past the announced expiry a side keeps polling a server that has not said so."""
_STATES: Final = frozenset(
    {"waiting", "claimed", "joined", "revealed", "confirmed", "completed", "cancelled"}
)


# --- what a front end sees ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkCode:
    """The code E shows, and how to use it on the new device."""

    code: str
    """As shown: XXXX-XXXX."""
    expires_ms: int
    server_url: str

    @property
    def command(self) -> str:
        return f"medrelay link {self.server_url} {self.code}"


@dataclass(frozen=True, slots=True)
class LinkCheck:
    """What both screens show; the user compares `sas`."""

    sas: str
    """Six digits (`display` groups them)."""
    username: str
    device_id: str
    """The new device."""

    @property
    def display(self) -> str:
        return format_sas(self.sas)


@dataclass(frozen=True, slots=True)
class LinkResult:
    """A device linked from this one."""

    username: str
    device_id: str
    sas: str


class LinkUi(Protocol):
    def show_code(self, code: LinkCode) -> None:
        """E only: show the code and the command to type on the new device."""
        ...

    def status(self, text: str) -> None:
        """A progress line (waiting for the other device, ...)."""
        ...

    def confirm(self, check: LinkCheck) -> Deferred[bool]:
        """Ask whether both screens show `check.display`; True only for an explicit yes."""
        ...


# --- HTTP helpers -------------------------------------------------------------------------------


def _bad_answer(problem: str) -> ClientError:
    return ClientError(
        LocalCode.BAD_SERVER_ANSWER, f"the server's link answer is invalid: {problem}"
    )


def _refused(message: str) -> ClientError:
    return ClientError(LocalCode.LINK_REFUSED, message)


def _get_json(http: HttpClient, url: str, headers: Mapping[str, str]) -> Deferred[Any]:
    return http.request("GET", url, headers=headers).addCallback(json_answer)


def _object(answer: object) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise _bad_answer("not a JSON object")
    return answer


def _text(answer: Mapping[str, Any], key: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise _bad_answer(f"{key} is missing")
    return value


def _int(answer: Mapping[str, Any], key: str) -> int:
    value = answer.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad_answer(f"{key} is missing")
    return value


def _bytes(answer: Mapping[str, Any], key: str, max_bytes: int) -> bytes:
    """Strict unpadded base64url, bounded before decoding."""
    text = answer.get(key)
    if not isinstance(text, str) or not text or len(text) > (max_bytes * 4 + 2) // 3:
        raise _bad_answer(f"{key} is missing or too long")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raise _bad_answer(f"{key} is not base64url") from None
    if b64url(data) != text:
        raise _bad_answer(f"{key} is not canonical unpadded base64url")
    return data


def _key(text: str, parse: Callable[[str], Any], what: str) -> Any:
    try:
        return parse(text)
    except CryptoError as exc:
        raise _bad_answer(f"{what}: {exc}") from None


async def _poll(
    http: HttpClient,
    clock: IReactorTime,
    url: str,
    headers: Mapping[str, str],
    *,
    ready: Collection[str],
    expires_ms: int,
    poll_s: float,
) -> dict[str, Any]:
    """Poll a link state until it is one of `ready`; a cancelled link is LINK_REFUSED and an
    expired one fails (the server says `not_found`; a server that never says fails here)."""
    while True:
        answer = _object(await _get_json(http, url, headers))
        state = answer.get("state")
        if state not in _STATES:
            raise _bad_answer("unknown state")
        if state in ready:
            return answer
        if state == "cancelled":
            raise _refused("the link was cancelled on the other device; nothing was linked")
        if now_ms(clock) > expires_ms + EXPIRY_SLACK_MS:
            raise ClientError(LocalCode.TIMEOUT, "the link expired; start again")
        await deferLater(clock, poll_s)


async def _step(
    http: HttpClient, base: str, action: str, body: object, headers: Mapping[str, str]
) -> Any:
    """POST one step of the link. A refusal because the link is no longer where this side left
    it (`unexpected_message`) most often means the other side cancelled: say so plainly."""
    try:
        return await post_json(http, f"{base}/{action}", body, headers)
    except RemoteError as exc:
        if exc.code is not ErrorCode.UNEXPECTED_MESSAGE or "cancelled" not in exc.message:
            raise
    raise _refused("the link was cancelled on the other device; nothing was linked")


async def _cancel_quietly(http: HttpClient, url: str, headers: Mapping[str, str]) -> None:
    """Tell the other side we gave up (best effort: the link expires anyway)."""
    try:
        await post_json(http, url, {}, headers)
    except Exception as exc:  # the caller's own error is what the user needs to see
        _log.info("cancelling a device link failed: {error}", error=type(exc).__name__)


# --- E: the existing device ---------------------------------------------------------------------


class ExistingDevice:
    """E's side of one link: `run(ui)` links a new device to this profile's account and
    returns it once the relay added it. `login` connects (and stores a session token), `tokens`
    loads the stored token, `forget_token` drops a token the server refused."""

    def __init__(
        self,
        *,
        profile: OpenProfile,
        http: HttpClient,
        server: ServerUrl,
        clock: IReactorTime,
        rng: Rng,
        login: Callable[[], Deferred[None]],
        tokens: Callable[[], Deferred[bytes | None]],
        forget_token: Callable[[], Deferred[None]],
        poll_s: float = POLL_INTERVAL_S,
    ) -> None:
        self._profile = profile
        self._http = http
        self._server = server
        self._clock = clock
        self._rng = rng
        self._login = login
        self._tokens = tokens
        self._forget_token = forget_token
        self._poll_s = poll_s

    async def _authorization(self) -> dict[str, str]:
        token = await self._tokens()
        if token is None:
            await self._login()
            token = await self._tokens()
        if token is None:
            raise ClientError(LocalCode.CONNECTION_LOST, "no session with the server")
        return {"Authorization": f"Bearer {b64url(token)}"}

    async def _create(self, ephemeral: DHPrivateKey) -> tuple[dict[str, str], dict[str, Any]]:
        body = {"commitment": b64url(commitment(ephemeral.public_key))}
        url = self._server.http(LINK_PATH)
        headers = await self._authorization()
        try:
            return headers, _object(await post_json(self._http, url, body, headers))
        except RemoteError as exc:
            if exc.code is not ErrorCode.TOKEN_INVALID:
                raise
        # The stored token is no longer known to the server: log in afresh, once.
        await self._forget_token()
        headers = await self._authorization()
        return headers, _object(await post_json(self._http, url, body, headers))

    async def run(self, ui: LinkUi) -> LinkResult:
        info = self._profile.info
        ephemeral = DHPrivateKey.generate(self._rng)
        headers, created = await self._create(ephemeral)
        try:
            code = normalize_link_code(_text(created, "code"))
        except ValueError:
            raise _bad_answer("code is not a link code") from None
        expires_ms = _int(created, "expires")
        ui.show_code(LinkCode(display_code(code), expires_ms, info.server_url))
        base = self._server.http(f"{LINK_PATH}/{code}")
        linked = False
        try:
            ui.status("waiting for the new device to join")
            joined = await _poll(
                self._http,
                self._clock,
                base,
                headers,
                ready=("joined",),
                expires_ms=expires_ms,
                poll_s=self._poll_s,
            )
            new_key, device_id, signing_key, dh_key = _joined_device(joined)
            reveal = {"ephemeral_key": ephemeral.public_key.to_text()}
            await _step(self._http, base, "reveal", reveal, headers)
            transcript = LinkTranscript(
                code, info.user_id, ephemeral.public_key, new_key, device_id, signing_key, dh_key
            )
            secrets = derive_link_secrets(ephemeral, transcript)
            if not await ui.confirm(LinkCheck(secrets.sas, info.user_id, device_id)):
                raise _refused("the link was refused on this device; nothing was linked")
            ui.status("waiting for the new device to confirm too")
            await _poll(
                self._http,
                self._clock,
                base,
                headers,
                ready=("confirmed",),
                expires_ms=expires_ms,
                poll_s=self._poll_s,
            )
            sealed, payload = await self._payload(secrets, transcript, signing_key, dh_key)
            ui.status("adding the new device")
            body = {
                "device_certificate": b64url(payload.device_certificate.encode()),
                "payload": b64url(sealed),
            }
            await _step(self._http, base, "complete", body, headers)
            linked = True
        except GeneratorExit:
            raise
        except BaseException:
            if not linked:
                await _cancel_quietly(self._http, f"{base}/cancel", headers)
            raise
        return LinkResult(info.user_id, device_id, secrets.sas)

    async def _payload(
        self,
        secrets: LinkSecrets,
        transcript: LinkTranscript,
        signing_key: VerifyKey,
        dh_key: DHPublicKey,
    ) -> tuple[bytes, LinkPayload]:
        profile = self._profile
        info = profile.info
        certificate = issue_device_certificate(
            profile.secrets.identity_key,
            user_id=info.user_id,
            device_id=transcript.device_id,
            signing_key=signing_key,
            dh_key=dh_key,
            created_at_ms=now_ms(self._clock),
        )
        # Recorded before the relay adds it: a crash in between must not make this device
        # warn later about a device its own user confirmed.
        known = await profile.db.run_interaction(
            "link_own_devices", _record_own_txn, info.device_id, transcript.device_id
        )
        payload = LinkPayload(
            identity_key=profile.secrets.identity_key,
            user_certificate=info.user_certificate,
            issuing_certificate=info.issuing_certificate,
            device_certificate=certificate,
            clinic_id=info.clinic_id,
            root_key=info.root_key,
            server_url=info.server_url,
            own_devices=known,
        )
        return seal_payload(secrets, transcript, payload, self._rng), payload


def _record_own_txn(conn: sqlite3.Connection, own_device: str, new_device: str) -> tuple[str, ...]:
    add_own_devices_txn(conn, own_device, [new_device])
    others = sorted(load_own_devices_txn(conn, own_device) - {own_device, new_device})
    return (own_device, new_device, *others)[:MAX_OWN_DEVICES]


def _joined_device(answer: Mapping[str, Any]) -> tuple[DHPublicKey, str, VerifyKey, DHPublicKey]:
    ephemeral = _key(_text(answer, "ephemeral_key"), DHPublicKey.from_text, "ephemeral_key")
    device = _object(answer.get("device"))
    device_id = _text(device, "device_id")
    try:
        check_id(device_id, "device id")
    except ValueError as exc:
        raise _bad_answer(str(exc)) from None
    signing_key = _key(_text(device, "signing_key"), VerifyKey.from_text, "signing_key")
    dh_key = _key(_text(device, "dh_key"), DHPublicKey.from_text, "dh_key")
    return ephemeral, device_id, signing_key, dh_key


# --- N: the new device --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _NewKeys:
    device_id: str
    signing_key: SigningKey
    dh_key: DHPrivateKey
    prekeys: InMemoryPrekeyStore

    def __repr__(self) -> str:
        return f"_NewKeys({self.device_id})"


def _new_keys(username: str, created_at_ms: int, rng: Rng) -> _NewKeys:
    signing_key = SigningKey.generate(rng)
    dh_key = DHPrivateKey.generate(rng)
    device_id = new_device_id(rng)
    # The device certificate comes from E at the end; a signed prekey names only the user, the
    # device and its signing key, so a provisional identity (no certificate hash yet) signs it.
    provisional = DeviceIdentity(
        user_id=username,
        device_id=device_id,
        signing_key=signing_key.verify_key,
        dh_key=dh_key.public_key,
        certificate_hash=bytes(32),
    )
    device = DeviceKeys(identity=provisional, signing_key=signing_key, dh_key=dh_key)
    prekeys = InMemoryPrekeyStore()
    prekeys.add_signed_prekey(generate_signed_prekey(device, 1, created_at_ms, rng))
    prekeys.add_one_time_prekeys(generate_one_time_prekeys(1, ONE_TIME_PREKEYS, rng))
    return _NewKeys(device_id, signing_key, dh_key, prekeys)


def _device_body(keys: _NewKeys, ephemeral: DHPrivateKey) -> dict[str, object]:
    signed = keys.prekeys.current_signed_prekey
    assert signed is not None  # noqa: S101 (_new_keys always adds one)
    return {
        "ephemeral_key": ephemeral.public_key.to_text(),
        "device": {
            "device_id": keys.device_id,
            "signing_key": keys.signing_key.verify_key.to_text(),
            "dh_key": keys.dh_key.public_key.to_text(),
        },
        "signed_prekey": b64url(signed.encode()),
        "one_time_prekeys": [b64url(r.encode()) for r in keys.prekeys.one_time_prekey_records()],
    }


def join_link(
    *,
    profile_dir: Path,
    passphrase: str,
    server_url: str,
    code: str,
    http: HttpClient,
    clock: IReactorTime,
    rng: Rng,
    runner: Runner,
    ui: LinkUi,
    seal_params: SealParams | None = None,
    poll_s: float = POLL_INTERVAL_S,
) -> Deferred[ProfileInfo]:
    """Become a device of the account whose device shows `code`; fires with the new profile's
    `ProfileInfo` once it is written."""
    return Deferred.fromCoroutine(
        _join(
            profile_dir=profile_dir,
            passphrase=passphrase,
            server_url=server_url,
            code=code,
            http=http,
            clock=clock,
            rng=rng,
            runner=runner,
            ui=ui,
            seal_params=seal_params,
            poll_s=poll_s,
        )
    )


async def _join(
    *,
    profile_dir: Path,
    passphrase: str,
    server_url: str,
    code: str,
    http: HttpClient,
    clock: IReactorTime,
    rng: Rng,
    runner: Runner,
    ui: LinkUi,
    seal_params: SealParams | None,
    poll_s: float,
) -> ProfileInfo:
    server = parse_server_url(server_url)
    try:
        normalized = normalize_link_code(code)
    except ValueError as exc:
        raise ClientError(LocalCode.INVALID_ARGUMENT, str(exc)) from None
    if profile_exists(profile_dir):
        raise ClientError(
            LocalCode.ALREADY_ENROLLED,
            f"{profile_dir} already holds a profile; choose another --profile directory",
        )
    # Argon2id before the code is used: a failure here cannot waste it.
    header, storage_key = await runner(lambda: new_key_derivation(passphrase, rng, seal_params))
    base = server.http(f"{LINK_PATH}/{normalized}")
    joined = _object(await post_json(http, f"{base}/join", {}))
    username = _text(joined, "username")
    try:
        check_id(username, "username")
    except ValueError as exc:
        raise _bad_answer(str(exc)) from None
    secret = _bytes(joined, "secret", 32)
    committed = _bytes(joined, "commitment", 32)
    expires_ms = _int(joined, "expires")
    headers = {"Authorization": f"Bearer {b64url(secret)}"}
    completed = False
    try:
        keys = _new_keys(username, now_ms(clock), rng)
        ephemeral = DHPrivateKey.generate(rng)
        await post_json(http, f"{base}/device", _device_body(keys, ephemeral), headers)
        ui.status(f"joined the link of {username}; waiting for the existing device")
        revealed = await _poll(
            http,
            clock,
            f"{base}/peer",
            headers,
            ready=("revealed",),
            expires_ms=expires_ms,
            poll_s=poll_s,
        )
        existing = _key(_text(revealed, "ephemeral_key"), DHPublicKey.from_text, "ephemeral_key")
        if not check_commitment(committed, existing):
            raise ClientError(
                LocalCode.PEER_UNVERIFIED,
                "SECURITY WARNING: the existing device's key does not match the commitment it "
                "made; the server may be interfering with this link. Nothing was linked",
            )
        transcript = LinkTranscript(
            normalized,
            username,
            existing,
            ephemeral.public_key,
            keys.device_id,
            keys.signing_key.verify_key,
            keys.dh_key.public_key,
        )
        secrets = derive_link_secrets(ephemeral, transcript)
        if not await ui.confirm(LinkCheck(secrets.sas, username, keys.device_id)):
            raise _refused("the link was refused on this device; nothing was linked")
        await _step(http, base, "confirm", {}, headers)
        ui.status("waiting for the existing device to confirm")
        done = await _poll(
            http,
            clock,
            f"{base}/peer",
            headers,
            ready=("completed",),
            expires_ms=expires_ms,
            poll_s=poll_s,
        )
        completed = True
        payload = _open(secrets, transcript, done, keys.device_id)
        info, profile_secrets = _verify(payload, server, username, keys, now_ms(clock))
        await write_profile(
            profile_dir,
            runner,
            header=header,
            sealer=Sealer(storage_key, rng),
            info=info,
            secrets=profile_secrets,
            prekeys=keys.prekeys,
            own_devices=payload.own_devices,
        )
    except GeneratorExit:
        raise
    except BaseException:
        if not completed:
            await _cancel_quietly(http, f"{base}/cancel", headers)
        raise
    return info


def _after_completion(device_id: str, problem: str) -> ClientError:
    return ClientError(
        LocalCode.PEER_UNVERIFIED,
        f"{problem}. The server added device {device_id} to the account, but this device could "
        "not take it over: revoke it from your existing device (or ask clinic IT)",
    )


def _open(
    secrets: LinkSecrets, transcript: LinkTranscript, answer: Mapping[str, Any], device_id: str
) -> LinkPayload:
    try:
        sealed = _bytes(answer, "payload", MAX_SEALED_PAYLOAD)
        return open_payload(secrets, transcript, sealed)
    except (ClientError, CryptoError) as exc:
        raise _after_completion(
            device_id, f"the keys from the existing device do not decrypt or parse ({exc})"
        ) from None


def _verify(
    payload: LinkPayload, server: ServerUrl, username: str, keys: _NewKeys, at_ms: int
) -> tuple[ProfileInfo, ProfileSecrets]:
    """Check the chain as an enrollment answer is checked (root -> issuing key -> user
    certificate for this identity key), then that the device certificate certifies exactly this
    device's keys with that identity key."""
    try:
        verified = verify_enrollment_answer(
            {
                "username": username,
                "device_id": keys.device_id,
                "clinic": payload.clinic_id,
                "root_key": payload.root_key.to_text(),
                "issuing_certificate": b64url(payload.issuing_certificate.encode()),
                "user_certificate": b64url(payload.user_certificate.encode()),
            },
            username=username,
            device_id=keys.device_id,
            identity_key=payload.identity_key.verify_key,
            at_ms=at_ms,
        )
        identity = verify_device(verified.user_certificate, payload.device_certificate)
    except (ClientError, CryptoError) as exc:
        problem = exc.message if isinstance(exc, ClientError) else str(exc)
        raise _after_completion(
            keys.device_id, f"the transferred keys do not verify: {problem}"
        ) from None
    if (identity.device_id, identity.signing_key, identity.dh_key) != (
        keys.device_id,
        keys.signing_key.verify_key,
        keys.dh_key.public_key,
    ):
        raise _after_completion(
            keys.device_id, "the existing device certified other keys than this device's"
        )
    info = ProfileInfo(
        server_url=str(server),
        clinic_id=verified.clinic_id,
        root_key=verified.root_key,
        user_id=username,
        device_id=keys.device_id,
        issuing_certificate=verified.issuing_certificate,
        user_certificate=verified.user_certificate,
        device_certificate=payload.device_certificate,
        enrolled_at_ms=at_ms,
    )
    device = DeviceKeys(identity=identity, signing_key=keys.signing_key, dh_key=keys.dh_key)
    return info, ProfileSecrets(identity_key=payload.identity_key, device=device)
