"""The hash-chained audit log (medrelay.server.audit): the canonical record encoding and chain
rule, field validation, appending and verifying on SQLite and PostgreSQL, every kind of tampering
`verify_audit_txn` must name (edited, deleted and reordered records, a deleted tail, a head that
disagrees, records beyond the head, unknown actions), what only an anchor detects (a truncation
or rewrite with the head updated to match), concurrent appenders staying one chain, and
`admin add-user` writing its record in the account's own transaction."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from store_worlds import SqlWorld, postgres_world, result, sqlite_world

from medrelay.crypto.certificates import Role
from medrelay.crypto.kdf import sha256
from medrelay.crypto.passwords import PasswordHasher, PasswordParams
from medrelay.crypto.rng import seeded_rng
from medrelay.server import admin, audit
from medrelay.server.audit import (
    DOMAIN,
    AuditAction,
    AuditAnchor,
    AuditProblem,
    AuditRecord,
    AuditReplay,
    AuditResult,
    AuditVerification,
    append_audit_txn,
    list_audit_txn,
    new_record,
    verify_audit_txn,
)
from medrelay.server.storage import accounts
from medrelay.server.storage.chains import GENESIS_HASH

T0 = 1_763_884_800_000


@pytest.fixture(params=["sqlite", "postgresql"])
def sql(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlWorld]:
    """An empty migrated database of each kind (PostgreSQL only when configured)."""
    if request.param == "sqlite":
        world = sqlite_world(request.getfixturevalue("sqlite_relay_template"), tmp_path)
    else:
        world = postgres_world(request.getfixturevalue("postgres_relay_url"))
    yield world
    world.close()


def append(sql: SqlWorld, n: int = 1, **fields: Any) -> list[int]:
    """Append `n` records (each its own transaction); returns their seqs."""
    seqs = []
    for i in range(n):
        values: dict[str, Any] = {
            "actor": "operator",
            "action": AuditAction.ACCOUNT_CREATE,
            "target": f"user{i}",
            "result": AuditResult.OK,
            "now_ms": T0 + i,
            "detail": "role=doctor",
        }
        values.update(fields)
        seqs.append(sql.run(append_audit_txn, **values))
    return seqs


def verify(sql: SqlWorld, **kwargs: Any) -> AuditVerification:
    return sql.run(verify_audit_txn, **kwargs)


def tamper(sql: SqlWorld, *statements: str, **params: Any) -> None:
    """What someone with write access to the database could do."""
    with sql.engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement), params)


def rows(sql: SqlWorld) -> list[Any]:
    with sql.engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT * FROM audit_log ORDER BY seq")))


def head(sql: SqlWorld) -> tuple[int, bytes]:
    with sql.engine.connect() as conn:
        size, head_hash = conn.execute(
            sa.text("SELECT size, head_hash FROM chain_heads WHERE name = 'audit'")
        ).one()
    return int(size), bytes(head_hash)


def record(seq: int = 0, **fields: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "actor": "operator",
        "action": AuditAction.ACCOUNT_CREATE,
        "target": "alice",
        "result": AuditResult.OK,
        "now_ms": T0,
        "detail": "",
    }
    values.update(fields)
    return new_record(seq, **values)


# --- the record and the chain rule --------------------------------------------------------------


def test_encoding_is_versioned_length_prefixed_and_unambiguous() -> None:
    """Moving characters from one field to the next changes the encoding: every text field
    carries its length, so no two records share an encoding (or a hash)."""
    one = record(actor="ab", target="c")
    two = record(actor="a", target="bc")
    assert one.encode() != two.encode()
    encoded = record(seq=7).encode()
    assert encoded[0] == audit.RECORD_VERSION
    assert encoded[1:9] == (7).to_bytes(8, "big")
    assert encoded[9:17] == T0.to_bytes(8, "big")
    assert encoded[17:21] == len("operator").to_bytes(4, "big")


def test_record_hash_is_domain_separated_and_binds_prev_hash_and_seq() -> None:
    rec = record()
    prev = bytes(range(32))
    assert rec.chain_hash(prev) == sha256(DOMAIN + prev + rec.encode())
    assert rec.chain_hash(prev) != rec.chain_hash(GENESIS_HASH)
    assert rec.chain_hash(prev) != record(seq=1).chain_hash(prev)
    with pytest.raises(ValueError, match="32 bytes"):
        rec.chain_hash(b"short")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"actor": ""}, "audit actor must not be empty"),
        ({"actor": "a\nb"}, "audit actor contains control characters"),
        ({"actor": "x" * 65}, "audit actor is longer than 64 bytes"),
        ({"action": "drop_tables"}, "unknown audit action 'drop_tables'"),
        ({"result": "maybe"}, "unknown audit result 'maybe'"),
        ({"target": "alice\x1b[2J"}, "audit target contains control characters"),
        ({"target": "u" * 64 + "/" + "d" * 65}, "audit target is longer than 129 bytes"),
        ({"detail": "x" * 501}, "audit detail is longer than 500 characters"),
        ({"detail": "line\nbreak"}, "audit detail contains control characters"),
        ({"detail": "\ud800"}, "audit detail contains control characters"),
        ({"now_ms": -1}, "audit time must be a non-negative integer"),
        ({"now_ms": True}, "audit time must be a non-negative integer"),
    ],
)
def test_every_field_is_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        record(**fields)


def test_fields_at_their_limits_are_accepted() -> None:
    """A username/device target of two maximal ids, a 500-character detail (any script)."""
    rec = record(target="u" * 64 + "/" + "d" * 64, detail="я" * 500, actor="x" * 64)
    assert len(rec.encode()) > 1000
    assert record(action="link_create", result="refused").action == "link_create"


def test_anchor_text_round_trips() -> None:
    anchor = AuditAnchor(3, bytes(range(32)))
    assert AuditAnchor.parse(str(anchor)) == anchor
    for bad in ("3", "x:" + "00" * 32, "3:" + "00" * 31, "3:" + "zz" * 32, "-1:" + "00" * 32):
        with pytest.raises(ValueError, match="anchor"):
            AuditAnchor.parse(bad)


# --- appending and verifying --------------------------------------------------------------------


def test_an_empty_log_is_intact(sql: SqlWorld) -> None:
    report = verify(sql)
    assert report == AuditVerification(0, GENESIS_HASH, 0, None)
    assert report.intact


def test_appends_form_one_chain_under_the_head(sql: SqlWorld) -> None:
    assert append(sql, 4) == [0, 1, 2, 3]
    stored = rows(sql)
    assert [row.seq for row in stored] == [0, 1, 2, 3]
    assert bytes(stored[0].prev_hash) == GENESIS_HASH
    for before, after in itertools.pairwise(stored):
        assert bytes(after.prev_hash) == bytes(before.record_hash)
    assert head(sql) == (4, bytes(stored[-1].record_hash))
    report = verify(sql)
    assert report.intact and report.count == report.verified == 4
    assert report.head_hash == bytes(stored[-1].record_hash)


def test_the_stored_hash_is_the_chain_rule(sql: SqlWorld) -> None:
    """An independent recomputation from the stored columns matches what was stored."""
    append(sql, 2, detail="role=nurse")
    prev = GENESIS_HASH
    for row in rows(sql):
        rec = AuditRecord(
            row.seq, row.at, row.actor, row.action, row.target, row.result, row.detail
        )
        assert bytes(row.record_hash) == sha256(DOMAIN + prev + rec.encode())
        prev = bytes(row.record_hash)


def test_a_refused_append_writes_nothing(sql: SqlWorld) -> None:
    append(sql, 1)
    with pytest.raises(ValueError, match="unknown audit action"):
        append(sql, 1, action="rm_rf")
    assert len(rows(sql)) == 1 and head(sql)[0] == 1


def test_verify_streams_in_batches(sql: SqlWorld) -> None:
    """Batches smaller than the log give the same answer, and a gap on a batch boundary is
    still found."""
    append(sql, 7)
    assert verify(sql, batch_size=2) == verify(sql)
    tamper(sql, "DELETE FROM audit_log WHERE seq = 4")
    report = verify(sql, batch_size=2)
    assert report.problem is not None and report.problem.seq == 4
    assert report.verified == 4


def replay(sql: SqlWorld, per_transaction: int, **kwargs: Any) -> AuditVerification:
    """`AuditReplay` the way `admin.verify_audit` runs it: one transaction per step."""
    steps = AuditReplay(**kwargs)
    sql.run(steps.start_txn)
    while not sql.run(steps.step_txn, max_records=per_transaction):
        pass
    return sql.run(steps.finish_txn)


def test_a_replay_in_many_transactions_matches_one(sql: SqlWorld) -> None:
    append(sql, 7)
    assert replay(sql, 3) == verify(sql)
    tamper(sql, "UPDATE audit_log SET detail = 'role=admin' WHERE seq = 5")
    assert replay(sql, 3) == verify(sql)
    assert replay(sql, 3).problem == AuditProblem(
        5, "record 5 was edited (its contents do not match its hash)"
    )


def test_appends_between_replay_steps_are_not_part_of_it(sql: SqlWorld) -> None:
    """The replay covers the records its head counted; what others append meanwhile is
    neither checked nor mistaken for tampering."""
    append(sql, 4)
    steps = AuditReplay()
    sql.run(steps.start_txn)
    assert not sql.run(steps.step_txn, max_records=2)
    append(sql, 3)
    assert sql.run(steps.step_txn, max_records=2)
    report = sql.run(steps.finish_txn)
    assert report.intact and report.count == 4
    assert report.head_hash == bytes(rows(sql)[3].record_hash)


def test_replay_steps_run_in_order() -> None:
    steps = AuditReplay()
    with pytest.raises(RuntimeError, match="start_txn must run first"):
        steps.step_txn(None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="records left"):
        steps.finish_txn(None)  # type: ignore[arg-type]


# --- tampering ----------------------------------------------------------------------------------


def swap_contents(sql: SqlWorld, a: int, b: int) -> None:
    """Exchange everything but the seq of records a and b."""
    columns = ("at", "actor", "action", "target", "result", "detail", "prev_hash", "record_hash")
    row_a, row_b = (next(r for r in rows(sql) if r.seq == s) for s in (a, b))
    assignments = ", ".join(f"{c} = :{c}" for c in columns)
    for seq, source in ((a, row_b), (b, row_a)):
        tamper(
            sql,
            f"UPDATE audit_log SET {assignments} WHERE seq = :s",  # noqa: S608 (fixed names)
            s=seq,
            **{c: getattr(source, c) for c in columns},
        )


def renumber(sql: SqlWorld, mapping: dict[int, int]) -> None:
    """Give records new seqs (through negative seqs, so the primary key never collides)."""
    for old in mapping:
        tamper(sql, "UPDATE audit_log SET seq = :new WHERE seq = :old", new=-1 - old, old=old)
    for old, new in mapping.items():
        tamper(sql, "UPDATE audit_log SET seq = :new WHERE seq = :old", new=new, old=-1 - old)


def rewrite_from(sql: SqlWorld, start: int, **changes: Any) -> None:
    """Change record `start` and recompute every hash after it, head included: the tampering
    only an anchor can detect."""
    stored = rows(sql)
    prev = bytes(stored[start].prev_hash) if start else GENESIS_HASH
    for row in stored[start:]:
        values = {
            "seq": row.seq,
            "at_ms": row.at,
            "actor": row.actor,
            "action": row.action,
            "target": row.target,
            "result": row.result,
            "detail": row.detail,
        }
        if row.seq == start:
            values.update(changes)
        rec = AuditRecord(**values)
        new_hash = rec.chain_hash(prev)
        tamper(
            sql,
            "UPDATE audit_log SET actor = :actor, action = :action, target = :target, "
            "detail = :detail, prev_hash = :prev, record_hash = :hash WHERE seq = :seq",
            actor=rec.actor,
            action=rec.action,
            target=rec.target,
            detail=rec.detail,
            prev=prev,
            hash=new_hash,
            seq=rec.seq,
        )
        prev = new_hash
    tamper(sql, "UPDATE chain_heads SET head_hash = :h WHERE name = 'audit'", h=prev)


def rehash_one(sql: SqlWorld, seq: int, **changes: Any) -> None:
    """Edit record `seq` and recompute its own hash, but not the later records' links."""
    row = rows(sql)[seq]
    rec = AuditRecord(
        row.seq,
        row.at,
        changes.get("actor", row.actor),
        row.action,
        row.target,
        row.result,
        row.detail,
    )
    tamper(
        sql,
        "UPDATE audit_log SET actor = :actor, record_hash = :h WHERE seq = :seq",
        actor=rec.actor,
        h=rec.chain_hash(bytes(row.prev_hash)),
        seq=seq,
    )


