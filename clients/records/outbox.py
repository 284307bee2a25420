"""The gateway's durable outbox: one SQLite file in its data directory (WAL, synchronous=FULL).

- `intake`: every `record_bundle` message handled, by (sender user, sender device, message id),
  and the engine row cursor, so each is handled once across restarts;
- `mirrors`: one row per mirror (id derived from visit id and bundle SHA-256): the FHIR Bundle
  JSON, state `pending` | `delivered` | `failed`, attempts, next attempt time, last error (one
  line, no content) and the record ids;
- `receipts`: receipts still to send (and sent ones, for `status`), so a restart between a
  delivery and its receipt loses nothing.

Every state change that must go with another happens in one transaction: a message's intake
with its mirror or its failed receipt; a mirror's delivery (or permanent failure) with its
receipt. The calls are synchronous and short; the gateway makes them on the reactor thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
SENT: Final = "sent"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS intake (
    sender_user TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    message_id BLOB NOT NULL,
    row_id INTEGER NOT NULL,
    handled_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    mirror_id TEXT,
    PRIMARY KEY (sender_user, sender_device, message_id)
);
CREATE TABLE IF NOT EXISTS mirrors (
    mirror_id TEXT PRIMARY KEY,
    visit_id TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    thread_id BLOB NOT NULL,
    recipients TEXT NOT NULL,
    bundle_json BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    record_ids TEXT NOT NULL DEFAULT '[]',
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id INTEGER PRIMARY KEY AUTOINCREMENT,
    mirror_id TEXT,
    thread_id BLOB NOT NULL,
    recipients TEXT NOT NULL,
    text TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER
);
CREATE INDEX IF NOT EXISTS mirrors_due ON mirrors (state, next_attempt_ms);
CREATE INDEX IF NOT EXISTS receipts_due ON receipts (state, next_attempt_ms);
"""


@dataclass(frozen=True, slots=True)
class Mirror:
    mirror_id: str
    visit_id: str
    bundle_sha256: str
    thread_id: bytes
    recipients: tuple[str, ...]
    bundle_json: bytes = field(repr=False)
    state: str
    attempts: int
    next_attempt_ms: int
    last_error: str | None
    record_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PendingReceipt:
    receipt_id: int
    mirror_id: str | None
    thread_id: bytes
    recipients: tuple[str, ...]
    text: str = field(repr=False)
    attempts: int


@dataclass(frozen=True, slots=True)
class NewReceipt:
    thread_id: bytes
    recipients: tuple[str, ...]
    text: str = field(repr=False)
    mirror_id: str | None = None


