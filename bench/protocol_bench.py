"""Benchmark of the wire codec (medrelay.protocol), one core.

For each frame shape, the median time per decode (`decode_body`, full validation) and encode
(`encode_body`) over several timed batches, and the decode's ratio to a plain `cbor2.loads` of
the same body measured in the same run (the floor any validating decoder pays; on a shared,
noisy machine the ratio is steadier than the absolute figure).

    .venv/bin/python bench/protocol_bench.py [--repeats 7]

Target (protocol brief): decoding a `send` with one 512-byte envelope in about 15 µs or less.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable
from dataclasses import dataclass

import cbor2

from medrelay.protocol.messages import (
    Ack,
    Deliver,
    DeliveredItem,
    Direction,
    Message,
    OutboundEnvelope,
    Send,
    decode_body,
    encode_body,
)

NOW_MS = 1_763_884_800_000


def _item(seq: int) -> DeliveredItem:
    return DeliveredItem(
        seq=seq,
        kind="msg",
        message_id=seq.to_bytes(16, "big"),
        time_ms=NOW_MS + seq,
        user="dr.ivanova",
        device="k3v9x2",
        ciphertext=bytes(512),
    )


CASES: list[tuple[str, Message]] = [
    (
        "send, 1 envelope of 512 B",
        Send(
            rid=1, message_id=bytes(16), envelopes=(OutboundEnvelope("alice", "phone", bytes(512)),)
        ),
    ),
    ("deliver, 1 item", Deliver(items=(_item(1),))),
    ("deliver, 64 items", Deliver(items=tuple(_item(i) for i in range(64)))),
    ("ack, 100 seqs", Ack(seqs=tuple(range(10_000, 10_100)))),
]


@dataclass(frozen=True)
class Row:
    name: str
    size: int
    decode_us: float
    encode_us: float
    loads_us: float


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median over `repeats` batches, each sized to take about 50 ms."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, number // 4)
    return statistics.median(timer.repeat(repeat=repeats, number=number)) / number * 1e6


def measure(repeats: int) -> list[Row]:
    rows = []
    for name, message in CASES:
        body = encode_body(message)
        direction: Direction = type(message).DIRECTION
        assert decode_body(body, direction) == message
        rows.append(
            Row(
                name,
                len(body),
                _median_us(lambda: decode_body(body, direction), repeats),  # noqa: B023
                _median_us(lambda: encode_body(message), repeats),  # noqa: B023
                _median_us(lambda: cbor2.loads(body), repeats),  # noqa: B023
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="medrelay.protocol codec benchmark")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{'frame':28} {'bytes':>7} {'decode µs':>10} {'encode µs':>10} {'decode/loads':>13}")
    for row in measure(args.repeats):
        print(
            f"{row.name:28} {row.size:7} {row.decode_us:10.2f} {row.encode_us:10.2f} "
            f"{row.decode_us / row.loads_us:12.1f}x"
        )


if __name__ == "__main__":
    main()
