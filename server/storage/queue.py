"""Store functions for sends, per-device queues, acknowledgements and expiry.

A send is one `messages` row (sender device + message id -> digest, for idempotency) and one
`queue_items` row per target device, written together: all or nothing. A device's queue is read in
`seq` order and a row is deleted only when that device acknowledges it (or it expires).

Rules of this file:
- Every function that inserts queue rows first locks the rows of the devices it inserts for, in
  ascending pk order (`FOR UPDATE`; SQLite's single writer needs no lock). Holding the device
  lock while taking the next `seq` makes, per device, seq order equal commit order even with
  concurrent PostgreSQL writers, and ascending order keeps the functions from deadlocking each
  other.
- `devices.queued_count` changes in the same transaction as the rows it counts.
- A refusal (`IdConflict`, `QueueFull`, `StaleDevice`) is raised before anything is written, so
  the function also leaves nothing behind when a caller catches it without a SAVEPOINT.
- Deletions of many rows (expiry, pruning, purging) work in caller-bounded batches, so no single
  transaction holds the write lock for long (notes D8).
"""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.server.storage.errors import IdConflict, QueueFull, StaleDevice
from medrelay.server.storage.schema import accounts, devices, messages, queue_items
from medrelay.server.storage.sql import insert_for

MSG: Final = "msg"
EXPIRED: Final = "expired"


@dataclass(frozen=True)
class StoredMessage:
    """The outcome of `store_message_txn`.

    New: `duplicate` False, `time_ms` the store time, `seqs` the seq assigned per target device
    pk. Duplicate (same sender device, message id and digest as an earlier send): `duplicate`
    True, `time_ms` the original store time, `seqs` empty (nothing new was queued)."""

    duplicate: bool
    time_ms: int
    seqs: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueItem:
    """One item of a device's queue, as a `deliver` frame carries it."""

    seq: int
    kind: str
    """"msg" (an envelope) or "expired" (a notice that a message this device sent expired)."""
    message_id: bytes
    time_ms: int
    """When the server stored the message (or, for a notice, when it expired)."""
    peer_user: str
    peer_device: str
    """For "msg": the sending user and device. For "expired": the user and device that missed
    the message."""
    ciphertext: bytes | None
    """The envelope for this device ("msg"), the signed notice ("notice"); None for "expired"."""
    flags: int = 0
    """"msg": what the relay knows about it (medrelay.server.availability.offhours FLAG_*)."""

    @property
    def size(self) -> int:
        return len(self.ciphertext) if self.ciphertext is not None else 0


@dataclass(frozen=True)
class ExpiredNotice:
    """An "expired" item `expire_txn` queued for the device `device_pk` (the original sender),
    so the relay can push it at once if that device is connected."""

    device_pk: int
    item: QueueItem


@dataclass(frozen=True)
class ExpiryResult:
    """What one `expire_queue_txn` batch did: `deleted` rows (of both kinds) and the notices it
    queued. `deleted == batch` means more expired rows may remain."""

    deleted: int
    notices: list[ExpiredNotice]


# --- locking and counting -----------------------------------------------------------------------


@dataclass(frozen=True)
class _LockedDevice:
    pk: int
    queued_count: int
    active: bool


# The statements of the send path are built once: building a Core statement costs more CPU than
# SQLite takes to run it, and group commit makes CPU, not fsync, the limit.
_LOCK_DEVICES: Final = (
    sa.select(devices.c.pk, devices.c.queued_count, devices.c.revoked_at, accounts.c.status)
    .select_from(devices.join(accounts, devices.c.account_pk == accounts.c.pk))
    .where(devices.c.pk.in_(sa.bindparam("pks", expanding=True)))
    .order_by(devices.c.pk)
    .with_for_update(of=devices)
)
_ADD_ONE: Final = (
    sa.update(devices)
    .where(devices.c.pk.in_(sa.bindparam("pks", expanding=True)))
    .values(queued_count=devices.c.queued_count + 1)
)
_ADJUST_COUNT: Final = (
    sa.update(devices)
    .where(devices.c.pk == sa.bindparam("b_pk"))
    .values(queued_count=devices.c.queued_count + sa.bindparam("b_delta"))
)
_EXISTING_MESSAGE: Final = sa.select(messages.c.digest, messages.c.created_at).where(
    messages.c.sender_device_pk == sa.bindparam("sender"),
    messages.c.message_id == sa.bindparam("message_id"),
)
_INSERT_QUEUE_ITEMS: Final = sa.insert(queue_items).returning(
    queue_items.c.device_pk, queue_items.c.seq, sort_by_parameter_order=True
)
_INSERT_MESSAGE_CACHE: dict[str, sa.Executable] = {}


