"""Linking a further device to an account from one of its enrolled devices (docs/protocol.md
§16; the cryptography is `medrelay.crypto.linking`).

E is the existing device (logged in: its requests carry its session token), N the new one (its
requests carry the link code, then the secret `join` handed it). The server only relays: E's
commitment and key to N, N's keys to E, and E's encrypted payload to N; and at the end it adds
N's device, but only with a device certificate signed by the account's identity key, which the
clinic never holds.

    E: create {commitment}                       -> code              WAITING
    N: join (code)                               -> secret, username  CLAIMED
    N: device {ephemeral key, device keys, prekeys}                   JOINED
    E: status (polls)                            <- N's keys
    E: reveal {ephemeral key} (checked against the commitment)        REVEALED
    N: peer (polls)                              <- E's key: both show the digits
    N: confirm (its user said yes)                                    CONFIRMED
    E: status (polls; its user said yes)         <- confirmed
    E: complete {device certificate, payload}    -> one transaction   COMPLETING -> COMPLETED
    N: peer (polls)                              <- the payload
    either: cancel                                                    CANCELLED

Rules of this file:

- Sessions live in memory only: a restart aborts the links in progress (the user starts again).
  Every session is bounded: at most `MAX_OPEN_LINKS` at once (a device's new link replaces its
  previous one), each expiring `LINK_TTL_S` after it was created, each holding at most one
  message per slot (N's keys, E's key, the payload) of at most `MAX_LINK_BODY` bytes (the HTTP
  adapter refuses a larger body before buffering it). Expired sessions are dropped lazily, on
  the next request.
- Every state change is a row of `TRANSITIONS`; `_move` refuses anything else.
- `complete` checks, in the ONE transaction that adds the device with its prekeys, appends
  `device_added` to the identity log and audits `device_link`: that E's device is still active,
  that the account is active, and that the certificate names this user and N's keys exactly and
  is signed by the account's CURRENT identity key. A refusal changes nothing but a `refused`
  audit record, written in a transaction of its own.
- Answers and refusals never say whether a code exists to someone who is not its party: an
  unknown, expired, used or foreign code is always the same `not_found`.

Guessing codes. A code is 40 random bits, single use, and lives 10 minutes; only `join` takes a
bare code (N's later requests carry the 256-bit secret `join` handed out, so N's polling cannot
be used to test codes). Failed joins (an unknown, expired or already used code) are counted over
a sliding window of `LINK_TTL_S` for the whole server; past `MAX_FAILED_JOINS` in the window every
join is refused with `rate_limited`, whatever its code, so an answer tells a guesser nothing.
With at most 64 open codes a guesser then wins with probability about 64 * 100 / 2^40 (6e-9) per
window, and a win only shows the real user digits that match nothing on the new device. A
guesser can pause linking for everyone for a few minutes; it can never weaken it. Counting per
source address would spare other users that pause, but addresses are shared (NAT, a reverse
proxy) and we keep none in memory.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from medrelay.crypto.certificates import DEVICE_CONTEXT, DeviceCertificate, key_hash
from medrelay.crypto.errors import BadSignature
from medrelay.crypto.identity import check_id
from medrelay.crypto.kdf import constant_time_equal, sha256
from medrelay.crypto.keys import DHPublicKey, VerifyKey
from medrelay.crypto.linking import (
    COMMITMENT_SIZE,
    MAX_SEALED_PAYLOAD,
    check_commitment,
    display_code,
    new_link_code,
    normalize_link_code,
)
from medrelay.crypto.rng import Rng
from medrelay.crypto.transparency import EventKind
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import (
    MAX_CERTIFICATE_SIZE,
    MAX_DEVICES_PER_USER,
    TOKEN_SIZE,
)
from medrelay.server.audit import AuditAction, AuditResult, append_audit_txn
from medrelay.server.blobs import parse_bearer, token_invalid
from medrelay.server.jsonbody import (
    b64url,
    b64url_decode,
    decoded,
    fields_of,
    invalid,
    key_text,
    one_time_prekeys,
    parse_object,
    signed_prekey,
)
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.service import token_digest
from medrelay.server.relay.store import DeviceRecord, RelayStore
from medrelay.server.storage import accounts
from medrelay.server.storage import devices as device_store
from medrelay.server.storage.database import Database
from medrelay.server.storage.errors import DeviceExists
from medrelay.server.storage.transparency import append_events_txn

_log = Logger()

_T = TypeVar("_T")

LINK_TTL_S: Final = 600
MAX_OPEN_LINKS: Final = 64
MAX_FAILED_JOINS: Final = 100
MAX_LINK_BODY: Final = 32 * 1024
"""The largest body of any link request (N's keys with 200 one-time prekeys take ~14 KiB)."""
_KEY_TEXT: Final = "a key in its text form"


class LinkState(enum.Enum):
    WAITING = "waiting"
    """E created the link; nobody has used the code."""
    CLAIMED = "claimed"
    """N used the code (it holds the secret) and has not sent its keys yet."""
    JOINED = "joined"
    """N's keys are here: E may reveal its key."""
    REVEALED = "revealed"
    """E's key is here: both sides compute and show the digits."""
    CONFIRMED = "confirmed"
    """N's user confirmed the digits: E completes once its own user has too. (E's answer is
    what protects the account; N's only spares it a device its user turned down.)"""
    COMPLETING = "completing"
    """E confirmed; the device is being added (shown to clients as `confirmed`)."""
    COMPLETED = "completed"
    """The device is added; N fetches the payload."""
    CANCELLED = "cancelled"
    """Either side gave up (refused digits, Ctrl-C); kept until expiry so the other sees it."""


class LinkStep(enum.Enum):
    JOIN = "join"
    DEVICE = "device"
    REVEAL = "reveal"
    CONFIRM = "confirm"
    COMPLETE = "complete"
    COMMITTED = "committed"
    REFUSED = "refused"
    """`complete` was refused or failed: nothing was added and E may try again."""
    CANCEL = "cancel"


TRANSITIONS: Final[dict[tuple[LinkState, LinkStep], LinkState]] = {
    (LinkState.WAITING, LinkStep.JOIN): LinkState.CLAIMED,
    (LinkState.CLAIMED, LinkStep.DEVICE): LinkState.JOINED,
    (LinkState.JOINED, LinkStep.REVEAL): LinkState.REVEALED,
    (LinkState.REVEALED, LinkStep.CONFIRM): LinkState.CONFIRMED,
    (LinkState.CONFIRMED, LinkStep.COMPLETE): LinkState.COMPLETING,
    (LinkState.COMPLETING, LinkStep.COMMITTED): LinkState.COMPLETED,
    (LinkState.COMPLETING, LinkStep.REFUSED): LinkState.CONFIRMED,
    (LinkState.WAITING, LinkStep.CANCEL): LinkState.CANCELLED,
    (LinkState.CLAIMED, LinkStep.CANCEL): LinkState.CANCELLED,
    (LinkState.JOINED, LinkStep.CANCEL): LinkState.CANCELLED,
    (LinkState.REVEALED, LinkStep.CANCEL): LinkState.CANCELLED,
    (LinkState.CONFIRMED, LinkStep.CANCEL): LinkState.CANCELLED,
}
"""(state, step) -> next state: every change a session can make."""

_SHOWN_AS: Final = {LinkState.COMPLETING: LinkState.CONFIRMED}
_REVEALED: Final = frozenset(
    {LinkState.REVEALED, LinkState.CONFIRMED, LinkState.COMPLETING, LinkState.COMPLETED}
)
_PEER_KEYS_VISIBLE: Final = _REVEALED | {LinkState.JOINED}


# --- errors (fresh instances: a shared one would grow its traceback with every raise) ----------


def not_found() -> RelayError:
    return RelayError(
        ErrorCode.NOT_FOUND,
        "no device link with this code is in progress: it expired (links last 10 minutes), "
        "was cancelled or already used; start again on your existing device",
    )


def too_many_failures() -> RelayError:
    return RelayError(
        ErrorCode.RATE_LIMITED,
        "too many wrong link codes were tried on this server recently; wait a few minutes "
        "and try again",
    )


def _refused(message: str) -> RelayError:
    return RelayError(ErrorCode.FORBIDDEN, message)


# --- sessions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewDevice:
    """What N sent: its ephemeral key, its device keys and its prekeys (checked)."""

    ephemeral_key: DHPublicKey
    device_id: str
    signing_key: VerifyKey
    dh_key: DHPublicKey
    signed_prekey: bytes
    one_time_prekeys: tuple[bytes, ...]

    def __repr__(self) -> str:
        return f"NewDevice({self.device_id})"

    def keys_json(self) -> dict[str, object]:
        return {
            "device_id": self.device_id,
            "signing_key": self.signing_key.to_text(),
            "dh_key": self.dh_key.to_text(),
        }


@dataclass(slots=True)
class LinkSession:
    code: str
    owner_pk: int
    owner_device: str
    username: str
    commitment: bytes
    created_ms: int
    expires_ms: int
    state: LinkState = LinkState.WAITING
    secret_digest: bytes | None = None
    new_device: NewDevice | None = None
    existing_key: DHPublicKey | None = None
    payload: bytes | None = None

    def __repr__(self) -> str:
        return f"LinkSession({self.state.value})"

    @property
    def shown_state(self) -> str:
        return _SHOWN_AS.get(self.state, self.state).value


def _move(session: LinkSession, step: LinkStep) -> None:
    """Apply `step`, or refuse it (`unexpected_message`) when the table has no such row."""
    target = TRANSITIONS.get((session.state, step))
    if target is None:
        raise _unexpected(session)
    session.state = target


def _unexpected(session: LinkSession) -> RelayError:
    if session.state is LinkState.CANCELLED:
        return RelayError(
            ErrorCode.UNEXPECTED_MESSAGE,
            "this device link was cancelled on the other device; nothing was linked",
        )
    return RelayError(
        ErrorCode.UNEXPECTED_MESSAGE,
        f"this device link cannot take that step now (it is {session.shown_state})",
    )


# --- request bodies -----------------------------------------------------------------------------


def _body(body: bytes, fields: Sequence[str]) -> dict[str, Any]:
    """A link request's body: a JSON object with exactly `fields` (empty counts as `{}`)."""
    return parse_object(body, fields, max_bytes=MAX_LINK_BODY, empty_is_object=True)


def parse_new_device(body: bytes, username: str) -> NewDevice:
    """N's keys; its signed prekey must name this account and device and be signed by the
    device's signing key (so what E certifies is a device that can be reached)."""
    document = _body(body, ("ephemeral_key", "device", "signed_prekey", "one_time_prekeys"))
    ephemeral = key_text(
        document["ephemeral_key"], "ephemeral_key", DHPublicKey.from_text, _KEY_TEXT
    )
    device = fields_of(document["device"], ("device_id", "signing_key", "dh_key"), "device")
    device_id = device["device_id"]
    if not isinstance(device_id, str):
        raise invalid("device.device_id", "must be a string")
    try:
        check_id(device_id, "device id")
    except ValueError as exc:
        raise invalid("device.device_id", str(exc)) from None
    signing_key = key_text(
        device["signing_key"], "device.signing_key", VerifyKey.from_text, _KEY_TEXT
    )
    dh_key = key_text(device["dh_key"], "device.dh_key", DHPublicKey.from_text, _KEY_TEXT)
    spk, spk_bytes = signed_prekey(document["signed_prekey"])
    if (spk.user_id, spk.device_id) != (username, device_id):
        raise invalid("signed_prekey", "names another user or device")
    try:
        signing_key.verify(spk.signed_bytes(), spk.signature)
    except BadSignature:
        raise invalid("signed_prekey", "is not signed by the device's signing key") from None
    one_time = one_time_prekeys(document["one_time_prekeys"])
    return NewDevice(ephemeral, device_id, signing_key, dh_key, spk_bytes, one_time)


# --- the service --------------------------------------------------------------------------------


class LinkService:
    """The link sessions of one server process, and the transaction that adds a linked device."""

    def __init__(
        self,
        *,
        database: Database,
        store: RelayStore,
        clock: IReactorTime,
        rng: Rng,
        ttl_s: int = LINK_TTL_S,
        max_open: int = MAX_OPEN_LINKS,
        max_failed_joins: int = MAX_FAILED_JOINS,
    ) -> None:
        self._database = database
        self._store = store
        self._clock = clock
        self._rng = rng
        self._ttl_ms = ttl_s * 1000
        self._max_open = max_open
        self._max_failed_joins = max_failed_joins
        self._sessions: dict[str, LinkSession] = {}
        self._failed_joins: deque[int] = deque()

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    @property
    def open_links(self) -> int:
        self._purge()
        return len(self._sessions)

    # -- E: the existing device ------------------------------------------------------------

    def create(self, authorization: bytes | None, body: bytes) -> Deferred[dict[str, object]]:
        """POST /v1/link: a new link from the device of `authorization`."""
        return _run(self._create(authorization, body))

    async def _create(self, authorization: bytes | None, body: bytes) -> dict[str, object]:
        document = _body(body, ("commitment",))
        commitment = b64url_decode(document["commitment"], "commitment", COMMITMENT_SIZE)
        if len(commitment) != COMMITMENT_SIZE:
            raise invalid("commitment", f"must be {COMMITMENT_SIZE} bytes")
        device = await self._device(authorization)
        self._purge()
        # One link per device: starting again replaces the previous one.
        for code, session in list(self._sessions.items()):
            if session.owner_pk == device.pk and session.state is not LinkState.COMPLETING:
                del self._sessions[code]
        if len(self._sessions) >= self._max_open:
            raise RelayError(
                ErrorCode.RATE_LIMITED,
                "too many device links are in progress on this server; try again in a few minutes",
            )
        code = new_link_code(self._rng)
        while code in self._sessions:  # 40 bits among at most 64 codes: practically never
            code = new_link_code(self._rng)
        now = self.now_ms()
        session = LinkSession(
            code=code,
            owner_pk=device.pk,
            owner_device=device.device_id,
            username=device.username,
            commitment=commitment,
            created_ms=now,
            expires_ms=now + self._ttl_ms,
        )
        self._sessions[code] = session
        _log.info("device link started")
        return {"code": display_code(code), "expires": session.expires_ms}

    def status(self, authorization: bytes | None, code: str) -> Deferred[dict[str, object]]:
        """GET /v1/link/{code}: what E polls until N's keys arrive."""
        return _run(self._status(authorization, code))

    async def _status(self, authorization: bytes | None, code: str) -> dict[str, object]:
        session = await self._owned(authorization, code)
        answer: dict[str, object] = {"state": session.shown_state, "expires": session.expires_ms}
        new = session.new_device
        if session.state in _PEER_KEYS_VISIBLE and new is not None:
            answer["ephemeral_key"] = new.ephemeral_key.to_text()
            answer["device"] = new.keys_json()
        return answer

    def reveal(
        self, authorization: bytes | None, code: str, body: bytes
    ) -> Deferred[dict[str, object]]:
        """POST /v1/link/{code}/reveal: E's ephemeral key, checked against its commitment."""
        return _run(self._reveal(authorization, code, body))

    async def _reveal(
        self, authorization: bytes | None, code: str, body: bytes
    ) -> dict[str, object]:
        document = _body(body, ("ephemeral_key",))
        key = key_text(document["ephemeral_key"], "ephemeral_key", DHPublicKey.from_text, _KEY_TEXT)
        session = await self._owned(authorization, code)
        if not check_commitment(session.commitment, key):
            raise invalid("ephemeral_key", "does not match the commitment this link began with")
        _move(session, LinkStep.REVEAL)
        session.existing_key = key
        return {"state": session.shown_state}

    def complete(
        self, authorization: bytes | None, code: str, body: bytes
    ) -> Deferred[dict[str, object]]:
        """POST /v1/link/{code}/complete: add N's device, certified by the identity key."""
        return _run(self._complete(authorization, code, body))

    async def _complete(
        self, authorization: bytes | None, code: str, body: bytes
    ) -> dict[str, object]:
        document = _body(body, ("device_certificate", "payload"))
        certificate, cert_bytes = decoded(
            document["device_certificate"],
            "device_certificate",
            MAX_CERTIFICATE_SIZE,
            DeviceCertificate.decode,
        )
        payload = b64url_decode(document["payload"], "payload", MAX_SEALED_PAYLOAD)
        session = await self._owned(authorization, code)
        new = session.new_device
        if session.state is not LinkState.CONFIRMED or new is None:
            raise _unexpected(session)
        if (certificate.device_id, certificate.signing_key, certificate.dh_key) != (
            new.device_id,
            new.signing_key,
            new.dh_key,
        ):
            raise invalid("device_certificate", "does not certify the keys the new device sent")
        _move(session, LinkStep.COMPLETE)
        now = self.now_ms()
        try:
            await self._database.run_interaction(
                "link_device",
                _complete_txn,
                username=session.username,
                owner_pk=session.owner_pk,
                certificate=certificate,
                certificate_bytes=cert_bytes,
                new=new,
                now_ms=now,
            )
        except RelayError as exc:
            _move(session, LinkStep.REFUSED)
            _log.info("device link refused: {reason}", reason=exc.code.value)
            if exc.code is ErrorCode.FORBIDDEN:
                await self._database.run_interaction(
                    "link_device_refused",
                    _refused_txn,
                    username=session.username,
                    device_id=new.device_id,
                    reason=exc.message,
                    now_ms=now,
                )
            raise
        except BaseException:
            _move(session, LinkStep.REFUSED)
            raise
        _move(session, LinkStep.COMMITTED)
        session.payload = payload
        _log.info("device link completed")
        return {"state": session.shown_state, "device_id": new.device_id, "time": now}

    # -- N: the new device -----------------------------------------------------------------

    def join(self, code: str, body: bytes) -> Deferred[dict[str, object]]:
        """POST /v1/link/{code}/join: claim the code (once); answers the secret for N's later
        requests, the account and E's commitment."""
        return _run(self._join(code, body))

    async def _join(self, code: str, body: bytes) -> dict[str, object]:
        _body(body, ())
        now = self.now_ms()
        self._purge()
        window = self._failed_joins
        while window and window[0] <= now - self._ttl_ms:
            window.popleft()
        if len(window) >= self._max_failed_joins:
            raise too_many_failures()
        session = self._find(code)
        if session is None or session.state is not LinkState.WAITING:
            window.append(now)
            raise not_found()
        secret = self._rng(TOKEN_SIZE)
        _move(session, LinkStep.JOIN)
        session.secret_digest = sha256(secret)
        return {
            "secret": b64url(secret),
            "username": session.username,
            "commitment": b64url(session.commitment),
            "expires": session.expires_ms,
        }

    def submit_device(
        self, authorization: bytes | None, code: str, body: bytes
    ) -> Deferred[dict[str, object]]:
        """POST /v1/link/{code}/device: N's ephemeral key, device keys and prekeys."""
        return _run(self._submit_device(authorization, code, body))

    async def _submit_device(
        self, authorization: bytes | None, code: str, body: bytes
    ) -> dict[str, object]:
        session = self._joined(authorization, code)
        new = parse_new_device(body, session.username)
        _move(session, LinkStep.DEVICE)
        session.new_device = new
        return {"state": session.shown_state, "expires": session.expires_ms}

    def confirm(self, authorization: bytes | None, code: str) -> Deferred[dict[str, object]]:
        """POST /v1/link/{code}/confirm: N's user compared the digits and said yes."""
        return _run(self._confirm(authorization, code))

    async def _confirm(self, authorization: bytes | None, code: str) -> dict[str, object]:
        session = self._joined(authorization, code)
        _move(session, LinkStep.CONFIRM)
        return {"state": session.shown_state}

    def peer(self, authorization: bytes | None, code: str) -> Deferred[dict[str, object]]:
        """GET /v1/link/{code}/peer: what N polls (E's key, then the payload)."""
        return _run(self._peer(authorization, code))

    async def _peer(self, authorization: bytes | None, code: str) -> dict[str, object]:
        session = self._joined(authorization, code)
        answer: dict[str, object] = {"state": session.shown_state, "expires": session.expires_ms}
        if session.state in _REVEALED and session.existing_key is not None:
            answer["ephemeral_key"] = session.existing_key.to_text()
        if session.state is LinkState.COMPLETED and session.payload is not None:
            answer["payload"] = b64url(session.payload)
        return answer

    # -- either ----------------------------------------------------------------------------

    def cancel(self, authorization: bytes | None, code: str) -> Deferred[dict[str, object]]:
        """POST /v1/link/{code}/cancel, by N (its secret) or E (its session token)."""
        return _run(self._cancel(authorization, code))

    async def _cancel(self, authorization: bytes | None, code: str) -> dict[str, object]:
        try:
            session = self._joined(authorization, code)
        except RelayError:
            session = await self._owned(authorization, code)
        _move(session, LinkStep.CANCEL)
        _log.info("device link cancelled")
        return {"state": session.shown_state}

    # -- lookups ---------------------------------------------------------------------------

    def _purge(self) -> None:
        now = self.now_ms()
        for code, session in list(self._sessions.items()):
            if session.expires_ms <= now and session.state is not LinkState.COMPLETING:
                del self._sessions[code]

    def _find(self, code: str) -> LinkSession | None:
        try:
            normalized = normalize_link_code(code)
        except ValueError:
            return None
        session = self._sessions.get(normalized)
        if session is None:
            return None
        if session.expires_ms <= self.now_ms() and session.state is not LinkState.COMPLETING:
            del self._sessions[normalized]
            return None
        return session

    async def _device(self, authorization: bytes | None) -> DeviceRecord:
        token = parse_bearer(authorization)
        device = await self._store.get_session(token_digest(token), self.now_ms())
        if device is None:
            raise token_invalid()
        return device

    async def _owned(self, authorization: bytes | None, code: str) -> LinkSession:
        """The session `code` if the token's device started it; otherwise not_found."""
        device = await self._device(authorization)
        session = self._find(code)
        if session is None or session.owner_pk != device.pk:
            raise not_found()
        return session

    def _joined(self, authorization: bytes | None, code: str) -> LinkSession:
        """The session `code` if `authorization` carries the secret its `join` handed out."""
        secret = parse_bearer(authorization)
        session = self._find(code)
        if (
            session is None
            or session.secret_digest is None
            or not constant_time_equal(sha256(secret), session.secret_digest)
        ):
            raise not_found()
        return session


def _run(coroutine: Coroutine[Any, Any, _T]) -> Deferred[_T]:
    return Deferred.fromCoroutine(coroutine)


# --- the transaction ----------------------------------------------------------------------------


def _complete_txn(
    conn: Connection,
    *,
    username: str,
    owner_pk: int,
    certificate: DeviceCertificate,
    certificate_bytes: bytes,
    new: NewDevice,
    now_ms: int,
) -> device_store.DeviceRow:
    owner = device_store.get_device_by_pk_txn(conn, owner_pk)
    if owner is None or owner.revoked:
        raise token_invalid()
    account = accounts.get_account_txn(conn, username)
    if account is None or not account.active or account.identity_key is None:
        raise _refused(f"the account {username} is closed")
    if certificate.user_id != username:
        raise _refused("the device certificate names another user")
    identity_key = VerifyKey.decode(account.identity_key)
    if certificate.identity_key_hash != key_hash(identity_key):
        raise _refused(
            f"the device certificate is not signed by the current identity key of {username}: "
            "only one of the account's own devices can link a device"
        )
    try:
        identity_key.verify(DEVICE_CONTEXT + certificate.tbs_bytes(), certificate.signature)
    except BadSignature:
        raise _refused(
            f"the device certificate's signature does not verify with the identity key of "
            f"{username}: only one of the account's own devices can link a device"
        ) from None
    if len(device_store.list_devices_txn(conn, username)) >= MAX_DEVICES_PER_USER:
        raise _refused(
            f"the account {username} already has {MAX_DEVICES_PER_USER} devices; revoke one "
            "before linking another"
        )
    try:
        device = device_store.add_device_txn(
            conn,
            account_id=account.pk,
            device_id=new.device_id,
            certificate=certificate_bytes,
            signing_key=new.signing_key.raw,
            signed_prekey=new.signed_prekey,
            one_time_prekeys=new.one_time_prekeys,
            now_ms=now_ms,
        )
    except DeviceExists:
        raise _refused(
            f"the account {username} already has a device {new.device_id}; start the link again"
        ) from None
    # In the same transaction: a device the server serves is always in the log.
    append_events_txn(conn, username, [(EventKind.DEVICE_ADDED, certificate_bytes)], now_ms)
    append_audit_txn(
        conn,
        actor=username,
        action=AuditAction.DEVICE_LINK,
        target=f"{username}/{new.device_id}",
        result=AuditResult.OK,
        now_ms=now_ms,
        detail=f"from={owner.device_id}",
    )
    return device


def _refused_txn(
    conn: Connection, *, username: str, device_id: str, reason: str, now_ms: int
) -> None:
    append_audit_txn(
        conn,
        actor=username,
        action=AuditAction.DEVICE_LINK,
        target=f"{username}/{device_id}",
        result=AuditResult.REFUSED,
        now_ms=now_ms,
        detail=reason[:200],
    )
