"""`medrelay-server admin holiday add / remove / list` through click's CliRunner: text and --json
output, the same data as `serve` (--data-dir, the configuration), refusals as one line (exit
status 1) that create nothing, and a holiday_set / holiday_remove audit record written with each
change (a refused remove included) that never carries the holiday's name."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from server_app_support import CHEAP_ENV, NOW_S

from medrelay.crypto.rng import seeded_rng
from medrelay.server.main import Environment, cli

# NOW_S is 2025-11-23T08:00:00Z.


def run(tmp_path: Path, *args: str, **env: str) -> Result:
    environment = Environment(
        environ={**CHEAP_ENV, **env},
        cwd=tmp_path,
        rng=seeded_rng(b"cli holidays"),
        now=lambda: NOW_S,
    )
    return CliRunner().invoke(cli, list(args), obj=environment)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def refused(result: Result) -> str:
    """The one stderr line of a refused command."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in result.output
    return lines[0]


def rows(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "var" / "medrelay.db") as conn:
        return list(conn.execute(sql))


def holiday_audit(tmp_path: Path) -> list[tuple[object, ...]]:
    return rows(
        tmp_path,
        "SELECT actor, action, target, result, detail FROM audit_log "
        "WHERE action LIKE 'holiday_%' ORDER BY seq",
    )


def test_add_list_and_remove(tmp_path: Path) -> None:
    assert ok(run(tmp_path, "admin", "holiday", "list")) == "no holidays\n"
    out = ok(run(tmp_path, "admin", "holiday", "add", "2026-01-01", "New Year"))
    assert out == (
        "added the holiday 2026-01-01: New Year; clinicians with hours are closed that day\n"
    )
    ok(run(tmp_path, "admin", "holiday", "add", "2025-12-31", "  New Year's Eve  "))
    assert ok(run(tmp_path, "admin", "holiday", "list")) == (
        "2025-12-31  New Year's Eve\n2026-01-01  New Year\n"
    )
    out = ok(run(tmp_path, "admin", "holiday", "remove", "2026-01-01"))
    assert out.splitlines() == [
        "removed the holiday on 2026-01-01: New Year",
        "a running server delivers messages held because of it within 30 s "
        "(availability.release_check_s)",
    ]
    assert ok(run(tmp_path, "admin", "holiday", "list")) == "2025-12-31  New Year's Eve\n"
    assert rows(tmp_path, "SELECT day, name FROM holidays") == [("2025-12-31", "New Year's Eve")]


def test_adding_a_holiday_again_renames_it(tmp_path: Path) -> None:
    ok(run(tmp_path, "admin", "holiday", "add", "2026-05-09", "Victory"))
    out = ok(run(tmp_path, "admin", "holiday", "add", "2026-05-09", "Victory Day"))
    assert out.startswith("renamed the holiday on 2026-05-09: Victory Day;")
    answer = json.loads(ok(run(tmp_path, "admin", "holiday", "add", "2026-05-09", "V", "--json")))
    assert answer == {"day": "2026-05-09", "name": "V", "renamed": True}
    assert rows(tmp_path, "SELECT day, name FROM holidays") == [("2026-05-09", "V")]


def test_json_output(tmp_path: Path) -> None:
    added = json.loads(
        ok(run(tmp_path, "admin", "holiday", "add", "2026-03-08", "Women's Day", "--json"))
    )
    assert added == {"day": "2026-03-08", "name": "Women's Day", "renamed": False}
    ok(run(tmp_path, "admin", "holiday", "add", "2026-01-07", "Рождество"))
    listed = json.loads(ok(run(tmp_path, "admin", "holiday", "list", "--json")))
    assert listed == {
        "holidays": [
            {"day": "2026-01-07", "name": "Рождество"},
            {"day": "2026-03-08", "name": "Women's Day"},
        ]
    }
    removed = json.loads(ok(run(tmp_path, "admin", "holiday", "remove", "2026-01-07", "--json")))
    assert removed == {"day": "2026-01-07", "name": "Рождество"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "tomorrow", "X"], "date 'tomorrow' is not a date in the form YYYY-MM-DD"),
        (["add", "2026-1-1", "X"], "date '2026-1-1' is not a date in the form YYYY-MM-DD"),
        (["add", "20260101", "X"], "date '20260101' is not a date in the form YYYY-MM-DD"),
        (["add", "2026-02-30", "X"], "date '2026-02-30' is not a valid calendar date"),
        (["add", "2026-01-01", ""], "the holiday's name must not be empty"),
        (["add", "2026-01-01", "   "], "the holiday's name must not be empty"),
        (["add", "2026-01-01", "x" * 101], "the holiday's name is longer than 100 characters"),
        (["add", "2026-01-01", "New\x1b[2JYear"], "the holiday's name contains control"),
        (["add", "2026-01-01", "New\nYear"], "the holiday's name contains control"),
        (["add", "2026-01-01", "New \u202eYear"], "the holiday's name contains control"),
        (["remove", "2026-13-01"], "date '2026-13-01' is not a valid calendar date"),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    line = refused(run(tmp_path, "admin", "holiday", *args))
    assert line.startswith(f"medrelay-server: {message}"), line
    assert "\x1b" not in line
    # Checked before the database is opened: a typo on a fresh host creates nothing.
    assert not (tmp_path / "var").exists()


