"""Store functions for devices and their session tokens.

A device belongs to one account and is named by a device id unique within it. It is *active* while
neither it nor its account is revoked; only active devices receive messages, appear in device
sets and bundles, and can hold sessions. Sessions are keyed by the SHA-256 digest of the token, so
the database never holds a usable token.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from medrelay.server.storage.errors import DeviceExists
from medrelay.server.storage.prekeys import add_one_time_prekeys_txn, set_signed_prekey_txn
from medrelay.server.storage.schema import (
    accounts,
    devices,
    enrollment_codes,
    one_time_prekeys,
    sessions,
    signed_prekeys,
)


@dataclass(frozen=True)
class DeviceRow:
    """A device as authentication and addressing need it."""

    pk: int
    account_id: int
    username: str
    role: str
    """The account's role (policy decisions need it with every authenticated device)."""
    device_id: str
    certificate: bytes
    signing_key: bytes
    """Raw 32-byte Ed25519 public key that verifies the device's `auth` signatures."""
    created_ms: int
    revoked: bool
    """The device, or its whole account, is revoked."""


_DEVICE_COLUMNS = (
    devices.c.pk,
    devices.c.account_pk,
    accounts.c.username,
    accounts.c.role,
    devices.c.device_id,
    devices.c.certificate,
    devices.c.signing_key,
    devices.c.created_at,
    devices.c.revoked_at,
    accounts.c.status,
)
_DEVICES_WITH_ACCOUNT = devices.join(accounts, devices.c.account_pk == accounts.c.pk)


def _active() -> sa.ColumnElement[bool]:
    return sa.and_(devices.c.revoked_at.is_(None), accounts.c.status == "active")


def device_row(row: Row[tuple[object, ...]]) -> DeviceRow:
    """A `DeviceRow` from a result row selected with the columns of `select_devices()`."""
    m = row._mapping
    return DeviceRow(
        pk=int(m[devices.c.pk]),
        account_id=int(m[devices.c.account_pk]),
        username=str(m[accounts.c.username]),
        role=str(m[accounts.c.role]),
        device_id=str(m[devices.c.device_id]),
        certificate=bytes(m[devices.c.certificate]),
        signing_key=bytes(m[devices.c.signing_key]),
        created_ms=int(m[devices.c.created_at]),
        revoked=m[devices.c.revoked_at] is not None or m[accounts.c.status] != "active",
    )


def select_devices() -> sa.Select[tuple[object, ...]]:
    """SELECT of everything a `DeviceRow` needs (devices joined with their accounts)."""
    return sa.select(*_DEVICE_COLUMNS).select_from(_DEVICES_WITH_ACCOUNT)


def get_device_txn(conn: Connection, username: str, device_id: str) -> DeviceRow | None:
    """The device `device_id` of `username`, revoked or not (check `revoked`); None if unknown."""
    row = conn.execute(
        select_devices().where(accounts.c.username == username, devices.c.device_id == device_id)
    ).first()
    return device_row(row) if row is not None else None


def get_device_by_pk_txn(conn: Connection, device_pk: int) -> DeviceRow | None:
    """The device with this primary key, revoked or not; None if unknown."""
    row = conn.execute(select_devices().where(devices.c.pk == device_pk)).first()
    return device_row(row) if row is not None else None


def list_devices_txn(conn: Connection, username: str) -> list[DeviceRow]:
    """The active devices of `username`, in enrollment order (empty for an unknown or revoked
    account)."""
    rows = conn.execute(
        select_devices().where(accounts.c.username == username, _active()).order_by(devices.c.pk)
    ).all()
    return [device_row(row) for row in rows]


def add_device_txn(
    conn: Connection,
    *,
    account_id: int,
    device_id: str,
    certificate: bytes,
    signing_key: bytes,
    signed_prekey: bytes,
    one_time_prekeys: Sequence[bytes],
    now_ms: int,
) -> DeviceRow:
    """Add a further device of an enrolled account with its signed prekey and one-time prekeys
    (device linking). Raises `DeviceExists` when the account already has this device id, before
    anything is written. The caller checks the certificate and runs this in the transaction that
    also logs the device, so the device and its log event commit together."""
    taken = conn.execute(
        sa.select(devices.c.pk).where(
            devices.c.account_pk == account_id, devices.c.device_id == device_id
        )
    ).first()
    if taken is not None:
        raise DeviceExists("the account already has a device with this id")
    device_pk = conn.execute(
        sa.insert(devices)
        .values(
            account_pk=account_id,
            device_id=device_id,
            certificate=certificate,
            signing_key=signing_key,
            created_at=now_ms,
            revoked_at=None,
            queued_count=0,
        )
        .returning(devices.c.pk)
    ).scalar_one()
    set_signed_prekey_txn(conn, device_pk, signed_prekey, now_ms)
    add_one_time_prekeys_txn(conn, device_pk, one_time_prekeys)
    device = get_device_by_pk_txn(conn, device_pk)
    if device is None:  # pragma: no cover - inserted above in this transaction
        raise RuntimeError("the linked device vanished inside its own transaction")
    return device