def _insert_message(conn: Connection) -> sa.Executable:
    """INSERT of a message id that does nothing (returns no row) if the id is already stored."""
    statement = _INSERT_MESSAGE_CACHE.get(conn.dialect.name)
    if statement is None:
        statement = (
            insert_for(conn, messages)
            .on_conflict_do_nothing(
                index_elements=[messages.c.sender_device_pk, messages.c.message_id]
            )
            .returning(messages.c.pk)
        )
        _INSERT_MESSAGE_CACHE[conn.dialect.name] = statement
    return statement


def _lock_devices(conn: Connection, device_pks: Iterable[int]) -> dict[int, _LockedDevice]:
    """Lock the devices' rows in ascending pk order and read their queue counts and status."""
    pks = sorted(set(device_pks))
    if not pks:
        return {}
    rows = conn.execute(_LOCK_DEVICES, {"pks": pks}).all()
    return {
        pk: _LockedDevice(pk, count, revoked_at is None and status == "active")
        for pk, count, revoked_at, status in rows
    }


def _adjust_counts(conn: Connection, deltas: Mapping[int, int]) -> None:
    """Add `deltas[pk]` to each device's queued_count (rows already locked by the caller)."""
    changes = [{"b_pk": pk, "b_delta": delta} for pk, delta in sorted(deltas.items()) if delta]
    if changes:
        conn.execute(_ADJUST_COUNT, changes)


def _existing_message(
    conn: Connection, sender_device_pk: int, message_id: bytes, digest: bytes
) -> StoredMessage | None:
    row = conn.execute(
        _EXISTING_MESSAGE, {"sender": sender_device_pk, "message_id": message_id}
    ).first()
    if row is None:
        return None
    if not hmac.compare_digest(bytes(row.digest), digest):
        raise IdConflict("this message id was already used for a different send")
    return StoredMessage(duplicate=True, time_ms=int(row.created_at))


# --- sending ------------------------------------------------------------------------------------


def store_message_txn(
    conn: Connection,
    *,
    sender_device_pk: int,
    sender_username: str,
    sender_device_id: str,
    message_id: bytes,
    digest: bytes,
    targets: Sequence[tuple[int, bytes]],
    now_ms: int,
    expires_ms: int,
    queue_cap: int,
) -> StoredMessage:
    """Store a send: the message id and one queue row per (device_pk, ciphertext) target.

    - Same sender device and id seen before with the same digest: returns the original
      (`duplicate=True`, original time); nothing new is stored, even if a queue is full by now.
    - Same id with another digest: `IdConflict`.
    - A target device is unknown or no longer active: `StaleDevice(pk)`.
    - A target device already holds `queue_cap` items: `QueueFull(pk)`.
    Refusals are raised before anything is written. Safe inside a SAVEPOINT on both databases.
    """
    device_pks = [device_pk for device_pk, _ in targets]
    if len(set(device_pks)) != len(device_pks):
        raise ValueError("at most one envelope per target device")
    locked = _lock_devices(conn, device_pks)
    for device_pk in sorted(device_pks):
        device = locked.get(device_pk)
        if device is None or not device.active:
            existing = _existing_message(conn, sender_device_pk, message_id, digest)
            if existing is not None:
                return existing
            raise StaleDevice(device_pk)
        if device.queued_count >= queue_cap:
            existing = _existing_message(conn, sender_device_pk, message_id, digest)
            if existing is not None:
                return existing
            raise QueueFull(device_pk)
    inserted = conn.execute(
        _insert_message(conn),
        {
            "sender_device_pk": sender_device_pk,
            "message_id": message_id,
            "digest": digest,
            "created_at": now_ms,
        },
    ).first()
    if inserted is None:
        # Already stored (by an earlier send, or a concurrent one that has now committed).
        existing = _existing_message(conn, sender_device_pk, message_id, digest)
        if existing is None:  # pragma: no cover - the conflicting row is visible after the wait
            raise RuntimeError("message id conflicted but no stored message was found")
        return existing
    if not targets:
        return StoredMessage(duplicate=False, time_ms=now_ms)
    conn.execute(_ADD_ONE, {"pks": sorted(device_pks)})
    rows = conn.execute(
        _INSERT_QUEUE_ITEMS,
        [
            {
                "device_pk": device_pk,
                "kind": MSG,
                "peer_user": sender_username,
                "peer_device": sender_device_id,
                "message_id": message_id,
                "created_at": now_ms,
                "expires_at": expires_ms,
                "sender_device_pk": sender_device_pk,
                "size": len(ciphertext),
                "ciphertext": ciphertext,
            }
            for device_pk, ciphertext in targets
        ],
    ).all()
    return StoredMessage(
        duplicate=False, time_ms=now_ms, seqs={int(pk): int(seq) for pk, seq in rows}
    )


