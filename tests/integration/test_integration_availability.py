"""End to end: clinicians' hours, automatic replies and the urgent path, with the real server
(SQLite) and the real `medrelay` CLI in separate processes on 127.0.0.1.

Real time runs here, so "outside hours" is made by hours on a weekday three days away (in UTC),
and "the hours begin" by the doctor declaring themselves available, which the relay treats as an
opening at once (docs/protocol.md §17).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import LiveServer, Person, enroll

from medrelay.protocol.hours import hhmm

pytestmark = pytest.mark.slow

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


def far_hours() -> str:
    """Hours that are closed now and for the next two days: 09:00-10:00 UTC, three days on."""
    day = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)).weekday()
    return f"{DAYS[day]} 09:00-10:00"


def opening_soon(lead_s: float = 40.0) -> tuple[str, float]:
    """Hours that open at the first whole minute at least `lead_s` from now (UTC) and last an
    hour (or to midnight), and that opening as a Unix time."""
    now = datetime.datetime.now(datetime.UTC)
    opening = (now + datetime.timedelta(seconds=lead_s + 60)).replace(second=0, microsecond=0)
    start = opening.hour * 60 + opening.minute
    end = min(start + 60, 24 * 60)
    return f"{DAYS[opening.weekday()]} {hhmm(start)}-{hhmm(end)}", opening.timestamp()


def in_an_hour_utc() -> str:
    return (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).strftime("%H:%M")


def clinic_notices(sent: dict[str, Any]) -> list[dict[str, Any]]:
    notices: list[dict[str, Any]] = sent["notices"]
    assert all(n["clinic_notice"] for n in notices)
    return notices


def test_held_at_night_then_delivered_once_in_order_when_hours_begin_across_a_restart(
    live: LiveServer, tmp_path: Path
) -> None:
    """The doctor's hours begin 40 to 100 s after they are set; the server is
    restarted meanwhile; at the opening its own timer moves the held messages to the queue."""
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    patient = enroll(live, tmp_path, "petrov", "patient")
    live.link("petrov", "dr.ivanova")
    doctor.run("autoreply", "set", "Dr. Ivanova reads messages from {reads_at}. {emergency}")
    hours, opening = opening_soon()
    shown = doctor.json("hours", "set", hours, "--tz", "UTC")
    assert (shown["scheduled"], shown["available_now"]) == (True, False)
    assert shown["changes_at"] == datetime.datetime.fromtimestamp(opening, datetime.UTC).isoformat(
        timespec="milliseconds"
    ).replace("+00:00", "Z")
    seen = patient.json("hours", "show", "dr.ivanova")
    assert seen["available_now"] is False and seen["autoreply"] is None  # not the patient's

    texts = [f"night reading {n}: {140 + n}/90" for n in range(3)]
    first = patient.json("send", "dr.ivanova", texts[0])
    assert first["held"] is True and first["reads_at"] == seen["changes_at"]
    (reply,) = clinic_notices(first)
    assert (reply["type"], reply["clinician"], reply["about"]) == (
        "auto_reply",
        "dr.ivanova",
        first["id"],
    )
    assert reply["text"].startswith("Dr. Ivanova reads messages from ")
    assert reply["emergency"] == ["103", "112"] and texts[0] not in reply["text"]
    for text in texts[1:]:
        again = patient.json("send", "dr.ivanova", text)
        assert again["held"] is True and clinic_notices(again) == []  # one reply per window

    assert doctor.inbox() == []  # held: nothing reaches the doctor at night
    live.stop()
    live.start()
    assert time.time() < opening, "the test was too slow to see the hold before the opening"
    assert doctor.inbox() == []  # still held after the restart

    time.sleep(max(0.0, opening - time.time()))  # real time: the server's own timer is tested
    received: list[dict[str, Any]] = []
    deadline = opening + 30
    while not received and time.time() < deadline:  # bounded: the opening plus 30 s
        received = doctor.inbox()
    assert [m["text"] for m in received] == texts
    assert all({"after_hours", "held"} <= set(m["flags"]) for m in received)
    assert doctor.inbox() == []  # exactly once

    doctor.send("petrov", "please come in tomorrow at 9")
    assert [m["text"] for m in patient.inbox()] == ["please come in tomorrow at 9"]


def test_automatic_replies_never_answer_each_other(live: LiveServer, tmp_path: Path) -> None:
    """Two clinicians who are both away and both have automatic replies write to each other:
    staff messages are never held or answered. A patient's automatic reply is a clinic notice,
    which no client answers, so one message makes exactly one notice."""
    one = enroll(live, tmp_path, "dr.ivanova", "doctor")
    two = enroll(live, tmp_path, "dr.sidorov", "doctor")
    patient = enroll(live, tmp_path, "petrov", "patient")
    live.link("petrov", "dr.ivanova")
    for clinician in (one, two):
        clinician.run("hours", "set", far_hours(), "--tz", "UTC")
        clinician.run("autoreply", "set", "Away until {reads_at}.")
    sent = one.json("send", "dr.sidorov", "can you cover my patients on Friday?")
    assert sent["held"] is False and sent["notices"] == []
    answer = two.json("send", "dr.ivanova", "yes")
    assert answer["held"] is False and answer["notices"] == []
    assert [m["text"] for m in two.inbox_all()] == ["can you cover my patients on Friday?"]
    assert [m["text"] for m in one.inbox_all()] == ["yes"]

    sent = patient.json("send", "dr.ivanova", "is my prescription ready?")
    assert len(clinic_notices(sent)) == 1
    assert patient.inbox_all() == []  # nothing more: the notice was not answered
    one.run("hours", "available-until", in_an_hour_utc())
    assert [m["text"] for m in one.inbox_all()] == ["is my prescription ready?"]


def test_an_urgent_message_reaches_the_on_call_clinician_and_they_can_answer(
    live: LiveServer, tmp_path: Path
) -> None:
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor", "--department", "cardiology")
    on_call = enroll(live, tmp_path, "dr.oncall", "doctor", "--department", "cardiology")
    registrar = enroll(live, tmp_path, "reg.smirnova", "registrar")
    patient = enroll(live, tmp_path, "petrov", "patient")
    live.link("petrov", "dr.ivanova")
    doctor.run("hours", "set", far_hours(), "--tz", "UTC")
    until = datetime.datetime.now().astimezone() + datetime.timedelta(hours=12)
    (shift,) = registrar.json(
        "oncall", "add", "dr.oncall", "--department", "cardiology", "--from", "now",
        "--to", until.isoformat(timespec="minutes"),
    )  # fmt: skip
    assert (shift["clinician"], shift["department"]) == ("dr.oncall", "cardiology")
    assert patient.json("hours", "show", "dr.ivanova")["on_call"] == "dr.oncall"

    sent = patient.json("send", "dr.ivanova", "crushing chest pain since an hour", "--urgent")
    assert sent["on_call"] == "dr.oncall"
    (routed,) = clinic_notices(sent)
    assert (routed["type"], routed["on_call"]) == ("urgent_routed", "dr.oncall")
    (urgent,) = on_call.inbox()
    assert urgent["text"] == "crushing chest pain since an hour" and "urgent" in urgent["flags"]
    on_call.send("petrov", "call 103 now; I am calling the ward")
    assert [m["text"] for m in patient.inbox()] == ["call 103 now; I am calling the ward"]
    assert doctor.inbox() == []  # the doctor's copy waits for their hours

    registrar.run("oncall", "remove", str(shift["id"]))
    alone = patient.json("send", "dr.ivanova", "still in pain", "--urgent")
    assert alone["on_call"] is None
    (unrouted,) = clinic_notices(alone)
    assert unrouted["type"] == "urgent_unrouted" and unrouted["emergency"] == ["103", "112"]
    text = patient.run("inbox").stdout
    assert text == "no new messages\n"

    def shown(person: Person) -> str:
        return person.run("hours", "show", "dr.ivanova").stdout

    assert "nobody is on call now" in shown(patient)
