"""The hash-chained audit log: who did what to whom, when, and with what result.

Every admin, registrar and identity action (issue 4, "Audit") is one `audit_log` row. This module
owns the record model, its canonical encoding, the chain rule and the store functions; callers
append from inside THEIR OWN transaction, so an action and its record commit (or roll back)
together:

    seq = append_audit_txn(conn, actor="operator", action=AuditAction.ACCOUNT_CREATE,
                           target="dr.ivanova", result=AuditResult.OK, now_ms=now_ms,
                           detail="role=doctor")

The chain. Record `seq` (0-based, dense) is encoded canonically (medrelay.crypto.encoding: fixed
widths and u32 length prefixes, so no two different records share an encoding)

    AuditRecord = u8 version | u64 seq | u64 at_ms | text actor | text action | text target
                  | text result | text detail

and its hash is SHA-256(DOMAIN || prev_hash || encoding), where prev_hash is the previous
record's hash (32 zero bytes for record 0). The `chain_heads` row named "audit" holds the size
and the newest hash. Appending UPDATEs that row before anything else: on PostgreSQL the row lock
serialises concurrent appenders (the second waits and then sees the first's head), on SQLite the
single writer does. `verify_audit_txn` replays the chain in bounded batches and names the first
edited, deleted or reordered record, or a head that disagrees with the records.

What verification cannot see: someone with write access to the database can rewrite the whole
chain from some record on (or cut its tail) and update the head to match. Only a copy of a past
head kept elsewhere detects that: `medrelay-server audit verify` prints (records, head hash) for
the operator to note, and `--anchor N:HEX` checks a noted head later (docs/operations.md).

Rules for what goes into a record (it is kept for years and read by auditors):
- actor: a username, or `OPERATOR` for a command run on the server host;
- target: a username, "username/device", or "" when the action has no target;
- detail: at most 500 characters, no control characters; short facts such as "role=doctor" or
  "clinician=dr.ivanova". NEVER display names, enrollment codes, tokens, keys or health data.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.crypto.encoding import Writer
from medrelay.crypto.identity import MAX_ID_BYTES, check_id
from medrelay.crypto.kdf import sha256
from medrelay.server.storage.chains import (
    GENESIS_HASH,
    ChainHead,
    lock_chain_head_txn,
    set_chain_head_txn,
)
from medrelay.server.storage.schema import audit_log, chain_heads

AUDIT_CHAIN: Final = "audit"
"""The `chain_heads` row of the audit log."""
RECORD_VERSION: Final = 1
DOMAIN: Final = b"MEDRELAY/v1/audit-record\x00"
HASH_SIZE: Final = 32
"""The prev_hash of record 0, and the head hash of an empty log."""
OPERATOR: Final = "operator"
"""The actor of a `medrelay-server` command run on the host."""

MAX_TARGET_BYTES: Final = 2 * MAX_ID_BYTES + 1
"""A username, "/" and a device id."""
MAX_DETAIL_CHARS: Final = 500
_MAX_DETAIL_BYTES: Final = 4 * MAX_DETAIL_CHARS
_MAX_WORD_BYTES: Final = 64
_MAX_MS: Final = 2**63 - 1
"""Times are BIGINT columns."""
DEFAULT_VERIFY_BATCH: Final = 1000
MAX_LIST_LIMIT: Final = 10_000


class AuditAction(enum.StrEnum):
    """Everything the audit log records. Add a member (never rename one: old records keep their
    value) when a new admin, registrar or identity action appears."""

    ACCOUNT_CREATE = "account_create"
    """An admin or registrar created an account. target: username; detail: "role=<role>"."""
    ACCOUNT_REVOKE = "account_revoke"
    """An account was revoked (its devices too). target: username."""
    ENROLLMENT_CODE_ISSUE = "enrollment_code_issue"
    """A new enrollment code replaced an account's previous one. target: username."""
    ENROLL = "enroll"
    """A first device enrolled with a one-time code (refused: wrong, used, expired or burned
    code). target: "username/device" (or username when refused before a device existed)."""
    DEVICE_LINK = "device_link"
    """A further device was linked from an existing one. target: "username/device"."""
    DEVICE_REVOKE = "device_revoke"
    """A device was revoked. target: "username/device"."""
    LINK_CREATE = "link_create"
    """A care link was created. target: the patient's username; detail: "clinician=<username>"
    and the visit and end dates."""
    LINK_END = "link_end"
    """A care link was ended early. target: the patient's username; detail: "clinician=..."."""
    CLINIC_KEY_ROTATE = "clinic_key_rotate"
    """A clinic issuing or log key was rotated. target: ""; detail: "issuing key" or "log key"."""
    SCHEDULE_SET = "schedule_set"
    """A user's schedule was changed, by themselves or an admin (refused: the policy table
    forbade it). target: the username; detail: "fields=<the fields set>", e.g.
    "fields=hours,absences" (tz, hours, autoreply, until, absences), never their values."""
    ROSTER_ADD = "roster_add"
    """An on-call shift was added (refused: the policy table forbade it). target: the
    clinician; detail: "shift=<id>; from=<UTC ISO>; to=<UTC ISO>; department=<department>"."""
    ROSTER_REMOVE = "roster_remove"
    """An on-call shift was removed (refused: the policy table forbade it). target: the
    clinician ("" when refused); detail: "shift=<id>"."""
    HOLIDAY_SET = "holiday_set"
    """A clinic holiday was added or renamed (`admin holiday add`). target: ""; detail:
    "day=YYYY-MM-DD" (not the holiday's name)."""
    HOLIDAY_REMOVE = "holiday_remove"
    """A clinic holiday was removed (refused: there was none that day). target: ""; detail:
    "day=YYYY-MM-DD"."""
    VISIT_OPEN = "visit_open"
    """A doctor opened a teleconsultation visit (refused: the policy table or the care link
    forbade it, or the pair has an open visit). target: the patient; detail: "visit=<id>;
    fields=indication,consent" (the indication is health data: named, never recorded)."""
    VISIT_CLOSE = "visit_close"
    """A doctor closed their visit (refused: their role may not, or it was already closed).
    target: the patient ("" when refused before the visit was found); detail: "visit=<id>;
    fields=conclusion" (the conclusion's message id is not recorded)."""


