"""Revoking a device or a whole account (a doctor leaves the clinic, a phone is lost).

`revoke_device_txn` / `revoke_account_txn` do everything in one transaction: the device (or the
account and all its devices) stops being active, its sessions and prekeys are deleted, a
revocation signed by the clinic issuing key is appended to the transparency log (so every client
stops encrypting to it, and can prove why), and the action is audited.

The serving process learns of a revocation made by another process (an admin command) from the
log itself: `RevocationWatcher` polls the log's head, a one-row read, every quarter second, and
closes the live connections of what the new revocation events name. So a revoked device is
disconnected within a second, its next login and session resume are refused (the device is no
longer active), and messages already queued for it are purged in bounded batches by the relay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medrelay.crypto.identity import check_id
from medrelay.crypto.transparency import EventKind, LogEvent, Revocation, issue_revocation
from medrelay.protocol.errors import ErrorCode
from medrelay.server.audit import AuditAction, AuditResult, append_audit_txn
from medrelay.server.clinic import ClinicKeys
from medrelay.server.relay.service import RelayService
from medrelay.server.storage import devices as device_store
from medrelay.server.storage import transparency as log_store
from medrelay.server.storage.accounts import get_account_txn
from medrelay.server.storage.chains import read_chain_head_txn
from medrelay.server.storage.database import Database
from medrelay.server.storage.schema import accounts, devices, log_entries

_log = Logger()

WATCH_INTERVAL_S: Final = 0.25
RECENT_S: Final = 10.0
REVOKED_MESSAGE: Final = "this device was revoked by the clinic"
_REVOCATION_KINDS: Final = (EventKind.DEVICE_REVOKED.value, EventKind.USER_REVOKED.value)


class RevocationError(Exception):
    """The revocation cannot be done; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Revoked:
    username: str
    device_ids: tuple[str, ...]
    """The devices this revocation made inactive."""
    logged: bool
    """Whether a revocation event was appended (an account that never enrolled has none)."""


def _check_names(*names: str) -> None:
    """Refuse what can never be a username or device id (it could not be audited either)."""
    for name in names:
        try:
            check_id(name, "name")
        except ValueError as exc:
            raise RevocationError(
                f"{name[:64]!r} is not a valid username or device id ({exc})"
            ) from None


def revoke_device_txn(
    conn: Connection,
    *,
    keys: ClinicKeys,
    username: str,
    device_id: str,
    actor: str,
    now_ms: int,
) -> Revoked:
    _check_names(username, device_id)
    device = device_store.get_device_txn(conn, username, device_id)
    if device is None or device.revoked:
        append_audit_txn(
            conn,
            actor=actor,
            action=AuditAction.DEVICE_REVOKE,
            target=f"{username}/{device_id}",
            result=AuditResult.REFUSED,
            now_ms=now_ms,
            detail="no such active device",
        )
        raise RevocationError(f"{username} has no active device {device_id}")
    device_store.revoke_device_txn(conn, device.pk, now_ms=now_ms)
    _log_and_audit_txn(
        conn, keys=keys, username=username, device_id=device_id, actor=actor, now_ms=now_ms
    )
    return Revoked(username, (device_id,), logged=True)


def _log_and_audit_txn(
    conn: Connection,
    *,
    keys: ClinicKeys,
    username: str,
    device_id: str,
    actor: str,
    now_ms: int,
    logged: bool = True,
) -> None:
    """The clinic-signed revocation into the identity log (device_id "" for the whole
    account), and the audit record, in the revocation's own transaction."""
    if logged:
        revocation = issue_revocation(
            keys.issuing_key, user_id=username, device_id=device_id, revoked_at_ms=now_ms
        )
        log_store.append_log_event_txn(
            conn,
            kind=EventKind.DEVICE_REVOKED if device_id else EventKind.USER_REVOKED,
            subject=username,
            payload=revocation.encode(),
            now_ms=now_ms,
        )
    append_audit_txn(
        conn,
        actor=actor,
        action=AuditAction.DEVICE_REVOKE if device_id else AuditAction.ACCOUNT_REVOKE,
        target=f"{username}/{device_id}" if device_id else username,
        result=AuditResult.OK,
        now_ms=now_ms,
    )


