"""The SQL implementation of the relay's `RelayStore` (SQLite and PostgreSQL).

The hot path is `apply_writes_txn`: every send and acknowledgement gathered during one reactor
turn is applied in one transaction with a handful of set-based statements, not a few statements
per send. Each send is judged in Python against rows read once for the whole batch (accounts,
the care links between the batch's patients and the other users, current devices with their
queue counts, already-stored message ids), with the policy table (`send_refusal`); refused sends
write nothing and do not affect the others; accepted ones are inserted with one multi-row INSERT
per table.
With group commit the database is rarely the limit on SQLite; the CPU spent building and running
statements is, so the number of statements per batch, not per message, is what this file keeps
small.

Rules of this file:
- The device rows a batch inserts for are locked first, in ascending pk order (FOR UPDATE on
  PostgreSQL; SQLite has one writer), as `queue.py` does: per device, queue seq order equals
  commit order even with several writers.
- `devices.queued_count` changes in the same transaction as the rows it counts.
- Every other operation reuses the store functions of `accounts.py`, `devices.py`, `prekeys.py`
  and `queue.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from medrelay.crypto.certificates import Role
from medrelay.protocol.messages import ItemKind
from medrelay.server.policy import LinkSpan, Standing, pair_state
from medrelay.server.relay.errors import (
    id_conflict,
    queue_full,
    stale_devices,
    unknown_user,
)
from medrelay.server.relay.store import (
    BundleRecord,
    DeviceBundleRecord,
    DeviceListRecord,
    DeviceRecord,
    QueuedItem,
    SendAccepted,
    SendOutcome,
    SendRequest,
    WriteBatch,
    WriteLimits,
    WriteResult,
    send_refusal,
)
from medrelay.server.storage import accounts as accounts_store
from medrelay.server.storage import care as care_store
from medrelay.server.storage import devices as devices_store
from medrelay.server.storage import prekeys as prekeys_store
from medrelay.server.storage import queue as queue_store
from medrelay.server.storage.database import Database
from medrelay.server.storage.schema import accounts, devices, messages, queue_items

_PATIENT: Final = Role.PATIENT.value
_CHUNK: Final = 500
"""Bound values per IN list, well under SQLite's variable limit."""

_ACCOUNTS: Final = sa.select(accounts.c.username, accounts.c.role, accounts.c.status).where(
    accounts.c.username.in_(sa.bindparam("names", expanding=True))
)
_DEVICES: Final = (
    sa.select(accounts.c.username, devices.c.device_id, devices.c.pk, devices.c.queued_count)
    .select_from(devices.join(accounts, devices.c.account_pk == accounts.c.pk))
    .where(
        accounts.c.username.in_(sa.bindparam("names", expanding=True)),
        accounts.c.status == "active",
        devices.c.revoked_at.is_(None),
    )
    .order_by(devices.c.pk)
    .with_for_update(of=devices)
)
# By id alone (random 128-bit values, indexed), filtered by sender in Python: one index probe
# per send instead of one per (sender, id) pair of the batch.
_EXISTING: Final = sa.select(
    messages.c.sender_device_pk, messages.c.message_id, messages.c.digest, messages.c.created_at
).where(messages.c.message_id.in_(sa.bindparam("ids", expanding=True)))
_INSERT_MESSAGES: Final = sa.insert(messages)
_INSERT_ITEMS: Final = sa.insert(queue_items).returning(
    queue_items.c.seq, sort_by_parameter_order=True
)
_ADJUST_COUNT: Final = (
    sa.update(devices)
    .where(devices.c.pk == sa.bindparam("b_pk"))
    .values(queued_count=devices.c.queued_count + sa.bindparam("b_delta"))
)
_OWNERS: Final = sa.select(queue_items.c.seq, queue_items.c.device_pk).where(
    queue_items.c.seq.in_(sa.bindparam("seqs", expanding=True))
)
_DELETE_ITEMS: Final = (
    sa.delete(queue_items)
    .where(queue_items.c.seq.in_(sa.bindparam("seqs", expanding=True)))
    .returning(queue_items.c.device_pk)
)