def delete_and_renumber(sql: SqlWorld) -> None:
    tamper(sql, "DELETE FROM audit_log WHERE seq = 1")
    renumber(sql, {2: 1, 3: 2, 4: 3})
    tamper(sql, "UPDATE chain_heads SET size = 4 WHERE name = 'audit'")


def unknown_result(sql: SqlWorld) -> None:
    tamper(sql, "UPDATE audit_log SET result = 'meh' WHERE seq = 4")
    rewrite_from(sql, 4)


def sql_tampering(*statements: str, **params: Any) -> Callable[[SqlWorld], None]:
    return lambda sql: tamper(sql, *statements, **params)


TAMPERINGS: dict[str, tuple[Callable[[SqlWorld], None], int, str]] = {
    "edited target": (
        sql_tampering("UPDATE audit_log SET target = 'mallory' WHERE seq = 2"),
        2,
        "record 2 was edited (its contents do not match its hash)",
    ),
    "edited result": (
        sql_tampering("UPDATE audit_log SET result = 'refused' WHERE seq = 0"),
        0,
        "record 0 was edited",
    ),
    "edited time": (
        sql_tampering("UPDATE audit_log SET at = at + 1 WHERE seq = 4"),
        4,
        "record 4 was edited",
    ),
    "edited link": (
        sql_tampering("UPDATE audit_log SET prev_hash = :h WHERE seq = 0", h=b"\x01" * 32),
        0,
        "record 0 does not start the chain",
    ),
    "edited record with its own hash": (
        lambda sql: rehash_one(sql, 1, actor="mallory"),
        2,
        "record 2 does not follow record 1 (a record was deleted, edited or replaced here)",
    ),
    "field out of bounds": (
        sql_tampering("UPDATE audit_log SET at = -5 WHERE seq = 1"),
        1,
        "record 1 was edited (a field is invalid)",
    ),
    "deleted middle record": (
        sql_tampering("DELETE FROM audit_log WHERE seq = 2"),
        2,
        "record 2 is missing (deleted)",
    ),
    "deleted and renumbered": (
        delete_and_renumber,
        1,
        "record 1 does not follow record 0 (a record was deleted, edited or replaced here)",
    ),
    "swapped contents": (
        lambda sql: swap_contents(sql, 1, 3),
        1,
        "records are reordered: record 3 is the one that follows record 0, not record 1",
    ),
    "swapped neighbours by seq": (
        lambda sql: renumber(sql, {1: 2, 2: 1}),
        1,
        "records are reordered: record 2 is the one that follows record 0, not record 1",
    ),
    "deleted tail": (
        sql_tampering("DELETE FROM audit_log WHERE seq = 4"),
        4,
        "record 4 is missing: the head counts 5 records (the tail was deleted)",
    ),
    "deleted tail of two": (
        sql_tampering("DELETE FROM audit_log WHERE seq >= 3"),
        3,
        "records 3..4 are missing",
    ),
    "edited head": (
        sql_tampering("UPDATE chain_heads SET head_hash = :h WHERE name = 'audit'", h=b"x"),
        4,
        "the chain head does not match the last record",
    ),
    "record beyond the head": (
        sql_tampering("UPDATE chain_heads SET size = 4 WHERE name = 'audit'"),
        4,
        "record 4 is beyond the chain head",
    ),
    "head row deleted": (
        sql_tampering("DELETE FROM chain_heads WHERE name = 'audit'"),
        0,
        "record 0 is beyond the chain head",
    ),
    "unknown action with correct hashes": (
        lambda sql: rewrite_from(sql, 3, action="coffee_break"),
        3,
        "record 3 has an unknown action 'coffee_break'",
    ),
    "unknown result with correct hashes": (
        unknown_result,
        4,
        "record 4 has an unknown result 'meh'",
    ),
}


