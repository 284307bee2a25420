"""Long-running fuzz target for medrelay.protocol's FrameDecoder (no pytest, no hypothesis).

Builds a corpus of valid frames of every message type (values drawn generically from the field
declarations, biased towards the bounds), then feeds the decoder mutated streams: bit flips,
interesting bytes, insertions, deletions, duplications, truncations, splices of two frames,
edited length prefixes, random bytes, several frames per stream, random chunkings and frame
limits. The decoder may refuse anything, but only with a `ProtocolError`; and whatever it
accepts must be canonical (its re-encoding is a frame of the input stream), so an accepted
message never has two encodings.

    .venv/bin/python bench/fuzz_protocol.py --seconds 600 [--iterations N] [--seed 1]

Prints executions per second and the outcome counts; exits 1 with the reproducer's hex (stream,
chunk sizes, direction and frame limit) on the first input that escapes with another exception
or breaks the canonical-acceptance oracle. `tests/protocol/test_protocol_fuzz.py` runs the same
engine for a few seconds in the suite.

atheris is not used: it does not build for this Python.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from medrelay.protocol.errors import ProtocolError
from medrelay.protocol.fields import Bool, Bytes, Choice, Codec, ListOf, Nested, Struct, Text, UInt
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.limits import MAX_FRAME_SIZE
from medrelay.protocol.messages import MESSAGE_TYPES, Direction, Message

MAX_GENERATED_BYTES = 600  # per byte-string field: frames stay small so iterations stay fast
MAX_GENERATED_ITEMS = 4
MAX_STREAM_BYTES = 64 * 1024
_TEXT_ALPHABET = ["a", "z", "0", ".", "-", "_", " ", "é", "я", "中", "😀"]
_INTERESTING_BYTES = [
    0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x20, 0x3F, 0x40, 0x5F, 0x60, 0x7F,
    0x80, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xD8, 0xF4, 0xF5, 0xF6, 0xF7, 0xF9, 0xFA, 0xFB, 0xFF,
]  # fmt: skip


class UnknownCodec(TypeError):
    """A codec the generator does not know: teach `random_value` about it."""


# -- a corpus of valid frames ------------------------------------------------------------------


def _bounded_int(rnd: random.Random, low: int, high: int) -> int:
    """An integer in low..high, often one of the bounds or next to them."""
    pick = rnd.random()
    if pick < 0.2:
        return low
    if pick < 0.4:
        return high
    if pick < 0.5:
        return min(high, low + 1)
    if pick < 0.6:
        return max(low, high - 1)
    return rnd.randint(low, high)


def random_value(codec: Codec[Any], rnd: random.Random) -> Any:
    """A valid value for `codec` (byte strings and lists capped so frames stay small)."""
    if isinstance(codec, UInt):
        return _bounded_int(rnd, 0, codec.max_value)
    if isinstance(codec, Bool):
        return rnd.random() < 0.5
    if isinstance(codec, Bytes):
        size = _bounded_int(rnd, codec.min_len, min(codec.max_len, MAX_GENERATED_BYTES))
        return rnd.randbytes(size)
    if isinstance(codec, Text):
        budget = _bounded_int(rnd, 1 if codec.identifier else 0, codec.max_bytes)
        text = ""
        while True:
            char = rnd.choice(_TEXT_ALPHABET)
            if len((text + char).encode("utf-8")) > budget:
                break
            text += char
        return text or "a"
    if isinstance(codec, Choice):
        return str(rnd.choice(sorted(codec.allowed)))
    if isinstance(codec, ListOf):
        count = _bounded_int(rnd, codec.min_items, min(codec.max_items, MAX_GENERATED_ITEMS))
        return tuple(random_value(codec.item, rnd) for _ in range(count))
    if isinstance(codec, Nested):
        return random_struct(codec.cls, rnd)
    raise UnknownCodec(f"no generator for codec {type(codec).__name__}")


def random_struct(cls: type[Struct], rnd: random.Random) -> Any:
    """A valid instance of `cls`: fields drawn independently, redrawn while a cross-field rule
    (`__post_init__`) refuses the combination."""
    fields = [f for f in getattr(cls, "__dataclass_fields__", {}).values() if "wire" in f.metadata]
    for _ in range(100):
        kwargs: dict[str, Any] = {}
        for f in fields:
            if f.metadata["optional"] and rnd.random() < 0.5:
                continue
            kwargs[f.name] = random_value(f.metadata["codec"], rnd)
        try:
            return cls(**kwargs)
        except ValueError:
            continue
    raise AssertionError(f"could not draw a valid {cls.__name__}")


@dataclass(frozen=True, slots=True)
class Seed:
    direction: Direction
    frame: bytes


def build_corpus(rnd: random.Random, per_type: int = 6) -> list[Seed]:
    """`per_type` valid frames of every registered message type."""
    corpus = []
    for name in sorted(MESSAGE_TYPES):
        cls = MESSAGE_TYPES[name]
        for _ in range(per_type):
            message = random_struct(cls, rnd)
            corpus.append(Seed(cls.DIRECTION, encode_frame(message)))
    return corpus


# -- mutations ---------------------------------------------------------------------------------


def _flip_bits(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    for _ in range(rnd.randint(1, 8)):
        if data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)


def _interesting_byte(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    if data:
        data[rnd.randrange(len(data))] = rnd.choice(_INTERESTING_BYTES)


def _insert(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    at = rnd.randint(0, len(data))
    data[at:at] = rnd.randbytes(rnd.randint(1, 16))


def _delete(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    if data:
        at = rnd.randrange(len(data))
        del data[at : at + rnd.randint(1, 16)]


def _duplicate(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    if data:
        at = rnd.randrange(len(data))
        chunk = data[at : at + rnd.randint(1, 32)]
        to = rnd.randint(0, len(data))
        data[to:to] = chunk


def _truncate(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    del data[rnd.randint(0, len(data)) :]


def _splice(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    other = rnd.choice(corpus).frame
    data[rnd.randint(0, len(data)) :] = other[rnd.randint(0, len(other)) :]


def _edit_length_prefix(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    """Make the prefix disagree with the body: off by a little, zero, the limit, beyond it."""
    if len(data) < 4:
        return
    body = len(data) - 4
    length = rnd.choice(
        [
            max(0, body + rnd.randint(-8, 8)),
            0,
            MAX_FRAME_SIZE,
            MAX_FRAME_SIZE + 1,
            2**32 - 1,
            rnd.randrange(2**32),
        ]
    )
    data[:4] = length.to_bytes(4, "big")


def _fix_length_prefix(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    """After other mutations, make the prefix agree with the body again, so the mutated body
    reaches the CBOR and field layers instead of stalling the framer."""
    if len(data) >= 4:
        data[:4] = (len(data) - 4).to_bytes(4, "big")


def _random_bytes(data: bytearray, rnd: random.Random, corpus: list[Seed]) -> None:
    data[4:] = rnd.randbytes(rnd.randint(0, 64))


# Values a tree mutation puts in place of a field: every CBOR type, each bound's neighbourhood.
_REPLACEMENTS: list[object] = [
    0, 1, 23, 24, 255, 256, 2**32 - 1, 2**32, 2**64 - 1, 2**64, -1, -(2**64),
    True, False, None, cbor2.undefined, cbor2.CBORSimpleValue(99), 1.5, float("nan"),
    "", "a", "a\x00", "é" * 40, "x" * 70, "msg", "expired",
    b"", b"\x00", bytes(16), bytes(32), bytes(64), bytes(65), bytes(513), bytes(4097),
    [], [1], [[[[[[1]]]]]], [0] * 1025, {}, {"zz": 1}, {"u": "a", "d": "b"},
    cbor2.CBORTag(1, 0), cbor2.CBORTag(28, 1), cbor2.CBORTag(9999, b""),
]  # fmt: skip


def _replacement(rnd: random.Random) -> object:
    return _fresh(rnd.choice(_REPLACEMENTS))


def _fresh(value: object) -> object:
    """A copy of a palette value, so later mutations never change the palette itself."""
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return value


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every value inside a decoded frame map (keys of maps, indexes of arrays)."""
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(_nodes(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.extend(_nodes(item, (*path, index)))
    return out


def _tree_mutation(frame: bytes, rnd: random.Random) -> bytes:
    """Decode a valid frame's body, change its structure (replace a value, drop or add a key,
    repeat an array item, reorder a map) and re-encode it, canonically or not: this reaches the
    field validation that byte mutations rarely get past the CBOR layer to."""
    tree = cbor2.loads(frame[4:])
    for _ in range(rnd.randint(1, 3)):
        path = rnd.choice(_nodes(tree)[1:] or [()])
        if not path:
            continue
        parent = tree
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        action = rnd.random()
        if action < 0.6:
            parent[last] = _replacement(rnd)
        elif action < 0.75 and isinstance(parent, dict):
            del parent[last]
        elif action < 0.85 and isinstance(parent, dict):
            parent["zz" if rnd.random() < 0.5 else "c"] = _replacement(rnd)
        elif isinstance(parent, list):
            parent.insert(last, parent[last])
        elif isinstance(parent, dict):
            items = list(parent.items())
            rnd.shuffle(items)
            parent.clear()
            parent.update(items)
    try:
        body = cbor2.dumps(tree, canonical=rnd.random() < 0.7)
    except (ValueError, TypeError, cbor2.CBOREncodeError):
        return frame
    return len(body).to_bytes(4, "big") + body


Mutator = Callable[[bytearray, random.Random, list[Seed]], None]
MUTATORS: list[Mutator] = [
    _flip_bits,
    _interesting_byte,
    _insert,
    _delete,
    _duplicate,
    _truncate,
    _splice,
    _edit_length_prefix,
    _random_bytes,
]


def mutate(frame: bytes, rnd: random.Random, corpus: list[Seed]) -> bytes:
    """A structural mutation, byte mutations, or both; the length prefix usually repaired."""
    if rnd.random() < 0.5:
        frame = _tree_mutation(frame, rnd)
        if rnd.random() < 0.7:
            return frame[:MAX_STREAM_BYTES]
    data = bytearray(frame)
    for _ in range(rnd.randint(1, 4)):
        rnd.choice(MUTATORS)(data, rnd, corpus)
    if rnd.random() < 0.85:
        _fix_length_prefix(data, rnd, corpus)
    return bytes(data[:MAX_STREAM_BYTES])


# -- execution ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One input: the stream, how it is cut into receive_data calls, and the decoder setup."""

    direction: Direction
    stream: bytes
    chunks: tuple[int, ...]
    max_frame_size: int

    def reproducer(self) -> str:
        return (
            f"direction={self.direction.value} max_frame_size={self.max_frame_size} "
            f"chunks={list(self.chunks)} stream={self.stream.hex()}"
        )


@dataclass(frozen=True, slots=True)
class Failure:
    case: Case
    error: str


@dataclass
class FuzzReport:
    executions: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0


def make_case(rnd: random.Random, corpus: list[Seed]) -> Case:
    seed = rnd.choice(corpus)
    same_direction = [s for s in corpus if s.direction is seed.direction]
    frames = []
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        frame = rnd.choice(same_direction).frame
        frames.append(mutate(frame, rnd, corpus) if rnd.random() < 0.9 else frame)
    stream = b"".join(frames)[:MAX_STREAM_BYTES]
    chunks: list[int] = []
    if rnd.random() < 0.3:
        remaining = len(stream)
        while remaining > 0:
            size = rnd.randint(1, max(1, remaining))
            chunks.append(size)
            remaining -= size
    limits = (MAX_FRAME_SIZE,) * 12 + (16 * 1024,) * 7 + (len(stream) // 2 + 1,)
    max_frame_size = rnd.choice(limits)
    return Case(seed.direction, stream, tuple(chunks), max_frame_size)


def execute(case: Case) -> str:
    """Feed `case` to a fresh decoder; returns an outcome label, raises on a violation."""
    decoder = FrameDecoder(case.direction, max_frame_size=case.max_frame_size)
    pieces: list[bytes] = []
    position = 0
    for size in case.chunks or (len(case.stream),):
        pieces.append(case.stream[position : position + size])
        position += size
    outcome = "incomplete"
    for piece in pieces:
        try:
            decoder.receive_data(piece)
        except ProtocolError as exc:
            if not exc.fatal:
                raise AssertionError("receive_data raised a non-fatal error") from exc
            try:
                decoder.receive_data(b"")
            except ProtocolError:
                return f"fatal:{exc.code.value}"
            raise AssertionError("the decoder is not poisoned after a fatal error") from exc
        while True:
            try:
                message = decoder.next_message()
            except ProtocolError as exc:
                if exc.fatal:
                    raise AssertionError("next_message raised a fatal error") from exc
                outcome = f"refused:{exc.code.value}"
                continue
            if message is None:
                break
            _check_canonical(message, case)
            outcome = f"accepted:{message.TYPE}"
    return outcome


def _check_canonical(message: Message, case: Case) -> None:
    """An accepted frame is the only encoding of its message: re-encoding gives its bytes."""
    if encode_frame(message) not in case.stream:
        raise AssertionError(f"accepted a non-canonical frame for {message!r}")


def run(
    seed: int,
    *,
    seconds: float | None = None,
    iterations: int | None = None,
    stop_at_first_failure: bool = True,
) -> FuzzReport:
    """Fuzz until `seconds` or `iterations` is reached (whichever comes first)."""
    if seconds is None and iterations is None:
        raise ValueError("give seconds, iterations or both")
    rnd = random.Random(seed)
    corpus = build_corpus(rnd)
    report = FuzzReport()
    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else float("inf")
    while iterations is None or report.executions < iterations:
        if report.executions % 64 == 0 and time.perf_counter() >= deadline:
            break
        case = make_case(rnd, corpus)
        report.executions += 1
        try:
            report.outcomes[execute(case)] += 1
        except Exception:  # the point of the fuzzer: anything else is a finding
            report.failures.append(Failure(case, traceback.format_exc()))
            if stop_at_first_failure:
                break
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=None, help="time budget (default 10)")
    parser.add_argument("--iterations", type=int, default=None, help="execution budget")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keep-going", action="store_true", help="collect failures instead of stopping"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None or args.iterations else 10.0
    report = run(
        args.seed,
        seconds=seconds,
        iterations=args.iterations,
        stop_at_first_failure=not args.keep_going,
    )
    print(
        f"{report.executions} executions in {report.seconds:.1f} s "
        f"({report.per_second:,.0f}/s), seed {args.seed}"
    )
    for outcome, count in sorted(report.outcomes.items()):
        print(f"  {outcome:32} {count}")
    for failure in report.failures[:5]:
        print(f"\nFAILURE {failure.case.reproducer()}\n{failure.error}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
