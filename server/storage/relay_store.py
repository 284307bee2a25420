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

import dataclasses
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from medrelay.crypto.certificates import Role
from medrelay.protocol.messages import ItemKind
from medrelay.server.availability.offhours import FLAG_HELD, FLAG_URGENT
from medrelay.server.availability.schedule import Schedule
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
from medrelay.server.storage import availability as availability_store
from medrelay.server.storage import care as care_store
from medrelay.server.storage import devices as devices_store
from medrelay.server.storage import prekeys as prekeys_store
from medrelay.server.storage import queue as queue_store
from medrelay.server.storage.after_hours import AfterHoursView, Routing
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


_SQLITE_EXISTING: Final = (
    "SELECT sender_device_pk, message_id, digest, created_at FROM messages WHERE message_id IN ({})"
)
_SQLITE_DELETE_OWNED: Final = "DELETE FROM queue_items WHERE device_pk = ? AND seq IN ({})"


def _marks(count: int) -> str:
    """`count` positional parameter marks for an IN list."""
    return ", ".join("?" * count)


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
    sqlite = conn.dialect.name == "sqlite"
    for start in range(0, len(ids), _CHUNK):
        id_chunk = ids[start : start + _CHUNK]
        # On SQLite through the driver: SQLAlchemy's per-value bind processing of the ids costs
        # more than the index probes.
        rows = (
            conn.exec_driver_sql(_SQLITE_EXISTING.format(_marks(len(id_chunk))), tuple(id_chunk))
            if sqlite
            else conn.execute(_EXISTING, {"ids": id_chunk})
        )
        for sender_pk, message_id, digest, created in rows:
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
    send: SendRequest,
    view: _BatchView,
    limits: WriteLimits,
    now_ms: int,
    after: AfterHoursView | None,
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
    on_call: set[str] = set()
    if after is not None and send.urgent:
        on_call, changed = after.urgent_extras(send, view.roles)
        if changed is not None:
            return changed
    for username in sorted(users):
        role = view.roles.get(username)
        if role is None:
            return unknown_user(username)
        state = pair_state(view.links, sender.username, username, now_ms)
        if username in on_call and username not in view.closed:
            continue  # an urgent message to the clinician on call needs no care link
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
) -> tuple[tuple[SendOutcome, ...], AfterHoursView | None]:
    view = _read_view(conn, sends)
    after = (
        AfterHoursView.load(conn, sends, view.roles, limits.offhours, now_ms)
        if limits.offhours is not None
        else None
    )
    verdicts: list[SendOutcome | list[int]] = []
    for send in sends:
        verdict = _judge(send, view, limits, now_ms, after)
        if isinstance(verdict, list):
            view.stored[(send.sender.pk, send.message_id)] = (send.digest, now_ms)
        verdicts.append(verdict)
    accepted = [(s, v) for s, v in zip(sends, verdicts, strict=True) if isinstance(v, list)]
    if not accepted:
        return tuple(v for v in verdicts if not isinstance(v, list)), after
    planned: list[tuple[SendRequest, list[QueuedItem], Routing | None]] = []
    held: list[availability_store.HeldEnvelope] = []
    for send, targets in accepted:
        routing = after.route(send, targets, view.roles, view.links) if after else None
        rows: list[QueuedItem] = []
        for index, (pk, envelope) in enumerate(zip(targets, send.envelopes, strict=True)):
            flags = routing.flags[index] if routing else (FLAG_URGENT if send.urgent else 0)
            if routing is not None and index in routing.held:
                held.append(
                    availability_store.HeldEnvelope(
                        clinician_pk=routing.held[index],
                        device_pk=pk,
                        peer_user=send.sender.username,
                        peer_device=send.sender.device_id,
                        message_id=send.message_id,
                        created_ms=now_ms,
                        sender_device_pk=send.sender.pk,
                        ciphertext=envelope.ciphertext,
                        flags=flags,
                    )
                )
                continue
            rows.append(_message_row(send, pk, envelope.ciphertext, now_ms, flags))
        for clinician, notice in routing.notices if routing else ():
            rows.extend(
                _notice_row(pk, send.message_id, clinician, notice, now_ms)
                for pk in view.current[send.sender.username].values()
            )
        planned.append((send, rows, routing))
    seqs = iter(
        _insert_accepted(
            conn,
            [s for s, _ in accepted],
            [row for _, rows, _ in planned for row in rows],
            now_ms,
            now_ms + limits.ttl_ms,
        )
    )
    availability_store.hold_txn(conn, held)
    _adjust(conn, Counter(row.device_pk for _, rows, _ in planned for row in rows))
    outcomes: list[SendOutcome] = []
    plans = iter(planned)
    for verdict in verdicts:
        if not isinstance(verdict, list):
            outcomes.append(verdict)
            continue
        _, rows, routing = next(plans)
        # Built field by field: `dataclasses.replace` costs several times a plain constructor.
        items = tuple(
            QueuedItem(
                row.device_pk,
                int(next(seqs)),
                row.kind,
                row.message_id,
                row.time_ms,
                row.peer_user,
                row.peer_device,
                row.ciphertext,
                row.flags,
            )
            for row in rows
        )
        outcomes.append(
            SendAccepted(
                time_ms=now_ms,
                items=items,
                held=bool(routing and routing.held),
                reads_at_ms=routing.reads_at_ms if routing else None,
                on_call=routing.on_call if routing else None,
            )
        )
    return tuple(outcomes), after