@pytest.mark.parametrize("kind", list(TAMPERINGS))
def test_verify_names_the_first_tampered_record(sql: SqlWorld, kind: str) -> None:
    damage, seq, reason = TAMPERINGS[kind]
    append(sql, 5)
    assert verify(sql).intact
    damage(sql)
    report = verify(sql)
    assert report.problem is not None, kind
    assert report.problem.seq == seq
    assert report.problem.reason.startswith(reason)
    assert "\n" not in report.problem.reason


def test_a_truncation_with_the_head_updated_needs_an_anchor(sql: SqlWorld) -> None:
    """Cutting the tail and setting the head to the new last record leaves a valid chain: only
    a head noted earlier (elsewhere) shows that records are gone."""
    append(sql, 5)
    before = verify(sql)
    anchor = AuditAnchor(before.count, before.head_hash)
    middle = AuditAnchor(3, bytes(rows(sql)[2].record_hash))
    assert verify(sql, anchor=anchor).intact and verify(sql, anchor=middle).intact
    tamper(
        sql,
        "DELETE FROM audit_log WHERE seq = 4",
        "UPDATE chain_heads SET size = 4, head_hash = "
        "(SELECT record_hash FROM audit_log WHERE seq = 3) WHERE name = 'audit'",
    )
    assert verify(sql).intact  # the limit of a self-contained chain
    assert verify(sql, anchor=middle).intact
    report = verify(sql, anchor=anchor)
    assert report.problem is not None and report.problem.seq == 4
    assert report.problem.reason == (
        "the log has 4 records but 5 were noted in the anchor (the log was truncated)"
    )


