"""Test harness for the relay: a RelayService on a fake clock and the in-memory store, and fake
client connections that speak frames over a recording transport. No threads, no sockets, no
real time."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from store_worlds import MemoryWorld, StoreWorld
from twisted.internet.task import Clock

from medrelay.crypto.keys import SigningKey
from medrelay.crypto.rng import seeded_rng
from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.messages import (
    Ack,
    Auth,
    Deliver,
    Direction,
    Hello,
    Message,
    OutboundEnvelope,
    Send,
    Welcome,
)
from medrelay.server.availability.offhours import OffHours
from medrelay.server.metrics import RelayMetrics
from medrelay.server.relay.connection import ClientConnection
from medrelay.server.relay.service import RelayConfig, RelayService
from medrelay.server.relay.store import DeviceRecord

CLINIC = "clinic.test"


@dataclass
class FakeTransport:
    """A ConnectionTransport that records what the server writes."""

    written: list[bytes] = field(default_factory=list)
    closed: bool = False
    writable: bool = True
    reading: bool = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class FakeClient:
    """One client connection: sends frames, collects decoded server frames."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport = FakeTransport()
        self.connection: ClientConnection = relay.service.new_connection(self.transport)
        self._decoder = FrameDecoder(Direction.SERVER_TO_CLIENT)
        self._seen = 0
        self.received: list[Message] = []
        self._rids = itertools.count(1)

    def rid(self) -> int:
        return next(self._rids)

    def send(self, message: Message) -> None:
        self.send_raw(encode_frame(message))

    def send_raw(self, data: bytes) -> None:
        """Deliver bytes, then end the reactor turn's output (frames are written at the end of
        a turn) without running anything else that is scheduled."""
        self.connection.data_received(data)
        self.relay.service.run_end_of_turn()

    def messages(self) -> list[Message]:
        """Everything received so far (decoding newly written bytes)."""
        for chunk in self.transport.written[self._seen :]:
            self._decoder.receive_data(chunk)
            while (message := self._decoder.next_message()) is not None:
                self.received.append(message)
        self._seen = len(self.transport.written)
        return self.received

    def take(self) -> list[Message]:
        """Messages received since the last take()."""
        self.messages()
        out, self.received = self.received, []
        return out

    def hello(self) -> Welcome:
        self.send(Hello(versions=(1,), agent="test"))
        (welcome,) = self.take()
        assert isinstance(welcome, Welcome)
        return welcome

    def login(self, device: DeviceRecord, key: SigningKey) -> list[Message]:
        welcome = self.hello()
        transcript = auth_transcript(welcome.challenge, CLINIC, device.username, device.device_id)
        self.send(
            Auth(
                rid=self.rid(),
                user=device.username,
                device=device.device_id,
                signature=key.sign(transcript),
            )
        )
        self.relay.settle()
        messages = self.take()
        # Deliveries that follow the login stay pending for the test to take().
        self.received = [m for m in messages if isinstance(m, Deliver)]
        return messages

    def send_text(
        self, message_id: bytes, targets: list[tuple[str, str]], payload: bytes = b"ciphertext"
    ) -> int:
        rid = self.rid()
        self.send(
            Send(
                rid=rid,
                message_id=message_id,
                envelopes=tuple(OutboundEnvelope(u, d, payload) for u, d in targets),
            )
        )
        return rid

    def ack(self, seqs: list[int]) -> None:
        self.send(Ack(seqs=tuple(seqs)))


class Relay:
    """A relay service with its clock, store and device keys."""

    def __init__(
        self, world: StoreWorld | None = None, offhours: OffHours | None = None, **config: object
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)  # a plausible present, in seconds
        self.world: StoreWorld = world if world is not None else MemoryWorld()
        self.store = self.world.store
        self.registry = CollectorRegistry()
        self.metrics = RelayMetrics.create(self.registry)
        self.config = RelayConfig(clinic_id=CLINIC, **config)  # type: ignore[arg-type]
        self.service = RelayService(
            store=self.store,
            clock=self.clock,
            rng=seeded_rng(b"relay"),
            config=self.config,
            metrics=self.metrics,
            offhours=offhours,
        )
        self._keys = seeded_rng(b"device keys")
        self.keys: dict[tuple[str, str], SigningKey] = {}

    def account(self, username: str, role: str = "doctor") -> None:
        self.world.add_account(username, role)

    def device(self, username: str, device_id: str) -> DeviceRecord:
        key = SigningKey.generate(self._keys)
        self.keys[(username, device_id)] = key
        return self.world.add_device(username, device_id, signing_key=key.verify_key.raw)

    def client(self) -> FakeClient:
        return FakeClient(self)

    def online(self, device: DeviceRecord) -> FakeClient:
        client = self.client()
        client.login(device, self.keys[(device.username, device.device_id)])
        return client

    def settle(self) -> None:
        """Run every callLater(0) (group commits, delivery starts) until nothing is due."""
        for _ in range(20):
            self.clock.advance(0)

    def counter(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value
