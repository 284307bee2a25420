"""End to end: a teleconsultation visit mirrored into the medical record, with the real server
(SQLite), the real `medrelay` CLI for the doctor and the patient, and the real `medrelay-records`
gateway, all in separate processes on 127.0.0.1.

The doctor opens a visit, doctor and patient talk in its thread, the doctor closes it with a
conclusion and saves it; the gateway verifies the bundle, writes the FHIR Bundle to its sink
(a directory, or Medplum's FHIR router: tests/support/fhir_server) and both parties receive the
gateway's signed receipt in the visit's thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir_server import FhirServer, Unavailable
from live_server import PASSPHRASE, LiveServer, Person, enroll

pytestmark = pytest.mark.slow

GATEWAY_MAIN = "from medrelay.clients.records.main import main; main()"
RECEIPT_TIMEOUT_S = 90.0
MESSAGE_SYSTEM = "urn:medrelay:clinic.test:message"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


class Gateway:
    """`medrelay-records run` as a process, stopped by its PID."""

    def __init__(self, profile: Path, config: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDRELAY_")}
        env["MEDRELAY_PASSPHRASE"] = PASSPHRASE
        env["MEDRELAY_FHIR_AUTHORIZATION"] = "Bearer integration-test"
        self.log = log
        with log.open("wb") as out:
            command = [sys.executable, "-c", GATEWAY_MAIN, "run", "--profile", str(profile)]
            self.process = subprocess.Popen(
                [*command, "--config", str(config)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=config.parent,
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


REPORT = b"%PDF-1.4 glucose 5.4 mmol/l (fasting), HbA1c 5.6 %"


def talk_then_close(doctor: Person, patient: Person) -> tuple[str, list[str], str]:
    """Open a visit, exchange messages in its thread and close it; the visit id, the texts of
    the conversation and the conclusion."""
    opened = doctor.json("visit", "open", "petrov", "--indication", "test-results")
    visit = opened["visit"]
    assert opened["open"] is True and opened["consent"] == "notice"
    (notice,) = patient.inbox()
    assert notice["kind"] == "visit_opened" and visit in notice["text"]
    assert notice["thread"] == opened["thread"]

    said = ["my glucose this morning was 5.4 mmol/l", "that is normal; keep the same dose"]
    patient.send("dr.ivanova", said[0])
    (first,) = doctor.inbox()
    assert (first["text"], first["thread"]) == (said[0], opened["thread"])
    doctor.send("petrov", said[1])
    conclusion = "Glucose within the normal range. Continue metformin 500 mg twice daily."
    report = doctor.profile.parent / "report.pdf"
    report.write_bytes(REPORT)
    closed = doctor.json("visit", "close", visit, "--conclusion", conclusion, "--file", str(report))
    assert closed["open"] is False and closed["conclusion"] is not None
    texts = [m["text"] for m in patient.inbox()]
    assert texts == [said[1], conclusion]
    return visit, said, conclusion


def wait_for_receipts(person: Person, visit: str, count: int = 1) -> list[dict[str, Any]]:
    """The next `count` record receipts this person receives (each shown once)."""
    receipts: list[dict[str, Any]] = []
    deadline = time.monotonic() + RECEIPT_TIMEOUT_S
    while len(receipts) < count and time.monotonic() < deadline:  # bounded in time
        for message in person.inbox():
            if message["kind"] == "record_receipt":
                assert message["from"] == "records"
                receipt: dict[str, Any] = message["receipt"]
                assert receipt is not None and receipt["visit"] == visit
                receipts.append(receipt)
        if len(receipts) < count:
            time.sleep(1)
    assert len(receipts) == count, f"{person.name} got {len(receipts)} of {count} receipts"
    return receipts


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def check_bundle(bundle: dict[str, Any], visit: str, said: list[str], conclusion: str) -> None:
    """The FHIR transaction holds the visit, every message as said, and the conclusion."""
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "transaction")
    (encounter,) = resources(bundle, "Encounter")
    assert encounter["class"]["code"] == "VR"
    assert any(i["value"] == visit for i in encounter["identifier"])
    communications = resources(bundle, "Communication")
    spoken = [c["payload"][0]["contentString"] for c in communications]
    # The visit-opened notice, the two messages and the conclusion, in the order they were sent.
    assert spoken[1:] == [*said, conclusion] and visit in spoken[0]
    # The conclusion's attachment is in the record itself, with the hash R4 defines.
    (attachment,) = [
        p["contentAttachment"] for p in communications[-1]["payload"] if "contentAttachment" in p
    ]
    assert base64.b64decode(attachment["data"]) == REPORT
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(REPORT).digest()).decode()  # noqa: S324
    (composition,) = resources(bundle, "Composition")
    assert conclusion in json.dumps(composition, ensure_ascii=False)
    (provenance,) = resources(bundle, "Provenance")
    # Every message's author signature, and the doctor's over the record request.
    assert len(provenance["signature"]) == len(communications) + 1


def setup_people(live: LiveServer, tmp_path: Path) -> tuple[Person, Person, Person]:
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    patient = enroll(live, tmp_path, "petrov", "patient")
    records = enroll(live, tmp_path, "records", "records")
    live.link("petrov", "dr.ivanova")
    return doctor, patient, records


def gateway_config(path: Path, data_dir: Path, sink: str, where: str) -> Path:
    if sink == "directory":
        path.write_text(
            f'sink = "directory"\ndata_dir = "{data_dir}"\n[directory]\npath = "{where}"\n'
        )
    else:
        path.write_text(f'sink = "fhir"\ndata_dir = "{data_dir}"\n[fhir]\nbase_url = "{where}"\n')
    return path


def test_a_visit_saved_into_the_directory_then_into_a_fhir_server_once(
    live: LiveServer, tmp_path: Path
) -> None:
    """One visit: saved through the directory sink (receipts for both, a Bundle file whose
    content is what was said, a log that names no one); then the gateway restarts on a FHIR
    server and the doctor saves it twice: the second save creates nothing new."""
    doctor, patient, records = setup_people(live, tmp_path)
    visit, said, conclusion = talk_then_close(doctor, patient)

    out = tmp_path / "records-out"
    config = gateway_config(tmp_path / "directory.toml", tmp_path / "gw1", "directory", str(out))
    gateway = Gateway(records.profile, config, tmp_path / "gateway.log")
    try:
        saved = doctor.json("record", "save", "--visit", visit)
        assert saved["visit"] == visit
        (for_doctor,) = wait_for_receipts(doctor, visit)
        assert for_doctor["status"] == "saved", for_doctor["reason"]
        (for_patient,) = wait_for_receipts(patient, visit)
    finally:
        gateway.stop()
    assert for_doctor == for_patient
    assert any(r.startswith("Encounter/") for r in for_doctor["records"])
    (written,) = list(out.glob("*.json"))
    check_bundle(json.loads(written.read_text()), visit, said, conclusion)
    # The gateway's log names no one and carries nothing that was said.
    log = (tmp_path / "gateway.log").read_text()
    assert not any(text in log for text in [*said, conclusion, "petrov"])

    fhir = FhirServer()
    try:
        fhir.start()
    except Unavailable as exc:
        pytest.skip(f"the directory sink passed; no FHIR test server: {exc}")
    try:
        # A second gateway on its own outbox: it takes the first request too, then two more
        # saves of the same visit; the record system ends up with one copy of everything.
        config = gateway_config(tmp_path / "fhir.toml", tmp_path / "gw2", "fhir", fhir.base_url)
        gateway = Gateway(records.profile, config, tmp_path / "gateway-fhir.log")
        try:
            doctor.json("record", "save", "--visit", visit)
            doctor.json("record", "save", "--visit", visit)
            receipts = wait_for_receipts(doctor, visit, 3)
        finally:
            gateway.stop()
        assert all(r["status"] == "saved" for r in receipts), receipts
        assert len({tuple(r["records"]) for r in receipts}) == 1
        assert len(wait_for_receipts(patient, visit, 3)) == 3
        assert fhir.count("Encounter") == 1 and fhir.count("Composition") == 1
        assert fhir.count("Communication") == len(said) + 2  # the notice and the conclusion
        assert fhir.count("Provenance") == 1
    finally:
        fhir.stop()