def _chunks(values: Sequence[int], size: int = _CHUNK) -> Iterable[Sequence[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


@dataclass
class _BatchView:
    """What the batch's sends are judged against, read once and updated as sends are accepted."""

    roles: dict[str, str]
    """Accounts among the addressed users (active or closed): username -> role."""
    closed: set[str]
    """The closed (revoked) ones among them."""
    links: dict[tuple[str, str], list[LinkSpan]]
    """(patient, other user) -> the spans of their care links, for the batch's patients."""
    current: dict[str, dict[str, int]]
    """username -> {device_id: device pk} of active devices."""
    queued: dict[int, int]
    """device pk -> items queued, counting the sends accepted so far in this batch."""
    stored: dict[tuple[int, bytes], tuple[bytes, int]]
    """(sender device pk, message id) -> (digest, time), stored earlier or in this batch."""


def _read_view(conn: Connection, sends: Sequence[SendRequest]) -> _BatchView:
    names = sorted(
        {e.username for s in sends for e in s.envelopes} | {s.sender.username for s in sends}
    )
    roles: dict[str, str] = {}
    closed: set[str] = set()
    current: dict[str, dict[str, int]] = {}
    queued: dict[int, int] = {}
    for start in range(0, len(names), _CHUNK):
        chunk = names[start : start + _CHUNK]
        for username, role, status in conn.execute(_ACCOUNTS, {"names": chunk}):
            roles[username] = role
            if status == "active":
                current.setdefault(username, {})
            else:
                closed.add(username)
        for username, device_id, pk, count in conn.execute(_DEVICES, {"names": chunk}):
            current.setdefault(username, {})[device_id] = pk
            queued[pk] = count
    stored: dict[tuple[int, bytes], tuple[bytes, int]] = {}
    wanted = {(s.sender.pk, s.message_id) for s in sends}
    ids = sorted({s.message_id for s in sends})
    for start in range(0, len(ids), _CHUNK):
        for sender_pk, message_id, digest, created in conn.execute(
            _EXISTING, {"ids": ids[start : start + _CHUNK]}
        ):
            key = (sender_pk, bytes(message_id))
            if key in wanted:
                stored[key] = (bytes(digest), int(created))
    # Care links matter only where a patient is involved: one query for the batch's patients.
    patients = [name for name, role in roles.items() if role == _PATIENT]
    links = care_store.pair_spans_txn(conn, patients, roles) if patients else {}
    return _BatchView(
        roles=roles, closed=closed, links=links, current=current, queued=queued, stored=stored
    )


def _judge(
    send: SendRequest, view: _BatchView, limits: WriteLimits, now_ms: int
) -> SendOutcome | list[int]:
    """A refusal or duplicate outcome, or the target device pks (in envelope order) to store."""
    sender = send.sender
    earlier = view.stored.get((sender.pk, send.message_id))
    if earlier is not None:
        digest, time_ms = earlier
        if digest != send.digest:
            return id_conflict()
        return SendAccepted(time_ms=time_ms, items=(), duplicate=True)
    users = {e.username for e in send.envelopes} | {sender.username}
    for username in sorted(users):
        role = view.roles.get(username)
        if role is None:
            return unknown_user(username)
        state = pair_state(view.links, sender.username, username, now_ms)
        refusal = send_refusal(sender, username, role, closed=username in view.closed, state=state)
        if refusal is not None:
            return refusal
    addressed = {(e.username, e.device_id) for e in send.envelopes}
    current = {
        (u, d)
        for u in users
        for d in view.current[u]
        if (u, d) != (sender.username, sender.device_id)
    }
    if addressed != current:
        return stale_devices(current - addressed, addressed - current)
    targets = [view.current[e.username][e.device_id] for e in send.envelopes]
    if any(view.queued[pk] >= limits.queue_cap for pk in targets):
        return queue_full()
    for pk in targets:
        view.queued[pk] += 1
    return targets


def _store_sends(
    conn: Connection, sends: Sequence[SendRequest], now_ms: int, limits: WriteLimits
) -> tuple[SendOutcome, ...]:
    view = _read_view(conn, sends)
    verdicts: list[SendOutcome | list[int]] = []
    for send in sends:
        verdict = _judge(send, view, limits, now_ms)
        if isinstance(verdict, list):
            view.stored[(send.sender.pk, send.message_id)] = (send.digest, now_ms)
        verdicts.append(verdict)
    accepted = [(s, v) for s, v in zip(sends, verdicts, strict=True) if isinstance(v, list)]
    if not accepted:
        return tuple(v for v in verdicts if not isinstance(v, list))
    seqs = iter(_insert_accepted(conn, accepted, now_ms, now_ms + limits.ttl_ms))
    _adjust(conn, Counter(pk for _, targets in accepted for pk in targets))
    outcomes: list[SendOutcome] = []
    for send, verdict in zip(sends, verdicts, strict=True):
        if not isinstance(verdict, list):
            outcomes.append(verdict)
            continue
        items = tuple(
            QueuedItem(
                device_pk=pk,
                seq=int(next(seqs)),
                kind=ItemKind.MESSAGE,
                message_id=send.message_id,
                time_ms=now_ms,
                peer_user=send.sender.username,
                peer_device=send.sender.device_id,
                ciphertext=envelope.ciphertext,
            )
            for pk, envelope in zip(verdict, send.envelopes, strict=True)
        )
        outcomes.append(SendAccepted(time_ms=now_ms, items=items))
    return tuple(outcomes)


def _insert_accepted(
    conn: Connection,
    accepted: Sequence[tuple[SendRequest, list[int]]],
    now_ms: int,
    expires_ms: int,
) -> list[int]:
    """Insert the accepted sends' message ids and queue rows; the new seqs in row order."""
    messages_rows: list[tuple[object, ...]] = [
        (s.sender.pk, s.message_id, s.digest, now_ms) for s, _ in accepted
    ]
    item_rows: list[tuple[object, ...]] = [
        (
            pk,
            queue_store.MSG,
            s.sender.username,
            s.sender.device_id,
            s.message_id,
            now_ms,
            expires_ms,
            s.sender.pk,
            len(envelope.ciphertext),
            envelope.ciphertext,
        )
        for s, targets in accepted
        for pk, envelope in zip(targets, s.envelopes, strict=True)
    ]
    if conn.dialect.name == "sqlite":
        return _insert_sqlite(conn, messages_rows, item_rows)
    conn.execute(
        _INSERT_MESSAGES, [dict(zip(_MESSAGE_KEYS, r, strict=True)) for r in messages_rows]
    )
    result = conn.execute(_INSERT_ITEMS, [dict(zip(_ITEM_KEYS, r, strict=True)) for r in item_rows])
    return [int(seq) for seq in result.scalars()]


_MESSAGE_KEYS: Final = ("sender_device_pk", "message_id", "digest", "created_at")
_ITEM_KEYS: Final = (
    "device_pk", "kind", "peer_user", "peer_device", "message_id", "created_at", "expires_at",
    "sender_device_pk", "size", "ciphertext",
)  # fmt: skip
# Written out in full (a test checks them against the schema's columns).
_SQLITE_INSERT_MESSAGES: Final = (
    "INSERT INTO messages (sender_device_pk, message_id, digest, created_at) VALUES (?, ?, ?, ?)"
)
_SQLITE_INSERT_ITEMS: Final = (
    "INSERT INTO queue_items (device_pk, kind, peer_user, peer_device, message_id, created_at,"
    " expires_at, sender_device_pk, size, ciphertext) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQLITE_LAST_SEQ: Final = "SELECT seq FROM sqlite_sequence WHERE name = 'queue_items'"
_SQLITE_NEW_SEQS: Final = "SELECT seq FROM queue_items WHERE seq > ? ORDER BY seq"


def _insert_sqlite(
    conn: Connection, messages_rows: list[tuple[object, ...]], item_rows: list[tuple[object, ...]]
) -> list[int]:
    """SQLite's hot path through the driver's executemany: SQLAlchemy cannot batch an INSERT
    with ordered RETURNING on SQLite (it falls back to one statement per row) and its per-value
    bind processing costs more than SQLite's own work. The seqs are read back instead: this
    transaction holds SQLite's only write lock, and AUTOINCREMENT gives rows inserted one after
    another increasing seqs above every seq ever used, so the new rows are exactly those above
    the sequence's value before the insert, in insertion order."""
    conn.exec_driver_sql(_SQLITE_INSERT_MESSAGES, messages_rows)
    before = conn.exec_driver_sql(_SQLITE_LAST_SEQ).scalar() or 0
    conn.exec_driver_sql(_SQLITE_INSERT_ITEMS, item_rows)
    seqs = [int(seq) for seq in conn.exec_driver_sql(_SQLITE_NEW_SEQS, (before,)).scalars()]
    if len(seqs) != len(item_rows):  # would mean another writer inside our transaction
        raise RuntimeError("queue seqs are not the rows this transaction inserted")
    return seqs


def _adjust(conn: Connection, deltas: Counter[int]) -> None:
    changes = [(delta, pk) for pk, delta in sorted(deltas.items()) if delta]
    if not changes:
        return
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            "UPDATE devices SET queued_count = queued_count + ? WHERE pk = ?", changes
        )
    else:
        conn.execute(_ADJUST_COUNT, [{"b_pk": pk, "b_delta": d} for d, pk in changes])


def _delete_acked(conn: Connection, acks: Sequence[tuple[int, tuple[int, ...]]]) -> None:
    """Delete acknowledged items, each only if the acknowledging device owns it."""
    requested = {(device_pk, seq) for device_pk, seqs in acks for seq in seqs}
    all_seqs = sorted({seq for _, seq in requested})
    owned: list[int] = []
    for chunk in _chunks(all_seqs):
        owned.extend(
            seq
            for seq, owner in conn.execute(_OWNERS, {"seqs": chunk})
            if (owner, seq) in requested
        )
    deltas: Counter[int] = Counter()
    for chunk in _chunks(owned):
        for device_pk in conn.execute(_DELETE_ITEMS, {"seqs": chunk}).scalars():
            deltas[int(device_pk)] -= 1
    _adjust(conn, deltas)


def apply_writes_txn(
    conn: Connection, batch: WriteBatch, now_ms: int, limits: WriteLimits
) -> WriteResult:
    """One group commit: acknowledgements, then sends, then expiry, in one transaction."""
    if batch.acks:
        _delete_acked(conn, batch.acks)
    outcomes = _store_sends(conn, batch.sends, now_ms, limits) if batch.sends else ()
    if not batch.expire_up_to:
        return WriteResult(outcomes)
    expiry = queue_store.expire_queue_txn(conn, now_ms, batch=batch.expire_up_to)
    queue_store.prune_messages_txn(
        conn, now_ms - limits.ttl_ms - 24 * 3600 * 1000, batch=batch.expire_up_to
    )
    notices = tuple(_queued(n.device_pk, n.item) for n in expiry.notices)
    return WriteResult(outcomes, notices, expiry.deleted)


def _queued(device_pk: int, item: queue_store.QueueItem) -> QueuedItem:
    return QueuedItem(
        device_pk=device_pk,
        seq=item.seq,
        kind=ItemKind(item.kind),
        message_id=item.message_id,
        time_ms=item.time_ms,
        peer_user=item.peer_user,
        peer_device=item.peer_device,
        ciphertext=item.ciphertext,
    )


def _record(row: devices_store.DeviceRow) -> DeviceRecord:
    return DeviceRecord(
        pk=row.pk,
        username=row.username,
        device_id=row.device_id,
        role=row.role,
        certificate=row.certificate,
        signing_key=row.signing_key,
        revoked=row.revoked,
    )


def _put_prekeys_txn(
    conn: Connection, device_pk: int, signed: bytes | None, one_time: Sequence[bytes], now_ms: int
) -> int:
    if signed is not None:
        prekeys_store.set_signed_prekey_txn(conn, device_pk, signed, now_ms)
    if one_time:
        return prekeys_store.add_one_time_prekeys_txn(conn, device_pk, one_time)
    return prekeys_store.one_time_prekey_count_txn(conn, device_pk)


def _bundles_txn(conn: Connection, username: str) -> BundleRecord | None:
    rows = prekeys_store.take_bundles_txn(conn, username)
    if rows is None:
        return None
    return BundleRecord(
        username=rows.username,
        user_certificate=rows.user_certificate,
        devices=tuple(
            DeviceBundleRecord(
                device_id=d.device_id,
                certificate=d.certificate,
                signed_prekey=d.signed_prekey,
                one_time_prekey=d.one_time_prekey,
                device_pk=d.device_pk,
                remaining_one_time=d.remaining,
            )
            for d in rows.devices
            # A device without a signed prekey cannot be reached; enrollment always sets one.
            if d.signed_prekey is not None
        ),
    )


def _list_devices_txn(conn: Connection, username: str) -> DeviceListRecord | None:
    account = accounts_store.get_account_txn(conn, username)
    if account is None or not account.active or account.user_certificate is None:
        return None
    return DeviceListRecord(
        username=username,
        user_certificate=account.user_certificate,
        devices=tuple(_record(d) for d in devices_store.list_devices_txn(conn, username)),
    )


class SqlRelayStore:
    """`RelayStore` over a `Database`: every method is one `run_interaction`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def apply_writes(
        self, batch: WriteBatch, now_ms: int, limits: WriteLimits
    ) -> Deferred[WriteResult]:
        return self._db.run_interaction("group_commit", apply_writes_txn, batch, now_ms, limits)

    def fetch_queue(
        self, device_pk: int, *, after_seq: int, limit: int, max_bytes: int
    ) -> Deferred[list[QueuedItem]]:
        def fetch(conn: Connection) -> list[QueuedItem]:
            items = queue_store.fetch_queue_txn(
                conn, device_pk, after_seq=after_seq, limit=limit, max_bytes=max_bytes
            )
            return [_queued(device_pk, item) for item in items]

        return self._db.run_interaction("fetch_queue", fetch)

    def get_device(self, username: str, device_id: str) -> Deferred[DeviceRecord | None]:
        def get(conn: Connection) -> DeviceRecord | None:
            row = devices_store.get_device_txn(conn, username, device_id)
            return _record(row) if row is not None else None

        return self._db.run_interaction("get_device", get)

    def create_session(
        self, device_pk: int, token_hash: bytes, now_ms: int, expires_ms: int
    ) -> Deferred[None]:
        return self._db.run_interaction(
            "create_session",
            devices_store.create_session_txn,
            device_pk=device_pk,
            token_hash=token_hash,
            now_ms=now_ms,
            expires_ms=expires_ms,
        )

    def get_session(self, token_hash: bytes, now_ms: int) -> Deferred[DeviceRecord | None]:
        def get(conn: Connection) -> DeviceRecord | None:
            row = devices_store.get_session_txn(conn, token_hash, now_ms)
            return _record(row) if row is not None and not row.revoked else None

        return self._db.run_interaction("get_session", get)

    def put_prekeys(
        self, device_pk: int, signed_prekey: bytes | None, one_time: Sequence[bytes], now_ms: int
    ) -> Deferred[int]:
        return self._db.run_interaction(
            "put_prekeys", _put_prekeys_txn, device_pk, signed_prekey, tuple(one_time), now_ms
        )

    def one_time_prekey_count(self, device_pk: int) -> Deferred[int]:
        return self._db.run_interaction(
            "count_prekeys", prekeys_store.one_time_prekey_count_txn, device_pk
        )

    def take_bundles(self, username: str) -> Deferred[BundleRecord | None]:
        return self._db.run_interaction("take_bundles", _bundles_txn, username)

    def list_devices(self, username: str) -> Deferred[DeviceListRecord | None]:
        return self._db.run_interaction("list_devices", _list_devices_txn, username)

    def standing(self, requester: str, username: str, now_ms: int) -> Deferred[Standing | None]:
        return self._db.run_interaction(
            "standing", care_store.standing_txn, requester, username, now_ms
        )


__all__ = ["SqlRelayStore", "apply_writes_txn"]
