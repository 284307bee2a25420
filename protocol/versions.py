"""Version negotiation: the client's `hello` lists the versions it speaks; the server answers in
`welcome` with the highest one both speak, or refuses the connection."""

from __future__ import annotations

from collections.abc import Iterable

from medrelay.protocol.errors import ErrorCode, RemoteProtocolError
from medrelay.protocol.messages import SUPPORTED_VERSIONS


def negotiate(offered: Iterable[int], supported: Iterable[int] = SUPPORTED_VERSIONS) -> int:
    """The highest common version; a fatal UNSUPPORTED_VERSION error when there is none."""
    speaks = sorted(set(supported))  # materialised once: either argument may be an iterator
    common = set(offered).intersection(speaks)
    if not common:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"no common protocol version (server speaks {speaks})",
            fatal=True,
        )
    return max(common)
