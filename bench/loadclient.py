"""A raw medrelay protocol client for load generation and black-box tests: a minimal asyncio
WebSocket client (binary frames, client masking, pings) and a logged-in `Device` speaking
protocol v1 frames, plus seeding of accounts and devices straight into a server's database
(the relay only needs the rows; enrollment's Argon2 would dominate setting up 10,000 devices),
and of session tokens (`seed_sessions`), so a load generator can log in with `resume` alone.

Shared by bench/relay_bench.py and the integration tests (tests put bench/ on their path).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import time
from typing import Any

import sqlalchemy as sa

from medrelay.crypto.keys import SigningKey
from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.messages import (
    Auth,
    Authenticated,
    Direction,
    Error,
    Hello,
    OutboundEnvelope,
    Send,
    Welcome,
)
from medrelay.server.storage.database import make_engine
from medrelay.server.storage.migrate import upgrade_to_head
from medrelay.server.storage.schema import accounts, devices, sessions, signed_prekeys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a server this process starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def device_key(index: int) -> SigningKey:
    return SigningKey(hashlib.sha256(b"relay bench device %d" % index).digest())


def username(index: int) -> str:
    return f"u{index:06d}"


def seed(url: str, count: int, first: int = 0) -> None:
    """Accounts u<first>.. with one device "d" each, straight into the tables."""
    engine = make_engine(url)
    upgrade_to_head(engine)
    now = int(time.time() * 1000)
    with engine.begin() as conn:
        for start in range(first, first + count, 1000):
            chunk = range(start, min(first + count, start + 1000))
            conn.execute(
                sa.insert(accounts),
                [
                    {
                        "username": username(i),
                        "role": "doctor",
                        "display_name": f"Bench {i}",
                        "specialty": None,
                        "department": None,
                        "status": "active",
                        "created_at": now,
                        "identity_key": b"k",
                        "user_certificate": b"c",
                    }
                    for i in chunk
                ],
            )
        pks = dict(conn.execute(sa.select(accounts.c.username, accounts.c.pk)).all())
        for start in range(first, first + count, 1000):
            chunk = range(start, min(first + count, start + 1000))
            conn.execute(
                sa.insert(devices),
                [
                    {
                        "account_pk": pks[username(i)],
                        "device_id": "d",
                        "certificate": b"c",
                        "signing_key": device_key(i).verify_key.raw,
                        "created_at": now,
                        "revoked_at": None,
                        "queued_count": 0,
                    }
                    for i in chunk
                ],
            )
        device_pks = (
            conn.execute(
                sa.select(devices.c.pk).where(
                    devices.c.account_pk.in_(
                        [pks[username(i)] for i in range(first, first + count)]
                    )
                )
            )
            .scalars()
            .all()
        )
        conn.execute(
            sa.insert(signed_prekeys),
            [{"device_pk": pk, "prekey": b"spk", "created_at": now} for pk in device_pks],
        )
    engine.dispose()


def session_token(index: int) -> bytes:
    """The 32-byte session token `seed_sessions` gives device "d" of user `index`."""
    return hashlib.sha256(b"relay bench session %d" % index).digest()


def seed_sessions(url: str, count: int, first: int = 0) -> None:
    """A session for device "d" of users u<first>.. (seeded with `seed`), as `auth` would have
    created it: the server stores the token's SHA-256 digest (docs/protocol.md §5). A device
    then logs in with `resume {token: session_token(index)}`, no signature needed."""
    engine = make_engine(url)
    now = int(time.time() * 1000)
    expires = now + 24 * 3600 * 1000
    with engine.begin() as conn:
        by_user = dict(
            conn.execute(
                sa.select(accounts.c.username, devices.c.pk)
                .join(devices, devices.c.account_pk == accounts.c.pk)
                .where(devices.c.device_id == "d")
            ).all()
        )
        for start in range(first, first + count, 1000):
            chunk = range(start, min(first + count, start + 1000))
            conn.execute(
                sa.insert(sessions),
                [
                    {
                        "token_hash": hashlib.sha256(session_token(i)).digest(),
                        "device_pk": by_user[username(i)],
                        "created_at": now,
                        "expires_at": expires,
                    }
                    for i in chunk
                ],
            )
    engine.dispose()


# -- a minimal asyncio WebSocket client ------------------------------------------------------


class WebSocket:
    """Just enough RFC 6455 for a load generator: binary frames, client masking, pings."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> WebSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"upgrade refused: {head[:80]!r}")
        return cls(reader, writer)

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
            n, "little"
        )
        self.writer.write(header + mask + masked)

    async def recv(self) -> bytes:
        """The next binary message (pings answered, pongs skipped)."""
        while True:
            message = self._parse()
            if message is not None:
                opcode, payload = message
                if opcode == 0x2:
                    return payload
                if opcode == 0x9:
                    self.send(payload, 0xA)
                elif opcode == 0x8:
                    raise ConnectionError("server closed the WebSocket")
                continue
            chunk = await self.reader.read(1 << 18)
            if not chunk:
                raise ConnectionError("connection closed")
            self._buffer += chunk

    def _parse(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        opcode = buffer[0] & 0x0F
        n = buffer[1] & 0x7F
        offset = 2
        if n == 126:
            if len(buffer) < 4:
                return None
            (n,) = struct.unpack_from(">H", buffer, 2)
            offset = 4
        elif n == 127:
            if len(buffer) < 10:
                return None
            (n,) = struct.unpack_from(">Q", buffer, 2)
            offset = 10
        if len(buffer) < offset + n:
            return None
        payload = bytes(buffer[offset : offset + n])
        del buffer[: offset + n]
        return opcode, payload

    def close(self) -> None:
        self.writer.close()


class Device:
    """One logged-in device connection speaking the medrelay protocol."""

    def __init__(self, index: int, ws: WebSocket) -> None:
        self.index = index
        self.ws = ws
        self.decoder = FrameDecoder(Direction.SERVER_TO_CLIENT)
        self.rid = 0

    @classmethod
    async def login(cls, index: int, port: int, clinic: str) -> Device:
        ws = await WebSocket.connect(port)
        device = cls(index, ws)
        ws.send(encode_frame(Hello(versions=(1,), agent="relay-bench")))
        welcome = await device.next_of(Welcome)
        transcript = auth_transcript(welcome.challenge, clinic, username(index), "d")
        ws.send(
            encode_frame(
                Auth(
                    rid=1,
                    user=username(index),
                    device="d",
                    signature=device_key(index).sign(transcript),
                )
            )
        )
        await device.next_of(Authenticated)
        return device

    async def messages(self) -> list[Any]:
        self.decoder.receive_data(await self.ws.recv())
        out = []
        while (message := self.decoder.next_message()) is not None:
            out.append(message)
        return out

    async def next_of(self, kind: type[Any]) -> Any:
        for _ in range(100):
            for message in await self.messages():
                if isinstance(message, Error):
                    raise ConnectionError(f"{message.code}: {message.message}")
                if isinstance(message, kind):
                    return message
        raise ConnectionError(f"no {kind.__name__} in 100 frames")

    def send_frame(self, to: int, payload: bytes, message_id: bytes | None = None) -> bytes:
        """One `send` frame to device "d" of user `to` (not yet written)."""
        self.rid = (self.rid + 1) & 0xFFFFFFFF
        return encode_frame(
            Send(
                rid=self.rid,
                message_id=message_id if message_id is not None else os.urandom(16),
                envelopes=(OutboundEnvelope(username(to), "d", payload),),
            )
        )

    def send(self, to: int, payload: bytes, message_id: bytes | None = None) -> None:
        self.ws.send(self.send_frame(to, payload, message_id))
