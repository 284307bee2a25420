"""Field codecs: how each message field is validated on the way in and shaped on the way out.

A message class declares its fields with `wire(key, codec)`; `medrelay.protocol.messages` reads
those declarations once per class, so validation is written once here and never per message.
Every codec bounds what it accepts (lengths, counts, ranges) so that a decoded frame is always
small and well-typed, and names the offending field in its error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar

from medrelay.protocol.cbor import FOREIGN_TYPES, canonical_key_order
from medrelay.protocol.errors import ErrorCode, RemoteProtocolError

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

UINT32_MAX: Final = 2**32 - 1
UINT64_MAX: Final = 2**64 - 1
_ONLY_INT: Final = frozenset({int})  # `type(v) is int`: booleans are not integers here
_CONTROL_CHARACTERS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


_SHOWN_MAX: Final = 40


class FieldError(RemoteProtocolError):
    """An error about one field (INVALID_FIELD unless said otherwise) whose path is assembled on
    the way out: containers prefix their key or index as the exception passes through them, so
    the success path builds no strings at all. The message reads `send.env[0].c: problem`."""

    def __init__(self, problem: str, code: ErrorCode = ErrorCode.INVALID_FIELD) -> None:
        super().__init__(code, problem)
        self.problem = problem
        self.path = ""

    def within(self, step: str) -> FieldError:
        self.path = step + self.path
        self.message = f"{self.path.lstrip('.')}: {self.problem}"
        self.args = (self.message,)
        return self


def invalid(problem: str) -> FieldError:
    return FieldError(problem)


def wrong_type(value: object, expected: str) -> FieldError:
    """The error for a value of the wrong CBOR type: INVALID_FIELD, or MALFORMED_FRAME for a type
    no frame ever carries (a float, `undefined`, a simple value; docs/protocol.md §9)."""
    if type(value) in FOREIGN_TYPES:
        return FieldError(
            f"CBOR {type(value).__name__}, a type frames never use", ErrorCode.MALFORMED_FRAME
        )
    return FieldError(expected)


def shown(value: object) -> str:
    """A short, printable, ASCII rendering of a peer-supplied value for an error message: the
    message goes back in an `error` frame (at most 512 bytes) and into logs."""
    text = ascii(value)
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def _key_step(key: object) -> str:
    """The path step naming map key `key`: `.name` for plain keys, `[...]` for anything else."""
    if type(key) is str and key.isidentifier() and key.isascii() and len(key) <= _SHOWN_MAX:
        return "." + key
    return f"[{shown(key)}]"


_Check = Callable[[object], Any]


class Codec(Protocol[T]):
    """Validates a decoded CBOR value into a Python value, and back."""

    def check(self, value: object) -> T: ...

    def to_wire(self, value: T) -> object: ...


@dataclass(frozen=True, slots=True)
class UInt:
    """A non-negative integer up to `max_value` (booleans are not integers here)."""

    max_value: int = UINT64_MAX

    def check(self, value: object) -> int:
        if type(value) is not int:
            raise wrong_type(value, "expected an unsigned integer")
        if not 0 <= value <= self.max_value:
            raise invalid(f"out of range 0..{self.max_value}")
        return value

    def to_wire(self, value: int) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Bool:
    def check(self, value: object) -> bool:
        if type(value) is not bool:
            raise wrong_type(value, "expected a boolean")
        return value

    def to_wire(self, value: bool) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Bytes:
    """A byte string of `min_len`..`max_len` bytes."""

    max_len: int
    min_len: int = 0

    def check(self, value: object) -> bytes:
        if type(value) is not bytes:
            raise wrong_type(value, "expected a byte string")
        if not self.min_len <= len(value) <= self.max_len:
            if self.min_len == self.max_len:
                raise invalid(f"must be exactly {self.max_len} bytes")
            raise invalid(f"length must be {self.min_len}..{self.max_len} bytes")
        return value

    def to_wire(self, value: bytes) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Text:
    """A UTF-8 text string of at most `max_bytes` bytes; `identifier` additionally requires it to
    be non-empty and free of control characters (user ids, device ids, codes)."""

    max_bytes: int
    identifier: bool = False

    def check(self, value: object) -> str:
        if type(value) is not str:
            raise wrong_type(value, "expected a text string")
        if len(value) > self.max_bytes:
            raise invalid(f"longer than {self.max_bytes} bytes")
        if not value.isascii():
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate: only our own code can make one
                raise invalid("not valid UTF-8 text") from None
            if size > self.max_bytes:
                raise invalid(f"longer than {self.max_bytes} bytes")
        if self.identifier:
            if not value:
                raise invalid("must not be empty")
            if _CONTROL_CHARACTERS.search(value):
                raise invalid("contains control characters")
        return value

    def to_wire(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a fixed set of text values."""

    allowed: frozenset[str]

    def check(self, value: object) -> str:
        if type(value) is not str or value not in self.allowed:
            raise wrong_type(value, f"must be one of {', '.join(sorted(self.allowed))}")
        return value

    def to_wire(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class ListOf(Generic[T]):
    """A list of `min_items`..`max_items` items, each checked by `item`; held as a tuple."""

    item: Codec[T]
    max_items: int
    min_items: int = 0

    def check(self, value: object) -> tuple[T, ...]:
        if type(value) is not list:
            raise wrong_type(value, "expected an array")
        if not self.min_items <= len(value) <= self.max_items:
            raise invalid(f"must hold {self.min_items}..{self.max_items} items")
        item: Codec[Any] = self.item
        if (  # fast path for acks: no Python-level call or loop per sequence number
            isinstance(item, UInt)
            and set(map(type, value)) <= _ONLY_INT
            and min(value, default=0) >= 0
            and max(value, default=0) <= item.max_value
        ):
            return tuple(value)
        check = checker(item)
        try:
            return tuple([check(v) for v in value])
        except FieldError as exc:
            for i, v in enumerate(value):  # find the failing index for the message
                try:
                    check(v)
                except FieldError:
                    raise exc.within(f"[{i}]") from None
            raise

    def to_wire(self, value: tuple[T, ...]) -> object:
        to_wire = self.item.to_wire
        return [to_wire(v) for v in value]


class Struct:
    """Base class of map-shaped values (messages and nested items).

    Subclasses are frozen dataclasses whose fields are declared with `wire(key, codec)`. The
    schema (wire keys in canonical order, codecs, optional fields) is derived once per class.
    Optional fields (declared `optional=True`, default None) are omitted from the map when None;
    a present CBOR null is refused, so every value has one encoding. `_extra_keys` names keys that
    are not dataclass fields but travel in the same map (a frame's "t" and "v"); their values are
    supplied to `to_map` and checked by the caller of `from_map`.
    """

    __slots__ = ()

    _extra_keys: ClassVar[tuple[str, ...]] = ()
    # Derived once per class by _schema_of(): (attribute or None for an extra key, wire key,
    # codec, optional) in canonical key order; all keys; required keys.
    _order: ClassVar[tuple[tuple[str | None, str, Codec[Any] | None, bool], ...]]
    _keys: ClassVar[frozenset[str]]
    _required: ClassVar[frozenset[str]]
    # Filled by _plan_for() as valid maps arrive: for each accepted key sequence (all keys known,
    # required ones present, in canonical order; so at most one per combination of optional
    # fields present) the fields to check, as (attribute, wire key, check function, optional).
    # A map whose key tuple is found here needs no further key checks.
    _plans: ClassVar[dict[tuple[object, ...], tuple[tuple[str, str, _Check, bool], ...]]]

    @classmethod
    def _schema_of(cls) -> tuple[tuple[str | None, str, Codec[Any] | None, bool], ...]:
        order = cls.__dict__.get("_order")
        if order is not None:
            return order  # type: ignore[no-any-return]
        entries: dict[str, tuple[str | None, str, Codec[Any] | None, bool]] = {
            key: (None, key, None, False) for key in cls._extra_keys
        }
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            key = f.metadata.get("wire")
            if key is None:
                continue
            if key in entries:
                raise TypeError(f"{cls.__name__}: wire key {key!r} declared twice")
            entries[key] = (f.name, key, f.metadata["codec"], f.metadata["optional"])
        order = tuple(entries[k] for k in canonical_key_order(entries))
        cls._keys = frozenset(entries)
        cls._required = frozenset(k for k, e in entries.items() if not e[3])
        cls._plans = {}
        cls._order = order  # last: its presence in the class __dict__ marks the schema complete
        return order

    def to_map(self, extra: dict[str, object] | None = None) -> dict[str, object]:
        """This value as a map with keys in canonical order (ready for `cbor.encode`)."""
        out: dict[str, object] = {}
        for name, key, codec, optional in type(self)._schema_of():
            if name is None:
                if extra is None:
                    raise TypeError(f"{type(self).__name__}.to_map needs its extra keys")
                out[key] = extra[key]
                continue
            value = getattr(self, name)
            if value is None and optional:
                continue
            out[key] = codec.to_wire(value)  # type: ignore[union-attr]
        return out

    @classmethod
    def from_map(cls: type[S], value: object) -> S:
        """Validate a decoded map into an instance. Every problem is a FieldError naming the
        field: INVALID_FIELD, NON_CANONICAL for keys out of canonical order, MALFORMED_FRAME for
        a value of a type no frame carries."""
        if type(value) is not dict:
            raise wrong_type(value, "expected a map")
        try:
            plan = cls.__dict__["_plans"][tuple(value)]
        except KeyError:  # first map of this layout, or a map with a key problem
            plan = cls._plan_for(value)
        kwargs: dict[str, Any] = {}
        for name, key, check, optional in plan:
            raw = value[key]
            try:
                kwargs[name] = check(raw)
            except FieldError as exc:
                error = (
                    invalid("omit an absent optional field, not null")
                    if raw is None and optional
                    else exc
                )
                raise error.within(f".{key}") from None
        try:
            return cls(**kwargs)
        except ValueError as exc:  # cross-field checks in __post_init__
            raise invalid(str(exc)) from None

    @classmethod
    def _plan_for(cls, value: dict[Any, Any]) -> tuple[tuple[str, str, _Check, bool], ...]:
        """Check the keys of `value` (known, complete, in canonical order) and remember the
        plan for maps laid out the same way."""
        order = cls._schema_of()
        keys = value.keys()
        unknown = keys - cls._keys
        if unknown:
            raise invalid("unknown field").within(_key_step(min(unknown, key=repr)))
        missing = cls._required - keys
        if missing:
            raise invalid("missing field").within("." + min(missing))
        layout = tuple(value)
        if layout != tuple(key for _, key, _, _ in order if key in value):
            raise FieldError(
                "map keys are not in canonical order (RFC 8949 §4.2.1)", ErrorCode.NON_CANONICAL
            )
        plan = tuple(
            (name, key, checker(codec), optional)
            for name, key, codec, optional in order
            if name is not None and codec is not None and key in value
        )
        cls._plans[layout] = plan
        return plan


S = TypeVar("S", bound=Struct)


@dataclass(frozen=True, slots=True)
class Nested(Generic[S]):
    """A nested map-shaped value."""

    cls: type[S]

    def check(self, value: object) -> S:
        return self.cls.from_map(value)

    def to_wire(self, value: S) -> object:
        return value.to_map()


def checker(codec: Codec[T]) -> Callable[[object], T]:
    """The function that checks values for `codec`: its `check`, or for a nested struct the
    struct's `from_map` directly (one call less per value on the hot path)."""
    if isinstance(codec, Nested):
        return codec.cls.from_map  # type: ignore[no-any-return]
    return codec.check


def wire(key: str, codec: Codec[Any], *, optional: bool = False) -> Any:
    """Declare a dataclass field's wire key and codec (optional fields default to None)."""
    metadata = {"wire": key, "codec": codec, "optional": optional}
    if optional:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(metadata=metadata)