class Outbox:
    """The outbox database (created on first use)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- intake --------------------------------------------------------------------------------

    def cursor(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
        return int(row[0]) if row else 0

    def advance_cursor(self, row_id: int) -> None:
        with self._transaction() as conn:
            _set_cursor(conn, row_id)

    def seen(self, sender_user: str, sender_device: str, message_id: bytes) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM intake WHERE sender_user = ? AND sender_device = ? AND message_id = ?",
            (sender_user, sender_device, message_id),
        ).fetchone()
        return row is not None

    def record_intake(
        self,
        *,
        sender_user: str,
        sender_device: str,
        message_id: bytes,
        row_id: int,
        now_ms: int,
        outcome: str,
        mirror: Mirror | None = None,
        receipt: NewReceipt | None = None,
        on_replay: Callable[[Mirror], NewReceipt | None] | None = None,
    ) -> str:
        """Record a handled message with what it led to, in one transaction: a new mirror
        (unless one with that id exists: then the existing one stands, and `on_replay(existing)`
        may add a receipt, e.g. a delivered one's again), and/or a receipt. Returns the intake
        outcome stored."""
        with self._transaction() as conn:
            if mirror is not None:
                row = conn.execute(
                    f"SELECT {_MIRROR_COLUMNS} FROM mirrors WHERE mirror_id = ?",  # noqa: S608
                    (mirror.mirror_id,),
                ).fetchone()
                existing = _mirror(row) if row else None
                if existing is None:
                    conn.execute(
                        "INSERT INTO mirrors (mirror_id, visit_id, bundle_sha256, thread_id,"
                        " recipients, bundle_json, state, attempts, next_attempt_ms, created_ms)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                        (
                            mirror.mirror_id,
                            mirror.visit_id,
                            mirror.bundle_sha256,
                            mirror.thread_id,
                            json.dumps(list(mirror.recipients)),
                            mirror.bundle_json,
                            PENDING,
                            now_ms,
                            now_ms,
                        ),
                    )
                else:
                    outcome = f"replay of a {existing.state} mirror"
                    again = on_replay(existing) if on_replay is not None else None
                    if again is not None:
                        _insert_receipt(conn, again, now_ms)
            if receipt is not None:
                _insert_receipt(conn, receipt, now_ms)
            conn.execute(
                "INSERT OR IGNORE INTO intake (sender_user, sender_device, message_id, row_id,"
                " handled_ms, outcome, mirror_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    sender_user,
                    sender_device,
                    message_id,
                    row_id,
                    now_ms,
                    outcome,
                    mirror.mirror_id if mirror is not None else None,
                ),
            )
            if row_id > _get_cursor(conn):
                _set_cursor(conn, row_id)
        return outcome

    # -- mirrors -------------------------------------------------------------------------------

    def mirror(self, mirror_id: str) -> Mirror | None:
        row = self._conn.execute(
            f"SELECT {_MIRROR_COLUMNS} FROM mirrors WHERE mirror_id = ?",  # noqa: S608
            (mirror_id,),
        ).fetchone()
        return _mirror(row) if row else None

    def due_mirrors(self, now_ms: int, limit: int = 16) -> list[Mirror]:
        rows = self._conn.execute(
            f"SELECT {_MIRROR_COLUMNS} FROM mirrors"  # noqa: S608
            " WHERE state = ? AND next_attempt_ms <= ? ORDER BY next_attempt_ms, mirror_id"
            " LIMIT ?",
            (PENDING, now_ms, limit),
        ).fetchall()
        return [_mirror(row) for row in rows]

    def next_due_ms(self) -> int | None:
        row = self._conn.execute(
            "SELECT MIN(t) FROM (SELECT MIN(next_attempt_ms) AS t FROM mirrors WHERE state = ?"
            " UNION ALL SELECT MIN(next_attempt_ms) FROM receipts WHERE state = ?)",
            (PENDING, PENDING),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def make_all_due(self, now_ms: int) -> None:
        """Bring every pending mirror and receipt forward to now (at start)."""
        with self._transaction() as conn:
            for table in ("mirrors", "receipts"):
                conn.execute(
                    f"UPDATE {table} SET next_attempt_ms = ?"  # noqa: S608
                    " WHERE state = ? AND next_attempt_ms > ?",
                    (now_ms, PENDING, now_ms),
                )

    def mirror_delivered(
        self, mirror_id: str, record_ids: Sequence[str], now_ms: int, receipt: NewReceipt
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE mirrors SET state = ?, attempts = attempts + 1, last_error = NULL,"
                " record_ids = ?, finished_ms = ? WHERE mirror_id = ? AND state = ?",
                (DELIVERED, json.dumps(list(record_ids)), now_ms, mirror_id, PENDING),
            )
            _insert_receipt(conn, receipt, now_ms)

    def mirror_failed(self, mirror_id: str, error: str, now_ms: int, receipt: NewReceipt) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE mirrors SET state = ?, attempts = attempts + 1, last_error = ?,"
                " finished_ms = ? WHERE mirror_id = ? AND state = ?",
                (FAILED, error, now_ms, mirror_id, PENDING),
            )
            _insert_receipt(conn, receipt, now_ms)

    def mirror_retry(self, mirror_id: str, error: str, next_attempt_ms: int) -> int:
        """Count a failed attempt and set the next one; returns the attempts so far."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE mirrors SET attempts = attempts + 1, last_error = ?, next_attempt_ms = ?"
                " WHERE mirror_id = ? AND state = ?",
                (error, next_attempt_ms, mirror_id, PENDING),
            )
            row = conn.execute(
                "SELECT attempts FROM mirrors WHERE mirror_id = ?", (mirror_id,)
            ).fetchone()
        return int(row[0]) if row else 0

    # -- receipts ------------------------------------------------------------------------------

    def add_receipt(self, receipt: NewReceipt, now_ms: int) -> None:
        with self._transaction() as conn:
            _insert_receipt(conn, receipt, now_ms)

    def due_receipts(self, now_ms: int, limit: int = 16) -> list[PendingReceipt]:
        rows = self._conn.execute(
            "SELECT receipt_id, mirror_id, thread_id, recipients, text, attempts FROM receipts"
            " WHERE state = ? AND next_attempt_ms <= ? ORDER BY next_attempt_ms, receipt_id"
            " LIMIT ?",
            (PENDING, now_ms, limit),
        ).fetchall()
        return [
            PendingReceipt(r[0], r[1], bytes(r[2]), tuple(json.loads(r[3])), r[4], r[5])
            for r in rows
        ]

    def receipt_sent(self, receipt_id: int, now_ms: int) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE receipts SET state = ?, attempts = attempts + 1, sent_ms = ?,"
                " last_error = NULL WHERE receipt_id = ?",
                (SENT, now_ms, receipt_id),
            )

    def receipt_retry(self, receipt_id: int, error: str, next_attempt_ms: int) -> int:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE receipts SET attempts = attempts + 1, last_error = ?, next_attempt_ms = ?"
                " WHERE receipt_id = ?",
                (error, next_attempt_ms, receipt_id),
            )
            row = conn.execute(
                "SELECT attempts FROM receipts WHERE receipt_id = ?", (receipt_id,)
            ).fetchone()
        return int(row[0]) if row else 0

    # -- status --------------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows by state: {"mirrors": {...}, "receipts": {...}, "intake": {"handled": n}}."""
        out: dict[str, dict[str, int]] = {
            "mirrors": {PENDING: 0, DELIVERED: 0, FAILED: 0},
            "receipts": {PENDING: 0, SENT: 0},
        }
        for table in ("mirrors", "receipts"):
            for state, count in self._conn.execute(
                f"SELECT state, COUNT(*) FROM {table} GROUP BY state"  # noqa: S608
            ):
                out[table][state] = count
        (handled,) = self._conn.execute("SELECT COUNT(*) FROM intake").fetchone()
        out["intake"] = {"handled": handled}
        return out