def test_a_rewritten_chain_is_caught_by_an_older_anchor(sql: SqlWorld) -> None:
    append(sql, 5)
    anchor = AuditAnchor(4, bytes(rows(sql)[3].record_hash))
    rewrite_from(sql, 1, target="somebody.else")
    assert verify(sql).intact
    report = verify(sql, anchor=anchor)
    assert report.problem is not None and report.problem.seq == 3
    assert "no longer matches the anchor" in report.problem.reason


def test_records_appended_after_the_anchor_are_fine(sql: SqlWorld) -> None:
    append(sql, 2)
    anchor = AuditAnchor(2, verify(sql).head_hash)
    append(sql, 3)
    assert verify(sql, anchor=anchor).intact
    assert verify(sql, anchor=AuditAnchor(0, GENESIS_HASH)).intact
    assert not verify(sql, anchor=AuditAnchor(0, b"\x01" * 32)).intact


# --- reading ------------------------------------------------------------------------------------


def test_list_filters_and_returns_the_newest_oldest_first(sql: SqlWorld) -> None:
    append(sql, 4)
    sql.run(
        append_audit_txn,
        actor="reg.anna",
        action=AuditAction.LINK_CREATE,
        target="pat.1",
        result=AuditResult.REFUSED,
        now_ms=T0 + 10,
        detail="clinician=dr.ivanova",
    )
    everything = sql.run(list_audit_txn)
    assert [e.record.seq for e in everything] == [0, 1, 2, 3, 4]
    assert everything[4].record == AuditRecord(
        4, T0 + 10, "reg.anna", "link_create", "pat.1", "refused", "clinician=dr.ivanova"
    )
    assert everything[4].record_hash == verify(sql).head_hash
    assert [e.record.seq for e in sql.run(list_audit_txn, limit=2)] == [3, 4]
    window = sql.run(list_audit_txn, since_ms=T0 + 1, until_ms=T0 + 3)
    assert [e.record.seq for e in window] == [1, 2]
    assert [e.record.seq for e in sql.run(list_audit_txn, actor="reg.anna")] == [4]
    assert [e.record.seq for e in sql.run(list_audit_txn, action="link_create")] == [4]
    assert [e.record.seq for e in sql.run(list_audit_txn, target="user2")] == [2]
    assert sql.run(list_audit_txn, target="nobody") == []
    with pytest.raises(ValueError, match="limit"):
        sql.run(list_audit_txn, limit=0)


