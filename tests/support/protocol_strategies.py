"""Test helpers for medrelay.protocol, derived from the message classes' own field declarations
(`wire(key, codec)`), so that a new message type or field is covered without touching the tests:

- hypothesis strategies for every codec, struct and message type (`message_strategy`);
- deterministic valid samples (`sample_message`), distinct per index so lists of them satisfy
  uniqueness rules such as one envelope per device;
- a walk over every bounded field of a message type (`bounded_fields`), with the path the decoder
  names in its errors (`send.env[0].c`), for the limit tests.

A codec class this module does not know raises `UnknownCodec`: the coverage test then fails, which
is the point (teach the strategies the new codec).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cbor2
from hypothesis import strategies as st

from medrelay.protocol.fields import (
    Bool,
    Bytes,
    Choice,
    Codec,
    ListOf,
    Nested,
    Struct,
    Text,
    UInt,
)
from medrelay.protocol.messages import PROTOCOL_VERSION, Message

# Round-trip strategies keep values small (fast examples); the limit tests cover the bounds.
MAX_GENERATED_BYTES = 48
MAX_GENERATED_ITEMS = 3


class UnknownCodec(TypeError):
    """A codec class the test strategies cannot build values for."""


@dataclass(frozen=True, slots=True)
class WireField:
    """One declared field of a struct: attribute name, wire key, codec, optional."""

    name: str
    key: str
    codec: Codec[Any]
    optional: bool


def wire_fields(cls: type[Struct]) -> list[WireField]:
    """The fields `cls` declares with `wire(...)`, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if "wire" in f.metadata:
            out.append(
                WireField(f.name, f.metadata["wire"], f.metadata["codec"], f.metadata["optional"])
            )
    return out


def wire_map(message: Message, version: int = PROTOCOL_VERSION) -> dict[str, object]:
    """The CBOR map a message travels as, including "t" and "v"."""
    return message.to_map({"t": message.TYPE, "v": version})


def canonical_body(value: object) -> bytes:
    """An independent deterministic encoding (cbor2's own canonical mode) of a frame map."""
    return cbor2.dumps(value, canonical=True)


# -- hypothesis strategies ---------------------------------------------------------------------


def _identifier_text(max_bytes: int) -> st.SearchStrategy[str]:
    alphabet = st.characters(exclude_categories=["Cs", "Cc"])
    return st.text(alphabet, min_size=1, max_size=min(max_bytes, 16)).filter(
        lambda s: len(s.encode("utf-8")) <= max_bytes
    )


def codec_strategy(codec: Codec[Any]) -> st.SearchStrategy[Any]:
    """Valid values for one codec (small, but spanning each bound's neighbourhood for integers)."""
    if isinstance(codec, UInt):
        return st.integers(0, codec.max_value)
    if isinstance(codec, Bool):
        return st.booleans()
    if isinstance(codec, Bytes):
        high = min(codec.max_len, codec.min_len + MAX_GENERATED_BYTES)
        return st.binary(min_size=codec.min_len, max_size=high)
    if isinstance(codec, Text):
        if codec.identifier:
            return _identifier_text(codec.max_bytes)
        text = st.text(st.characters(exclude_categories=["Cs"]), max_size=min(codec.max_bytes, 16))
        return text.filter(lambda s: len(s.encode("utf-8")) <= codec.max_bytes)
    if isinstance(codec, Choice):
        return st.sampled_from(sorted(str(v) for v in codec.allowed))
    if isinstance(codec, ListOf):
        high = min(codec.max_items, codec.min_items + MAX_GENERATED_ITEMS)
        items = st.lists(codec_strategy(codec.item), min_size=codec.min_items, max_size=high)
        return items.map(tuple)
    if isinstance(codec, Nested):
        return struct_strategy(codec.cls)
    raise UnknownCodec(f"no test strategy for codec {type(codec).__name__}")


def _construct_or_none(cls: type[Struct]) -> Callable[[dict[str, Any]], Struct | None]:
    def construct(kwargs: dict[str, Any]) -> Struct | None:
        try:
            return cls(**kwargs)
        except ValueError:  # a cross-field rule (__post_init__) the generic draw broke
            return None

    return construct