# --- delivery -----------------------------------------------------------------------------------

_ITEM_COLUMNS = (
    queue_items.c.seq,
    queue_items.c.kind,
    queue_items.c.message_id,
    queue_items.c.created_at,
    queue_items.c.peer_user,
    queue_items.c.peer_device,
    queue_items.c.ciphertext,
    queue_items.c.flags,
)


def fetch_queue_txn(
    conn: Connection, device_pk: int, *, after_seq: int, limit: int, max_bytes: int
) -> list[QueueItem]:
    """The device's items with seq > `after_seq`, in seq order: at most `limit` items whose
    ciphertexts total at most `max_bytes`, but always at least one item if any is queued (an
    envelope larger than `max_bytes` must still be deliverable).

    Sizes are read first, so ciphertexts beyond the byte budget are never loaded."""
    if limit < 1:
        return []
    sizes = conn.execute(
        sa.select(queue_items.c.seq, queue_items.c.size)
        .where(queue_items.c.device_pk == device_pk, queue_items.c.seq > after_seq)
        .order_by(queue_items.c.seq)
        .limit(limit)
    ).all()
    if not sizes:
        return []
    last_seq = sizes[0].seq
    total = 0
    for taken, (seq, size) in enumerate(sizes):
        if taken > 0 and total + size > max_bytes:
            break
        total += size
        last_seq = seq
    rows = conn.execute(
        sa.select(*_ITEM_COLUMNS)
        .where(
            queue_items.c.device_pk == device_pk,
            queue_items.c.seq > after_seq,
            queue_items.c.seq <= last_seq,
        )
        .order_by(queue_items.c.seq)
    ).all()
    return [
        QueueItem(
            seq=int(row.seq),
            kind=row.kind,
            message_id=bytes(row.message_id),
            time_ms=int(row.created_at),
            peer_user=row.peer_user,
            peer_device=row.peer_device,
            ciphertext=bytes(row.ciphertext) if row.ciphertext is not None else None,
            flags=int(row.flags),
        )
        for row in rows
    ]


def ack_txn(conn: Connection, device_pk: int, seqs: Collection[int]) -> int:
    """Delete the named items from this device's queue; returns how many were deleted. Seqs that
    are unknown, already acknowledged or belong to another device are ignored."""
    if not seqs:
        return 0
    deleted = conn.execute(
        sa.delete(queue_items).where(
            queue_items.c.device_pk == device_pk, queue_items.c.seq.in_(sorted(set(seqs)))
        )
    ).rowcount
    if deleted:
        _adjust_counts(conn, {device_pk: -deleted})
    return int(deleted)


def queue_depth_txn(conn: Connection, device_pk: int) -> int:
    """Items in the device's queue (the maintained count; 0 for an unknown device)."""
    count = conn.execute(
        sa.select(devices.c.queued_count).where(devices.c.pk == device_pk)
    ).scalar_one_or_none()
    return int(count or 0)


# --- expiry and cleanup -------------------------------------------------------------------------


