"""Group commit: the sends and acknowledgements of one reactor turn go to storage in one
transaction.

A write submitted while no batch is pending schedules a flush for the next reactor turn
(`callLater(0)`); everything submitted before that turn ends joins the same batch. While a batch
is being committed (and fsynced), new writes gather for the next one, so batches grow exactly when
the disk is the bottleneck and stay small, with low latency, when it is not. A sender's `sent`
answer waits for its batch's commit: nothing is acknowledged that is not durable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from medrelay.server.metrics import RelayMetrics
from medrelay.server.relay.errors import server_busy
from medrelay.server.relay.store import (
    QueuedItem,
    RelayStore,
    SendOutcome,
    SendRequest,
    WriteBatch,
    WriteLimits,
    WriteResult,
)

MAX_SENDS_PER_BATCH: Final = 2000

_log = Logger()


class WriteBatcher:
    """Collects writes and applies them in batches, one batch in flight at a time.

    One batch at a time also keeps queue sequence numbers in the order their commits are
    announced, which lets delivery push freshly stored items without re-reading them.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: RelayStore,
        limits: WriteLimits,
        metrics: RelayMetrics | None = None,
        *,
        on_notices: Callable[[Sequence[QueuedItem]], None] | None = None,
        on_result: Callable[[WriteResult], None] | None = None,
    ) -> None:
        self._clock = clock
        self._store = store
        self._limits = limits
        self._metrics = metrics
        self._on_notices = on_notices
        self._on_result = on_result
        self._expire_up_to = 0
        self._release = False
        self._sends: list[tuple[SendRequest, Deferred[SendOutcome]]] = []
        self._acks: list[tuple[int, tuple[int, ...]]] = []
        self._scheduled: IDelayedCall | None = None
        self._in_flight = False
        self._idle_waiters: list[Deferred[None]] = []

    def send(self, request: SendRequest) -> Deferred[SendOutcome]:
        """Queue a send; fires with its outcome once the batch holding it has committed."""
        result: Deferred[SendOutcome] = Deferred()
        self._sends.append((request, result))
        self._schedule()
        return result

    def ack(self, device_pk: int, seqs: tuple[int, ...]) -> None:
        """Queue the deletion of acknowledged items. Losing it (database down) only means the
        items are delivered again later, which clients deduplicate."""
        self._acks.append((device_pk, seqs))
        self._schedule()

    def expire(self, up_to: int) -> None:
        """Have the next batch also delete up to `up_to` expired items (and queue notices)."""
        self._expire_up_to = max(self._expire_up_to, up_to)
        self._schedule()

    def release(self) -> None:
        """Have the next batch move held messages whose clinician's hours are open now into
        their queues (releases ride in the group commit for the same reason expiry does)."""
        self._release = True
        self._schedule()

    @property
    def pending(self) -> int:
        return (
            len(self._sends)
            + len(self._acks)
            + (1 if self._expire_up_to else 0)
            + (1 if self._release else 0)
        )

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is pending or in flight (for an orderly shutdown)."""
        done: Deferred[None] = Deferred()
        if not self._in_flight and not self.pending:
            done.callback(None)
        else:
            self._idle_waiters.append(done)
        return done

    def _schedule(self) -> None:
        if self._scheduled is None and not self._in_flight:
            self._scheduled = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        if not self.pending:
            self._notify_idle()
            return
        sends, self._sends = (
            self._sends[:MAX_SENDS_PER_BATCH],
            self._sends[MAX_SENDS_PER_BATCH:],
        )
        acks, self._acks = self._acks, []
        expire_up_to, self._expire_up_to = self._expire_up_to, 0
        release, self._release = self._release, False
        batch = WriteBatch(
            sends=tuple(r for r, _ in sends),
            acks=tuple(acks),
            release=release,
            expire_up_to=expire_up_to,
        )
        self._in_flight = True
        now_ms = int(self._clock.seconds() * 1000)
        d = self._store.apply_writes(batch, now_ms, self._limits)

        def committed(result: WriteResult) -> None:
            if self._metrics is not None and result.expired:
                self._metrics.expired.inc(result.expired)
            if result.notices and self._on_notices is not None:
                self._on_notices(result.notices)
            if result.released and self._on_notices is not None:
                self._on_notices(result.released)
            if self._on_result is not None:
                self._on_result(result)
            for (_, waiter), outcome in zip(sends, result.sends, strict=True):
                waiter.callback(outcome)

        def failed(failure: Failure) -> None:
            # The whole transaction rolled back: no send of this batch is stored, and every
            # sender is told so (they retry with the same message id).
            _log.failure("group commit of {sends} sends failed", failure, sends=len(sends))
            for _, waiter in sends:
                waiter.callback(server_busy())

        def finished(_: object) -> None:
            self._in_flight = False
            if self._metrics is not None:
                self._metrics.group_commit_batch.observe(len(sends) + len(acks))
            if self.pending:
                self._schedule()
            else:
                self._notify_idle()

        d.addCallbacks(committed, failed)
        d.addBoth(finished)

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)
