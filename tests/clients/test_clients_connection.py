"""The relay connection: log-in (hello, auth signature, resume), requests matched by rid with
timeouts, refusals, malformed input from the server, and the connector's reconnection with
full-jitter exponential backoff on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from medrelay.clients.engine.connection import (
    BACKOFF_CAP_S,
    LOGIN_TIMEOUT_S,
    Backoff,
    ConnectionState,
    Credentials,
    ServerConnection,
    uniform,
)
from medrelay.clients.engine.errors import ClientError, LocalCode, RemoteError
from medrelay.clients.engine.testing import ClientWorld
from medrelay.clients.engine.views import ConnectionStatus, Event
from medrelay.crypto.keys import SigningKey
from medrelay.crypto.rng import seeded_rng
from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.messages import (
    Auth,
    Authenticated,
    Deliver,
    DeliveredItem,
    DeviceRef,
    DevicesGet,
    Direction,
    Error,
    Hello,
    Limits,
    Message,
    PrekeysLow,
    Resume,
    Sent,
    Welcome,
)

CHALLENGE = b"c" * 32
TOKEN = b"t" * 32


class Transport:
    """Records what the client writes, decoded."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
        self.closed = False

    def write(self, data: bytes) -> None:
        self.decoder.receive_data(data)

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[Message]:
        return list(self.decoder)


class Handler:
    def __init__(self) -> None:
        self.authenticated: list[Authenticated] = []
        self.refused: list[ClientError] = []
        self.delivered: list[Deliver] = []
        self.low: list[PrekeysLow] = []
        self.closed = 0

    def on_authenticated(self, connection: ServerConnection, message: Authenticated) -> None:
        self.authenticated.append(message)

    def on_login_refused(self, connection: ServerConnection, error: ClientError) -> None:
        self.refused.append(error)

    def on_deliver(self, connection: ServerConnection, message: Deliver) -> None:
        self.delivered.append(message)

    def on_prekeys_low(self, connection: ServerConnection, message: PrekeysLow) -> None:
        self.low.append(message)

    def on_closed(self, connection: ServerConnection) -> None:
        self.closed += 1


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate(seeded_rng(b"device key"))


def connect(
    key: SigningKey, *, token: bytes | None = None, timeout_s: float = 5.0
) -> tuple[ServerConnection, Transport, Handler, Clock]:
    transport, handler, clock = Transport(), Handler(), Clock()
    connection = ServerConnection(
        transport,
        handler,
        credentials=Credentials("clinic.test", "alice", "dev1", key),
        token=token,
        clock=clock,
        request_timeout_s=timeout_s,
    )
    connection.connection_made()
    return connection, transport, handler, clock


def welcome(clinic: str = "clinic.test") -> bytes:
    return encode_frame(
        Welcome(
            version=1,
            agent="test",
            clinic=clinic,
            challenge=CHALLENGE,
            time_ms=0,
            limits=Limits(
                max_frame=1 << 20, max_ciphertext=1 << 18, max_envelopes=128, max_acks=1024
            ),
        )
    )


def logged_in(key: SigningKey) -> tuple[ServerConnection, Transport, Handler, Clock]:
    connection, transport, handler, clock = connect(key)
    connection.data_received(welcome())
    (auth,) = [m for m in transport.frames() if isinstance(m, Auth)]
    connection.data_received(
        encode_frame(
            Authenticated(rid=auth.rid, user="alice", device="dev1", expires_ms=1, token=TOKEN)
        )
    )
    assert connection.ready
    return connection, transport, handler, clock


def results(d: Deferred[Message]) -> list[object]:
    out: list[object] = []
    d.addBoth(out.append)
    return out


def test_hello_is_the_first_frame_and_auth_signs_the_transcript(key: SigningKey) -> None:
    connection, transport, _, _ = connect(key)
    (hello,) = transport.frames()
    assert isinstance(hello, Hello) and hello.versions == (1,)
    connection.data_received(welcome())
    (auth,) = transport.frames()
    assert isinstance(auth, Auth)
    assert (auth.user, auth.device) == ("alice", "dev1")
    key.verify_key.verify(
        auth_transcript(CHALLENGE, "clinic.test", "alice", "dev1"), auth.signature
    )
    assert connection.state is ConnectionState.AUTHENTICATING


def test_a_stored_token_resumes_instead_of_signing(key: SigningKey) -> None:
    connection, transport, handler, _ = connect(key, token=TOKEN)
    connection.data_received(welcome())
    (_, resume) = transport.frames()
    assert isinstance(resume, Resume) and resume.token == TOKEN
    connection.data_received(
        encode_frame(Authenticated(rid=resume.rid, user="alice", device="dev1", expires_ms=1))
    )
    assert connection.ready and handler.authenticated[0].token is None