def device_sets_txn(conn: Connection, usernames: Collection[str]) -> dict[str, dict[str, int]]:
    """username -> {device_id: device_pk} of the active devices of each named active account.

    Unknown and revoked accounts are absent; an active account without devices maps to {}. This is
    what a send's device set is checked against."""
    if not usernames:
        return {}
    joined = accounts.outerjoin(
        devices, sa.and_(devices.c.account_pk == accounts.c.pk, devices.c.revoked_at.is_(None))
    )
    rows = conn.execute(
        sa.select(accounts.c.username, devices.c.device_id, devices.c.pk)
        .select_from(joined)
        .where(accounts.c.username.in_(list(set(usernames))), accounts.c.status == "active")
    ).all()
    result: dict[str, dict[str, int]] = {}
    for username, device_id, device_pk in rows:
        device_set = result.setdefault(username, {})
        if device_id is not None:
            device_set[device_id] = device_pk
    return result


def create_session_txn(
    conn: Connection, *, device_pk: int, token_hash: bytes, now_ms: int, expires_ms: int
) -> None:
    """Record a session token (by its SHA-256 digest) for a device until `expires_ms`."""
    conn.execute(
        sa.insert(sessions).values(
            token_hash=token_hash, device_pk=device_pk, created_at=now_ms, expires_at=expires_ms
        )
    )


def get_session_txn(conn: Connection, token_hash: bytes, now_ms: int) -> DeviceRow | None:
    """The device a token digest belongs to, or None when the token is unknown, expired, or its
    device or account is revoked. (Lookup by digest: the token itself is never compared.)"""
    row = conn.execute(
        select_devices()
        .join(sessions, sessions.c.device_pk == devices.c.pk)
        .where(sessions.c.token_hash == token_hash, sessions.c.expires_at > now_ms, _active())
    ).first()
    return device_row(row) if row is not None else None


def delete_expired_sessions_txn(conn: Connection, now_ms: int) -> int:
    """Delete sessions that expired at or before `now_ms`; returns how many."""
    return conn.execute(sa.delete(sessions).where(sessions.c.expires_at <= now_ms)).rowcount


def revoke_device_txn(conn: Connection, device_pk: int, *, now_ms: int) -> bool:
    """Revoke a device: it stops being active at once, its sessions and prekeys are deleted.
    Returns False if it was already revoked or does not exist.

    Its queue is emptied later in bounded batches (`queue.purge_revoked_queues_txn`)."""
    changed = conn.execute(
        sa.update(devices)
        .where(devices.c.pk == device_pk, devices.c.revoked_at.is_(None))
        .values(revoked_at=now_ms)
    ).rowcount
    _drop_credentials(conn, [device_pk])
    return changed == 1


def revoke_account_txn(conn: Connection, account_id: int, *, now_ms: int) -> list[int]:
    """Revoke an account and every device of it (their sessions and prekeys are deleted, a pending
    enrollment code is burned). Returns the pks of the devices this revoked, so live connections
    can be closed."""
    conn.execute(sa.update(accounts).where(accounts.c.pk == account_id).values(status="revoked"))
    conn.execute(
        sa.update(enrollment_codes)
        .where(enrollment_codes.c.account_pk == account_id)
        .values(burned=True)
    )
    revoked = [
        int(pk)
        for pk in conn.execute(
            sa.update(devices)
            .where(devices.c.account_pk == account_id, devices.c.revoked_at.is_(None))
            .values(revoked_at=now_ms)
            .returning(devices.c.pk)
        ).scalars()
    ]
    all_devices = [
        int(pk)
        for pk in conn.execute(
            sa.select(devices.c.pk).where(devices.c.account_pk == account_id)
        ).scalars()
    ]
    _drop_credentials(conn, all_devices)
    return sorted(revoked)


def _drop_credentials(conn: Connection, device_pks: list[int]) -> None:
    if not device_pks:
        return
    conn.execute(sa.delete(sessions).where(sessions.c.device_pk.in_(device_pks)))
    conn.execute(sa.delete(signed_prekeys).where(signed_prekeys.c.device_pk.in_(device_pks)))
    conn.execute(sa.delete(one_time_prekeys).where(one_time_prekeys.c.device_pk.in_(device_pks)))