def _message_row(
    send: SendRequest, device_pk: int, ciphertext: bytes, now_ms: int, flags: int
) -> QueuedItem:
    return QueuedItem(
        device_pk=device_pk,
        seq=0,
        kind=ItemKind.MESSAGE,
        message_id=send.message_id,
        time_ms=now_ms,
        peer_user=send.sender.username,
        peer_device=send.sender.device_id,
        ciphertext=ciphertext,
        flags=flags,
    )


def _notice_row(
    device_pk: int, message_id: bytes, clinician: str, notice: bytes, now_ms: int
) -> QueuedItem:
    return QueuedItem(
        device_pk=device_pk,
        seq=0,
        kind=ItemKind.NOTICE,
        message_id=message_id,
        time_ms=now_ms,
        peer_user=clinician,
        peer_device="",
        ciphertext=notice,
    )


def _insert_accepted(
    conn: Connection,
    accepted: Sequence[SendRequest],
    rows: Sequence[QueuedItem],
    now_ms: int,
    expires_ms: int,
) -> list[int]:
    """Insert the accepted sends' message ids and the queue rows (seq ignored); the new seqs
    in row order."""
    messages_rows: list[tuple[object, ...]] = [
        (s.sender.pk, s.message_id, s.digest, now_ms) for s in accepted
    ]
    senders = {(s.sender.username, s.sender.device_id): s.sender.pk for s in accepted}
    item_rows: list[tuple[object, ...]] = [
        (
            row.device_pk,
            row.kind.value,
            row.peer_user,
            row.peer_device,
            row.message_id,
            row.time_ms,
            expires_ms,
            senders[(row.peer_user, row.peer_device)] if row.kind is ItemKind.MESSAGE else None,
            len(row.ciphertext or b""),
            row.ciphertext,
            row.flags,
        )
        for row in rows
    ]

    if conn.dialect.name == "sqlite":
        return _insert_sqlite(conn, messages_rows, item_rows)
    conn.execute(
        _INSERT_MESSAGES, [dict(zip(_MESSAGE_KEYS, r, strict=True)) for r in messages_rows]
    )
    if not item_rows:  # every envelope held, no notice: only the message id is stored
        return []
    result = conn.execute(_INSERT_ITEMS, [dict(zip(_ITEM_KEYS, r, strict=True)) for r in item_rows])
    return [int(seq) for seq in result.scalars()]