def revoke_account_txn(
    conn: Connection, *, keys: ClinicKeys, username: str, actor: str, now_ms: int
) -> Revoked:
    _check_names(username)
    account = get_account_txn(conn, username)
    if account is None or not account.active:
        append_audit_txn(
            conn,
            actor=actor,
            action=AuditAction.ACCOUNT_REVOKE,
            target=username,
            result=AuditResult.REFUSED,
            now_ms=now_ms,
            detail="no such active account",
        )
        raise RevocationError(f"there is no active account {username}")
    names = dict(
        conn.execute(
            sa.select(devices.c.pk, devices.c.device_id).where(
                devices.c.account_pk == account.pk, devices.c.revoked_at.is_(None)
            )
        ).all()
    )
    revoked = device_store.revoke_account_txn(conn, account.pk, now_ms=now_ms)
    # An account that never enrolled has no certificate, so nothing about it is in the log.
    logged = account.enrolled
    _log_and_audit_txn(
        conn, keys=keys, username=username, device_id="", actor=actor, now_ms=now_ms, logged=logged
    )
    return Revoked(username, tuple(sorted(names[pk] for pk in revoked)), logged=logged)


# --- the serving process: close what was revoked ----------------------------------------


def revoked_device_pks_txn(conn: Connection, *, after: int) -> tuple[int, list[int]]:
    """Leaves after index `after`: (the new log size, the pks of devices their revocation
    events name)."""
    size = read_chain_head_txn(conn, log_store.TRANSPARENCY_CHAIN).size
    if size <= after:
        return size, []
    events = conn.execute(
        sa.select(log_entries.c.event).where(
            log_entries.c.leaf_index >= after, log_entries.c.kind.in_(_REVOCATION_KINDS)
        )
    ).scalars()
    pks: list[int] = []
    for data in events:
        event = LogEvent.decode(bytes(data))
        revocation = Revocation.decode(event.payload)
        query = (
            sa.select(devices.c.pk)
            .join(accounts, accounts.c.pk == devices.c.account_pk)
            .where(accounts.c.username == revocation.user_id)
        )
        if revocation.device_id:
            query = query.where(devices.c.device_id == revocation.device_id)
        pks.extend(int(pk) for pk in conn.execute(query).scalars())
    return size, pks


class RevocationWatcher(Service):
    """Closes the live connections of devices revoked by any process, within a second."""

    def __init__(
        self,
        *,
        database: Database,
        relay: RelayService,
        clock: IReactorTime,
        interval_s: float = WATCH_INTERVAL_S,
    ) -> None:
        self._database = database
        self._relay = relay
        self._interval_s = interval_s
        self._clock = clock
        self._seen: int | None = None
        # Devices revoked in the last few seconds, closed again at every poll: a login that
        # read the device as active just before the revocation committed may register its
        # connection after the poll that saw the revocation.
        self._recent: dict[int, float] = {}
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def startService(self) -> None:  # noqa: N802 (Twisted's IService name)
        super().startService()  # type: ignore[no-untyped-call]
        self._loop.start(self._interval_s, now=True)

    def stopService(self) -> Deferred[None]:  # noqa: N802 (Twisted's IService name)
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
        return succeed(None)

    def check(self) -> Deferred[None]:
        """One poll; a failure is logged and the next poll tries again."""
        return Deferred.fromCoroutine(self._check()).addErrback(
            lambda failure: _log.failure("revocation watcher: poll failed", failure)
        )

    async def _check(self) -> None:
        if self._seen is None:
            # Start from the current head: connections opened from now on are of devices that
            # are active now (logins check it), so older revocations need no action.
            head = await self._database.run_interaction(
                "revocations_head", read_chain_head_txn, log_store.TRANSPARENCY_CHAIN
            )
            self._seen = head.size
            return
        size, pks = await self._database.run_interaction(
            "revocations", revoked_device_pks_txn, after=self._seen
        )
        self._seen = size
        now = self._clock.seconds()
        for pk in pks:
            self._recent[pk] = now
        self._recent = {pk: at for pk, at in self._recent.items() if now - at < RECENT_S}
        close(self._relay, list(self._recent))


def close(relay: RelayService, device_pks: Sequence[int]) -> None:
    for pk in device_pks:
        relay.disconnect_device(pk, ErrorCode.DEVICE_REVOKED, REVOKED_MESSAGE)