def test_a_server_of_another_clinic_is_refused(key: SigningKey) -> None:
    connection, transport, handler, _ = connect(key)
    connection.data_received(welcome(clinic="other.clinic"))
    assert transport.closed
    assert handler.refused[0].code is LocalCode.PEER_UNVERIFIED
    assert not any(isinstance(m, Auth) for m in transport.frames())


def test_a_login_for_another_device_is_refused(key: SigningKey) -> None:
    connection, transport, _, _ = connect(key)
    connection.data_received(welcome())
    (_, auth) = transport.frames()
    assert isinstance(auth, Auth)
    connection.data_received(
        encode_frame(
            Authenticated(rid=auth.rid, user="bob", device="dev1", expires_ms=1, token=TOKEN)
        )
    )
    assert transport.closed and not connection.ready


@pytest.mark.parametrize("code", [ErrorCode.AUTH_FAILED, ErrorCode.TOKEN_INVALID])
def test_a_refused_login_reaches_the_handler_with_its_code(
    key: SigningKey, code: ErrorCode
) -> None:
    connection, transport, handler, _ = connect(key)
    connection.data_received(welcome())
    (_, auth) = transport.frames()
    assert isinstance(auth, Auth)
    connection.data_received(encode_frame(Error(code=code, message="no", rid=auth.rid)))
    assert handler.refused[0].code is code
    assert transport.closed


def test_answers_are_matched_to_requests_by_rid_in_any_order(key: SigningKey) -> None:
    connection, transport, _, _ = logged_in(key)
    first = results(connection.request(lambda rid: DevicesGet(rid=rid, user="bob")))
    second = results(connection.request(lambda rid: DevicesGet(rid=rid, user="carol")))
    a, b = [m for m in transport.frames() if isinstance(m, DevicesGet)]
    connection.data_received(encode_frame(Sent(rid=b.rid, message_id=b"2" * 16, time_ms=2)))
    connection.data_received(encode_frame(Sent(rid=a.rid, message_id=b"1" * 16, time_ms=1)))
    assert isinstance(first[0], Sent) and first[0].message_id == b"1" * 16
    assert isinstance(second[0], Sent) and second[0].message_id == b"2" * 16


def test_an_error_answer_fails_the_request_with_its_code_and_device_sets(key: SigningKey) -> None:
    connection, transport, _, _ = logged_in(key)
    out = results(connection.request(lambda rid: DevicesGet(rid=rid, user="bob")))
    (request,) = [m for m in transport.frames() if isinstance(m, DevicesGet)]
    connection.data_received(
        encode_frame(
            Error(
                code="stale_devices",
                message="stale",
                rid=request.rid,
                missing=(DeviceRef("bob", "tab"),),
            )
        )
    )
    failure = out[0]
    assert isinstance(failure, Failure) and isinstance(failure.value, RemoteError)
    assert failure.value.code is ErrorCode.STALE_DEVICES
    assert failure.value.missing == (DeviceRef("bob", "tab"),)
    assert connection.ready  # a refused request does not end the connection


def test_a_silent_server_times_the_request_out_and_a_late_answer_is_ignored(
    key: SigningKey,
) -> None:
    connection, transport, _, clock = logged_in(key)
    out = results(connection.request(lambda rid: DevicesGet(rid=rid, user="bob")))
    clock.advance(4.9)
    assert out == []
    clock.advance(0.2)
    failure = out[0]
    assert isinstance(failure, Failure) and isinstance(failure.value, ClientError)
    assert failure.value.code is LocalCode.TIMEOUT
    (request,) = [m for m in transport.frames() if isinstance(m, DevicesGet)]
    connection.data_received(encode_frame(Sent(rid=request.rid, message_id=b"1" * 16, time_ms=1)))
    assert len(out) == 1


def test_a_lost_connection_fails_pending_requests(key: SigningKey) -> None:
    connection, _, handler, clock = logged_in(key)
    out = results(connection.request(lambda rid: DevicesGet(rid=rid, user="bob")))
    connection.connection_lost()
    failure = out[0]
    assert isinstance(failure, Failure) and isinstance(failure.value, ClientError)
    assert failure.value.code is LocalCode.CONNECTION_LOST
    assert handler.closed == 1
    assert clock.getDelayedCalls() == []


def test_a_frame_split_across_transport_messages_closes_the_connection(key: SigningKey) -> None:
    connection, transport, _, _ = logged_in(key)
    frame = encode_frame(PrekeysLow(remaining=1, wanted=99))
    connection.data_received(frame[:5])
    assert transport.closed