_MIRROR_COLUMNS: Final = (
    "mirror_id, visit_id, bundle_sha256, thread_id, recipients, bundle_json, state, attempts,"
    " next_attempt_ms, last_error, record_ids"
)


def _mirror(row: Sequence[object]) -> Mirror:
    return Mirror(
        mirror_id=str(row[0]),
        visit_id=str(row[1]),
        bundle_sha256=str(row[2]),
        thread_id=bytes(row[3]),  # type: ignore[call-overload]
        recipients=tuple(json.loads(str(row[4]))),
        bundle_json=bytes(row[5]),  # type: ignore[call-overload]
        state=str(row[6]),
        attempts=int(row[7]),  # type: ignore[call-overload]
        next_attempt_ms=int(row[8]),  # type: ignore[call-overload]
        last_error=None if row[9] is None else str(row[9]),
        record_ids=tuple(json.loads(str(row[10]))),
    )


def _insert_receipt(conn: sqlite3.Connection, receipt: NewReceipt, now_ms: int) -> None:
    conn.execute(
        "INSERT INTO receipts (mirror_id, thread_id, recipients, text, state, next_attempt_ms,"
        " created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            receipt.mirror_id,
            receipt.thread_id,
            json.dumps(list(receipt.recipients)),
            receipt.text,
            PENDING,
            now_ms,
            now_ms,
        ),
    )


def _get_cursor(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
    return int(row[0]) if row else 0


def _set_cursor(conn: sqlite3.Connection, row_id: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('cursor', ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (str(row_id),),
    )
