"""The gateway against a real FHIR server implementation on 127.0.0.1 (Medplum's FHIR router with
its in-memory repository, tests/support/fhir_server): a replayed mirror creates nothing new, and
with the endpoint down for a while, across a gateway restart, the record arrives exactly once.
Skipped with the reason when node/npm or the npm registry is unavailable."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from fhir_server import FhirServer, Unavailable, free_port
from record_world import CLINIC, T0
from records_world import VISIT_ID, FakeEngine, World
from twisted.internet import reactor
from twisted.internet.task import Clock

from medrelay.clients.engine.record_messages import RecordReceipt
from medrelay.clients.records.fhir_mapping import clinic_system
from medrelay.clients.records.gateway import Backoff, RecordsGateway
from medrelay.clients.records.outbox import Outbox
from medrelay.clients.records.sinks import FhirSink
from medrelay.crypto.rng import Rng

_F = TypeVar("_F", bound=Callable[..., Any])


def on_reactor(test: _F) -> _F:
    wrapped: _F = pytest_twisted.ensureDeferred(test)
    return wrapped


@pytest.fixture(scope="module")
def fhir() -> Iterator[FhirServer]:
    server = FhirServer()
    try:
        server.start()
    except Unavailable as exc:
        pytest.skip(f"no FHIR test server: {exc}")
    try:
        yield server
    finally:
        server.stop()


class Gateway:
    def __init__(self, engine: FakeEngine, base_url: str, outbox: Path) -> None:
        self.clock = Clock()
        self.clock.advance(T0 / 1000 + 3 * 3600)
        self.outbox = Outbox(outbox)
        self.gateway = RecordsGateway(
            engine,
            self.outbox,
            FhirSink(reactor, reactor, base_url, authorization="Bearer test", timeout_s=10),
            clock=self.clock,
            jitter=lambda: 0.0,
            backoff=Backoff(base_s=10, cap_s=60),
        )

    async def settle(self) -> None:
        while self.gateway.idle is not None and not self.gateway.idle.called:
            await self.gateway.idle

    async def start(self) -> None:
        await self.gateway.start()
        await self.settle()

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.settle()

    def close(self) -> None:
        self.gateway.stop()
        self.outbox.close()


def visit_identifier() -> str:
    return f"{clinic_system(CLINIC, 'visit')}|{VISIT_ID}"


def receipts(engine: FakeEngine) -> list[RecordReceipt]:
    return [RecordReceipt.decode(text) for _, _, _, text in engine.sent]


@on_reactor
async def test_a_replayed_mirror_creates_nothing_new(
    fhir: FhirServer, rng: Rng, tmp_path: Path
) -> None:
    world = World(rng)
    engine = FakeEngine(world)
    messages = world.exchange()
    bundle = world.bundle(messages)
    engine.deliver_bundle(bundle)
    first = Gateway(engine, fhir.base_url, tmp_path / "a.sqlite3")
    await first.start()
    first.close()
    (receipt,) = receipts(engine)
    assert receipt.saved, receipt.reason
    assert receipt.records[0].startswith("Encounter/")
    before = {
        kind: fhir.count(kind)
        for kind in ("Encounter", "Communication", "Composition", "Provenance")
    }
    assert fhir.count("Encounter", visit_identifier()) == 1
    message_system = clinic_system(CLINIC, "message")
    for signed in messages:
        assert (
            fhir.count("Communication", f"{message_system}|{signed.content.message_id.hex()}") == 1
        )
    # A gateway that lost its outbox mirrors the same bundle again from scratch.
    second = Gateway(engine, fhir.base_url, tmp_path / "b.sqlite3")
    await second.start()
    second.close()
    again = receipts(engine)[1]
    assert again.saved
    assert again.records == receipt.records
    after = {kind: fhir.count(kind) for kind in before}
    assert after == before


@on_reactor
async def test_an_endpoint_down_then_up_across_a_restart_gets_the_record_once(
    rng: Rng, tmp_path: Path
) -> None:
    world = World(rng)
    engine = FakeEngine(world)
    engine.deliver_bundle(world.bundle(world.exchange()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    outbox = tmp_path / "outbox.sqlite3"
    gateway = Gateway(engine, url, outbox)
    await gateway.start()  # refused: nothing listens yet
    await gateway.advance(10)  # and again
    assert gateway.outbox.counts()["mirrors"]["pending"] == 1
    assert engine.sent == []
    gateway.close()
    server = FhirServer()
    try:
        server.start(port)
    except Unavailable as exc:
        pytest.skip(f"no FHIR test server: {exc}")
    try:
        restarted = Gateway(engine, url, outbox)
        await restarted.start()  # the restart drains the outbox at once
        await restarted.advance(120)
        assert restarted.outbox.counts()["mirrors"] == {"pending": 0, "delivered": 1, "failed": 0}
        restarted.close()
        assert [r.saved for r in receipts(engine)] == [True]
        assert server.count("Encounter", visit_identifier()) == 1
        assert server.count("Communication") == 4
        assert server.count("Provenance") == 1
    finally:
        server.stop()
