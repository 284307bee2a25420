"""`medrelay hours`, `away`, `autoreply`, `timezone`, `oncall` and `send --urgent` through click's
CliRunner, on the real engine and the fake relay: text and JSON output, the clinic's notices as
automatic clinic notices, and bad input as one line with exit status 2."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from client_support import WorldApp, enrolled, medrelay, one_line_error

from medrelay.clients.cli.main import cli, next_clock_time
from medrelay.clients.engine.testing import ClientWorld, FakeAvailability
from medrelay.protocol.hours import parse_hours

COMMANDS = [
    ["hours", "show"],
    ["hours", "set"],
    ["hours", "available-until"],
    ["away"],
    ["autoreply", "set"],
    ["autoreply", "clear"],
    ["timezone"],
    ["oncall", "add"],
    ["oncall", "remove"],
    ["oncall", "list"],
]
MOSCOW_NIGHT_MS = 1_795_456_800_000  # 2026-11-23 21:00 in Moscow (18:00 UTC)


@pytest.fixture
def world(tmp_path: Path) -> ClientWorld:
    return ClientWorld(tmp_path / "profiles")


@pytest.fixture
def app(world: ClientWorld) -> WorldApp:
    return WorldApp(world)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_profile_and_json(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "--profile" in result.stdout and "--json" in result.stdout
    assert len(result.stdout.split("Options:")[0].split()) > 8


def test_hours_set_then_show_in_text_and_json(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "doctor", "patient")
    done = medrelay(
        app, world, "doctor", "hours", "set", "mon-fri 09:00-13:00,14:00-18:00; sat 10-12",
        "--tz", "Europe/Moscow",
    )  # fmt: skip
    assert done.exit_code == 2 and "bad time" in done.stderr  # "10-12" is not HH:MM
    done = medrelay(
        app, world, "doctor", "hours", "set", "mon-fri 09:00-13:00,14:00-18:00; sat 10:00-12:00",
        "--tz", "Europe/Moscow",
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert "hours (Europe/Moscow): Mon-Fri 09:00-13:00, 14:00-18:00; Sat 10:00-12:00" in (
        done.stdout
    )
    world.relay.availability["doctor"].open_now = False
    world.relay.availability["doctor"].on_call = "nurse"
    shown = json.loads(medrelay(app, world, "patient", "hours", "show", "doctor", "--json").stdout)
    assert shown["hours"] == [
        {"day": h.day, "start": h.start, "end": h.end}
        for h in parse_hours("mon-fri 09:00-13:00,14:00-18:00; sat 10:00-12:00")
    ]
    assert (shown["available_now"], shown["on_call"], shown["emergency"]) == (
        False,
        "nurse",
        ["103", "112"],
    )
    text = medrelay(app, world, "patient", "hours", "show", "doctor").stdout
    assert text.startswith("doctor: away now") and "on call now: nurse" in text


def test_available_until_is_the_next_time_the_clock_reads_it() -> None:
    moscow = "Europe/Moscow"
    later = next_clock_time(23 * 60 + 30, moscow, MOSCOW_NIGHT_MS)
    assert later - MOSCOW_NIGHT_MS == 150 * 60_000  # 21:00 -> 23:30 the same evening
    tomorrow = next_clock_time(8 * 60, moscow, MOSCOW_NIGHT_MS)
    assert tomorrow - MOSCOW_NIGHT_MS == 11 * 3600_000  # 21:00 -> 08:00 the next morning
    # Berlin springs forward on 2026-03-29 at 02:00: 01:00 -> 04:00 is three hours, not four.
    berlin_midnight = int(
        datetime.datetime(2026, 3, 29, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
        .timestamp() * 1000
    )  # fmt: skip
    assert next_clock_time(4 * 60, "Europe/Berlin", berlin_midnight) - berlin_midnight == (
        3 * 3600_000
    )


def test_available_until_sends_the_moment_and_off_clears_it(
    app: WorldApp, world: ClientWorld
) -> None:
    enrolled(app, world, "doctor")
    done = medrelay(app, world, "doctor", "hours", "available-until", "23:30", "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["available_until"] is not None
    cleared = medrelay(app, world, "doctor", "hours", "available-until", "off", "--json")
    assert json.loads(cleared.stdout)["available_until"] is None
    bad = medrelay(app, world, "doctor", "hours", "available-until", "25:00")
    assert bad.exit_code == 2 and "bad time" in bad.stderr


def test_away_adds_and_cancels_absences(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "doctor")
    medrelay(app, world, "doctor", "away", "2026-12-28", "2027-01-08")
    done = medrelay(app, world, "doctor", "away", "2027-02-02", "--reason", "sick", "--json")
    assert json.loads(done.stdout)["absences"] == [
        {"from": "2026-12-28", "to": "2027-01-08", "reason": "vacation"},
        {"from": "2027-02-02", "to": "2027-02-02", "reason": "sick"},
    ]
    done = medrelay(app, world, "doctor", "away", "2026-12-28", "--cancel", "--json")
    assert [a["from"] for a in json.loads(done.stdout)["absences"]] == ["2027-02-02"]
    missing = one_line_error(medrelay(app, world, "doctor", "away", "2026-12-28", "--cancel"))
    assert "no absence of doctor starts on 2026-12-28" in missing
    backwards = medrelay(app, world, "doctor", "away", "2027-01-08", "2026-12-28")
    assert backwards.exit_code == 2 and "before FIRST" in backwards.stderr
    assert medrelay(app, world, "doctor", "away", "2026-02-30").exit_code == 2


def test_autoreply_and_timezone(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "doctor", "patient")
    done = medrelay(app, world, "doctor", "autoreply", "set", "Back at {reads_at}", "--json")
    assert json.loads(done.stdout)["autoreply"] == "Back at {reads_at}"
    done = medrelay(app, world, "doctor", "autoreply", "clear", "--json")
    assert json.loads(done.stdout)["autoreply"] is None
    assert medrelay(app, world, "doctor", "autoreply", "set", "  ").exit_code == 2
    zone = medrelay(app, world, "patient", "timezone", "Asia/Novosibirsk", "--json")
    assert json.loads(zone.stdout)["time_zone"] == "Asia/Novosibirsk"


def test_oncall_add_list_remove(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "registrar", "oncall")
    done = medrelay(
        app, world, "registrar", "oncall", "add", "oncall", "--department", "cardiology",
        "--from", "2026-11-23T20:00+03:00", "--to", "2026-11-24T08:00+03:00", "--json",
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    (shift,) = json.loads(done.stdout)
    assert (shift["from"], shift["to"]) == ("2026-11-23T17:00:00.000Z", "2026-11-24T05:00:00.000Z")
    listed = medrelay(app, world, "registrar", "oncall", "list").stdout
    assert listed.startswith(f"#{shift['id']} oncall on call for cardiology: ")
    removed = medrelay(app, world, "registrar", "oncall", "remove", str(shift["id"]))
    assert removed.stdout.strip() == "no on-call shifts"
    bad = medrelay(
        app, world, "registrar", "oncall", "add", "oncall", "--department", "x",
        "--from", "tonight", "--to", "now",
    )  # fmt: skip
    assert bad.exit_code == 2 and "--from: 'tonight' is not a time" in bad.stderr


def test_send_outside_hours_shows_the_clinics_signed_reply_at_once(
    app: WorldApp, world: ClientWorld
) -> None:
    enrolled(app, world, "patient", "doctor")
    world.relay.availability["doctor"] = FakeAvailability(
        open_now=False, changes_at_ms=MOSCOW_NIGHT_MS
    )
    done = medrelay(app, world, "patient", "send", "doctor", "my pressure is 150/95")
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("sent to doctor (1 device)")
    assert lines[1].startswith("doctor is outside their hours and will read it from ")
    assert (
        "automatic clinic notice (signed by the clinic), about your message to doctor" in (lines[2])
    )
    assert "reads it from Mon 23 Nov 2026 21:00 (Europe/Moscow)" in done.stdout
    assert "my pressure" not in "\n".join(lines[1:])
    received = medrelay(app, world, "doctor", "inbox").stdout
    assert "[after hours] patient: my pressure is 150/95" in received


def test_send_urgent_names_the_clinician_on_call(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "patient", "doctor", "oncall")
    world.relay.availability["doctor"] = FakeAvailability(open_now=False, on_call="oncall")
    done = medrelay(app, world, "patient", "send", "doctor", "chest pain", "--urgent", "--json")
    assert done.exit_code == 0, done.stderr
    sent = json.loads(done.stdout)
    assert sent["on_call"] == "oncall"
    (notice,) = sent["notices"]
    assert (notice["type"], notice["on_call"], notice["about"]) == (
        "urgent_routed",
        "oncall",
        sent["id"],
    )
    assert "[URGENT] patient: chest pain" in medrelay(app, world, "oncall", "inbox").stdout
