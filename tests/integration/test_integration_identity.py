"""End to end with the identity authority: the real server and CLI processes on 127.0.0.1.

Enrolled users appear in the transparency log that `medrelay-server log verify` replays; a
revocation from the admin command line closes the device's live connection (the server notices
within a quarter second by watching the log) and refuses its next login."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import LiveServer, Person, enroll
from loadclient import Device, WebSocket, device_key, seed, username

from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.frames import encode_frame
from medrelay.protocol.messages import Auth, Error, Hello, Welcome

pytestmark = pytest.mark.slow


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


def test_enrolled_people_are_in_the_log_the_auditor_replays(
    live: LiveServer, tmp_path: Path
) -> None:
    enroll(live, tmp_path, "dr.ivanova", "doctor")
    enroll(live, tmp_path, "nurse.petrova", "nurse")
    done = live.command("log", "verify", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["ok"], report["users"], report["active_devices"]) == (True, 2, 2)


def test_revoking_a_device_closes_its_connection_and_refuses_its_login(
    live: LiveServer,
) -> None:
    seed(f"sqlite:///{live.data_dir / 'medrelay.db'}", 1, first=950)

    async def scenario() -> tuple[float, str]:
        device = await Device.login(950, live.port, "clinic.test")
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(
            None, live.command, "admin", "revoke-device", username(950), "d", "--yes"
        )
        assert done.returncode == 0, done.stderr
        revoked_at = time.monotonic()
        code = ""
        try:
            while True:
                for message in await asyncio.wait_for(device.messages(), 10):
                    if isinstance(message, Error):
                        code = message.code
        except ConnectionError:
            pass
        closed_after = time.monotonic() - revoked_at
        # A new login with the same key is refused.
        ws = await WebSocket.connect(live.port)
        again = Device(950, ws)
        ws.send(encode_frame(Hello(versions=(1,), agent="revocation-test")))
        welcome = await again.next_of(Welcome)
        transcript = auth_transcript(welcome.challenge, "clinic.test", username(950), "d")
        ws.send(
            encode_frame(
                Auth(
                    rid=1,
                    user=username(950),
                    device="d",
                    signature=device_key(950).sign(transcript),
                )
            )
        )
        with pytest.raises(ConnectionError, match="device_revoked"):
            await asyncio.wait_for(again.next_of(Welcome), 10)
        ws.close()
        return closed_after, code

    closed_after, code = asyncio.run(scenario())
    assert code == "device_revoked"
    # The watcher polls every 0.25 s; the generous bound only absorbs a loaded CI machine.
    assert closed_after < 5.0


def test_front_desk_creates_and_links_a_patient_who_then_sees_a_verified_care_team(
    live: LiveServer, tmp_path: Path
) -> None:
    registrar = enroll(live, tmp_path, "front.desk", "registrar")
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    created = json.loads(
        registrar.run("account", "add", "petrov", "--name", "Ivan Petrov", "--json").stdout
    )
    patient = Person("petrov", tmp_path / "profile-petrov")
    patient.run("enroll", live.url, "petrov", created["enrollment_code"])

    def team() -> list[str]:
        found = json.loads(patient.run("directory", "--json").stdout)
        assert all(person["verified"] for person in found)
        return sorted(person["user"] for person in found)

    assert team() == ["petrov"]  # nobody but themselves before the in-person visit is recorded
    refused = patient.run("send", "dr.ivanova", "hello?", check=False)
    assert refused.returncode != 0 and "no care link" in refused.stderr
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    registrar.run("care", "link", "petrov", "dr.ivanova", "--visit-date", today)
    assert team() == ["dr.ivanova", "petrov"]
    (found,) = [p for p in json.loads(patient.run("directory", "ivanova", "--json").stdout)]
    assert (found["role"], found["display_name"]) == ("doctor", "Name dr.ivanova")
    patient.send("dr.ivanova", "my blood pressure is 150/95")
    assert [m["text"] for m in doctor.inbox()] == ["my blood pressure is 150/95"]
    registrar.run("care", "end", "petrov", "dr.ivanova")
    ended = patient.run("send", "dr.ivanova", "one more question", check=False)
    assert ended.returncode != 0 and "ended" in ended.stderr
    for check in (("audit", "verify"), ("log", "verify")):
        done = live.command(*check)
        assert done.returncode == 0, done.stderr


def test_clients_follow_a_rotation_of_the_clinic_keys(live: LiveServer, tmp_path: Path) -> None:
    """Rotate both online keys while the clinic runs, restart: a client enrolled before the
    rotation trusts a colleague certified by the new issuing key and checkpoints signed by the
    new log key (both certified by the root key it pinned), and still its old peers."""
    alice = enroll(live, tmp_path, "dr.ivanova", "doctor")
    enroll(live, tmp_path, "dr.sidorov", "doctor")
    alice.send("dr.sidorov", "before the rotation")
    for which in ("issuing", "log"):
        done = live.command("keys", "rotate", which)  # first-start keys: no passphrase to type
        assert done.returncode == 0, done.stderr
    live.stop()
    live.start()
    newcomer = enroll(live, tmp_path, "nurse.petrova", "nurse")
    alice.send("nurse.petrova", "after the rotation")
    alice.send("dr.sidorov", "still trusted")
    assert [m["text"] for m in newcomer.inbox()] == ["after the rotation"]
    report = json.loads(live.command("log", "verify", "--json").stdout)
    assert report["ok"] is True