# --- concurrency --------------------------------------------------------------------------------


def test_concurrent_appenders_stay_one_chain(sql: SqlWorld) -> None:
    """Two threads, each with its own connections, append at once (the head starts absent, so
    its creation races too): seqs are dense and unique and the chain verifies."""
    seqs: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        try:
            for i in range(15):
                seq = result(
                    sql.db.run_interaction(
                        "test_append",
                        append_audit_txn,
                        actor=name,
                        action=AuditAction.DEVICE_REVOKE,
                        target=f"{name}/dev{i}",
                        result=AuditResult.OK,
                        now_ms=T0 + i,
                    )
                )
                with lock:
                    seqs.append(seq)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(seqs) == list(range(30))
    report = verify(sql)
    assert report.intact and report.count == 30


def test_a_second_appender_waits_for_the_first_on_postgresql(postgres_relay_url: str) -> None:
    """The second transaction blocks on the head row until the first commits, then extends the
    first's head (it never reads a stale head)."""
    world = postgres_world(postgres_relay_url)
    try:
        first = world.engine.connect()
        first_tx = first.begin()
        assert _append_as(first, "alice") == 0  # creates and locks the head row
        pids: queue.Queue[int] = queue.Queue()
        outcome: list[int | BaseException] = []

        def second() -> None:
            try:
                with world.engine.begin() as conn:
                    pids.put(int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()))
                    outcome.append(_append_as(conn, "bob"))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        _wait_until_blocked(world, pids.get(timeout=10))
        assert outcome == []
        first_tx.commit()
        first.close()
        thread.join(timeout=10)
        assert outcome == [1]
        report = world.run(verify_audit_txn)
        assert report.intact and report.count == 2
    finally:
        world.close()


