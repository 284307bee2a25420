"""The ceiling for bench/relay_bench.py: a minimal Twisted relay with no storage and no protocol
beyond length-prefixed frames.

Each client first sends its 4-byte id. After that a frame is `u32 destination id ‖ payload`: the
relay forwards the payload (prefixed) to the destination and answers the sender with an 8-byte
acknowledgement, the same message pattern as medrelay's send / sent / deliver, minus everything
that makes it a real relay (authentication, validation, durability, acknowledgements of delivery).

    python bench/minimal_relay.py PORT
"""

from __future__ import annotations

import struct
import sys
from typing import Final

from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import Int32StringReceiver

_ID: Final = struct.Struct(">I")
_ACK: Final = b"\x00" * 8


class RelayProtocol(Int32StringReceiver):
    MAX_LENGTH = 1 << 20

    def __init__(self, table: dict[int, RelayProtocol]) -> None:
        self.table = table
        self.client_id: int | None = None

    def stringReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.client_id is None:
            (self.client_id,) = _ID.unpack(data[:4])
            self.table[self.client_id] = self
            return
        (destination,) = _ID.unpack_from(data)
        target = self.table.get(destination)
        if target is not None:
            target.sendString(data[4:])  # type: ignore[no-untyped-call]
        self.sendString(_ACK)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802 (Twisted API)
        if self.client_id is not None and self.table.get(self.client_id) is self:
            del self.table[self.client_id]


class RelayFactory(ServerFactory):
    def __init__(self) -> None:
        self.table: dict[int, RelayProtocol] = {}

    def buildProtocol(self, addr: object) -> RelayProtocol:  # noqa: N802 (Twisted API)
        return RelayProtocol(self.table)


def main() -> None:
    from twisted.internet import reactor

    port = int(sys.argv[1])
    reactor.listenTCP(port, RelayFactory(), interface="127.0.0.1", backlog=4096)
    reactor.run()


if __name__ == "__main__":
    main()
