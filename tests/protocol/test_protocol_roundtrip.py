"""medrelay.protocol.messages: every message type round-trips through its body encoding, the
encoding is the deterministic one (byte-equal to cbor2's canonical mode), every valid message
passes `check_outgoing`, and a type is accepted only in its own direction.

The strategies are derived from the field declarations (tests/support/protocol_strategies.py), so
a new message type is covered as soon as it is registered in MESSAGE_TYPES; the first tests fail
if a type or codec appears that the strategies cannot build.
"""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from protocol_strategies import (
    canonical_body,
    message_strategy,
    sample_message,
    wire_fields,
    wire_map,
)

from medrelay.protocol.errors import ErrorCode, RemoteProtocolError
from medrelay.protocol.fields import Struct
from medrelay.protocol.messages import (
    MESSAGE_TYPES,
    Direction,
    Message,
    check_outgoing,
    decode_body,
    encode_body,
)

TYPES = sorted(MESSAGE_TYPES)
OTHER = {
    Direction.CLIENT_TO_SERVER: Direction.SERVER_TO_CLIENT,
    Direction.SERVER_TO_CLIENT: Direction.CLIENT_TO_SERVER,
}


def _protocol_subclasses(cls: type[Message]) -> set[str]:
    """Names of the library's Message subclasses (by name: `slots=True` dataclasses replace the
    class object, and the replaced one may linger in __subclasses__ until collected)."""
    out: set[str] = set()
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("medrelay.protocol"):
            out |= {sub.__qualname__} | _protocol_subclasses(sub)
    return out


def test_every_message_class_is_registered_under_its_type() -> None:
    """A Message subclass missing from MESSAGE_TYPES would be undecodable and untested."""
    registered = {cls.__qualname__ for cls in MESSAGE_TYPES.values()}
    assert registered == _protocol_subclasses(Message)
    for name, cls in MESSAGE_TYPES.items():
        assert name == cls.TYPE
        assert isinstance(cls.DIRECTION, Direction)


@pytest.mark.parametrize("type_name", TYPES)
def test_the_strategies_can_build_every_message_type(type_name: str) -> None:
    """Fails when MESSAGE_TYPES gains a type (or a codec) the generic strategies cannot build,
    or whose cross-field rules the generic draws never satisfy."""
    cls = MESSAGE_TYPES[type_name]
    found = find(
        message_strategy(cls),
        lambda m: True,
        settings=settings(database=None, phases=[Phase.generate], max_examples=50),
    )
    assert type(found) is cls
    assert type(sample_message(cls)) is cls
    assert wire_fields(cls), f"{type_name} declares no wire fields"


# One test draws a message of every type per example (rather than parametrizing over types):
# pytest-twisted rewraps hypothesis' inner test once per parametrized item, which breaks
# @given under @parametrize.
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_every_message_type_round_trips_and_encodes_deterministically(data: st.DataObject) -> None:
    """For a message of every type: decode(encode(m)) == m; the body equals cbor2's canonical
    encoding of the same map and of the map a plain CBOR decoder reads back; check_outgoing
    accepts it."""
    for type_name in TYPES:
        cls = MESSAGE_TYPES[type_name]
        message = data.draw(message_strategy(cls), label=type_name)
        body = encode_body(message)
        assert decode_body(body, cls.DIRECTION) == message
        assert body == canonical_body(wire_map(message))
        assert canonical_body(cbor2.loads(body)) == body
        check_outgoing(message)


@pytest.mark.parametrize("type_name", TYPES)
def test_a_type_fed_to_the_other_direction_is_an_unknown_type(type_name: str) -> None:
    """A server never accepts server-to-client types and a client never accepts client-to-server
    types; the refusal echoes the rid when the frame has one."""
    cls = MESSAGE_TYPES[type_name]
    message = sample_message(cls)
    with pytest.raises(RemoteProtocolError) as caught:
        decode_body(encode_body(message), OTHER[cls.DIRECTION])
    assert caught.value.code is ErrorCode.UNKNOWN_TYPE
    assert not caught.value.fatal
    assert caught.value.rid == getattr(message, "rid", None)


@settings(max_examples=30, deadline=None)
@given(message=st.sampled_from(TYPES).flatmap(lambda name: message_strategy(MESSAGE_TYPES[name])))
def test_wire_maps_list_exactly_the_declared_keys_in_canonical_order(message: Message) -> None:
    """to_map emits "t", "v" and the present fields, keys in RFC 8949 §4.2.1 order, omitting
    absent optional fields rather than sending null."""
    frame_map = wire_map(message)
    keys = list(frame_map)
    assert keys == sorted(keys, key=lambda k: (len(k.encode()), k.encode()))
    declared = {f.key: f for f in wire_fields(type(message))}
    for key in keys:
        assert key in {"t", "v"} or key in declared
    for key, f in declared.items():
        present = getattr(message, f.name) is not None
        assert (key in frame_map) == present
    assert None not in frame_map.values()


def test_struct_declaring_a_wire_key_twice_is_refused() -> None:
    """A schema with two fields on one wire key would silently lose one: refused at first use."""
    from dataclasses import dataclass

    from medrelay.protocol.fields import UInt, wire

    @dataclass(frozen=True, slots=True)
    class Twice(Struct):
        a: int = wire("x", UInt())
        b: int = wire("x", UInt())

    with pytest.raises(TypeError):
        Twice.from_map({"x": 1})
