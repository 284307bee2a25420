"""medrelay.protocol.frames: FrameDecoder reassembles frames however the bytes are cut (one byte
at a time, random chunkings, several frames per call, a frame split across calls), bounds every
length prefix before buffering its body, and `encode_frame` refuses what the peer would refuse.
In the style of Twisted's IntNTestCaseMixin (protocols/test/test_basic.py)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_strategies import sample_message

from medrelay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.limits import MAX_FRAME_SIZE
from medrelay.protocol.messages import (
    MESSAGE_TYPES,
    Ack,
    BundleGet,
    Direction,
    Hello,
    Message,
    OutboundEnvelope,
    Send,
)

TYPES = sorted(MESSAGE_TYPES)


def _decoder_for(message: Message, **kwargs: int) -> FrameDecoder:
    return FrameDecoder(type(message).DIRECTION, **kwargs)


def _drain(decoder: FrameDecoder) -> list[Message]:
    return list(decoder)


def _partial(decoder: FrameDecoder) -> bool:
    """has_partial_frame read through a call, so mypy does not carry its narrowing across
    receive_data."""
    return decoder.has_partial_frame


@pytest.mark.parametrize("type_name", TYPES)
def test_every_type_fed_one_byte_at_a_time_decodes_to_an_equal_message(type_name: str) -> None:
    """No message appears before its last byte, exactly one appears after it, and it is equal."""
    message = sample_message(MESSAGE_TYPES[type_name])
    frame = encode_frame(message)
    decoder = _decoder_for(message)
    for i in range(len(frame) - 1):
        decoder.receive_data(frame[i : i + 1])
        assert decoder.next_message() is None
        assert decoder.has_partial_frame
    decoder.receive_data(frame[-1:])
    assert _drain(decoder) == [message]
    assert not decoder.has_partial_frame


@pytest.mark.parametrize("type_name", TYPES)
def test_every_type_in_random_chunkings_decodes_to_equal_messages(type_name: str) -> None:
    """Three copies of a frame cut at random points (seeded) come out as three equal messages, in
    order, whatever the cuts."""
    message = sample_message(MESSAGE_TYPES[type_name])
    stream = encode_frame(message) * 3
    chooser = random.Random(type_name)
    for _ in range(20):
        decoder = _decoder_for(message)
        out: list[Message] = []
        position = 0
        while position < len(stream):
            step = chooser.randint(1, max(1, len(stream) // 3))
            decoder.receive_data(stream[position : position + step])
            out.extend(decoder)
            position += step
        assert out == [message, message, message]
        assert not decoder.has_partial_frame


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.sampled_from(TYPES), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_any_sequence_of_frames_cut_anywhere_decodes_in_order(
    messages: list[str], cuts: list[int]
) -> None:
    """Frames of one direction concatenated and cut at arbitrary offsets decode in order."""
    items = [sample_message(MESSAGE_TYPES[name], i) for i, name in enumerate(messages)]
    direction = type(items[0]).DIRECTION
    items = [m for m in items if type(m).DIRECTION is direction]
    stream = b"".join(encode_frame(m) for m in items)
    offsets = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder(direction)
    out: list[Message] = []
    for start, end in itertools.pairwise(offsets):
        decoder.receive_data(stream[start:end])
        out.extend(decoder)
    assert out == items


def test_several_frames_in_one_call_are_all_returned_in_order() -> None:
    """One receive_data holding many frames yields all of them, in order."""
    acks = [Ack(seqs=(i, i + 1)) for i in range(1, 20)]
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    decoder.receive_data(b"".join(encode_frame(a) for a in acks))
    assert _drain(decoder) == acks
    assert decoder.next_message() is None


def test_a_frame_split_across_calls_is_reported_as_partial_until_complete() -> None:
    """has_partial_frame is true exactly while an incomplete frame is buffered (the WebSocket
    adapter refuses frames that span transport messages with it)."""
    first, second = (
        encode_frame(BundleGet(rid=1, user="a")),
        encode_frame(BundleGet(rid=2, user="b")),
    )
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    decoder.receive_data(first + second[:2])
    assert _partial(decoder)
    assert _drain(decoder) == [BundleGet(rid=1, user="a")]
    decoder.receive_data(second[2:])
    assert not _partial(decoder)
    assert _drain(decoder) == [BundleGet(rid=2, user="b")]


def test_empty_receive_data_changes_nothing() -> None:
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    decoder.receive_data(b"")
    assert decoder.next_message() is None
    assert not decoder.has_partial_frame


# -- length prefix limits --------------------------------------------------------------------


def test_an_oversized_length_prefix_alone_is_fatal_before_any_body_byte() -> None:
    """Only the four prefix bytes are fed: the error comes at once (nothing of the body is
    waited for or buffered), it is fatal, and the decoder stays poisoned."""
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.receive_data((MAX_FRAME_SIZE + 1).to_bytes(4, "big"))
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert caught.value.fatal
    assert not decoder.has_partial_frame  # nothing held for the refused frame
    with pytest.raises(RemoteProtocolError) as again:
        decoder.receive_data(encode_frame(Ack(seqs=(1,))))
    assert again.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_an_oversized_prefix_fed_byte_by_byte_fails_on_its_fourth_byte() -> None:
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER, max_frame_size=100)
    prefix = (101).to_bytes(4, "big")
    for byte in prefix[:3]:
        decoder.receive_data(bytes([byte]))
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.receive_data(prefix[3:])
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE and caught.value.fatal


def test_the_largest_length_prefix_is_refused_without_allocating() -> None:
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.receive_data(b"\xff\xff\xff\xff")
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE


def test_an_oversized_frame_after_valid_ones_is_still_refused() -> None:
    """The limit applies to every prefix in the stream, not only the first."""
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER, max_frame_size=64)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.receive_data(encode_frame(Ack(seqs=(1,))) + (65).to_bytes(4, "big"))
    assert caught.value.fatal


def _frame_with_body_size(size: int) -> tuple[Message, bytes]:
    """A hello whose body is exactly `size` bytes (the agent text is padded)."""
    base = len(encode_frame(Hello(versions=(1,), agent=""))) - 4
    length = size - base
    if length >= 24:  # from 24 bytes on, the text's CBOR head takes one more byte
        length -= 1
    message = Hello(versions=(1,), agent="a" * length)
    frame = encode_frame(message)
    assert len(frame) - 4 == size
    return message, frame


def test_a_body_of_exactly_the_limit_is_accepted_and_one_more_byte_is_refused() -> None:
    message, frame = _frame_with_body_size(40)
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER, max_frame_size=40)
    decoder.receive_data(frame)
    assert _drain(decoder) == [message]
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER, max_frame_size=39)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.receive_data(frame[:4])
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE


def test_raising_the_limit_admits_larger_frames_afterwards() -> None:
    """Before authentication the server uses a small limit and raises it after login."""
    message, frame = _frame_with_body_size(60)
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER, max_frame_size=40)
    decoder.receive_data(encode_frame(Hello(versions=(1,), agent="")))
    assert len(_drain(decoder)) == 1
    decoder.max_frame_size = 60
    assert decoder.max_frame_size == 60
    decoder.receive_data(frame)
    assert _drain(decoder) == [message]


def test_lowering_the_limit_refuses_frames_that_were_allowed_before() -> None:
    message, frame = _frame_with_body_size(60)
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    decoder.receive_data(frame)
    assert _drain(decoder) == [message]
    decoder.max_frame_size = 59
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.receive_data(frame)
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE


def test_frames_already_complete_are_kept_when_the_limit_is_lowered() -> None:
    """A frame that was complete when it arrived is not re-judged by a later, lower limit."""
    message, frame = _frame_with_body_size(60)
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    decoder.receive_data(frame)
    decoder.max_frame_size = 10
    assert _drain(decoder) == [message]


def test_a_non_fatal_error_drops_only_its_own_frame() -> None:
    """A well-delimited frame with a bad body raises a non-fatal error from next_message and the
    frames after it still decode."""
    bad = b"\x00\x00\x00\x01\xff"
    good = encode_frame(Ack(seqs=(7,)))
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    decoder.receive_data(good + bad + good)
    assert decoder.next_message() == Ack(seqs=(7,))
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.next_message()
    assert not caught.value.fatal
    assert decoder.next_message() == Ack(seqs=(7,))
    assert decoder.next_message() is None


def test_an_empty_body_is_a_non_fatal_malformed_frame() -> None:
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    decoder.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.next_message()
    assert caught.value.code is ErrorCode.MALFORMED_FRAME and not caught.value.fatal


def test_the_decoder_uses_its_negotiated_version() -> None:
    """`version` is the negotiated version: frames of another version are refused."""
    frame = encode_frame(Ack(seqs=(1,)), version=2)
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    decoder.receive_data(frame)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.next_message()
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION
    decoder.version = 2
    decoder.receive_data(frame)
    assert decoder.next_message() == Ack(seqs=(1,))


# -- encode_frame ----------------------------------------------------------------------------


def test_encode_frame_prefixes_the_body_length_big_endian() -> None:
    frame = encode_frame(Ack(seqs=(1,)))
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4


def test_encode_frame_refuses_a_message_larger_than_the_limit() -> None:
    """A send of 128 envelopes of 256 KiB would exceed 1 MiB: refused locally, as the peer
    would refuse it remotely."""
    big = Send(
        rid=1,
        message_id=bytes(16),
        envelopes=tuple(OutboundEnvelope(f"u{i}", "d", bytes(256 * 1024)) for i in range(5)),
    )
    with pytest.raises(LocalProtocolError) as caught:
        encode_frame(big)
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    message, frame = _frame_with_body_size(40)
    assert encode_frame(message, max_frame_size=40) == frame
    with pytest.raises(LocalProtocolError) as too_large:
        encode_frame(message, max_frame_size=39)
    assert too_large.value.code is ErrorCode.FRAME_TOO_LARGE


def test_bytearray_and_memoryview_input_decode_like_bytes_and_are_not_retained() -> None:
    """Frames may be fed from any bytes-like buffer; the decoder copies what it keeps, so the
    caller may reuse its buffer at once."""
    message = sample_message(Send)
    frame = encode_frame(message) * 2
    cut = len(frame) // 2 + 3
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    reused = bytearray(frame[:cut])
    decoder.receive_data(reused)  # type: ignore[arg-type]
    reused[:] = bytes(len(reused))
    decoder.receive_data(memoryview(frame)[cut:])  # type: ignore[arg-type]
    assert _drain(decoder) == [message, message]
