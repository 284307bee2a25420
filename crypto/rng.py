"""The random source, passed as an argument to everything that needs randomness.

Domain code never calls `os.urandom` or `nacl.utils.random` itself: it receives an `Rng`. Only a
composition root (the server's or client's entry point) hands out `system_rng`; tests hand out
`seeded_rng` so known-answer tests are reproducible without monkeypatching.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

import nacl.utils

Rng = Callable[[int], bytes]
"""A function returning `n` uniformly random bytes."""

_SEEDED_BLOCK_SIZE: Final = 64


def system_rng(n: int) -> bytes:
    """The operating system's CSPRNG (through libsodium's randombytes)."""
    _check_count(n)
    return nacl.utils.random(n)


def seeded_rng(seed: bytes) -> Rng:
    """A deterministic byte stream for tests, vectors and benchmarks. Never for real keys.

    The stream is SHAKE-256(seed ‖ u64be(i)) truncated to 64 bytes, for i = 0, 1, 2, ...,
    concatenated; calls consume it in order, so the bytes do not depend on how requests are split.
    Reproducible across runs and platforms (tests pin the first block). Other tests' vectors
    depend on this exact stream: do not change it.
    """
    seed = bytes(seed)
    counter = 0
    buffer = b""

    def rng(n: int) -> bytes:
        nonlocal counter, buffer
        _check_count(n)
        if len(buffer) < n:
            # Joined once per call: appending block by block would be quadratic for large n.
            missing_blocks = -(-(n - len(buffer)) // _SEEDED_BLOCK_SIZE)
            blocks = [buffer]
            for index in range(counter, counter + missing_blocks):
                blocks.append(
                    hashlib.shake_256(seed + index.to_bytes(8, "big")).digest(_SEEDED_BLOCK_SIZE)
                )
            counter += missing_blocks
            buffer = b"".join(blocks)
        out, buffer = buffer[:n], buffer[n:]
        return out

    return rng


def _check_count(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError("the number of random bytes must be a non-negative integer")
