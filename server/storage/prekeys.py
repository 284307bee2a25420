"""Store functions for prekeys: each device's current signed prekey and its one-time prekeys.

Prekeys are opaque encoded byte strings here (their format is in docs/crypto.md). A one-time
prekey is served at most once: `take_bundles_txn` deletes each one in the same statement that
reads it. On PostgreSQL that statement skips rows another transaction has locked
(`FOR UPDATE SKIP LOCKED`), so two concurrent takers get different keys without waiting for each
other; on SQLite the single writer serialises them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.server.storage.schema import accounts, devices, one_time_prekeys, signed_prekeys
from medrelay.server.storage.sql import insert_for


@dataclass(frozen=True)
class DeviceBundle:
    """What a sender needs to start a session with one device."""

    device_id: str
    device_pk: int
    certificate: bytes
    signed_prekey: bytes | None
    """None only for a device that never uploaded one (enrollment always sets it)."""
    one_time_prekey: bytes | None
    """Served once and deleted; None when the device has run out (X3DH then runs without one)."""
    remaining: int
    """One-time prekeys the device has left after this one was taken (for `prekeys_low`)."""


@dataclass(frozen=True)
class BundleRows:
    """A user's certificate and a bundle per active device (in enrollment order)."""

    username: str
    user_certificate: bytes
    devices: tuple[DeviceBundle, ...]


def set_signed_prekey_txn(conn: Connection, device_pk: int, prekey: bytes, now_ms: int) -> None:
    """Make `prekey` the device's current signed prekey (replacing any previous one)."""
    statement = insert_for(conn, signed_prekeys).values(
        device_pk=device_pk, prekey=prekey, created_at=now_ms
    )
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=[signed_prekeys.c.device_pk],
            set_={"prekey": statement.excluded.prekey, "created_at": statement.excluded.created_at},
        )
    )


def add_one_time_prekeys_txn(conn: Connection, device_pk: int, prekeys: Sequence[bytes]) -> int:
    """Store more one-time prekeys for a device; returns how many it now holds."""
    if prekeys:
        conn.execute(
            sa.insert(one_time_prekeys),
            [{"device_pk": device_pk, "prekey": prekey} for prekey in prekeys],
        )
    return one_time_prekey_count_txn(conn, device_pk)


def one_time_prekey_count_txn(conn: Connection, device_pk: int) -> int:
    """How many one-time prekeys the device has left."""
    count = conn.execute(
        sa.select(sa.func.count())
        .select_from(one_time_prekeys)
        .where(one_time_prekeys.c.device_pk == device_pk)
    ).scalar_one()
    return int(count)


def take_one_time_prekey_txn(conn: Connection, device_pk: int) -> bytes | None:
    """Remove and return the device's oldest one-time prekey, or None if it has none left."""
    oldest = (
        sa.select(one_time_prekeys.c.pk)
        .where(one_time_prekeys.c.device_pk == device_pk)
        .order_by(one_time_prekeys.c.pk)
        .limit(1)
        .with_for_update(skip_locked=True)  # ignored by SQLite, which has a single writer
        .scalar_subquery()
    )
    prekey = conn.execute(
        sa.delete(one_time_prekeys)
        .where(one_time_prekeys.c.pk == oldest)
        .returning(one_time_prekeys.c.prekey)
    ).scalar_one_or_none()
    return bytes(prekey) if prekey is not None else None


def take_bundles_txn(conn: Connection, username: str) -> BundleRows | None:
    """The user's certificate and, per active device, its certificate, signed prekey and one
    one-time prekey (removed as it is served, so no two callers ever get the same one).

    None when the account does not exist, is revoked, or has not enrolled yet (no certificate)."""
    account = conn.execute(
        sa.select(accounts.c.pk, accounts.c.user_certificate).where(
            accounts.c.username == username, accounts.c.status == "active"
        )
    ).first()
    if account is None or account.user_certificate is None:
        return None
    rows = conn.execute(
        sa.select(devices.c.pk, devices.c.device_id, devices.c.certificate, signed_prekeys.c.prekey)
        .select_from(devices.outerjoin(signed_prekeys, signed_prekeys.c.device_pk == devices.c.pk))
        .where(devices.c.account_pk == account.pk, devices.c.revoked_at.is_(None))
        .order_by(devices.c.pk)
    ).all()
    bundles = []
    for device_pk, device_id, certificate, signed_prekey in rows:
        one_time = take_one_time_prekey_txn(conn, device_pk)
        bundles.append(
            DeviceBundle(
                device_id=device_id,
                device_pk=device_pk,
                certificate=bytes(certificate),
                signed_prekey=bytes(signed_prekey) if signed_prekey is not None else None,
                one_time_prekey=one_time,
                remaining=one_time_prekey_count_txn(conn, device_pk),
            )
        )
    return BundleRows(
        username=username,
        user_certificate=bytes(account.user_certificate),
        devices=tuple(bundles),
    )
