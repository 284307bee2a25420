"""Enrollment of a user's first device with a one-time code (docs/protocol.md §10).

`parse_enrollment_request` turns the JSON body into an `EnrollmentRequest`, checking every field
(an `invalid_field` error names the field). `EnrollmentService.enroll` then:

1. checks the request's own consistency, which needs no secret: the device certificate names the
   username and is signed by `identity_key`; the signed prekey names this device and is signed
   by its signing key; the one-time prekeys decode. A malformed request never costs an Argon2
   computation or an attempt on the account's code;
2. looks up the account's pending code and verifies the code (Argon2id in the `PasswordWorker`);
   an unknown username, a used or burned code, a wrong code and an expired code all get the
   same answer (`enrollment_failed`), and an unknown username still costs one Argon2
   verification, so timing does not tell them apart either. A wrong code counts against the
   account (`record_enrollment_failure_txn`; at `max_attempts` the code is burned);
3. issues the user certificate with the clinic issuing key and records everything with
   `complete_enrollment_txn`, which consumes the code in the same transaction, and appends the
   `user_certified` and `device_added` events to the transparency log in that transaction too:
   on any failure nothing is half-created, and of two concurrent enrollments with one code
   exactly one wins.

Enrollment codes: 12 characters of Crockford's base32 (60 random bits) shown as `XXXX-XXXX-XXXX`.
What is hashed is the normalised code (upper case, without dashes and spaces), so a code typed in
lower case or without dashes works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from medrelay.crypto.certificates import (
    DEVICE_CONTEXT,
    DeviceCertificate,
    Role,
    UserCertificate,
    issue_user_certificate,
    key_hash,
)
from medrelay.crypto.errors import BadSignature, CryptoError
from medrelay.crypto.identity import DeviceIdentity, check_id
from medrelay.crypto.keys import SigningKey, VerifyKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.transparency import EventKind
from medrelay.crypto.x3dh import SignedPrekey
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import (
    MAX_CERTIFICATE_SIZE,
)
from medrelay.server.audit import AuditAction, AuditResult, append_audit_txn
from medrelay.server.clinic import BACKDATE_MS, ClinicKeys, random_serial
from medrelay.server.config import EnrollmentSection
from medrelay.server.hashing import PasswordWorker
from medrelay.server.jsonbody import (
    b64url,
    decoded,
    invalid,
    key_text,
    one_time_prekeys,
    parse_object,
    signed_prekey,
)
from medrelay.server.metrics import RelayMetrics
from medrelay.server.relay.errors import RelayError
from medrelay.server.storage import accounts
from medrelay.server.storage.database import Database
from medrelay.server.storage.devices import DeviceRow
from medrelay.server.storage.errors import DeviceExists, EnrollmentConflict
from medrelay.server.storage.transparency import append_events_txn

_log = Logger()

MAX_ENROLLMENT_BODY: Final = 64 * 1024
MAX_CODE_CHARS: Final = 64
CODE_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
CODE_CHARS: Final = 12
CODE_GROUP: Final = 4
MAX_DISPLAY_NAME_CHARS: Final = 200
"""The accounts table's column widths (characters); the certificate limits are in bytes."""
MAX_PROFILE_FIELD_CHARS: Final = 200
CLIENT_ROLES: Final = (
    Role.DOCTOR,
    Role.NURSE,
    Role.PATIENT,
    Role.REGISTRAR,
    Role.ADMIN,
    Role.RECORDS,
)
"""Roles `admin add-user` creates; `records` is the clinic's records gateway account
(docs/records.md)."""

REFUSED_MESSAGE: Final = (
    "enrollment refused: the username or code is not valid, or the code has expired or "
    "was already used; ask the clinic for a new code"
)


def refused() -> RelayError:
    """The one answer to every refused code (a new instance each time: raising a shared
    exception instance would grow its traceback, and the frames it holds, with every raise)."""
    return RelayError(ErrorCode.ENROLLMENT_FAILED, REFUSED_MESSAGE)


_FIELDS: Final = (
    "username",
    "code",
    "identity_key",
    "device_certificate",
    "signed_prekey",
    "one_time_prekeys",
)


