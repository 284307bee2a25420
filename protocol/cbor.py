"""Deterministic CBOR (RFC 8949 §4.2.1) for frame bodies, on top of cbor2, decoded strictly.

Decoding refuses everything a frame never needs and a hostile peer could abuse: semantic tags
(bignums, regular expressions, shared references, dates...), indefinite lengths, duplicate map
keys, non-text map keys and nesting deeper than `MAX_DEPTH`. It then insists that the input was
already in deterministic form by re-encoding the decoded value and comparing bytes: minimal
integer and length heads, nothing after the item. Map key order is the one thing this byte
comparison cannot see (cbor2 re-encodes a map in the order it was read), so it is checked where
every map of a frame is validated: `medrelay.protocol.fields.Struct.from_map` compares each map's
key sequence with the canonical layouts of its schema.

Codes (docs/protocol.md §2, §9): CBOR that is valid but not deterministic (non-minimal heads,
indefinite lengths, duplicate keys, unsorted keys) is `non_canonical`; bytes that are not one CBOR
item, or hold a type frames never use (tags, floats, `undefined`, other simple values), are
`malformed_frame`. Telling these apart costs a second look only on the error path.

Encoding relies on the caller building maps with keys already in canonical order (see
`canonical_key_order`); cbor2's own canonical mode sorts on every call and costs three times as
much. For the values frames contain (ints, bytes, text, bools, null, lists, maps with short text
keys) cbor2's default encoding is then exactly the deterministic encoding; the tests check this
against `canonical=True` for every message type.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any, Final

import cbor2

from medrelay.protocol.errors import ErrorCode, RemoteProtocolError

MAX_DEPTH: Final = 6

# Every tag cbor2 decodes natively, mapped to a refusal; other tags reach `_refuse_tag`.
_BUILTIN_TAGS: Final = (
    0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 55799,
)  # fmt: skip


FOREIGN_TYPES: Final = frozenset({float, cbor2.CBORSimpleValue, type(cbor2.undefined)})
"""Types cbor2 can decode without a tag that no frame field ever holds (floats of every width,
`undefined` and the unassigned simple values). They reach the field codecs, which report them as
malformed_frame rather than as a merely wrong field type."""


class BodyError(RemoteProtocolError):
    """A frame body refused by the CBOR layer. `value` is what the body decoded to when it could
    be read at all (possibly leniently), so the frame layer can still echo its request id."""

    def __init__(self, code: ErrorCode, message: str, value: object = None) -> None:
        super().__init__(code, message)
        self.value = value


def _refuse_semantic(decoder: Any, *args: Any) -> Any:
    raise ValueError("CBOR tags are not allowed in frames")


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise ValueError("CBOR tags are not allowed in frames")


_DECODE_OPTIONS: Final[dict[str, Any]] = {
    "max_depth": MAX_DEPTH,
    "allow_indefinite": False,
    "allow_duplicate_keys": False,
    "strict_hashable_types": True,
    "semantic_decoders": dict.fromkeys(_BUILTIN_TAGS, _refuse_semantic),
    "tag_hook": _refuse_tag,
}
# Only for diagnosing a refused body: the same rules minus the two that make valid CBOR merely
# non-deterministic.
_LENIENT_OPTIONS: Final[dict[str, Any]] = {
    **_DECODE_OPTIONS,
    "allow_indefinite": True,
    "allow_duplicate_keys": True,
}


def canonical_key_order(keys: Iterable[str]) -> tuple[str, ...]:
    """RFC 8949 §4.2.1 order for text keys: by the bytes of their encoding, which for keys
    shorter than 24 bytes means by length, then bytewise."""
    return tuple(sorted(keys, key=lambda k: (len(k.encode("utf-8")), k.encode("utf-8"))))


def encode(value: object) -> bytes:
    """Encode a value whose maps are already in canonical key order."""
    return cbor2.dumps(value)


def decode(data: bytes) -> object:
    """Decode one complete CBOR item strictly; any refusal is a non-fatal `BodyError` (the frame
    boundary is already known, so the stream stays usable). Map key order is left to the schema
    layer (see the module docstring)."""
    try:
        value = cbor2.loads(data, **_DECODE_OPTIONS)
    except Exception:  # cbor2 raises several types; none may escape the codec
        raise _undecodable(data) from None
    try:
        reencoded = cbor2.dumps(value)
    except Exception:  # pragma: no cover - every type the decoder yields here encodes again
        raise BodyError(
            ErrorCode.MALFORMED_FRAME, "CBOR value of a type frames never use"
        ) from None
    if reencoded != data:
        raise _not_deterministic(data, value)
    return value


def _undecodable(data: bytes) -> BodyError:
    """Why the strict decoder refused `data`: valid CBOR that only breaks the deterministic
    rules (indefinite lengths, duplicate keys) is non_canonical, anything else malformed."""
    try:
        value = cbor2.loads(data, **_LENIENT_OPTIONS)
    except Exception:
        return BodyError(ErrorCode.MALFORMED_FRAME, "not valid CBOR for a frame")
    refusal = _not_deterministic(data, value)
    if refusal.code is ErrorCode.NON_CANONICAL:
        refusal.message = "indefinite lengths and duplicate map keys are not deterministic CBOR"
        refusal.args = (refusal.message,)
    return refusal


def _not_deterministic(data: bytes, value: object) -> BodyError:
    """The refusal for a body that decoded to `value` but does not re-encode to itself."""
    if _holds_foreign_type(value):
        return BodyError(
            ErrorCode.MALFORMED_FRAME, "CBOR float or simple value, a type frames never use", value
        )
    if _item_length(data) != len(data):
        return BodyError(ErrorCode.MALFORMED_FRAME, "bytes after the CBOR item", value)
    return BodyError(
        ErrorCode.NON_CANONICAL, "frame body is not deterministic CBOR (RFC 8949 §4.2.1)", value
    )


def _holds_foreign_type(value: object) -> bool:
    if type(value) in FOREIGN_TYPES:
        return True
    if type(value) is list:
        return any(_holds_foreign_type(v) for v in value)
    if type(value) is dict:
        return any(_holds_foreign_type(k) or _holds_foreign_type(v) for k, v in value.items())
    return False


def _item_length(data: bytes) -> int:
    """How many bytes the first CBOR item of `data` spans (it is known to decode leniently)."""
    stream = io.BytesIO(data)
    cbor2.CBORDecoder(stream, **_LENIENT_OPTIONS).decode()
    return stream.tell()