def _append_as(conn: Connection, actor: str) -> int:
    return append_audit_txn(
        conn,
        actor=actor,
        action=AuditAction.ENROLL,
        target=f"{actor}/laptop",
        result=AuditResult.OK,
        now_ms=T0,
    )


def _wait_until_blocked(world: SqlWorld, pid: int) -> None:
    """Poll PostgreSQL until backend `pid` waits for a lock (an integration test: the only way
    to observe that a transaction blocks is to ask the server)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with world.engine.connect() as conn:
            blockers = conn.execute(
                sa.text("SELECT cardinality(pg_blocking_pids(:pid))"), {"pid": pid}
            ).scalar_one()
        if blockers:
            return
        time.sleep(0.01)
    raise AssertionError("the second appender never waited for the first")


# --- admin add-user -----------------------------------------------------------------------------


def _add_user(world: SqlWorld, username: str) -> admin.NewAccount:
    return admin.add_user(
        world.db,
        username=username,
        role=Role.DOCTOR,
        display_name="Dr. Secret Name",
        specialty="cardiology",
        department=None,
        now_ms=T0,
        code_ttl_hours=72,
        hasher=PasswordHasher(PasswordParams.for_tests()),
        rng=seeded_rng(b"audit add-user"),
    )


def test_add_user_records_success_and_refusal(sql: SqlWorld) -> None:
    account = _add_user(sql, "dr.ivanova")
    with pytest.raises(admin.AdminError, match="already exists"):
        _add_user(sql, "dr.ivanova")
    entries = sql.run(list_audit_txn)
    assert [
        (e.record.actor, e.record.action, e.record.target, e.record.result) for e in entries
    ] == [
        ("operator", "account_create", "dr.ivanova", "ok"),
        ("operator", "account_create", "dr.ivanova", "refused"),
    ]
    assert [e.record.detail for e in entries] == ["role=doctor", "username taken"]
    assert all(e.record.at_ms == T0 for e in entries)
    for entry in entries:  # no display name, profile or code in the log
        text = repr(entry.record)
        assert "Secret" not in text and "cardiology" not in text
        assert account.enrollment_code not in text
    assert verify(sql).intact


def test_add_user_and_its_record_share_one_transaction(
    sql: SqlWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the audit record cannot be written, the account is not created either."""

    def broken(*_args: object, **_kwargs: object) -> int:
        raise RuntimeError("audit write failed")

    monkeypatch.setattr(audit, "append_audit_txn", broken)
    with pytest.raises(RuntimeError, match="audit write failed"):
        _add_user(sql, "dr.petrov")
    assert sql.run(accounts.get_account_txn, "dr.petrov") is None
    monkeypatch.undo()
    assert sql.run(list_audit_txn) == []