def struct_strategy(cls: type[Struct]) -> st.SearchStrategy[Any]:
    """Instances of a struct class, each field drawn from its codec's strategy; optional fields
    are absent or present. Draws that break a cross-field rule are filtered out."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in wire_fields(cls):
        strategy = codec_strategy(f.codec)
        fields[f.name] = st.none() | strategy if f.optional else strategy
    return (
        st.fixed_dictionaries(fields)
        .map(_construct_or_none(cls))
        .filter(lambda value: value is not None)
    )


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    return struct_strategy(cls)


# -- deterministic samples -------------------------------------------------------------------


def sample_value(codec: Codec[Any], index: int = 0) -> Any:
    """A valid value for `codec`, different for different `index` where the codec allows it;
    lists hold one item (or their minimum) so nested fields can be reached."""
    if isinstance(codec, UInt):
        return min(index + 1, codec.max_value)
    if isinstance(codec, Bool):
        return bool(index % 2)
    if isinstance(codec, Bytes):
        size = max(codec.min_len, min(4, codec.max_len))
        return (index.to_bytes(4, "big") * (size // 4 + 1))[:size]
    if isinstance(codec, Text):
        return f"id{index}"[: codec.max_bytes]
    if isinstance(codec, Choice):
        return sorted(str(v) for v in codec.allowed)[0]
    if isinstance(codec, ListOf):
        count = max(codec.min_items, 1)
        return tuple(sample_value(codec.item, index + i) for i in range(count))
    if isinstance(codec, Nested):
        return sample_struct(codec.cls, index)
    raise UnknownCodec(f"no sample for codec {type(codec).__name__}")


def sample_struct(cls: type[Struct], index: int = 0) -> Any:
    """A valid instance of `cls`, with its optional fields present when its rules allow it.

    Tries each combination of `Choice` values, optional fields present before absent, and keeps
    the first that the class's cross-field rules accept.
    """
    fields = wire_fields(cls)
    choices = [
        sorted(str(v) for v in f.codec.allowed) if isinstance(f.codec, Choice) else [None]
        for f in fields
    ]
    optional = [f.name for f in fields if f.optional]
    # Most optional fields present first; every subset when there are few (a rule such as
    # "a notice item has no ciphertext" forbids some together), else all or none.
    if len(optional) <= 6:
        subsets = [
            set(c)
            for size in range(len(optional), -1, -1)
            for c in itertools.combinations(optional, size)
        ]
    else:
        subsets = [set(optional), set()]
    for present in subsets:
        for picked in itertools.product(*choices):
            kwargs: dict[str, Any] = {}
            for f, choice in zip(fields, picked, strict=True):
                if f.optional and f.name not in present:
                    continue
                kwargs[f.name] = choice if choice is not None else sample_value(f.codec, index)
            try:
                return cls(**kwargs)
            except ValueError:
                continue
    raise AssertionError(f"no valid sample of {cls.__name__}")


def sample_message(cls: type[Message], index: int = 0) -> Message:
    message = sample_struct(cls, index)
    assert isinstance(message, Message)
    return message


# -- the bounded fields of a message type ----------------------------------------------------

PathStep = str | int


@dataclass(frozen=True, slots=True)
class FieldSite:
    """A field inside a frame map: its location (keys and list indexes), the name the decoder
    gives it in errors, its codec and whether it may be omitted."""

    location: tuple[PathStep, ...]
    name: str
    codec: Codec[Any]
    optional: bool


def field_sites(cls: type[Struct], prefix: tuple[PathStep, ...], name: str) -> Iterator[FieldSite]:
    """Every field of `cls`, recursing into nested structs (first list item only)."""
    for f in wire_fields(cls):
        location = (*prefix, f.key)
        field_name = f"{name}.{f.key}"
        yield FieldSite(location, field_name, f.codec, f.optional)
        codec = f.codec
        if isinstance(codec, ListOf) and isinstance(codec.item, Nested):
            yield from field_sites(codec.item.cls, (*location, 0), f"{field_name}[0]")
        elif isinstance(codec, Nested):
            yield from field_sites(codec.cls, location, field_name)


def message_sites(cls: type[Message]) -> list[FieldSite]:
    return list(field_sites(cls, (), cls.TYPE))


def edited(frame_map: dict[str, Any], location: tuple[PathStep, ...], value: Any) -> Any:
    """A deep copy of `frame_map` with the value at `location` replaced (or deleted when `value`
    is `DELETE`)."""
    copy = _deep_copy(frame_map)
    parent: Any = copy
    for step in location[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[location[-1]]
    else:
        parent[location[-1]] = value
    return copy


DELETE: Any = object()


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deep_copy(v) for v in value]
    return value


def read(frame_map: Any, location: tuple[PathStep, ...]) -> Any:
    value = frame_map
    for step in location:
        value = value[step]
    return value