def test_garbage_from_the_server_closes_the_connection(key: SigningKey) -> None:
    connection, transport, handler, _ = logged_in(key)
    connection.data_received(b"\xff\xff\xff\xff")
    assert transport.closed
    assert handler.refused[0].code is LocalCode.BAD_SERVER_ANSWER


def test_deliveries_and_prekey_notices_go_to_the_handler(key: SigningKey) -> None:
    connection, _, handler, _ = logged_in(key)
    item = DeliveredItem(
        seq=1, kind="msg", message_id=b"m" * 16, time_ms=1, user="bob", device="d", ciphertext=b"x"
    )
    connection.data_received(
        encode_frame(Deliver(items=(item,))) + encode_frame(PrekeysLow(remaining=1, wanted=99))
    )
    assert handler.delivered[0].items == (item,)
    assert handler.low[0].wanted == 99


def test_a_login_that_takes_too_long_is_abandoned(key: SigningKey) -> None:
    _, transport, handler, clock = connect(key)
    clock.advance(LOGIN_TIMEOUT_S + 1)
    assert transport.closed
    assert handler.refused[0].code is LocalCode.TIMEOUT


# --- backoff and the connector -----------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_doubling_ceiling_capped_at_thirty_seconds() -> None:
    backoff = Backoff(seeded_rng(b"backoff"))
    delays = [backoff.next_delay() for _ in range(12)]
    ceilings = [min(BACKOFF_CAP_S, 2.0**n) for n in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[6:]) > 8  # jitter spreads up to the cap, not around a fixed value
    backoff.reset()
    assert backoff.ceiling() == 1.0


def test_uniform_draws_cover_the_unit_interval() -> None:
    rng = seeded_rng(b"uniform")
    draws = [uniform(rng) for _ in range(2000)]
    assert 0 <= min(draws) < 0.01 and 0.99 < max(draws) < 1


@pytest.fixture
def world(tmp_path: Path) -> ClientWorld:
    world = ClientWorld(tmp_path)
    world.enroll("alice")
    return world


def test_reconnection_waits_with_growing_jittered_delays_and_resets_after_login(
    world: ClientWorld,
) -> None:
    engine = world.open("alice")
    statuses: list[Event] = []
    engine.subscribe(statuses.append)
    world.relay.down = True
    engine.start()
    delays: list[float] = []
    for _ in range(8):
        (call,) = world.clock.getDelayedCalls()
        delays.append(call.getTime() - world.clock.seconds())
        world.clock.advance(delays[-1])
    assert world.relay.dials == 9
    assert all(0 <= d <= min(30.0, 2.0**n) for n, d in enumerate(delays))
    assert all(isinstance(s, ConnectionStatus) and s.retry_in_s is not None for s in statuses)
    world.relay.down = False
    (call,) = world.clock.getDelayedCalls()
    world.clock.advance(call.getTime() - world.clock.seconds())
    world.relay.pump()
    assert engine.connector.connection is not None
    assert engine.connector.backoff.attempt == 0
    world.relay.drop()
    (call,) = world.clock.getDelayedCalls()
    assert call.getTime() - world.clock.seconds() <= 1.0  # the first retry after a good login
    world.run(engine.close())


def test_a_listener_waits_through_failures_while_a_one_shot_caller_fails_fast(
    world: ClientWorld,
) -> None:
    engine = world.open("alice")
    world.relay.down = True
    patient = engine.connector.when_ready(fail_fast=False)
    hasty = engine.connector.when_ready(fail_fast=True)
    hasty_out: list[object] = []
    hasty.addBoth(hasty_out.append)
    assert isinstance(hasty_out[0], Failure)
    assert not patient.called
    for _ in range(5):
        world.clock.advance(31)
    world.relay.down = False
    connection = world.run(patient)
    assert connection.ready
    world.run(engine.close())


def test_a_failed_login_stops_reconnecting_for_good(world: ClientWorld) -> None:
    engine = world.open("alice")
    statuses: list[Event] = []
    engine.subscribe(statuses.append)
    world.relay.users["alice"].devices.clear()  # the relay no longer knows this device
    with pytest.raises(ClientError) as caught:
        world.run(engine.connect())
    assert caught.value.code is ErrorCode.AUTH_FAILED
    dials = world.relay.dials
    world.clock.advance(120)
    world.relay.pump()
    assert world.relay.dials == dials
    assert statuses[-1] == ConnectionStatus(connected=False, detail=caught.value.message)
    with pytest.raises(ClientError):
        world.run(engine.connect())
    world.run(engine.close())


def test_stop_cancels_a_pending_retry(world: ClientWorld) -> None:
    engine = world.open("alice")
    world.relay.down = True
    engine.start()
    assert world.clock.getDelayedCalls()
    world.run(engine.close())
    assert world.clock.getDelayedCalls() == []
