"""End to end: linking a second device with the real server and two real `medrelay` processes
on 127.0.0.1. The existing device runs `medrelay devices link`, the new one `medrelay link`; the
test plays the person holding both, reading the digits off each screen (their JSON progress
lines) and typing them into the other (`--yes-if-sas -`), so each side says yes only because
the digits match. Then a message to the user reaches the new device, and the auditor's replay of
the identity log (`medrelay-server log verify`) and of the audit log pass."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from live_server import CLIENT_MAIN, PASSPHRASE, LiveServer, Person, enroll

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 120.0


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


class Cli:
    """A `medrelay` process whose standard output is read line by line as it comes."""

    def __init__(self, profile: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDRELAY_")}
        env["MEDRELAY_PASSPHRASE"] = PASSPHRASE
        self.process = subprocess.Popen(
            [sys.executable, "-c", CLIENT_MAIN, *args, "--profile", str(profile)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        assert self.process.stdout is not None and self.process.stderr is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        threading.Thread(
            target=self.stderr.extend, args=(self.process.stderr,), daemon=True
        ).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def event(self, name: str) -> dict[str, Any]:
        """The next JSON progress line of this kind (earlier ones are skipped)."""
        while True:
            try:
                line = self.lines.get(timeout=STEP_TIMEOUT_S)
            except queue.Empty:
                self.stop()
                raise AssertionError(f"no {name!r} line in time; stderr: {self.stderr}") from None
            if line is None:
                self.process.wait(timeout=STEP_TIMEOUT_S)
                raise AssertionError(f"exited before {name!r}; stderr: {''.join(self.stderr)}")
            value: dict[str, Any] = json.loads(line)
            if value.get("event") == name:
                return value

    def type(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def wait(self) -> int:
        return self.process.wait(timeout=STEP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def test_a_second_device_linked_through_the_real_server_receives_messages(
    live: LiveServer, tmp_path: Path
) -> None:
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    nurse = enroll(live, tmp_path, "nurse.petrova", "nurse")
    laptop = Person("dr.ivanova", tmp_path / "profile-laptop")

    existing = Cli(doctor.profile, "devices", "link", "--json", "--yes-if-sas", "-")
    new: Cli | None = None
    try:
        code = existing.event("code")
        assert code["command"] == f"medrelay link {live.url} {code['code']}"
        new = Cli(laptop.profile, "link", live.url, code["code"], "--json", "--yes-if-sas", "-")
        on_existing, on_new = existing.event("sas"), new.event("sas")
        assert on_existing["sas"] == on_new["sas"]
        assert on_existing["device"] == on_new["device"]
        # The person reads each screen and types what it shows into the other device.
        existing.type(on_new["display"])
        new.type(on_existing["display"])
        done_existing, done_new = existing.event("linked"), new.event("linked")
        assert existing.wait() == 0, existing.stderr
        assert new.wait() == 0, new.stderr
    finally:
        existing.stop()
        if new is not None:
            new.stop()
    device = done_new["device"]
    assert done_existing["device"] == device
    assert len(done_new["devices"]) == 2 and all(d["added_by_you"] for d in done_new["devices"])

    nurse.send("dr.ivanova", "the lab results for bed 4 are in")
    assert [m["text"] for m in laptop.inbox()] == ["the lab results for bed 4 are in"]
    assert [m["text"] for m in doctor.inbox()] == ["the lab results for bed 4 are in"]
    laptop.send("nurse.petrova", "thanks, from my laptop")
    assert [m["from_device"] for m in nurse.inbox()] == [device]
    listed = json.loads(doctor.run("devices", "--json").stdout)
    assert len(listed) == 2 and device in {d["device"] for d in listed}
    assert all(d["added_by_you"] for d in listed)

    verified = live.command("log", "verify", "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert (report["ok"], report["users"], report["active_devices"]) == (True, 2, 3)
    audit = live.command("audit", "verify")
    assert audit.returncode == 0, audit.stderr


def test_a_no_on_the_existing_device_links_nothing(live: LiveServer, tmp_path: Path) -> None:
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    laptop = tmp_path / "profile-laptop"
    existing = Cli(doctor.profile, "devices", "link", "--json")
    new: Cli | None = None
    try:
        code = existing.event("code")
        new = Cli(laptop, "link", live.url, code["code"], "--json", "--yes-if-sas", "-")
        shown = existing.event("sas")
        new.event("sas")
        existing.type("n")  # the person answers no on the existing device
        new.type(shown["display"])
        assert existing.wait() == 1
        assert new.wait() == 1
        assert "refused on this device" in "".join(existing.stderr)
        assert "cancelled on the other device" in "".join(new.stderr)
    finally:
        existing.stop()
        if new is not None:
            new.stop()
    assert not (laptop / "profile.sqlite3").exists()
    listed = json.loads(doctor.run("devices", "--json").stdout)
    assert len(listed) == 1
    verified = live.command("log", "verify", "--json")
    assert json.loads(verified.stdout)["active_devices"] == 1