# --- codes --------------------------------------------------------------------------------------


def new_enrollment_code(rng: Rng) -> str:
    """A fresh code for display: `XXXX-XXXX-XXXX` (60 random bits)."""
    bits = int.from_bytes(rng(8), "big") >> (64 - 5 * CODE_CHARS)
    chars = [CODE_ALPHABET[(bits >> (5 * i)) & 31] for i in reversed(range(CODE_CHARS))]
    text = "".join(chars)
    return "-".join(text[i : i + CODE_GROUP] for i in range(0, CODE_CHARS, CODE_GROUP))


def normalize_code(code: str) -> str:
    """The form that is hashed: upper case, without the dashes and spaces people type."""
    return "".join(c for c in code.upper() if c not in "- \t")


# --- account profile checks (shared with `admin add-user`) --------------------------------------


def check_profile(
    username: str, role: Role, display_name: str, specialty: str | None, department: str | None
) -> None:
    """Refuse an account that could never receive a certificate (ValueError naming the field):
    the exact checks the certificate applies, plus the database's column widths."""
    check_id(username, "username")
    if username != username.strip():
        raise ValueError("username must not start or end with spaces")
    for value, limit, what in (
        (display_name, MAX_DISPLAY_NAME_CHARS, "display name"),
        (specialty or "", MAX_PROFILE_FIELD_CHARS, "specialty"),
        (department or "", MAX_PROFILE_FIELD_CHARS, "department"),
    ):
        if len(value) > limit:
            raise ValueError(f"{what} is longer than {limit} characters")
    # A throwaway certificate runs the certificate's own field checks (lengths in bytes,
    # control and bidirectional-formatting characters) so the two can never disagree.
    dummy = SigningKey(bytes(32))
    issue_user_certificate(
        dummy,
        user_id=username,
        role=role,
        display_name=display_name,
        specialty=specialty or "",
        department=department or "",
        identity_key=dummy.verify_key,
        not_before_ms=0,
        not_after_ms=1,
        serial=0,
    )


# --- the request --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnrollmentRequest:
    username: str
    code: str
    """Normalised (see `normalize_code`)."""
    identity_key: VerifyKey
    device_certificate: DeviceCertificate
    device_certificate_bytes: bytes
    signed_prekey: SignedPrekey
    signed_prekey_bytes: bytes
    one_time_prekeys: tuple[bytes, ...]

    def __repr__(self) -> str:
        return f"EnrollmentRequest(<{len(self.one_time_prekeys)} one-time prekeys>)"


def parse_enrollment_request(body: bytes) -> EnrollmentRequest:
    """The request of POST /v1/enroll, every field checked for shape (`invalid_field` naming
    the field). Signatures are checked by `EnrollmentService.check_request`."""
    document = parse_object(body, _FIELDS, max_bytes=MAX_ENROLLMENT_BODY)
    username = document["username"]
    if not isinstance(username, str):
        raise invalid("username", "must be a string")
    try:
        check_id(username, "username")
    except ValueError as exc:
        raise invalid("username", str(exc)) from None
    code = document["code"]
    if not isinstance(code, str) or not code.strip() or len(code) > MAX_CODE_CHARS:
        raise invalid("code", f"must be a string of 1 to {MAX_CODE_CHARS} characters")
    identity_key = key_text(
        document["identity_key"], "identity_key", VerifyKey.from_text, "an ed25519-v1: key"
    )
    device_certificate, cert_bytes = decoded(
        document["device_certificate"],
        "device_certificate",
        MAX_CERTIFICATE_SIZE,
        DeviceCertificate.decode,
    )
    spk, spk_bytes = signed_prekey(document["signed_prekey"])
    return EnrollmentRequest(
        username=username,
        code=normalize_code(code),
        identity_key=identity_key,
        device_certificate=device_certificate,
        device_certificate_bytes=cert_bytes,
        signed_prekey=spk,
        signed_prekey_bytes=spk_bytes,
        one_time_prekeys=one_time_prekeys(document["one_time_prekeys"]),
    )