class AuditResult(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"
    """The request was not allowed or not valid (nothing changed)."""
    FAILED = "failed"
    """The action was allowed but could not be completed."""


_ACTIONS: Final = frozenset(AuditAction)
_RESULTS: Final = frozenset(AuditResult)


# --- the record and the chain -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record as stored. `action` and `result` are plain strings here because a reader must
    be able to show (and the verifier to refuse) a value written by something other than
    `append_audit_txn`; `append_audit_txn` admits only `AuditAction` and `AuditResult` values."""

    seq: int
    at_ms: int
    """When, in milliseconds since the Unix epoch (UTC)."""
    actor: str
    action: str
    target: str
    result: str
    detail: str

    def encode(self) -> bytes:
        """The canonical encoding (ValueError if a field is out of bounds)."""
        return (
            Writer()
            .u8(RECORD_VERSION)
            .u64(self.seq)
            .u64(self.at_ms)
            .text(self.actor, MAX_ID_BYTES)
            .text(self.action, _MAX_WORD_BYTES)
            .text(self.target, MAX_TARGET_BYTES)
            .text(self.result, _MAX_WORD_BYTES)
            .text(self.detail, _MAX_DETAIL_BYTES)
            .to_bytes()
        )

    def chain_hash(self, prev_hash: bytes) -> bytes:
        """This record's hash when it follows a record whose hash is `prev_hash`."""
        if len(prev_hash) != HASH_SIZE:
            raise ValueError(f"prev_hash must be {HASH_SIZE} bytes")
        return sha256(DOMAIN + prev_hash + self.encode())


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A stored record with its hash (what `list_audit_txn` returns)."""

    record: AuditRecord
    record_hash: bytes


def _has_control_characters(value: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in value)


def check_target(target: str) -> str:
    """ "" or a username or "username/device": at most MAX_TARGET_BYTES of UTF-8, no control
    characters (ValueError otherwise)."""
    if not isinstance(target, str):
        raise TypeError("audit target must be a str")
    if _has_control_characters(target):
        raise ValueError("audit target contains control characters")
    if len(target.encode("utf-8")) > MAX_TARGET_BYTES:
        raise ValueError(f"audit target is longer than {MAX_TARGET_BYTES} bytes")
    return target


def check_detail(detail: str) -> str:
    if not isinstance(detail, str):
        raise TypeError("audit detail must be a str")
    if len(detail) > MAX_DETAIL_CHARS:
        raise ValueError(f"audit detail is longer than {MAX_DETAIL_CHARS} characters")
    if _has_control_characters(detail):
        raise ValueError("audit detail contains control characters")
    return detail


def new_record(
    seq: int,
    *,
    actor: str,
    action: AuditAction | str,
    target: str,
    result: AuditResult | str,
    now_ms: int,
    detail: str = "",
) -> AuditRecord:
    """A validated record (ValueError or TypeError naming the bad field)."""
    check_id(actor, "audit actor")
    try:
        action = AuditAction(action)
    except ValueError:
        raise ValueError(f"unknown audit action {action!r}") from None
    try:
        result = AuditResult(result)
    except ValueError:
        raise ValueError(f"unknown audit result {result!r}") from None
    if type(now_ms) is not int or not 0 <= now_ms <= _MAX_MS:
        raise ValueError("audit time must be a non-negative integer of milliseconds")
    if type(seq) is not int or not 0 <= seq <= _MAX_MS:
        raise ValueError("audit seq must be a non-negative integer")
    return AuditRecord(
        seq=seq,
        at_ms=now_ms,
        actor=actor,
        action=action.value,
        target=check_target(target),
        result=result.value,
        detail=check_detail(detail),
    )


# --- appending ----------------------------------------------------------------------------------


def _lock_head_txn(conn: Connection) -> tuple[int, bytes]:
    """Lock the audit chain's head row (creating it on first use); returns (size, head hash)."""
    head = lock_chain_head_txn(conn, AUDIT_CHAIN)
    return head.size, head.head_hash


def append_audit_txn(
    conn: Connection,
    *,
    actor: str,
    action: AuditAction | str,
    target: str,
    result: AuditResult | str,
    now_ms: int,
    detail: str = "",
) -> int:
    """Append one record to the audit log in the caller's transaction; returns its seq.

    Validates every field first (ValueError or TypeError, nothing written): `actor` is a
    username or `OPERATOR`; `action` an `AuditAction`; `target` "", a username or
    "username/device"; `result` an `AuditResult`; `detail` at most 500 characters without
    control characters, and never names, codes, tokens or health data. The head row stays
    locked until the caller's transaction ends, so keep that transaction short.
    """
    # Validate before taking the lock: a bad call writes nothing and blocks nobody.
    record = new_record(
        0, actor=actor, action=action, target=target, result=result, now_ms=now_ms, detail=detail
    )
    size, head_hash = _lock_head_txn(conn)
    record = dataclasses.replace(record, seq=size)
    record_hash = record.chain_hash(head_hash)
    conn.execute(
        sa.insert(audit_log).values(
            seq=record.seq,
            at=record.at_ms,
            actor=record.actor,
            action=record.action,
            target=record.target,
            result=record.result,
            detail=record.detail,
            prev_hash=head_hash,
            record_hash=record_hash,
        )
    )
    set_chain_head_txn(conn, AUDIT_CHAIN, ChainHead(size + 1, record_hash))
    return size


# --- verifying ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditProblem:
    seq: int
    """The record where the chain stops being trustworthy."""
    reason: str
    """One line for the operator."""


@dataclass(frozen=True, slots=True)
class AuditVerification:
    count: int
    """Records in the log, as its head row says."""
    head_hash: bytes
    """The head hash as its head row says (equal to the last record's hash when intact)."""
    verified: int
    """Records 0..verified-1 were checked and chain correctly."""
    problem: AuditProblem | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class AuditAnchor:
    """A head noted earlier: the log had `count` records and its head was `head_hash`."""

    count: int
    head_hash: bytes

    @classmethod
    def parse(cls, text: str) -> AuditAnchor:
        """`N:HEX`, as `audit verify` prints it (ValueError otherwise)."""
        count_text, sep, hex_text = text.strip().partition(":")
        if not sep or not count_text.isdigit() or len(hex_text) != 2 * HASH_SIZE:
            raise ValueError("an anchor is N:HEX (the record count and the 64-digit head hash)")
        try:
            head_hash = bytes.fromhex(hex_text)
        except ValueError:
            raise ValueError("the anchor's head hash is not hexadecimal") from None
        return cls(int(count_text), head_hash)

    def __str__(self) -> str:
        return f"{self.count}:{self.head_hash.hex()}"


def _row_record(row: sa.Row[tuple[object, ...]]) -> AuditRecord:
    return AuditRecord(
        seq=int(row.seq),
        at_ms=int(row.at),
        actor=row.actor,
        action=row.action,
        target=row.target,
        result=row.result,
        detail=row.detail,
    )


def _successor_seq_txn(conn: Connection, prev_hash: bytes, after_seq: int) -> int | None:
    """The first record after `after_seq` that claims to follow `prev_hash` (a full scan; only
    run once, to explain a broken link)."""
    value = conn.execute(
        sa.select(sa.func.min(audit_log.c.seq)).where(
            audit_log.c.prev_hash == prev_hash, audit_log.c.seq > after_seq
        )
    ).scalar()
    return None if value is None else int(value)


def _link_problem(conn: Connection, seq: int, expected_prev: bytes) -> AuditProblem:
    """Explain why record `seq` does not follow record seq-1."""
    successor = _successor_seq_txn(conn, expected_prev, seq)
    if successor is not None:
        return AuditProblem(
            seq,
            f"records are reordered: record {successor} is the one that follows record "
            f"{seq - 1}, not record {seq}",
        )
    if seq == 0:
        return AuditProblem(0, "record 0 does not start the chain (it was edited or replaced)")
    return AuditProblem(
        seq,
        f"record {seq} does not follow record {seq - 1} (a record was deleted, edited or "
        "replaced here)",
    )


def _check_record(
    conn: Connection,
    row: sa.Row[tuple[object, ...]],
    expected_seq: int,
    expected_prev: bytes,
) -> AuditProblem | None:
    if int(row.seq) != expected_seq:  # keyset order: only ever a gap
        return AuditProblem(expected_seq, f"record {expected_seq} is missing (deleted)")
    if bytes(row.prev_hash) != expected_prev:
        return _link_problem(conn, expected_seq, expected_prev)
    record = _row_record(row)
    try:
        recomputed = record.chain_hash(expected_prev)
    except ValueError:
        return AuditProblem(expected_seq, f"record {expected_seq} was edited (a field is invalid)")
    if recomputed != bytes(row.record_hash):
        return AuditProblem(
            expected_seq, f"record {expected_seq} was edited (its contents do not match its hash)"
        )
    if record.action not in _ACTIONS:
        return AuditProblem(
            expected_seq, f"record {expected_seq} has an unknown action {record.action!a}"
        )
    if record.result not in _RESULTS:
        return AuditProblem(
            expected_seq, f"record {expected_seq} has an unknown result {record.result!a}"
        )
    return None


class AuditReplay:
    """`verify_audit_txn` in resumable steps, so that a long log can be checked in many short
    transactions (on SQLite a transaction holds the write lock; the server must not wait for a
    replay of a million records). Each step only changes this object when it returns, so a
    step that `run_interaction` runs again starts from the same state.

    Reading across transactions is sound for an append-only log: the head is read first, only
    the records it covers are replayed, and appends never change them.
    """

    def __init__(self, *, anchor: AuditAnchor | None = None) -> None:
        self._anchor = anchor
        self._size = 0
        self._head_hash = GENESIS_HASH
        self._next_seq = 0
        self._running = GENESIS_HASH
        self._problem: AuditProblem | None = None
        self._started = False

    @property
    def done(self) -> bool:
        """No more records to replay (all checked, or a problem found)."""
        return self._started and (self._problem is not None or self._next_seq >= self._size)

    def _result(self, problem: AuditProblem | None = None) -> AuditVerification:
        return AuditVerification(self._size, self._head_hash, self._next_seq, problem)

    def start_txn(self, conn: Connection) -> None:
        """Read the head: the replay covers the records it counts."""
        row = conn.execute(
            sa.select(chain_heads.c.size, chain_heads.c.head_hash).where(
                chain_heads.c.name == AUDIT_CHAIN
            )
        ).first()
        if row is not None:
            self._size, self._head_hash = int(row.size), bytes(row.head_hash)
        anchor = self._anchor
        if anchor is not None and anchor.count == 0 and anchor.head_hash != GENESIS_HASH:
            self._problem = AuditProblem(0, "the anchor of an empty log must be the zero hash")
        self._started = True

    def step_txn(self, conn: Connection, *, max_records: int = DEFAULT_VERIFY_BATCH) -> bool:
        """Replay up to `max_records` more records; returns `done`."""
        if not self._started:
            raise RuntimeError("start_txn must run first")
        if max_records < 1:
            raise ValueError("max_records must be positive")
        if self.done:
            return True
        seq, running, problem = self._next_seq, self._running, None
        rows = conn.execute(
            sa.select(audit_log)
            .where(audit_log.c.seq >= seq, audit_log.c.seq < self._size)
            .order_by(audit_log.c.seq)
            .limit(max_records)
        ).all()
        for row in rows:
            problem = _check_record(conn, row, seq, running)
            if problem is not None:
                break
            running = bytes(row.record_hash)
            seq += 1
            problem = self._anchor_problem(seq, running)
            if problem is not None:
                break
        if problem is None and seq < self._size and len(rows) < max_records:
            # Fewer rows than asked for, and none left below the head.
            missing = (
                f"record {seq} is"
                if seq == self._size - 1
                else f"records {seq}..{self._size - 1} are"
            )
            problem = AuditProblem(
                seq,
                f"{missing} missing: the head counts {self._size} records (the tail was deleted)",
            )
        self._next_seq, self._running, self._problem = seq, running, problem
        return self.done

    def _anchor_problem(self, count: int, running: bytes) -> AuditProblem | None:
        anchor = self._anchor
        if anchor is None or count != anchor.count or running == anchor.head_hash:
            return None
        return AuditProblem(
            count - 1,
            f"the log no longer matches the anchor: record {count - 1} is not the head noted "
            "then (the chain was rewritten)",
        )

    def finish_txn(self, conn: Connection) -> AuditVerification:
        """The verdict, after the last step: the head against the last record, records beyond
        the head, and an anchor beyond the end."""
        if not self.done:
            raise RuntimeError("the replay has records left")
        if self._problem is not None:
            return self._result(self._problem)
        # One statement, so a concurrent append (record and head in one commit) is seen wholly
        # or not at all.
        head_size = (
            sa.select(chain_heads.c.size).where(chain_heads.c.name == AUDIT_CHAIN).scalar_subquery()
        )
        beyond = conn.execute(
            sa.select(sa.func.min(audit_log.c.seq)).where(
                audit_log.c.seq >= sa.func.coalesce(head_size, 0)
            )
        ).scalar()
        if beyond is not None:
            return self._result(
                AuditProblem(
                    int(beyond),
                    f"record {int(beyond)} is beyond the chain head (added outside the audit "
                    "log, or the head was rolled back)",
                )
            )
        if self._running != self._head_hash:
            return self._result(
                AuditProblem(
                    max(self._size - 1, 0),
                    "the chain head does not match the last record (the head or the tail was "
                    "changed)",
                )
            )
        anchor = self._anchor
        if anchor is not None and anchor.count > self._size:
            return self._result(
                AuditProblem(
                    self._size,
                    f"the log has {self._size} records but {anchor.count} were noted in the "
                    "anchor (the log was truncated)",
                )
            )
        return self._result()


def verify_audit_txn(
    conn: Connection,
    *,
    anchor: AuditAnchor | None = None,
    batch_size: int = DEFAULT_VERIFY_BATCH,
) -> AuditVerification:
    """Replay the audit chain against its head row in one transaction; report the first problem.

    Reads the head first and then the records it covers (0..size-1) in batches of
    `batch_size`, so memory stays bounded and records appended meanwhile by others are simply
    not part of this check. Detects: an edited record (its hash, or the next record's link, no
    longer matches), a deleted record (a gap), reordered records (a link points elsewhere), a
    deleted tail (fewer records than the head counts), a head that disagrees with the last
    record, records beyond the head, and unknown actions or results. With `anchor`, also that
    the log still extends the head noted then (detects a rewritten or truncated chain whose
    head row was updated to match). `AuditReplay` does the same in several transactions.
    """
    replay = AuditReplay(anchor=anchor)
    replay.start_txn(conn)
    while not replay.step_txn(conn, max_records=batch_size):
        pass
    return replay.finish_txn(conn)


# --- reading ------------------------------------------------------------------------------------


def list_audit_txn(
    conn: Connection,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    actor: str | None = None,
    action: AuditAction | str | None = None,
    target: str | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """The newest `limit` records matching every given filter, oldest first.

    `since_ms` is inclusive and `until_ms` exclusive (record time, UTC milliseconds); `actor`,
    `action` and `target` match exactly. Records are returned as stored (not verified)."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    conditions: list[sa.ColumnElement[bool]] = []
    if since_ms is not None:
        conditions.append(audit_log.c.at >= since_ms)
    if until_ms is not None:
        conditions.append(audit_log.c.at < until_ms)
    if actor is not None:
        conditions.append(audit_log.c.actor == actor)
    if action is not None:
        conditions.append(audit_log.c.action == str(action))
    if target is not None:
        conditions.append(audit_log.c.target == target)
    rows: Sequence[sa.Row[tuple[object, ...]]] = conn.execute(
        sa.select(audit_log).where(*conditions).order_by(audit_log.c.seq.desc()).limit(limit)
    ).all()
    return [AuditEntry(_row_record(row), bytes(row.record_hash)) for row in reversed(rows)]


# --- the operator's view ------------------------------------------------------------------------


def utc_text(ms: int) -> str:
    """ISO-8601 UTC to the second, e.g. 2025-11-23T08:00:00Z (a raw count if out of range)."""
    try:
        moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ms}ms"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> int:
    """Milliseconds since the epoch of an ISO-8601 date or time; without an offset it is UTC
    (ValueError otherwise)."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO-8601 time (e.g. 2025-11-23 or 2025-11-23T08:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def _printable(value: str) -> str:
    # Records come from a database that may have been tampered with: never let one send
    # terminal escapes to the operator's screen.
    return value if not _has_control_characters(value) else ascii(value)


def entry_json(entry: AuditEntry) -> dict[str, object]:
    record = entry.record
    return {
        "seq": record.seq,
        "at": utc_text(record.at_ms),
        "at_ms": record.at_ms,
        "actor": record.actor,
        "action": record.action,
        "target": record.target,
        "result": record.result,
        "detail": record.detail,
        "hash": entry.record_hash.hex(),
    }


def entry_text(entry: AuditEntry) -> str:
    """One line: seq, time, actor, action, target ("-" if none), result, detail."""
    record = entry.record
    fields = [
        f"{record.seq:>6}",
        utc_text(record.at_ms),
        _printable(record.actor),
        _printable(record.action),
        _printable(record.target) or "-",
        _printable(record.result),
    ]
    if record.detail:
        fields.append(_printable(record.detail))
    return "  ".join(fields)
