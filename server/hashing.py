"""Argon2id off the reactor thread, at most a few at once: `PasswordWorker`.

Every Argon2id computation of the server (verifying an enrollment code; later, passwords) goes
through one worker: a small dedicated thread pool behind a `DeferredSemaphore`, so at most
`concurrency` (2) hashes run at any moment - each one holds its memory cost (64 MiB by default)
for a few hundred milliseconds, and an unbounded burst would exhaust memory or starve the
database threads. Requests beyond the semaphore wait in order; beyond `max_waiting` of them the
worker refuses at once with `rate_limited` instead of queueing without bound.

The runner is injected (`medrelay.server.storage.database.Runner`): a `ThreadPoolRunner` in
production, a controllable fake in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, fail

from medrelay.crypto.passwords import PasswordHasher
from medrelay.crypto.rng import Rng
from medrelay.protocol.errors import ErrorCode
from medrelay.server.relay.errors import RelayError
from medrelay.server.storage.database import Runner

DEFAULT_CONCURRENCY: Final = 2
DEFAULT_MAX_WAITING: Final = 64


def busy() -> RelayError:
    return RelayError(
        ErrorCode.RATE_LIMITED, "too many requests are being checked right now; try again shortly"
    )


_T = TypeVar("_T")


class PasswordWorker(Service):
    """Argon2id hashing and verification with bounded concurrency, off the reactor thread."""

    def __init__(
        self,
        runner: Runner,
        hasher: PasswordHasher,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_waiting: int = DEFAULT_MAX_WAITING,
    ) -> None:
        self._runner = runner
        self._hasher = hasher
        self._semaphore = DeferredSemaphore(concurrency)
        self._max_waiting = max_waiting

    @property
    def hasher(self) -> PasswordHasher:
        return self._hasher

    @property
    def running_now(self) -> int:
        """Computations holding the semaphore (for tests and metrics)."""
        return self._semaphore.limit - self._semaphore.tokens

    @property
    def waiting(self) -> int:
        return len(self._semaphore.waiting)

    def verify(self, stored_hash: str, secret: str) -> Deferred[bool]:
        """Whether `secret` matches `stored_hash` (a malformed stored hash fails the Deferred
        with `MalformedPasswordHash`)."""
        hasher = self._hasher
        return self._run(lambda: hasher.verify(stored_hash, secret))

    def hash(self, secret: str, rng: Rng) -> Deferred[str]:
        """The PHC string of `secret`. The salt is drawn here, on the calling thread: the rng
        is not shared with the pool's threads."""
        salt = rng(self._hasher.params.salt_len)
        hasher = self._hasher
        return self._run(lambda: hasher.hash(secret, lambda n: salt[:n]))

    def _run(self, work: Callable[[], _T]) -> Deferred[_T]:
        if self._semaphore.tokens == 0 and len(self._semaphore.waiting) >= self._max_waiting:
            return fail(busy())
        runner = self._runner
        return self._semaphore.run(lambda: runner.run(work))

    def startService(self) -> None:  # noqa: N802 (IService)
        super().startService()  # type: ignore[no-untyped-call]
        self._runner.start()

    def stopService(self) -> Deferred[object] | None:  # noqa: N802 (IService)
        super().stopService()  # type: ignore[no-untyped-call]
        self._runner.stop()
        return None
