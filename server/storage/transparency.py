"""Store functions for the identity transparency log (`log_entries`).

Appending takes the "transparency" chain head's row lock first (`storage.chains`), so on
PostgreSQL two transactions can never both read size N and both write leaf N; SQLite has one
writer anyway. A leaf index is therefore dense and assigned in commit order, which is what an
RFC 9162 tree needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.crypto.errors import ProofError
from medrelay.crypto.transparency import CLINIC_SUBJECT, EventKind, LogEvent, next_event
from medrelay.server.storage.chains import (
    ChainHead,
    lock_chain_head_txn,
    set_chain_head_txn,
)
from medrelay.server.storage.schema import accounts, devices, log_entries

TRANSPARENCY_CHAIN: Final = "transparency"


def append_log_event_txn(
    conn: Connection, *, kind: EventKind, subject: str, payload: bytes, now_ms: int
) -> tuple[int, LogEvent]:
    """Append the subject's next event; returns its leaf index and the event."""
    head = lock_chain_head_txn(conn, TRANSPARENCY_CHAIN)
    previous = last_event_txn(conn, subject)
    # Never earlier than the subject's previous event: replay refuses time going backwards.
    time_ms = now_ms if previous is None else max(now_ms, previous.time_ms)
    event = next_event(previous, kind, subject, time_ms, payload)
    encoded = event.encode()
    conn.execute(
        sa.insert(log_entries).values(
            leaf_index=head.size,
            user_id=subject,
            user_seq=event.seq,
            kind=kind.value,
            event=encoded,
            created_at=now_ms,
        )
    )
    set_chain_head_txn(conn, TRANSPARENCY_CHAIN, ChainHead(head.size + 1, event.leaf_hash()))
    return head.size, event


def last_event_txn(conn: Connection, subject: str) -> LogEvent | None:
    row = conn.execute(
        sa.select(log_entries.c.event)
        .where(log_entries.c.user_id == subject)
        .order_by(log_entries.c.user_seq.desc())
        .limit(1)
    ).first()
    return None if row is None else LogEvent.decode(bytes(row.event))


def user_entries_txn(conn: Connection, subject: str, limit: int) -> list[tuple[int, bytes]]:
    """(leaf index, encoded event) of a subject's first `limit` events, in sequence order."""
    rows = conn.execute(
        sa.select(log_entries.c.leaf_index, log_entries.c.event)
        .where(log_entries.c.user_id == subject)
        .order_by(log_entries.c.user_seq)
        .limit(limit)
    )
    return [(int(row.leaf_index), bytes(row.event)) for row in rows]


def leaves_txn(conn: Connection, *, start: int, limit: int) -> list[bytes]:
    """Encoded events of leaves start, start+1, ... (at most `limit`), in leaf order. A gap in
    the leaf indexes (a deleted row) raises `ProofError`: the tree would silently shift."""
    rows = conn.execute(
        sa.select(log_entries.c.leaf_index, log_entries.c.event)
        .where(log_entries.c.leaf_index >= start)
        .order_by(log_entries.c.leaf_index)
        .limit(limit)
    ).all()
    for expected, (index, _) in enumerate(rows, start):
        if index != expected:
            raise ProofError(f"leaf {expected} is missing from the database")
    return [bytes(event) for _, event in rows]


def log_clinic_certificates_txn(
    conn: Connection, certificates: Iterable[bytes], now_ms: int
) -> int:
    """Append a `clinic_key_certified` event for each certificate not logged yet; returns how
    many were appended (the serving keys are logged at every start, so a rotation done offline
    reaches the log before any client sees the new key)."""
    logged = {
        bytes(row.event)
        for row in conn.execute(
            sa.select(log_entries.c.event).where(log_entries.c.user_id == CLINIC_SUBJECT)
        )
    }
    known = {LogEvent.decode(data).payload for data in logged}
    added = 0
    for certificate in certificates:
        if certificate not in known:
            append_log_event_txn(
                conn,
                kind=EventKind.CLINIC_KEY_CERTIFIED,
                subject=CLINIC_SUBJECT,
                payload=certificate,
                now_ms=now_ms,
            )
            known.add(certificate)
            added += 1
    return added


def clinic_certificates_txn(conn: Connection) -> list[bytes]:
    """Every clinic key certificate in the log, oldest first."""
    rows = conn.execute(
        sa.select(log_entries.c.event)
        .where(log_entries.c.user_id == CLINIC_SUBJECT)
        .order_by(log_entries.c.user_seq)
    )
    return [LogEvent.decode(bytes(row.event)).payload for row in rows]


def append_events_txn(
    conn: Connection, subject: str, events: Sequence[tuple[EventKind, bytes]], now_ms: int
) -> list[int]:
    """Append several events of one subject in order; returns their leaf indexes."""
    return [
        append_log_event_txn(conn, kind=kind, subject=subject, payload=payload, now_ms=now_ms)[0]
        for kind, payload in events
    ]


def iter_leaves_txn(conn: Connection, batch: int = 5000) -> Iterator[bytes]:
    """Every leaf's encoded event in leaf order, read in bounded batches (`leaves_txn`)."""
    start = 0
    while True:
        leaves = leaves_txn(conn, start=start, limit=batch)
        yield from leaves
        if len(leaves) < batch:
            return
        start += len(leaves)


@dataclass(frozen=True, slots=True)
class EnrolledAccount:
    username: str
    status: str
    user_certificate: bytes
    devices: dict[str, bytes]
    """Active (not revoked) devices: id -> certificate."""


def enrolled_accounts_txn(conn: Connection) -> list[EnrolledAccount]:
    """Every account that has a user certificate, with its active devices (for the auditor's
    comparison of the database with the log)."""
    found: dict[int, EnrolledAccount] = {}
    for row in conn.execute(
        sa.select(
            accounts.c.pk, accounts.c.username, accounts.c.status, accounts.c.user_certificate
        ).where(accounts.c.user_certificate.is_not(None))
    ):
        found[int(row.pk)] = EnrolledAccount(
            row.username, row.status, bytes(row.user_certificate), {}
        )
    active = conn.execute(
        sa.select(devices.c.account_pk, devices.c.device_id, devices.c.certificate).where(
            devices.c.revoked_at.is_(None)
        )
    )
    for account_pk, device_id, certificate in active:
        account = found.get(int(account_pk))
        if account is not None:
            account.devices[device_id] = bytes(certificate)
    return list(found.values())
