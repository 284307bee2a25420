"""`medrelay-server admin link / unlink / links` through click's CliRunner: text and --json
output, refusals as one line (exit status 1) that leave nothing behind, and an audit record for
every link_create and link_end, refused ones included, written with the change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from server_app_support import CHEAP_ENV, NOW_S, open_database

from medrelay.crypto.rng import seeded_rng
from medrelay.server.config import load_config
from medrelay.server.main import Environment, cli

# NOW_S is 2025-11-23T08:00:00Z.


def run(tmp_path: Path, *args: str, now: float = NOW_S) -> Result:
    environment = Environment(
        environ=dict(CHEAP_ENV), cwd=tmp_path, rng=seeded_rng(b"cli links"), now=lambda: now
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
    return lines[0]


def query(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    config = load_config(environ=dict(CHEAP_ENV), cwd=tmp_path)
    database = open_database(config)
    try:
        with database.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql))]
    finally:
        database.close()


@pytest.fixture
def clinic(tmp_path: Path) -> Path:
    for username, role in [
        ("petrov", "patient"),
        ("dr.ivanova", "doctor"),
        ("nurse.petrova", "nurse"),
        ("front.desk", "registrar"),
    ]:
        ok(run(tmp_path, "admin", "add-user", username, "--role", role, "--name", "N"))
    return tmp_path


def test_link_prints_the_pair_and_its_last_day(clinic: Path) -> None:
    out = ok(run(clinic, "admin", "link", "petrov", "dr.ivanova", "--visit-date", "2025-11-20"))
    assert out == "linked patient petrov to dr.ivanova until 2026-11-23 (visit 2025-11-20)\n"
    listed = ok(run(clinic, "admin", "links", "petrov"))
    assert listed == (
        "petrov - dr.ivanova: active, visit 2025-11-20, until 2026-11-23 (created by operator)\n"
    )


def test_link_json_and_until(clinic: Path) -> None:
    out = ok(
        run(
            clinic,
            "admin",
            "link",
            "petrov",
            "nurse.petrova",
            "--visit-date",
            "2025-11-23",
            "--until",
            "2025-12-31",
            "--json",
        )
    )
    assert json.loads(out) == {
        "patient": "petrov",
        "clinician": "nurse.petrova",
        "visit_date": "2025-11-23",
        "state": "active",
        "created_at": "2025-11-23T08:00:00Z",
        "created_by": "operator",
        "until": "2025-12-31",
        "ends_at": "2026-01-01T00:00:00Z",
        "ended_at": None,
        "ended_by": None,
    }


def test_unlink_ends_the_link_now_and_links_shows_the_history(clinic: Path) -> None:
    ok(run(clinic, "admin", "link", "petrov", "dr.ivanova", "--visit-date", "2025-11-20"))
    out = ok(run(clinic, "admin", "unlink", "petrov", "dr.ivanova", now=NOW_S + 86_400))
    assert out == (
        "ended the care link of petrov with dr.ivanova; messages already sent are still delivered\n"
    )
    listed = json.loads(
        ok(run(clinic, "admin", "links", "dr.ivanova", "--json", now=NOW_S + 86_402))
    )
    assert listed["username"] == "dr.ivanova"
    (entry,) = listed["links"]
    assert (entry["state"], entry["ended_at"], entry["ended_by"]) == (
        "ended",
        "2025-11-24T08:00:00Z",
        "operator",
    )
    text = ok(run(clinic, "admin", "links", "petrov", now=NOW_S + 2 * 86_400))
    assert "ended, visit 2025-11-20, ended on 2025-11-24 by operator" in text
    again = ok(
        run(
            clinic,
            "admin",
            "link",
            "petrov",
            "dr.ivanova",
            "--visit-date",
            "2025-11-25",
            now=NOW_S + 2 * 86_400,
        )
    )
    assert again.startswith("linked patient petrov to dr.ivanova")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["link", "ghost", "dr.ivanova", "--visit-date", "2025-11-20"],
            "no account named 'ghost'",
        ),
        (
            ["link", "petrov", "front.desk", "--visit-date", "2025-11-20"],
            "front.desk is a registrar; care links are with doctors and nurses",
        ),
        (
            ["link", "dr.ivanova", "petrov", "--visit-date", "2025-11-20"],
            "dr.ivanova is a doctor, not a patient",
        ),
        (
            ["link", "petrov", "dr.ivanova", "--visit-date", "2025-12-01"],
            "visit date 2025-12-01 is in the future; a link follows an in-person visit",
        ),
        (
            ["link", "petrov", "dr.ivanova", "--visit-date", "yesterday"],
            "visit date 'yesterday' is not a date in the form YYYY-MM-DD",
        ),
        (
            ["link", "petrov", "dr.ivanova", "--visit-date", "2025-11-20", "--until", "2025-11-22"],
            "the end date 2025-11-22 is already over",
        ),
        (
            ["link", "petrov", "dr.ivanova", "--visit-date", "2025-11-20", "--until", "2026-02-30"],
            "end date '2026-02-30' is not a valid calendar date",
        ),
        (["unlink", "petrov", "dr.ivanova"], "petrov has no active care link with dr.ivanova"),
        (["links", "front.desk"], "front.desk is a registrar; only patients, doctors and nurses"),
        (["links", "ghost"], "no account named 'ghost'"),
    ],
)
def test_refusals_are_one_line_and_create_nothing(
    clinic: Path, args: list[str], message: str
) -> None:
    line = refused(run(clinic, "admin", *args))
    assert line.startswith(f"medrelay-server: {message}"), line
    assert query(clinic, "SELECT count(*) FROM care_links") == [(0,)]


def test_a_second_active_link_is_refused_and_json_errors_are_json(clinic: Path) -> None:
    ok(run(clinic, "admin", "link", "petrov", "dr.ivanova", "--visit-date", "2025-11-20"))
    result = run(
        clinic, "admin", "link", "petrov", "dr.ivanova", "--visit-date", "2025-11-20", "--json"
    )
    assert result.exit_code == 1 and result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "refused"
    assert error["message"].startswith("petrov already has an active care link with dr.ivanova")
    assert query(clinic, "SELECT count(*) FROM care_links") == [(1,)]


def test_link_changes_and_refusals_are_audited(clinic: Path) -> None:
    ok(run(clinic, "admin", "link", "petrov", "dr.ivanova", "--visit-date", "2025-11-20"))
    refused(run(clinic, "admin", "link", "petrov", "front.desk", "--visit-date", "2025-11-20"))
    ok(run(clinic, "admin", "unlink", "petrov", "dr.ivanova"))
    rows = query(
        clinic,
        "SELECT actor, action, target, result, detail FROM audit_log "
        "WHERE action LIKE 'link_%' ORDER BY seq",
    )
    assert rows == [
        (
            "operator",
            "link_create",
            "petrov",
            "ok",
            "clinician=dr.ivanova; visit=2025-11-20; until=2026-11-23",
        ),
        ("operator", "link_create", "petrov", "refused", "clinician=front.desk; reason=wrong_role"),
        ("operator", "link_end", "petrov", "ok", "clinician=dr.ivanova"),
    ]


def test_help_lists_the_link_commands(tmp_path: Path) -> None:
    out = ok(run(tmp_path, "admin", "--help"))
    for command in ("link", "unlink", "links"):
        assert f"  {command} " in out
