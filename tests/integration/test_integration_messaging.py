"""End to end: the real server on 127.0.0.1 (SQLite, and PostgreSQL when configured) and the
real `medrelay` CLI in separate processes. People enroll with one-time codes from
`medrelay-server admin add-user` and exchange end-to-end-encrypted messages."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from live_server import LiveServer, enroll
from loadclient import Device, seed
from store_worlds import NO_POSTGRES, POSTGRES_URL, postgres_schema

from medrelay.protocol.frames import encode_frame
from medrelay.protocol.messages import Ack, Deliver, Sent
from medrelay.server.storage.database import make_engine

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def live(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveServer]:
    """A running server on a fresh database of each kind."""
    if request.param == "sqlite":
        server = LiveServer(tmp_path / "server")
        server.start()
        yield server
        server.stop()
        return
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    with postgres_schema() as url:
        server = LiveServer(tmp_path / "server", database_url=url)
        server.start()
        yield server
        server.stop()


def canary() -> str:
    return f"canary-{secrets.token_hex(8)}"


def test_two_people_exchange_messages_both_ways_with_an_attachment(
    live: LiveServer, tmp_path: Path
) -> None:
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    patient = enroll(live, tmp_path, "petrov", "patient")
    live.link("petrov", "dr.ivanova")
    report = tmp_path / "lab-results.txt"
    report.write_text("creatinine 98 umol/L\n")
    patient.send("dr.ivanova", "my blood pressure is 150/95", "--file", str(report))
    (received,) = doctor.inbox()
    assert received["from"] == "petrov" and received["text"] == "my blood pressure is 150/95"
    assert [a["name"] for a in received["attachments"]] == ["lab-results.txt"]
    out = tmp_path / "saved"
    doctor.run("attachment", "save", received["id"], "--out", str(out))
    assert (out / "lab-results.txt").read_text() == "creatinine 98 umol/L\n"

    doctor.send("petrov", "take 5 mg amlodipine tonight")
    (reply,) = patient.inbox()
    assert (reply["from"], reply["text"]) == ("dr.ivanova", "take 5 mg amlodipine tonight")
    assert reply["thread"] == received["thread"]


def test_an_offline_recipient_gets_everything_in_order_on_reconnect(
    live: LiveServer, tmp_path: Path
) -> None:
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    patient = enroll(live, tmp_path, "petrov", "patient")
    live.link("petrov", "dr.ivanova")
    texts = [f"reading {n}: {120 + n}/80" for n in range(5)]
    for text in texts:
        patient.send("dr.ivanova", text)
    assert [m["text"] for m in doctor.inbox()] == texts
    assert doctor.inbox() == []  # acknowledged: nothing is delivered twice


def test_a_server_killed_after_acknowledging_loses_nothing(
    live: LiveServer, tmp_path: Path
) -> None:
    """Every message the sender saw acknowledged is delivered after a crash (SIGKILL) and
    restart between the acknowledgement and the delivery."""
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    patient = enroll(live, tmp_path, "petrov", "patient")
    live.link("petrov", "dr.ivanova")
    texts = [f"before the crash {n}" for n in range(3)]
    for text in texts:
        patient.send("dr.ivanova", text)  # returns only after the server's `sent`
    live.kill()
    live.start()
    assert [m["text"] for m in doctor.inbox()] == texts


def test_a_resend_after_a_lost_acknowledgement_is_delivered_once(live: LiveServer) -> None:
    """The sender's connection drops before it reads `sent`; it resends the identical frame
    with the same message id on a new connection; the recipient gets the message once."""
    database_url = live.database_url or f"sqlite:///{live.data_dir / 'medrelay.db'}"
    seed(database_url, 2, first=900)
    message_id = secrets.token_bytes(16)
    payload = secrets.token_bytes(300)

    async def scenario() -> list[bytes]:
        sender = await Device.login(900, live.port, "clinic.test")
        sender.send(901, payload, message_id)
        await asyncio.sleep(0.5)  # stored and acknowledged, but the answer is never read
        sender.ws.close()
        again = await Device.login(900, live.port, "clinic.test")
        again.send(901, payload, message_id)
        await asyncio.wait_for(again.next_of(Sent), 10)
        again.ws.close()
        recipient = await Device.login(901, live.port, "clinic.test")
        received: list[bytes] = []
        try:
            while True:
                for message in await asyncio.wait_for(recipient.messages(), 1.5):
                    if isinstance(message, Deliver):
                        received += [i.message_id for i in message.items]
                        recipient.ws.send(
                            encode_frame(Ack(seqs=tuple(i.seq for i in message.items)))
                        )
        except TimeoutError:
            pass
        recipient.ws.close()
        return received

    assert asyncio.run(scenario()) == [message_id]


def _stored_bytes(live: LiveServer) -> list[bytes]:
    """Every value in every table, plus the raw database files for SQLite."""
    url = live.database_url or f"sqlite:///{live.data_dir / 'medrelay.db'}"
    engine = make_engine(url)
    values: list[bytes] = []
    try:
        metadata = sa.MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            for table in metadata.sorted_tables:
                for row in conn.execute(sa.select(table)):
                    for value in row:
                        if isinstance(value, bytes | memoryview):
                            values.append(bytes(value))
                        elif isinstance(value, str):
                            values.append(value.encode())
    finally:
        engine.dispose()
    if live.database_url is None:
        values += [p.read_bytes() for p in live.data_dir.glob("medrelay.db*")]
    return values


def test_the_server_keeps_no_plaintext_in_its_database_or_logs(
    live: LiveServer, tmp_path: Path
) -> None:
    doctor = enroll(live, tmp_path, "dr.ivanova", "doctor")
    patient = enroll(live, tmp_path, "petrov", "patient")
    live.link("petrov", "dr.ivanova")
    secret_text, secret_reply, secret_file = canary(), canary(), canary()
    attachment = tmp_path / "scan.txt"
    attachment.write_text(secret_file)
    patient.send("dr.ivanova", secret_text, "--file", str(attachment))
    doctor.send("petrov", secret_reply)
    live.stop()  # flushes logs and checkpoints nothing away: the WAL is still scanned
    stored = [*_stored_bytes(live), live.log_path.read_bytes()]
    for text in (secret_text, secret_reply, secret_file):
        assert not any(text.encode() in blob for blob in stored), text
    log = live.log_path.read_text()
    for name in ("dr.ivanova", "petrov"):
        assert name not in log
    live.start()  # the fixture stops it again
