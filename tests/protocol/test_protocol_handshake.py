"""medrelay.protocol versions, auth and outgoing checks: `negotiate` picks the highest common
version or refuses fatally; `auth_transcript` has the pinned layout of docs/protocol.md §5 and
never gives two login tuples the same bytes; `check_outgoing` turns an invalid outgoing message
into a LocalProtocolError (our bug), never another exception."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.protocol.auth import AUTH_CONTEXT, auth_transcript
from medrelay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from medrelay.protocol.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    BundleGet,
    Deliver,
    DeliveredItem,
    Error,
    Hello,
    Limits,
    OutboundEnvelope,
    Send,
    Welcome,
    check_outgoing,
)
from medrelay.protocol.versions import negotiate

# -- negotiate -------------------------------------------------------------------------------


def test_negotiate_picks_the_highest_common_version() -> None:
    assert negotiate([1]) == 1
    assert negotiate([3, 1, 2], supported=[1, 2]) == 2
    assert negotiate([1, 2, 7], supported=(7, 2)) == 7


def test_the_library_speaks_version_one() -> None:
    assert SUPPORTED_VERSIONS == (1,)
    assert negotiate(range(256)) == 1


@pytest.mark.parametrize("offered", [[], [2], [0, 2, 255]])
def test_no_common_version_is_a_fatal_unsupported_version(offered: list[int]) -> None:
    """The server answers `error unsupported_version` and closes (§3)."""
    with pytest.raises(RemoteProtocolError) as caught:
        negotiate(offered)
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert caught.value.fatal
    assert "[1]" in caught.value.message


def test_negotiate_accepts_iterators_and_names_what_it_speaks() -> None:
    """Both arguments may be one-shot iterators; the refusal still lists the supported ones."""
    assert negotiate(iter([1, 2]), supported=iter([2, 1])) == 2
    with pytest.raises(RemoteProtocolError) as caught:
        negotiate(iter([9]), supported=(v for v in (1, 2)))
    assert "[1, 2]" in caught.value.message


# -- auth_transcript -------------------------------------------------------------------------


def test_the_transcript_layout_is_pinned() -> None:
    """§5: context || u32 len || challenge || u32 len || clinic || u32 len || user || u32 len ||
    device, lengths big-endian, text UTF-8."""
    challenge = bytes(range(32))
    assert AUTH_CONTEXT == b"MEDRELAY/v1/auth\x00"
    assert auth_transcript(challenge, "clinic.example", "dr.ivanova", "k3v9x2") == (
        AUTH_CONTEXT
        + struct.pack(">I", 32)
        + challenge
        + struct.pack(">I", 14)
        + b"clinic.example"
        + struct.pack(">I", 10)
        + b"dr.ivanova"
        + struct.pack(">I", 6)
        + b"k3v9x2"
    )


def test_the_transcript_matches_a_fixed_hex_vector() -> None:
    transcript = auth_transcript(b"\xaa" * 32, "c", "ü", "d")
    assert transcript.hex() == (
        "4d454452454c41592f76312f6175746800"
        "00000020" + "aa" * 32 + "00000001" + "63" + "00000002" + "c3bc" + "00000001" + "64"
    )


def test_moving_bytes_between_fields_changes_the_transcript() -> None:
    """Length prefixes keep ("ab", "c") and ("a", "bc") apart, and the challenge from the
    clinic."""
    challenge = bytes(32)
    assert auth_transcript(challenge, "c", "ab", "c") != auth_transcript(challenge, "c", "a", "bc")
    assert auth_transcript(b"x", "yz", "u", "d") != auth_transcript(b"xy", "z", "u", "d")
    assert auth_transcript(challenge, "", "u", "d") != auth_transcript(challenge, "u", "", "d")


_parts = st.tuples(
    st.binary(max_size=40), st.text(max_size=8), st.text(max_size=8), st.text(max_size=8)
)


@settings(max_examples=300, deadline=None)
@given(first=_parts, second=_parts)
def test_distinct_tuples_give_distinct_transcripts(
    first: tuple[bytes, str, str, str], second: tuple[bytes, str, str, str]
) -> None:
    """The transcript is injective: it can be parsed back into the tuple it came from."""
    a, b = auth_transcript(*first), auth_transcript(*second)
    assert (a == b) == (first == second)
    assert _parse_transcript(a) == first


def _parse_transcript(data: bytes) -> tuple[bytes, str, str, str]:
    assert data.startswith(AUTH_CONTEXT)
    offset = len(AUTH_CONTEXT)
    fields: list[bytes] = []
    for _ in range(4):
        (length,) = struct.unpack_from(">I", data, offset)
        fields.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    assert offset == len(data)
    return fields[0], fields[1].decode(), fields[2].decode(), fields[3].decode()


# -- check_outgoing --------------------------------------------------------------------------


def _item(**changes: Any) -> DeliveredItem:
    fields: dict[str, Any] = {
        "seq": 1,
        "kind": "msg",
        "message_id": bytes(16),
        "time_ms": 0,
        "user": "u",
        "device": "d",
        "ciphertext": b"c",
    }
    fields.update(changes)
    return DeliveredItem(**fields)


VALID = [
    Hello(versions=(1,), agent="medrelay-cli/0.1"),
    BundleGet(rid=2**32 - 1, user="alice"),
    Ack(seqs=(0, 2**64 - 1)),
    Send(rid=1, message_id=bytes(16), envelopes=(OutboundEnvelope("a", "b", b"x"),)),
    Deliver(items=(_item(), _item(kind="expired", ciphertext=None))),
    Error(code="queue_full", message="the queue is full"),
]


@pytest.mark.parametrize("message", VALID, ids=lambda m: m.TYPE)
def test_valid_outgoing_messages_pass(message: Any) -> None:
    check_outgoing(message)


INVALID: dict[str, Any] = {
    "rid above u32": BundleGet(rid=2**32, user="alice"),
    "boolean rid": BundleGet(rid=True, user="alice"),
    "empty user id": BundleGet(rid=1, user=""),
    "user id with a newline": BundleGet(rid=1, user="a\nb"),
    "user id of 65 bytes": BundleGet(rid=1, user="a" * 65),
    "lone surrogate": BundleGet(rid=1, user="\ud800"),
    "bytes for text": BundleGet(rid=1, user=b"alice"),  # type: ignore[arg-type]
    "no versions": Hello(versions=(), agent=""),
    "version above 255": Hello(versions=(256,), agent=""),
    "seq above u64": Ack(seqs=(2**70,)),
    "negative seq": Ack(seqs=(1, -1)),
    "too many acks": Ack(seqs=tuple(range(1025))),
    "short message id": Send(rid=1, message_id=b"x", envelopes=(OutboundEnvelope("a", "b", b"x"),)),
    "empty ciphertext": Send(
        rid=1, message_id=bytes(16), envelopes=(OutboundEnvelope("a", "b", b""),)
    ),
    "no envelopes": Send(rid=1, message_id=bytes(16), envelopes=()),
    "unknown item kind": Deliver(items=(_item(kind="other", ciphertext=None),)),
    "error message too long": Error(code="x", message="é" * 257),
    "None in a required field": BundleGet(rid=1, user=None),  # type: ignore[arg-type]
    "None for a nested struct": Welcome(
        version=1,
        agent="",
        clinic="c",
        challenge=bytes(32),
        time_ms=0,
        limits=None,  # type: ignore[arg-type]
    ),
    "wrong nested type": Welcome(
        version=1,
        agent="",
        clinic="c",
        challenge=bytes(32),
        time_ms=0,
        limits="limits",  # type: ignore[arg-type]
    ),
    "None for a list": Ack(seqs=None),  # type: ignore[arg-type]
    "a list item of the wrong struct": Deliver(items=(Limits(1, 2, 3, 4),)),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("message", INVALID.values(), ids=INVALID.keys())
def test_invalid_outgoing_messages_are_local_protocol_errors(message: Any) -> None:
    """Our own bug, reported as LocalProtocolError with a stable code, whatever the mistake."""
    with pytest.raises(LocalProtocolError) as caught:
        check_outgoing(message)
    assert isinstance(caught.value.code, ErrorCode)
    assert not isinstance(caught.value, RemoteProtocolError)


def test_an_invalid_outgoing_field_is_named_with_its_path() -> None:
    with pytest.raises(LocalProtocolError) as caught:
        check_outgoing(
            Send(rid=1, message_id=bytes(16), envelopes=(OutboundEnvelope("a", "b", b""),))
        )
    assert caught.value.code is ErrorCode.INVALID_FIELD
    assert caught.value.message.startswith("send.env[0].c: ")