def check_request(request: EnrollmentRequest) -> DeviceIdentity:
    """The checks that need no secret: the device certificate is this user's and signed by the
    identity key; the signed prekey is this device's and signed by its signing key."""
    cert = request.device_certificate
    if cert.user_id != request.username:
        raise invalid("device_certificate", "names another user")
    if cert.identity_key_hash != key_hash(request.identity_key):
        raise invalid("device_certificate", "is not certified by identity_key")
    try:
        request.identity_key.verify(DEVICE_CONTEXT + cert.tbs_bytes(), cert.signature)
    except BadSignature:
        raise invalid("device_certificate", "signature does not verify") from None
    identity = DeviceIdentity(
        user_id=cert.user_id,
        device_id=cert.device_id,
        signing_key=cert.signing_key,
        dh_key=cert.dh_key,
        certificate_hash=cert.hash(),
    )
    try:
        request.signed_prekey.verify(identity)
    except CryptoError as exc:
        raise invalid("signed_prekey", str(exc)) from None
    return identity


# --- the answer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnrollmentAnswer:
    username: str
    device_id: str
    clinic_id: str
    user_certificate: bytes
    issuing_certificate: bytes
    root_key: VerifyKey
    server_time_ms: int

    def to_json(self) -> dict[str, object]:
        """The body of the 200 answer (docs/protocol.md §10)."""
        return {
            "username": self.username,
            "device_id": self.device_id,
            "clinic": self.clinic_id,
            "user_certificate": b64url(self.user_certificate),
            "issuing_certificate": b64url(self.issuing_certificate),
            "root_key": self.root_key.to_text(),
            "server_time": self.server_time_ms,
        }


# --- the service --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lookup:
    pending: accounts.EnrollmentRow | None
    account: accounts.AccountRow | None


def _lookup_txn(conn: Connection, username: str) -> _Lookup:
    pending = accounts.get_pending_enrollment_txn(conn, username)
    account = accounts.get_account_txn(conn, username) if pending is not None else None
    return _Lookup(pending, account)


