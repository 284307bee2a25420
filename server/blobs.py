"""Encrypted attachments (blobs): who may upload and download, ids, expiry (docs/protocol.md §11).

A blob is opaque ciphertext. Any authenticated device may upload one and may download any blob
whose id it knows: ids are 128 random bits (unpadded base64url, 22 characters), handed to the
recipients inside end-to-end encrypted content, so knowing an id is the capability. Blobs expire
with the envelope time-to-live; a periodic sweep deletes expired ones in bounded batches.

Authentication is the session token of the WebSocket login (`Authorization: Bearer`), checked
through the relay store (`RelayStore.get_session`, by the token's SHA-256 digest). Size limits
are enforced by the HTTP adapter before a body is buffered; `upload` checks again.
"""

from __future__ import annotations

import base64
import re
from typing import Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medrelay.crypto.rng import Rng
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import TOKEN_SIZE
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.service import token_digest
from medrelay.server.relay.store import DeviceRecord, RelayStore
from medrelay.server.storage import blobs
from medrelay.server.storage.database import Database
from medrelay.server.storage.errors import BlobExists

_log = Logger()

BLOB_ID_BYTES: Final = 16
BLOB_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{22}")
EXPIRY_BATCH: Final = 100
EXPIRY_ROUNDS: Final = 10
"""Batches per sweep: a sweep deletes at most EXPIRY_BATCH * EXPIRY_ROUNDS blobs."""


# Fresh instances per refusal: raising a shared exception instance grows its traceback.
def not_authenticated() -> RelayError:
    return RelayError(
        ErrorCode.NOT_AUTHENTICATED, "log in first and send the session token as a Bearer token"
    )


def token_invalid() -> RelayError:
    return RelayError(
        ErrorCode.TOKEN_INVALID, "the session token is unknown or expired; log in again"
    )


def not_found() -> RelayError:
    return RelayError(ErrorCode.NOT_FOUND, "no such attachment (or it has expired)")


def parse_bearer(header: bytes | None) -> bytes:
    """The session token of an `Authorization: Bearer <base64url>` header."""
    if header is None:
        raise not_authenticated()
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not value:
        raise not_authenticated()
    text = value.strip()
    if len(text) != 43:  # 32 bytes in unpadded base64url
        raise token_invalid()
    try:
        token = base64.urlsafe_b64decode(text + b"=")
    except ValueError:
        raise token_invalid() from None
    if len(token) != TOKEN_SIZE or base64.urlsafe_b64encode(token).rstrip(b"=") != text:
        raise token_invalid()
    return token


class BlobService(Service):
    """Upload, download and expiry of blobs."""

    def __init__(
        self,
        *,
        database: Database,
        store: RelayStore,
        clock: IReactorTime,
        rng: Rng,
        ttl_ms: int,
        max_size_bytes: int,
        expiry_interval_s: float = 60.0,
    ) -> None:
        self._database = database
        self._store = store
        self._clock = clock
        self._rng = rng
        self._ttl_ms = ttl_ms
        self.max_size_bytes = max_size_bytes
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = clock
        self._expiry_interval_s = expiry_interval_s

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def authenticate(self, token: bytes) -> Deferred[DeviceRecord]:
        """The device a session token belongs to; `token_invalid` when it is unknown, expired or
        its device revoked."""

        def check(device: DeviceRecord | None) -> DeviceRecord:
            if device is None:
                raise token_invalid()
            return device

        return self._store.get_session(token_digest(token), self.now_ms()).addCallback(check)

    def upload(self, device: DeviceRecord, data: bytes) -> Deferred[str]:
        """Store `data`; fires with the new blob id."""
        if len(data) > self.max_size_bytes:
            return fail(too_large(self.max_size_bytes))
        if not data:
            return fail(RelayError(ErrorCode.INVALID_FIELD, "body: an attachment cannot be empty"))
        return Deferred.fromCoroutine(self._upload(device, data))

    async def _upload(self, device: DeviceRecord, data: bytes) -> str:
        for _attempt in range(3):
            blob_id = base64.urlsafe_b64encode(self._rng(BLOB_ID_BYTES)).rstrip(b"=").decode()
            now_ms = self.now_ms()
            try:
                await self._database.run_interaction(
                    "put_blob",
                    blobs.put_blob_txn,
                    blob_id=blob_id,
                    owner_device_pk=device.pk,
                    data=data,
                    now_ms=now_ms,
                    expires_ms=now_ms + self._ttl_ms,
                )
            except BlobExists:
                continue  # 128 random bits collided: only a broken rng gets here twice
            return blob_id
        raise RelayError(ErrorCode.INTERNAL_ERROR, "could not choose a new attachment id")

    def download(self, device: DeviceRecord, blob_id: str) -> Deferred[bytes]:
        """The blob's bytes; `not_found` for an unknown, expired or malformed id."""
        if BLOB_ID_PATTERN.fullmatch(blob_id) is None:
            return fail(not_found())

        def found(row: blobs.BlobRow | None) -> bytes:
            if row is None:
                raise not_found()
            return row.data

        d = self._database.run_interaction("get_blob", blobs.get_blob_txn, blob_id, self.now_ms())
        return d.addCallback(found)

    # -- expiry ----------------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 (IService)
        super().startService()  # type: ignore[no-untyped-call]
        self._expiry.start(self._expiry_interval_s, now=False)

    def stopService(self) -> Deferred[object] | None:  # noqa: N802 (IService)
        super().stopService()  # type: ignore[no-untyped-call]
        if self._expiry.running:
            self._expiry.stop()
        return None

    def _expire(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._sweep()).addErrback(
            lambda f: _log.failure("expiring attachments failed", f)
        )

    async def _sweep(self) -> None:
        for _round in range(EXPIRY_ROUNDS):
            deleted = await self._database.run_interaction(
                "expire_blobs", blobs.expire_blobs_txn, self.now_ms(), batch=EXPIRY_BATCH
            )
            if deleted < EXPIRY_BATCH:
                return


def too_large(limit: int) -> RelayError:
    return RelayError(ErrorCode.PAYLOAD_TOO_LARGE, f"an attachment may be at most {limit} bytes")
