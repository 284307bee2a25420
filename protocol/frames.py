"""Framing: a connection's bytes are a sequence of frames, each a 4-byte big-endian body length
followed by that many bytes of deterministic CBOR (`medrelay.protocol.messages`).

`FrameDecoder` is sans-IO in the style of h11: feed it bytes with `receive_data`, take messages
with `next_message`. Every length prefix is checked against the current maximum as soon as its
four bytes arrive, before any of its body is buffered, so the decoder never holds more than one
partial frame of at most `max_frame_size` bytes. An oversized prefix poisons the stream (a fatal
error: nothing after it can be trusted); a complete frame with bad content is a non-fatal error
and decoding continues with the next frame.

Over WebSocket each binary message carries one or more whole frames (`has_partial_frame` lets
the adapter refuse a frame split across messages); over a plain byte stream frames simply follow
one another.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from medrelay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from medrelay.protocol.limits import FRAME_HEADER_SIZE, MAX_FRAME_SIZE
from medrelay.protocol.messages import (
    PROTOCOL_VERSION,
    Direction,
    Message,
    decode_body,
    encode_body,
)

_HEADER: Final = struct.Struct(">I")


def encode_frame(
    message: Message, version: int = PROTOCOL_VERSION, max_frame_size: int = MAX_FRAME_SIZE
) -> bytes:
    """One complete frame (prefix and body)."""
    body = encode_body(message, version)
    if len(body) > max_frame_size:
        raise LocalProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"{message.TYPE} frame of {len(body)} bytes exceeds {max_frame_size}",
        )
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder for the frames one side receives."""

    def __init__(
        self,
        accept: Direction,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self._accept = accept
        self._max_frame_size = max_frame_size
        self.version = version
        self._buffer = bytearray()
        self._bodies: deque[bytes] = deque()
        self._poisoned: RemoteProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        """Raise or lower the limit (e.g. after authentication); applies to frames not yet seen."""
        self._max_frame_size = value

    @property
    def has_partial_frame(self) -> bool:
        """True while some bytes of an incomplete frame are buffered."""
        return bool(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer, splitting off complete frames.

        Raises a fatal `RemoteProtocolError` as soon as a length prefix exceeds the limit.
        """
        if self._poisoned is not None:
            raise self._poisoned
        buffer = self._buffer
        # With nothing buffered (the usual case: a WebSocket message of whole frames), frames are
        # sliced straight out of `data`, one copy per body; only a partial frame is buffered.
        source: bytes | bytearray
        if buffer:
            buffer += data
            source = buffer
        else:
            source = data
        offset = 0
        available = len(source)
        while available - offset >= FRAME_HEADER_SIZE:
            (length,) = _HEADER.unpack_from(source, offset)
            if length > self._max_frame_size:
                self._poisoned = RemoteProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {length} bytes exceeds the limit of {self._max_frame_size}",
                    fatal=True,
                )
                buffer.clear()
                raise self._poisoned
            end = offset + FRAME_HEADER_SIZE + length
            if end > available:
                break
            self._bodies.append(bytes(source[offset + FRAME_HEADER_SIZE : end]))
            offset = end
        if source is buffer:
            if offset:
                del buffer[:offset]
        elif offset < available:
            buffer += source[offset:]

    def next_message(self) -> Message | None:
        """The next decoded message, or None when no complete frame is buffered.

        A frame with invalid content raises a non-fatal `RemoteProtocolError` and is dropped;
        call again for the frames after it.
        """
        if self._poisoned is not None:
            raise self._poisoned
        if not self._bodies:
            return None
        body = self._bodies.popleft()
        return decode_body(body, self._accept, self.version)

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> Message:
        message = self.next_message()
        if message is None:
            raise StopIteration
        return message
