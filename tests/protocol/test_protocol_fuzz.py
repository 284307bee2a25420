"""FrameDecoder under random and mutated input: whatever the bytes, the only exceptions are
ProtocolErrors (fatal or not), a fatal one poisons the decoder, and after a non-fatal one the
decoder goes on with the next frame. Hypothesis drives arbitrary bytes and mutations of valid
frames of every type; then a few seconds of bench/fuzz_protocol.py's mutation engine (which also
checks that nothing non-canonical is ever accepted) run inside the suite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_strategies import message_strategy

from medrelay.protocol.errors import ErrorCode, ProtocolError
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.messages import MESSAGE_TYPES, Ack, Direction, Message, PrekeysLow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_protocol.py"
TYPES = sorted(MESSAGE_TYPES)
# A valid frame of each direction, sent after the fuzzed input to see that decoding goes on.
MARKERS: dict[Direction, Message] = {
    Direction.CLIENT_TO_SERVER: Ack(seqs=(424242,)),
    Direction.SERVER_TO_CLIENT: PrekeysLow(remaining=4242, wanted=42),
}


def _feed_all(decoder: FrameDecoder, data: bytes) -> tuple[list[Message], list[ProtocolError]]:
    """Feed `data` and drain the decoder, collecting messages and protocol errors; any other
    exception propagates and fails the test."""
    messages: list[Message] = []
    errors: list[ProtocolError] = []
    try:
        decoder.receive_data(data)
    except ProtocolError as exc:
        assert exc.fatal, "receive_data only raises fatal errors"
        errors.append(exc)
        with pytest.raises(ProtocolError):
            decoder.next_message()  # poisoned
        return messages, errors
    while True:
        try:
            message = decoder.next_message()
        except ProtocolError as exc:
            assert not exc.fatal, "next_message only raises non-fatal errors"
            errors.append(exc)
            continue
        if message is None:
            return messages, errors
        messages.append(message)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), to_server=st.booleans())
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes, to_server: bool) -> None:
    direction = Direction.CLIENT_TO_SERVER if to_server else Direction.SERVER_TO_CLIENT
    _feed_all(FrameDecoder(direction), data)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_any_well_delimited_body_is_refused_without_losing_the_next_frame(body: bytes) -> None:
    """A random body behind a correct length prefix costs only its own frame."""
    marker = MARKERS[Direction.CLIENT_TO_SERVER]
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
    framed = len(body).to_bytes(4, "big") + body
    messages, errors = _feed_all(decoder, framed + encode_frame(marker))
    assert messages[-1] == marker
    assert all(not e.fatal for e in errors)


def _mutations(frame: bytes) -> st.SearchStrategy[bytes]:
    """Flips, insertions, deletions and truncations of one frame's bytes."""
    size = len(frame)
    flip = st.tuples(st.integers(0, size - 1), st.integers(1, 255)).map(
        lambda p: frame[: p[0]] + bytes([frame[p[0]] ^ p[1]]) + frame[p[0] + 1 :]
    )
    insert = st.tuples(st.integers(0, size), st.binary(min_size=1, max_size=8)).map(
        lambda p: frame[: p[0]] + p[1] + frame[p[0] :]
    )
    delete = st.tuples(st.integers(0, size - 1), st.integers(1, 8)).map(
        lambda p: frame[: p[0]] + frame[p[0] + p[1] :]
    )
    truncate = st.integers(0, size - 1).map(lambda n: frame[:n])
    return st.one_of(flip, insert, delete, truncate)


@st.composite
def _mutated_frames(draw: st.DrawFn) -> tuple[Direction, bytes, bool]:
    """A valid frame of any type, mutated up to three times; `fixed` says whether the length
    prefix was then corrected so the mutated body reaches the CBOR and field layers."""
    cls = MESSAGE_TYPES[draw(st.sampled_from(TYPES))]
    frame = encode_frame(draw(message_strategy(cls)))
    for _ in range(draw(st.integers(1, 3))):
        if frame:
            frame = draw(_mutations(frame))
    fixed = draw(st.booleans()) and len(frame) >= 4
    if fixed:
        frame = (len(frame) - 4).to_bytes(4, "big") + frame[4:]
    return cls.DIRECTION, frame, fixed


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=_mutated_frames())
def test_mutated_frames_raise_only_protocol_errors_and_decoding_continues(
    case: tuple[Direction, bytes, bool],
) -> None:
    """Whatever the mutation, only ProtocolErrors; when the mutated frame is still delimited
    (prefix corrected), a valid frame after it is decoded."""
    direction, frame, fixed = case
    marker = MARKERS[direction]
    messages, errors = _feed_all(FrameDecoder(direction), frame + encode_frame(marker))
    if fixed and not any(e.fatal for e in errors):
        assert messages[-1] == marker


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=120), cuts=st.lists(st.integers(1, 20), max_size=30))
def test_random_bytes_in_random_chunks_raise_only_protocol_errors(
    data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(Direction.CLIENT_TO_SERVER, max_frame_size=64)
    position = 0
    for cut in [*cuts, len(data)]:
        _, errors = _feed_all(decoder, data[position : position + cut])
        position += cut
        if any(e.fatal for e in errors):
            return


# -- the long-running engine, briefly ---------------------------------------------------------


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_protocol", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_the_mutation_engine_finds_no_escape_in_a_few_seconds() -> None:
    """About three seconds (bounded in iterations too) of bench/fuzz_protocol.py: no exception
    other than ProtocolError, nothing non-canonical accepted; and the run is not vacuous: every
    type is accepted somewhere and every framing/decoding refusal code occurs."""
    fuzz = _load_bench()
    report = fuzz.run(seed=20251123, seconds=3.0, iterations=40_000)
    assert not report.failures, report.failures[0].case.reproducer() + report.failures[0].error
    assert report.executions >= 1_000
    accepted = {label.split(":")[1] for label in report.outcomes if label.startswith("accepted:")}
    assert accepted == set(MESSAGE_TYPES)
    codes = {label.split(":")[1] for label in report.outcomes if ":" in label}
    assert {
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.MALFORMED_FRAME,
        ErrorCode.NON_CANONICAL,
        ErrorCode.INVALID_FIELD,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.UNSUPPORTED_VERSION,
    } <= codes


def test_the_engine_reports_an_escaping_exception_with_a_reproducer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fuzzer itself can fail: an exception other than ProtocolError is recorded with the
    input that caused it (so a clean run above means something)."""
    fuzz = _load_bench()

    def broken_next_message(self: FrameDecoder) -> Message | None:
        raise KeyError("boom")

    monkeypatch.setattr(FrameDecoder, "next_message", broken_next_message)
    report = fuzz.run(seed=1, iterations=50)
    assert report.failures
    assert "KeyError" in report.failures[0].error
    assert "stream=" in report.failures[0].case.reproducer()
    assert fuzz.main(["--iterations", "20", "--seed", "3"]) == 1