def expire_queue_txn(conn: Connection, now_ms: int, *, batch: int) -> ExpiryResult:
    """Delete up to `batch` queue rows whose `expires_at` <= `now_ms` (oldest expiry first).

    For each expired "msg" row whose sending device is still active, queue an "expired" notice
    for that device (naming the user and device that missed the message); it lives as long as the
    message did. Expired notice rows themselves are just deleted. On PostgreSQL rows locked by a
    concurrent transaction (an ack in flight) are skipped for this batch."""
    recipient = devices.alias("recipient")
    recipient_account = accounts.alias("recipient_account")
    expired = conn.execute(
        sa.select(
            queue_items.c.seq,
            queue_items.c.device_pk,
            queue_items.c.kind,
            queue_items.c.sender_device_pk,
            queue_items.c.message_id,
            queue_items.c.created_at,
            queue_items.c.expires_at,
            recipient.c.device_id,
            recipient_account.c.username,
        )
        .select_from(
            queue_items.join(recipient, recipient.c.pk == queue_items.c.device_pk).join(
                recipient_account, recipient_account.c.pk == recipient.c.account_pk
            )
        )
        .where(queue_items.c.expires_at <= now_ms)
        .order_by(queue_items.c.expires_at, queue_items.c.seq)
        .limit(batch)
        .with_for_update(of=queue_items, skip_locked=True)
    ).all()
    if not expired:
        return ExpiryResult(deleted=0, notices=[])
    deleted_seqs = set(
        conn.execute(
            sa.delete(queue_items)
            .where(queue_items.c.seq.in_([row.seq for row in expired]))
            .returning(queue_items.c.seq)
        ).scalars()
    )
    gone = [row for row in expired if row.seq in deleted_seqs]
    senders = {row.sender_device_pk for row in gone if row.kind == MSG and row.sender_device_pk}
    locked = _lock_devices(conn, {row.device_pk for row in gone} | senders)
    deltas: Counter[int] = Counter()
    for row in gone:
        deltas[row.device_pk] -= 1
    notices = [
        row
        for row in gone
        if row.kind == MSG
        and row.sender_device_pk is not None
        and row.sender_device_pk in locked
        and locked[row.sender_device_pk].active
    ]
    for row in notices:
        deltas[row.sender_device_pk] += 1
    _adjust_counts(conn, deltas)
    if not notices:
        return ExpiryResult(deleted=len(gone), notices=[])
    # A notice is small and must never be dropped: it is queued even past the cap (the count
    # still includes it, so the sender's queue refuses new messages until it drains).
    inserted = conn.execute(
        sa.insert(queue_items).returning(queue_items.c.seq, sort_by_parameter_order=True),
        [
            {
                "device_pk": row.sender_device_pk,
                "kind": EXPIRED,
                "peer_user": row.username,
                "peer_device": row.device_id,
                "message_id": row.message_id,
                "created_at": now_ms,
                "expires_at": now_ms + max(row.expires_at - row.created_at, 0),
                "sender_device_pk": None,
                "size": 0,
                "ciphertext": None,
            }
            for row in notices
        ],
    ).scalars()
    return ExpiryResult(
        deleted=len(gone),
        notices=[
            ExpiredNotice(
                device_pk=int(row.sender_device_pk),
                item=QueueItem(
                    seq=int(seq),
                    kind=EXPIRED,
                    message_id=bytes(row.message_id),
                    time_ms=now_ms,
                    peer_user=row.username,
                    peer_device=row.device_id,
                    ciphertext=None,
                ),
            )
            for row, seq in zip(notices, inserted, strict=True)
        ],
    )


def expire_txn(conn: Connection, now_ms: int, *, batch: int) -> list[ExpiredNotice]:
    """`expire_queue_txn` returning only the notices it queued (use `expire_queue_txn` to learn
    whether a full batch was deleted and another call is due)."""
    return expire_queue_txn(conn, now_ms, batch=batch).notices


def prune_messages_txn(conn: Connection, older_than_ms: int, *, batch: int) -> int:
    """Forget up to `batch` message ids stored before `older_than_ms` (the relay passes
    now - TTL - 1 day); returns how many. After that a resend of such an id is a new message."""
    oldest = (
        sa.select(messages.c.pk)
        .where(messages.c.created_at < older_than_ms)
        .order_by(messages.c.created_at)
        .limit(batch)
    )
    return int(conn.execute(sa.delete(messages).where(messages.c.pk.in_(oldest))).rowcount)


def purge_revoked_queues_txn(conn: Connection, *, batch: int) -> int:
    """Delete up to `batch` queue rows of revoked devices (or devices of revoked accounts), which
    will never fetch them; returns how many. No expiry notices are sent for them."""
    doomed = conn.execute(
        sa.select(queue_items.c.seq, queue_items.c.device_pk)
        .select_from(
            queue_items.join(devices, devices.c.pk == queue_items.c.device_pk).join(
                accounts, accounts.c.pk == devices.c.account_pk
            )
        )
        .where(sa.or_(devices.c.revoked_at.is_not(None), accounts.c.status != "active"))
        .order_by(queue_items.c.seq)
        .limit(batch)
        .with_for_update(of=queue_items, skip_locked=True)
    ).all()
    if not doomed:
        return 0
    deltas: Counter[int] = Counter()
    for device_pk in conn.execute(
        sa.delete(queue_items)
        .where(queue_items.c.seq.in_([row.seq for row in doomed]))
        .returning(queue_items.c.device_pk)
    ).scalars():
        deltas[int(device_pk)] -= 1
    _lock_devices(conn, deltas)
    _adjust_counts(conn, deltas)
    return -sum(deltas.values())
