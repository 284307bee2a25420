"""Delivery to one connected device: a bounded window of unacknowledged items, fed from the
database when the device has a backlog and directly from fresh commits when it is caught up.

Rules of this file:
- Items reach the device in seq order. Fresh items are pushed directly only while the pump is
  caught up (no backlog, no fetch in flight) and they fit the window; otherwise the pump marks a
  backlog and reads them back from the queue in order. Every queue insert commits through the one
  group-commit writer, so commits are announced in seq order.
- At most `window_items` items and `window_bytes` bytes are in flight (sent, not acknowledged),
  and nothing is written while the transport says it is full. A slow or stalled reader therefore
  costs a bounded amount of memory; everything else waits in the database.
- Acknowledgements open the window at once; deleting the rows is the group commit's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from medrelay.protocol.messages import ItemKind
from medrelay.server.metrics import RelayMetrics
from medrelay.server.relay.store import QueuedItem, RelayStore

DEFAULT_WINDOW_ITEMS: Final = 256
DEFAULT_WINDOW_BYTES: Final = 1024 * 1024

_log = Logger()


class DeliverySink(Protocol):
    """What a pump needs from its connection."""

    def deliver(self, items: Sequence[QueuedItem]) -> None:
        """Write the items to the device (one or more `deliver` frames)."""

    @property
    def writable(self) -> bool:
        """False while the transport's send buffer is full."""


class DeliveryPump:
    def __init__(
        self,
        device_pk: int,
        store: RelayStore,
        sink: DeliverySink,
        clock: IReactorTime,
        *,
        window_items: int = DEFAULT_WINDOW_ITEMS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self._device_pk = device_pk
        self._store = store
        self._sink = sink
        self._clock = clock
        self._window_items = window_items
        self._window_bytes = window_bytes
        self._metrics = metrics
        self._in_flight: dict[int, QueuedItem] = {}
        self._in_flight_bytes = 0
        self._last_sent_seq = 0
        self._backlog = False
        self._fetching = False
        self._stopped = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight_bytes

    def start(self) -> None:
        """Begin delivering whatever is queued for the device."""
        self._backlog = True
        self._pump()

    def stop(self) -> None:
        """The connection is gone; unacknowledged items stay queued for the next one."""
        self._stopped = True
        self._in_flight.clear()
        self._in_flight_bytes = 0

    def offer(self, items: Iterable[QueuedItem]) -> None:
        """Items just committed for this device, in seq order."""
        if self._stopped:
            return
        fresh = [i for i in items if i.seq > self._last_sent_seq]
        if not fresh:
            return
        if not self._backlog and not self._fetching and self._sink.writable and self._fits(fresh):
            self._send(fresh)
        else:
            self._backlog = True
            self._pump()

    def acknowledged(self, seqs: Iterable[int]) -> int:
        """The device stored these items; returns how many were envelopes in flight here."""
        delivered = 0
        for seq in seqs:
            item = self._in_flight.pop(seq, None)
            if item is not None:
                self._in_flight_bytes -= item.size
                if item.kind is ItemKind.MESSAGE:
                    delivered += 1
        self._pump()
        return delivered

    def resume(self) -> None:
        """The transport can take more bytes again."""
        self._pump()

    def _fits(self, items: Sequence[QueuedItem]) -> bool:
        return len(self._in_flight) + len(items) <= self._window_items and (
            self._in_flight_bytes + sum(i.size for i in items) <= self._window_bytes
            or not self._in_flight  # an item bigger than the window still goes alone
        )

    def _send(self, items: Sequence[QueuedItem]) -> None:
        now = self._clock.seconds()
        for item in items:
            self._in_flight[item.seq] = item
            self._in_flight_bytes += item.size
            if self._metrics is not None and item.kind is ItemKind.MESSAGE:
                self._metrics.send_to_deliver.observe(max(0.0, now - item.time_ms / 1000))
        self._last_sent_seq = items[-1].seq
        self._sink.deliver(items)

    def _pump(self) -> None:
        if self._stopped or not self._backlog or self._fetching or not self._sink.writable:
            return
        room_items = self._window_items - len(self._in_flight)
        room_bytes = self._window_bytes - self._in_flight_bytes
        if room_items <= 0 or (room_bytes <= 0 and self._in_flight):
            return
        self._fetching = True
        # A fresh commit announced while this read runs may or may not be in its snapshot, so
        # clear the backlog flag now: an offer during the fetch sets it again.
        self._backlog = False
        after = self._last_sent_seq
        d = self._store.fetch_queue(
            self._device_pk,
            after_seq=after,
            limit=room_items,
            max_bytes=max(room_bytes, 1),
        )
        d.addCallbacks(self._fetched, self._fetch_failed, callbackArgs=(room_items, room_bytes))

    def _fetched(self, items: list[QueuedItem], limit: int, max_bytes: int) -> None:
        self._fetching = False
        if self._stopped:
            return
        items = [i for i in items if i.seq > self._last_sent_seq]
        if items:
            self._send(items)
        if len(items) >= limit or sum(i.size for i in items) >= max_bytes:
            self._backlog = True  # there may be more than one window's worth
        self._pump()

    def _fetch_failed(self, failure: Failure) -> None:
        self._fetching = False
        self._backlog = True
        _log.failure("reading a delivery queue failed; will retry", failure)
        # Retry after a pause rather than spinning on a failing database.
        self._clock.callLater(1.0, self._pump)