class EnrollmentService:
    """Checks enrollment requests and records the enrolled device."""

    def __init__(
        self,
        *,
        database: Database,
        keys: ClinicKeys,
        clock: IReactorTime,
        rng: Rng,
        worker: PasswordWorker,
        config: EnrollmentSection,
        metrics: RelayMetrics,
    ) -> None:
        self._database = database
        self._keys = keys
        self._clock = clock
        self._rng = rng
        self._worker = worker
        self._config = config
        self._metrics = metrics
        self._dummy_hash: str | None = None

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def enroll_body(self, body: bytes, request_id: str = "-") -> Deferred[EnrollmentAnswer]:
        """`enroll` for the raw JSON body of POST /v1/enroll (a malformed body is refused, and
        counted, like any other refusal)."""
        try:
            request = parse_enrollment_request(body)
        except RelayError as exc:
            self._metrics.enrollments.labels("refused").inc()
            return fail(exc)
        return self.enroll(request, request_id)

    def enroll(
        self, request: EnrollmentRequest, request_id: str = "-"
    ) -> Deferred[EnrollmentAnswer]:
        """Enroll the device of `request`; fails with a `RelayError` (invalid_field,
        enrollment_failed, rate_limited) or a storage error (server_busy)."""
        d = Deferred.fromCoroutine(self._enroll(request, request_id))

        def count(result: object) -> object:
            outcome = "enrolled" if isinstance(result, EnrollmentAnswer) else "refused"
            self._metrics.enrollments.labels(outcome).inc()
            return result

        return d.addBoth(count)

    async def _enroll(self, request: EnrollmentRequest, request_id: str) -> EnrollmentAnswer:
        identity = check_request(request)
        found = await self._database.run_interaction(
            "enrollment_lookup", _lookup_txn, request.username
        )
        pending, account = found.pending, found.account
        if pending is None or account is None:
            await self._dummy_verify(request.code)
            _log.info("enrollment {request_id} refused: no pending code", request_id=request_id)
            raise refused()
        matches = await self._worker.verify(pending.code_hash, request.code)
        if not matches:
            attempts = await self._database.run_interaction(
                "enrollment_failure",
                _failure_txn,
                pending.account_id,
                request.username,
                max_attempts=self._config.max_attempts,
                now_ms=self.now_ms(),
            )
            _log.info(
                "enrollment {request_id} refused: wrong code (attempt {attempts} of {max})",
                request_id=request_id,
                attempts=attempts,
                max=self._config.max_attempts,
            )
            raise refused()
        now_ms = self.now_ms()
        if pending.expires_ms <= now_ms:
            _log.info("enrollment {request_id} refused: expired code", request_id=request_id)
            raise refused()
        certificate = self._issue(request, account, now_ms)
        try:
            await self._database.run_interaction(
                "complete_enrollment",
                _complete_txn,
                account_id=pending.account_id,
                request=request,
                user_certificate=certificate.encode(),
                now_ms=now_ms,
            )
        except (EnrollmentConflict, DeviceExists):
            _log.info("enrollment {request_id} refused: code used meanwhile", request_id=request_id)
            raise refused() from None
        _log.info("enrollment {request_id} completed", request_id=request_id)
        return EnrollmentAnswer(
            username=request.username,
            device_id=identity.device_id,
            clinic_id=self._keys.clinic_id,
            user_certificate=certificate.encode(),
            issuing_certificate=self._keys.issuing_certificate.encode(),
            root_key=self._keys.root_key,
            server_time_ms=now_ms,
        )

    def _issue(
        self, request: EnrollmentRequest, account: accounts.AccountRow, now_ms: int
    ) -> UserCertificate:
        validity_ms = self._config.certificate_validity_days * 24 * 3600 * 1000
        not_after = min(now_ms + validity_ms, self._keys.issuing_certificate.not_after_ms)
        return issue_user_certificate(
            self._keys.issuing_key,
            user_id=request.username,
            role=Role(account.role),
            display_name=account.display_name,
            specialty=account.specialty or "",
            department=account.department or "",
            identity_key=request.identity_key,
            not_before_ms=max(0, now_ms - BACKDATE_MS),
            not_after_ms=not_after,
            serial=random_serial(self._rng),
        )

    async def _dummy_verify(self, code: str) -> None:
        """Spend what a real verification would, so an unknown username answers as slowly as
        a wrong code."""
        if self._dummy_hash is None:
            self._dummy_hash = await self._worker.hash(b64url(self._rng(16)), self._rng)
            return  # hashing cost the same as verifying
        await self._worker.verify(self._dummy_hash, code)


def _failure_txn(
    conn: Connection, account_id: int, username: str, *, max_attempts: int, now_ms: int
) -> int:
    attempts = accounts.record_enrollment_failure_txn(conn, account_id, max_attempts=max_attempts)
    append_audit_txn(
        conn,
        actor=username,
        action=AuditAction.ENROLL,
        target=username,
        result=AuditResult.REFUSED,
        now_ms=now_ms,
        detail=f"wrong code (attempt {attempts} of {max_attempts})",
    )
    return attempts


def _complete_txn(
    conn: Connection,
    *,
    account_id: int,
    request: EnrollmentRequest,
    user_certificate: bytes,
    now_ms: int,
) -> DeviceRow:
    cert = request.device_certificate
    device = accounts.complete_enrollment_txn(
        conn,
        account_id=account_id,
        identity_key=request.identity_key.encode(),
        user_certificate=user_certificate,
        device_id=cert.device_id,
        device_certificate=request.device_certificate_bytes,
        signing_key=cert.signing_key.raw,
        signed_prekey=request.signed_prekey_bytes,
        one_time_prekeys=request.one_time_prekeys,
        now_ms=now_ms,
    )
    # In the same transaction: a certificate the server hands out is always in the log.
    append_events_txn(
        conn,
        request.username,
        [
            (EventKind.USER_CERTIFIED, user_certificate),
            (EventKind.DEVICE_ADDED, request.device_certificate_bytes),
        ],
        now_ms,
    )
    append_audit_txn(
        conn,
        actor=request.username,
        action=AuditAction.ENROLL,
        target=f"{request.username}/{cert.device_id}",
        result=AuditResult.OK,
        now_ms=now_ms,
    )
    return device
