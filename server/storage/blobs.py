"""Store functions for encrypted attachments (blobs).

A blob is opaque ciphertext uploaded by a device under a random text id the caller chose (128
random bits, so ids cannot be guessed), kept until `expires_at` (the envelope time-to-live) and
then deleted in bounded batches. Sizes are limited by the HTTP adapter before anything reaches
here.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.server.storage.errors import BlobExists
from medrelay.server.storage.schema import blobs
from medrelay.server.storage.sql import insert_for


@dataclass(frozen=True)
class BlobRow:
    blob_id: str
    owner_device_pk: int
    size: int
    created_ms: int
    expires_ms: int
    data: bytes


def put_blob_txn(
    conn: Connection,
    *,
    blob_id: str,
    owner_device_pk: int,
    data: bytes,
    now_ms: int,
    expires_ms: int,
) -> None:
    """Store a blob; `BlobExists` if the id is taken (nothing is written then)."""
    stored = conn.execute(
        insert_for(conn, blobs)
        .values(
            blob_id=blob_id,
            owner_device_pk=owner_device_pk,
            size=len(data),
            created_at=now_ms,
            expires_at=expires_ms,
            data=data,
        )
        .on_conflict_do_nothing(index_elements=[blobs.c.blob_id])
        .returning(blobs.c.blob_id)
    ).first()
    if stored is None:
        raise BlobExists("a blob with this id already exists")


def get_blob_txn(conn: Connection, blob_id: str, now_ms: int) -> BlobRow | None:
    """The blob, or None if unknown or expired at `now_ms` (even if not yet deleted)."""
    row = conn.execute(
        sa.select(blobs).where(blobs.c.blob_id == blob_id, blobs.c.expires_at > now_ms)
    ).first()
    if row is None:
        return None
    return BlobRow(
        blob_id=row.blob_id,
        owner_device_pk=row.owner_device_pk,
        size=row.size,
        created_ms=row.created_at,
        expires_ms=row.expires_at,
        data=bytes(row.data),
    )


def blob_usage_txn(conn: Connection, owner_device_pk: int, now_ms: int) -> tuple[int, int]:
    """(count, total bytes) of the device's unexpired blobs, for upload quotas."""
    count, total = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(blobs.c.size), 0)).where(
            blobs.c.owner_device_pk == owner_device_pk, blobs.c.expires_at > now_ms
        )
    ).one()
    return int(count), int(total)


def expire_blobs_txn(conn: Connection, now_ms: int, *, batch: int) -> int:
    """Delete up to `batch` blobs that expired at or before `now_ms`; returns how many."""
    expired = (
        sa.select(blobs.c.blob_id)
        .where(blobs.c.expires_at <= now_ms)
        .order_by(blobs.c.expires_at)
        .limit(batch)
    )
    return int(conn.execute(sa.delete(blobs).where(blobs.c.blob_id.in_(expired))).rowcount)
