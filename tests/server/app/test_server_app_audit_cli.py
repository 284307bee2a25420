"""`medrelay-server audit verify` and `audit show` through click's CliRunner: what `admin
add-user` records (success and refusal), text and --json output, filters, UTC times, a tampered
database named at its first bad record with exit status 1, the anchor that catches a truncation
the chain alone cannot, and one-line errors (never a traceback)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from server_app_support import CHEAP_ENV, NOW_S

from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.sealing import SealParams
from medrelay.server.main import Environment, cli

ZERO_HEAD = "00" * 32


def run(tmp_path: Path, *args: str, **env: str) -> Result:
    environment = Environment(
        environ={**CHEAP_ENV, **env},
        cwd=tmp_path,
        rng=seeded_rng(b"audit cli tests"),
        now=lambda: NOW_S,
        seal_params=SealParams.for_tests(),
    )
    return CliRunner().invoke(cli, list(args), obj=environment)


def add_users(tmp_path: Path) -> None:
    """bob (ok), bob again (refused), alice (ok): three records at NOW."""
    for username, expected in (("bob", 0), ("bob", 1), ("alice", 0)):
        result = run(tmp_path, "admin", "add-user", username, "--role", "nurse", "--name", "N")
        assert result.exit_code == expected, result.output


def tamper(tmp_path: Path, *statements: str, data_dir: str = "var") -> None:
    with sqlite3.connect(tmp_path / data_dir / "medrelay.db") as conn:
        for statement in statements:
            conn.execute(statement)


def verify_json(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = run(tmp_path, "audit", "verify", "--json", *args)
    answer: dict[str, Any] = json.loads(result.stdout)
    return result.exit_code, answer


# --- verify -------------------------------------------------------------------------------------


def test_verify_on_a_fresh_directory(tmp_path: Path) -> None:
    result = run(tmp_path, "audit", "verify")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"audit log intact: 0 records, head {ZERO_HEAD}",
        f"note this anchor elsewhere and check it later with --anchor 0:{ZERO_HEAD}",
    ]


def test_verify_counts_what_add_user_recorded(tmp_path: Path) -> None:
    add_users(tmp_path)
    result = run(tmp_path, "audit", "verify")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("audit log intact: 3 records, head ")
    head = first.rsplit(" ", 1)[1]
    assert len(head) == 64 and head != ZERO_HEAD
    code, answer = verify_json(tmp_path)
    assert code == 0
    assert answer == {"intact": True, "records": 3, "head": head, "anchor": f"3:{head}"}


def test_verify_names_the_first_tampered_record(tmp_path: Path) -> None:
    add_users(tmp_path)
    tamper(tmp_path, "UPDATE audit_log SET result = 'ok' WHERE seq = 1")
    result = run(tmp_path, "audit", "verify")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        "medrelay-server: audit log broken at record 1: record 1 was edited (its contents do "
        "not match its hash)\n"
    )
    code, answer = verify_json(tmp_path)
    assert code == 1
    assert answer["intact"] is False and "anchor" not in answer
    assert answer["problem"] == {
        "seq": 1,
        "reason": "record 1 was edited (its contents do not match its hash)",
    }


def test_verify_detects_a_deleted_and_a_reordered_record(tmp_path: Path) -> None:
    add_users(tmp_path)
    tamper(
        tmp_path,
        "UPDATE audit_log SET seq = -1 WHERE seq = 1",
        "UPDATE audit_log SET seq = 1 WHERE seq = 2",
        "UPDATE audit_log SET seq = 2 WHERE seq = -1",
    )
    assert "records are reordered" in run(tmp_path, "audit", "verify").stderr
    tamper(tmp_path, "DELETE FROM audit_log WHERE seq = 1")
    result = run(tmp_path, "audit", "verify")
    assert result.exit_code == 1
    assert "record 1 is missing (deleted)" in result.stderr


def test_an_anchor_catches_a_truncation_the_chain_cannot(tmp_path: Path) -> None:
    """Deleting the newest record and moving the head back leaves a valid chain; the anchor
    printed by an earlier verify shows the loss."""
    add_users(tmp_path)
    anchor = verify_json(tmp_path)[1]["anchor"]
    assert run(tmp_path, "audit", "verify", "--anchor", anchor).exit_code == 0
    tamper(
        tmp_path,
        "DELETE FROM audit_log WHERE seq = 2",
        "UPDATE chain_heads SET size = 2, head_hash = "
        "(SELECT record_hash FROM audit_log WHERE seq = 1) WHERE name = 'audit'",
    )
    assert run(tmp_path, "audit", "verify").exit_code == 0
    result = run(tmp_path, "audit", "verify", "--anchor", anchor)
    assert result.exit_code == 1
    assert result.stderr == (
        "medrelay-server: audit log broken at record 2: the log has 2 records but 3 were noted "
        "in the anchor (the log was truncated)\n"
    )


def test_a_malformed_anchor_is_a_usage_error(tmp_path: Path) -> None:
    result = run(tmp_path, "audit", "verify", "--anchor", "3:abc")
    assert result.exit_code == 2
    assert "Invalid value for '--anchor': an anchor is N:HEX" in result.stderr
    assert "Traceback" not in result.output


# --- show ---------------------------------------------------------------------------------------


def test_show_prints_records_oldest_first(tmp_path: Path) -> None:
    add_users(tmp_path)
    result = run(tmp_path, "audit", "show")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "     0  2025-11-23T08:00:00Z  operator  account_create  bob  ok  role=nurse",
        "     1  2025-11-23T08:00:00Z  operator  account_create  bob  refused  username taken",
        "     2  2025-11-23T08:00:00Z  operator  account_create  alice  ok  role=nurse",
    ]


def test_show_json(tmp_path: Path) -> None:
    add_users(tmp_path)
    result = run(tmp_path, "audit", "show", "--json", "--limit", "1")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)["records"]
    head = verify_json(tmp_path)[1]["head"]
    assert record == {
        "seq": 2,
        "at": "2025-11-23T08:00:00Z",
        "at_ms": int(NOW_S * 1000),
        "actor": "operator",
        "action": "account_create",
        "target": "alice",
        "result": "ok",
        "detail": "role=nurse",
        "hash": head,
    }


def test_show_filters(tmp_path: Path) -> None:
    add_users(tmp_path)

    def seqs(*args: str) -> list[int]:
        result = run(tmp_path, "audit", "show", "--json", *args)
        assert result.exit_code == 0, result.output
        return [record["seq"] for record in json.loads(result.stdout)["records"]]

    assert seqs() == [0, 1, 2]
    assert seqs("--target", "bob") == [0, 1]
    assert seqs("--target", "bob", "--limit", "1") == [1]
    assert seqs("--actor", "operator", "--action", "account_create") == [0, 1, 2]
    assert seqs("--actor", "dr.house") == []
    assert seqs("--since", "2025-11-23T08:00:00Z") == [0, 1, 2]
    assert seqs("--since", "2025-11-23T11:00:00+03:00", "--until", "2025-11-24") == [0, 1, 2]
    assert seqs("--until", "2025-11-23T08:00:00") == []
    assert seqs("--since", "2025-11-23T08:00:01Z") == []
    assert run(tmp_path, "audit", "show", "--actor", "x").stdout == "no audit records match\n"


def test_show_never_prints_control_characters_from_the_database(tmp_path: Path) -> None:
    """A record edited to carry a terminal escape is shown escaped (and fails verification)."""
    add_users(tmp_path)
    tamper(tmp_path, "UPDATE audit_log SET target = 'bob' || char(27) || '[2J' WHERE seq = 0")
    line = run(tmp_path, "audit", "show", "--limit", "3").stdout.splitlines()[0]
    assert "\x1b" not in line and "'bob\\x1b[2J'" in line
    assert run(tmp_path, "audit", "verify").exit_code == 1


def test_show_bad_options_are_one_line_usage_errors(tmp_path: Path) -> None:
    for args, message in (
        (["--since", "yesterday"], "Invalid value for '--since': 'yesterday' is not an ISO-8601"),
        (["--limit", "0"], "Invalid value for '--limit'"),
        (["--action", "reboot"], "Invalid value for '--action'"),
    ):
        result = run(tmp_path, "audit", "show", *args)
        assert result.exit_code == 2
        assert message in result.stderr
        assert "Traceback" not in result.output


# --- where the data is, and errors --------------------------------------------------------------


def test_audit_commands_honour_data_dir(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "admin",
        "add-user",
        "x",
        "--role",
        "admin",
        "--name",
        "X",
        "--data-dir",
        str(tmp_path / "elsewhere"),
    )
    assert result.exit_code == 0, result.output
    assert "0 records" in run(tmp_path, "audit", "verify").stdout
    moved = run(tmp_path, "audit", "verify", "--data-dir", str(tmp_path / "elsewhere"))
    assert "1 records" in moved.stdout
    shown = run(tmp_path, "audit", "show", "--data-dir", "elsewhere")
    assert "account_create  x  ok  role=admin" in shown.stdout


def test_a_database_error_is_one_line(tmp_path: Path) -> None:
    """A database that cannot be reached (nothing listens on port 1 of loopback)."""
    env = {"MEDRELAY_STORAGE_DATABASE_URL": "postgresql://medrelay@127.0.0.1:1/medrelay"}
    for command in ("verify", "show"):
        result = run(tmp_path, "audit", command, **env)
        assert result.exit_code == 1
        assert result.stderr.startswith("medrelay-server: ")
        assert result.stderr.count("\n") == 1
        as_json = run(tmp_path, "audit", command, "--json", **env)
        assert as_json.exit_code == 1
        assert json.loads(as_json.stderr)["error"]["code"] == "failed"