_MESSAGE_KEYS: Final = ("sender_device_pk", "message_id", "digest", "created_at")
_ITEM_KEYS: Final = (
    "device_pk", "kind", "peer_user", "peer_device", "message_id", "created_at", "expires_at",
    "sender_device_pk", "size", "ciphertext", "flags",
)  # fmt: skip
# Written out in full (a test checks them against the schema's columns).
_SQLITE_INSERT_MESSAGES: Final = (
    "INSERT INTO messages (sender_device_pk, message_id, digest, created_at) VALUES (?, ?, ?, ?)"
)
_SQLITE_INSERT_ITEMS: Final = (
    "INSERT INTO queue_items (device_pk, kind, peer_user, peer_device, message_id, created_at,"
    " expires_at, sender_device_pk, size, ciphertext, flags)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQLITE_LAST_SEQ: Final = "SELECT seq FROM sqlite_sequence WHERE name = 'queue_items'"


def _insert_sqlite(
    conn: Connection, messages_rows: list[tuple[object, ...]], item_rows: list[tuple[object, ...]]
) -> list[int]:
    """SQLite's hot path through the driver: SQLAlchemy cannot batch an INSERT with ordered
    RETURNING on SQLite (it falls back to one statement per row) and its per-value bind
    processing costs more than SQLite's own work. Rows go in as multi-row INSERTs, not
    executemany: every statement step releases and retakes the GIL, which costs a context switch
    while the reactor thread is busy, so one step per chunk instead of one per row.

    The seqs are not read back row by row: this transaction holds SQLite's only write lock, and
    AUTOINCREMENT gives the rows of an INSERT, in VALUES order, increasing seqs above every seq
    ever used (recorded in sqlite_sequence). So if the sequence moved from `before` to exactly
    `before + n` for n inserted rows, the new seqs are `before + 1 .. before + n` in row order."""
    for chunk in _row_chunks(messages_rows, _rows_per_insert(conn, 4)):
        conn.exec_driver_sql(_multi_insert(_SQLITE_INSERT_MESSAGES, 4, len(chunk)), _flat(chunk))
    if not item_rows:  # every envelope held, no notice: only the message id is stored
        return []
    before = int(conn.exec_driver_sql(_SQLITE_LAST_SEQ).scalar() or 0)
    for chunk in _row_chunks(item_rows, _rows_per_insert(conn, 11)):
        conn.exec_driver_sql(_multi_insert(_SQLITE_INSERT_ITEMS, 11, len(chunk)), _flat(chunk))
    after = int(conn.exec_driver_sql(_SQLITE_LAST_SEQ).scalar() or 0)
    if after - before != len(item_rows):  # would mean another writer inside our transaction
        raise RuntimeError("queue seqs are not the rows this transaction inserted")
    return list(range(before + 1, after + 1))


_SQLITE_ROWS_PER_INSERT: Final = 500


def _rows_per_insert(conn: Connection, columns: int) -> int:
    """Rows per multi-row INSERT: at most 500, and within this SQLite's limit on bound values
    (999 before SQLite 3.32)."""
    driver = conn.connection.driver_connection
    limit = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if driver is not None else 999
    return max(1, min(_SQLITE_ROWS_PER_INSERT, limit // columns))


def _multi_insert(single: str, columns: int, rows: int) -> str:
    """`single` (an INSERT of one row of `columns` values) extended to `rows` rows."""
    head, _, _ = single.partition(" VALUES ")
    row = "(" + ", ".join("?" * columns) + ")"
    return head + " VALUES " + ", ".join([row] * rows)


def _row_chunks(rows: list[tuple[object, ...]], size: int) -> Iterable[list[tuple[object, ...]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _flat(rows: list[tuple[object, ...]]) -> tuple[object, ...]:
    return tuple(value for row in rows for value in row)


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
    deltas: Counter[int] = Counter()
    if conn.dialect.name == "sqlite":
        # Through the driver (see `_insert_sqlite`), one DELETE per device whose row count is
        # that device's change: one statement step each instead of one per row read or
        # returned (every step releases and retakes the GIL, a context switch when the reactor
        # thread is busy).
        per_device: dict[int, set[int]] = {}
        for device_pk, seq in requested:
            per_device.setdefault(device_pk, set()).add(seq)
        for device_pk, seqs in sorted(per_device.items()):
            for chunk in _chunks(sorted(seqs)):
                deleted = conn.exec_driver_sql(
                    _SQLITE_DELETE_OWNED.format(_marks(len(chunk))), (device_pk, *chunk)
                ).rowcount
                if deleted:
                    deltas[device_pk] -= deleted
        _adjust(conn, deltas)
        return
    all_seqs = sorted({seq for _, seq in requested})
    owned: list[int] = []
    for chunk in _chunks(all_seqs):
        owned.extend(
            seq
            for seq, owner in conn.execute(_OWNERS, {"seqs": chunk})
            if (owner, seq) in requested
        )
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
    outcomes: tuple[SendOutcome, ...] = ()
    after: AfterHoursView | None = None
    if batch.sends:
        outcomes, after = _store_sends(conn, batch.sends, now_ms, limits)
    released: tuple[QueuedItem, ...] = ()
    next_release: int | None = None
    if batch.release and limits.offhours is not None:
        released, next_release = _release_txn(conn, now_ms, limits)
    notices: tuple[QueuedItem, ...] = ()
    deleted = 0
    if batch.expire_up_to:
        expiry = queue_store.expire_queue_txn(conn, now_ms, batch=batch.expire_up_to)
        queue_store.prune_messages_txn(
            conn, now_ms - limits.ttl_ms - 24 * 3600 * 1000, batch=batch.expire_up_to
        )
        notices = tuple(_queued(n.device_pk, n.item) for n in expiry.notices)
        deleted = expiry.deleted
    return WriteResult(
        outcomes,
        notices,
        deleted,
        released=released,
        next_release_ms=next_release,
        after_hours=after.tally if after is not None else None,
    )


def _release_txn(
    conn: Connection, now_ms: int, limits: WriteLimits
) -> tuple[tuple[QueuedItem, ...], int | None]:
    """Move the held messages of every clinician whose hours are open now into the queues."""
    offhours = limits.offhours
    if offhours is None:  # pragma: no cover - the caller checks
        return (), None

    def is_open(schedule: Schedule | None, at_ms: int) -> tuple[bool, int | None]:
        found = offhours.availability(schedule, at_ms)
        return found.open_now, found.changes_at_ms

    due, next_at = availability_store.due_clinicians_txn(
        conn, now_ms, offhours.config.time_zone, is_open
    )
    released: list[QueuedItem] = []
    for clinician_pk in due:
        for row in availability_store.release_txn(
            conn, clinician_pk, now_ms, now_ms + limits.ttl_ms, FLAG_HELD
        ):
            released.append(dataclasses.replace(_queued(row.device_pk, row.item), flags=row.flags))
    return tuple(released), next_at


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
        flags=item.flags,
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
