"""`medrelay visit open|close|list|consent` and `medrelay record save` through click's CliRunner,
on the real engine and the fake relay: text and JSON output, what the patient's `inbox` shows,
the records account receiving a bundle, and bad input as one line with exit status 2."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from client_support import WorldApp, medrelay, one_line_error

from medrelay.clients.cli.main import cli
from medrelay.clients.engine.record_messages import KIND_RECORD_RECEIPT, RecordReceipt
from medrelay.clients.engine.testing import TEST_SERVER_URL, ClientWorld
from medrelay.crypto.certificates import Role

COMMANDS = [
    ["visit", "open"],
    ["visit", "close"],
    ["visit", "list"],
    ["visit", "consent"],
    ["record", "save"],
]


@pytest.fixture
def world(tmp_path: Path) -> ClientWorld:
    return ClientWorld(tmp_path / "profiles")


@pytest.fixture
def app(world: ClientWorld) -> WorldApp:
    return WorldApp(world)


def enroll_as(app: WorldApp, world: ClientWorld, user: str, role: Role) -> None:
    world.relay.add_user(user, f"CODE-{user}", role=role)
    result = medrelay(app, world, user, "enroll", TEST_SERVER_URL, user, f"CODE-{user}")
    assert result.exit_code == 0, result.stderr


@pytest.fixture
def clinic(app: WorldApp, world: ClientWorld) -> WorldApp:
    enroll_as(app, world, "doctor", Role.DOCTOR)
    enroll_as(app, world, "patient", Role.PATIENT)
    enroll_as(app, world, "records", Role.RECORDS)
    world.relay.care_links.add(("patient", "doctor"))
    return app


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.stderr
    return result


def usage_error(result: Result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_profile_and_json(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "--profile" in result.stdout and "--json" in result.stdout
    assert "--records-user" not in result.stdout
    assert len(result.stdout.split("Options:")[0].split()) > 8


def test_a_visit_from_opening_to_the_record(clinic: WorldApp, world: ClientWorld) -> None:
    app = clinic
    opened = json.loads(
        ok(
            medrelay(app, world, "doctor", "visit", "open", "patient", "--indication",
                     "test-results", "--json")
        ).stdout
    )  # fmt: skip
    visit = opened["visit"]
    assert (opened["open"], opened["patient"], opened["consent"]) == (True, "patient", "notice")
    shown = ok(medrelay(app, world, "patient", "inbox")).stdout
    assert f"doctor (visit opened): Teleconsultation visit {visit} is open" in shown
    assert "medical record" in shown
    world.clock.advance(5)
    ok(medrelay(app, world, "patient", "send", "doctor", "What do my results mean?"))
    world.clock.advance(5)
    listed = ok(medrelay(app, world, "doctor", "visit", "list", "--open")).stdout
    assert listed.startswith(f"{visit}  patient with doctor: test-results (")
    assert "indications: test-results" in listed
    refused = one_line_error(medrelay(app, world, "doctor", "record", "save", "--visit", visit))
    assert "still open: close it first" in refused
    closed = ok(
        medrelay(app, world, "doctor", "visit", "close", visit, "--conclusion",
                 "Results normal.")
    ).stdout  # fmt: skip
    assert f"closed visit {visit}" in closed and f"record save --visit {visit}" in closed
    patient_view = json.loads(ok(medrelay(app, world, "patient", "inbox", "--json")).stdout)
    assert [m["kind"] for m in patient_view] == ["conclusion"]
    assert patient_view[0]["text"] == "Results normal."
    world.clock.advance(5)
    saved = json.loads(
        ok(medrelay(app, world, "doctor", "record", "save", "--visit", visit, "--json")).stdout
    )
    assert (saved["visit"], saved["messages"], saved["sent"]["to"]) == (visit, 3, "records")
    bundle_line = ok(medrelay(app, world, "records", "inbox")).stdout
    assert f"doctor (record of visit {visit} for the medical record)" in bundle_line
    assert "attachment 0" in bundle_line

    # The gateway's receipt, shown to the patient as the records gateway's word.
    engine = world.open("records")
    text = RecordReceipt(visit, "saved", "ab" * 32, ("Encounter/e1",)).encode()
    thread = bytes.fromhex(opened["thread"])
    world.run(engine.send_in_thread(["doctor", "patient"], thread, KIND_RECORD_RECEIPT, text))
    world.run(engine.close())
    shown = ok(medrelay(app, world, "patient", "inbox")).stdout
    assert f"records (record receipt): visit {visit} saved in the medical record" in shown


def test_explicit_consent_through_the_cli(clinic: WorldApp, world: ClientWorld) -> None:
    app = clinic
    world.relay.consent_mode = "explicit"
    opened = ok(
        medrelay(app, world, "doctor", "visit", "open", "patient", "--indication", "test-results")
    ).stdout
    visit = next(w for w in opened.split() if w.startswith("V"))
    assert f"medrelay visit consent {visit}" in opened
    notice = ok(medrelay(app, world, "patient", "inbox")).stdout
    assert f"medrelay visit consent {visit}" in notice
    world.clock.advance(5)
    consent = ok(medrelay(app, world, "patient", "visit", "consent", visit.lower())).stdout
    assert f"you agreed that visit {visit.lower()}" in consent
    shown = ok(medrelay(app, world, "doctor", "inbox")).stdout
    assert "patient (consent to saving the visit): I agree" in shown


def test_thread_export_and_bad_input(clinic: WorldApp, world: ClientWorld) -> None:
    app = clinic
    start = datetime.datetime.fromtimestamp(world.clock.seconds(), tz=datetime.UTC)
    world.clock.advance(60)
    ok(medrelay(app, world, "patient", "send", "doctor", "A question"))
    world.clock.advance(60)
    ok(medrelay(app, world, "doctor", "inbox"))
    end = start + datetime.timedelta(minutes=5)
    saved = json.loads(
        ok(
            medrelay(app, world, "doctor", "record", "save", "--with", "patient", "--from",
                     start.isoformat(), "--to", end.isoformat(), "--json")
        ).stdout
    )  # fmt: skip
    assert saved["visit"].startswith("thread-") and saved["messages"] == 1

    def bad(*args: str) -> str:
        return usage_error(medrelay(app, world, "doctor", *args))

    assert "either --visit or --with" in bad("record", "save")
    assert "needs --from and --to" in bad("record", "save", "--with", "patient")
    assert "not a date and time" in bad(
        "record", "save", "--with", "patient", "--from", "yesterday", "--to", end.isoformat()
    )
    assert "--to is before --from" in bad(
        "record", "save", "--with", "patient", "--from", end.isoformat(), "--to",
        start.isoformat(),
    )  # fmt: skip
    assert "not a visit id" in bad("visit", "close", "no such visit", "--conclusion", "x")
    assert "conclusion is empty" in bad("visit", "close", "V123", "--conclusion", " ")
    assert "not an indication code" in bad("visit", "open", "patient", "--indication", "bad code!")


def test_server_refusals_are_one_line(clinic: WorldApp, world: ClientWorld) -> None:
    app = clinic
    world.relay.care_links.clear()
    line = one_line_error(
        medrelay(app, world, "doctor", "visit", "open", "patient", "--indication", "test-results")
    )
    assert "care link" in line
    missing = one_line_error(
        medrelay(app, world, "doctor", "visit", "close", "VNOSUCH01", "--conclusion", "x")
    )
    assert "no visit" in missing or "not_found" in missing
    empty = ok(medrelay(app, world, "patient", "visit", "list")).stdout
    assert empty.startswith("no visits")