def test_a_name_of_exactly_100_characters_is_accepted(tmp_path: Path) -> None:
    ok(run(tmp_path, "admin", "holiday", "add", "2026-01-01", "x" * 100))
    assert rows(tmp_path, "SELECT length(name) FROM holidays") == [(100,)]


def test_removing_a_day_that_is_no_holiday_is_refused(tmp_path: Path) -> None:
    ok(run(tmp_path, "admin", "holiday", "add", "2026-01-01", "New Year"))
    line = refused(run(tmp_path, "admin", "holiday", "remove", "2026-01-02"))
    assert line == "medrelay-server: there is no holiday on 2026-01-02"
    result = run(tmp_path, "admin", "holiday", "remove", "2026-01-02", "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert json.loads(result.stderr) == {
        "error": {"code": "refused", "message": "there is no holiday on 2026-01-02"}
    }
    assert rows(tmp_path, "SELECT day FROM holidays") == [("2026-01-01",)]


def test_bad_input_with_json_is_a_json_error(tmp_path: Path) -> None:
    result = run(tmp_path, "admin", "holiday", "add", "2026-01-01", "", "--json")
    assert result.exit_code == 1 and result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error == {"code": "refused", "message": "the holiday's name must not be empty"}


def test_changes_and_refusals_are_audited_without_the_name(tmp_path: Path) -> None:
    ok(run(tmp_path, "admin", "holiday", "add", "2026-01-01", "New Year"))
    ok(run(tmp_path, "admin", "holiday", "add", "2026-01-01", "New Year's Day"))
    ok(run(tmp_path, "admin", "holiday", "remove", "2026-01-01"))
    refused(run(tmp_path, "admin", "holiday", "remove", "2026-01-01"))
    ok(run(tmp_path, "admin", "holiday", "list"))  # reading is not audited
    assert holiday_audit(tmp_path) == [
        ("operator", "holiday_set", "", "ok", "day=2026-01-01"),
        ("operator", "holiday_set", "", "ok", "day=2026-01-01"),
        ("operator", "holiday_remove", "", "ok", "day=2026-01-01"),
        ("operator", "holiday_remove", "", "refused", "day=2026-01-01; reason=not_found"),
    ]
    assert not any("New Year" in str(row) for row in rows(tmp_path, "SELECT * FROM audit_log"))
    verified = run(tmp_path, "audit", "verify")
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("audit log intact: 4 records")
    shown = json.loads(ok(run(tmp_path, "audit", "show", "--action", "holiday_remove", "--json")))
    assert [r["result"] for r in shown["records"]] == ["ok", "refused"]


def test_finds_the_data_like_serve(tmp_path: Path) -> None:
    """--data-dir and the environment point the command at the server's database."""
    ok(run(tmp_path, "admin", "holiday", "add", "2026-01-01", "New Year", "--data-dir", "other"))
    assert ok(run(tmp_path, "admin", "holiday", "list")) == "no holidays\n"
    assert ok(run(tmp_path, "admin", "holiday", "list", "--data-dir", "other")) == (
        "2026-01-01  New Year\n"
    )
    listed = run(tmp_path, "admin", "holiday", "list", MEDRELAY_STORAGE_DATA_DIR="other")
    assert ok(listed) == "2026-01-01  New Year\n"


def test_the_release_check_named_is_the_configured_one(tmp_path: Path) -> None:
    ok(run(tmp_path, "admin", "holiday", "add", "2026-01-01", "New Year"))
    out = ok(
        run(
            tmp_path,
            "admin",
            "holiday",
            "remove",
            "2026-01-01",
            MEDRELAY_AVAILABILITY_RELEASE_CHECK_S="5",
        )
    )
    assert "within 5 s" in out


def test_a_bad_configuration_is_a_config_error(tmp_path: Path) -> None:
    result = run(tmp_path, "admin", "holiday", "list", MEDRELAY_AVAILABILITY_RELEASE_CHECK_S="soon")
    assert result.exit_code == 2
    assert result.stderr.startswith("config error: availability.release_check_s")


def test_list_never_prints_control_characters_from_the_database(tmp_path: Path) -> None:
    ok(run(tmp_path, "admin", "holiday", "add", "2026-01-01", "New Year"))
    with sqlite3.connect(tmp_path / "var" / "medrelay.db") as conn:
        conn.execute("UPDATE holidays SET name = 'New' || char(27) || '[2J'")
    out = ok(run(tmp_path, "admin", "holiday", "list"))
    assert "\x1b" not in out and "'New\\x1b[2J'" in out


def test_help_lists_the_holiday_commands(tmp_path: Path) -> None:
    assert "  holiday " in ok(run(tmp_path, "admin", "--help"))
    out = ok(run(tmp_path, "admin", "holiday", "--help"))
    for command in ("add", "remove", "list"):
        assert f"  {command} " in out
    add_help = ok(run(tmp_path, "admin", "holiday", "add", "--help"))
    assert "DATE NAME" in add_help and "--json" in add_help and "--data-dir" in add_help
    assert "release_check_s" in ok(run(tmp_path, "admin", "holiday", "remove", "--help"))
