"""medrelay.protocol: what a decoder refuses, and with which stable code.

Every bounded field of every message type is tried at its limit (accepted) and one past it
(refused with `invalid_field` and a message that names the field's path, e.g. `send.env[0].c`);
the sites come from the field declarations, so new fields are covered automatically. Then the
frame-level rules: unknown, missing and null fields, versions, types, and every way a body can
be valid CBOR without being deterministic CBOR, or not CBOR a frame may carry at all
(docs/protocol.md §2 and §9). Every refusal is a non-fatal RemoteProtocolError that echoes the
request's rid whenever the body could be read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from protocol_strategies import (
    DELETE,
    FieldSite,
    canonical_body,
    edited,
    message_sites,
    read,
    sample_message,
    sample_value,
    wire_map,
)

from medrelay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from medrelay.protocol.fields import UINT64_MAX, Bool, Bytes, Choice, ListOf, Nested, Text, UInt
from medrelay.protocol.messages import (
    MESSAGE_TYPES,
    BundleGet,
    Deliver,
    Direction,
    Message,
    Send,
    decode_body,
    encode_body,
)

C2S = Direction.CLIENT_TO_SERVER
RID = 4242


# -- helpers -----------------------------------------------------------------------------------


def _refusal(body: bytes, direction: Direction = C2S) -> RemoteProtocolError:
    """The error decoding `body` raises; anything but a non-fatal RemoteProtocolError fails."""
    try:
        decode_body(body, direction)
    except RemoteProtocolError as exc:
        assert not exc.fatal, "a well-delimited frame never poisons the connection"
        assert isinstance(exc.code, ErrorCode)
        return exc
    raise AssertionError("the body was accepted")


def _base(cls: type[Message]) -> dict[str, Any]:
    """A valid frame map of `cls` (optional fields present where allowed, rid set to RID)."""
    frame_map = wire_map(sample_message(cls))
    if "rid" in frame_map:
        frame_map["rid"] = RID
    return frame_map


def _expected_rid(frame_map: dict[str, Any]) -> int | None:
    rid = frame_map.get("rid")
    return rid if type(rid) is int and 0 <= rid < 2**32 else None


def _accepts(cls: type[Message], frame_map: dict[str, Any]) -> None:
    decode_body(canonical_body(frame_map), cls.DIRECTION)


def _refuses(
    cls: type[Message], frame_map: dict[str, Any], code: ErrorCode, path: str | None = None
) -> RemoteProtocolError:
    exc = _refusal(canonical_body(frame_map), cls.DIRECTION)
    assert exc.code is code, exc.message
    if path is not None:
        assert exc.message.startswith(f"{path}: "), exc.message
    assert exc.rid == _expected_rid(frame_map)
    return exc


def _sites() -> Iterator[tuple[type[Message], FieldSite]]:
    for name in sorted(MESSAGE_TYPES):
        cls = MESSAGE_TYPES[name]
        for site in message_sites(cls):
            yield cls, site


SITES = list(_sites())
SITE_IDS = [site.name for _, site in SITES]


def _sites_of(codec_type: type) -> list[Any]:
    return [
        pytest.param(cls, site, id=site.name)
        for cls, site in SITES
        if isinstance(site.codec, codec_type)
    ]


# -- every bounded field at its limit and one past ---------------------------------------------


@pytest.mark.parametrize(("cls", "site"), _sites_of(UInt))
def test_unsigned_integers_at_their_maximum_are_accepted_and_beyond_refused(
    cls: type[Message], site: FieldSite
) -> None:
    """0 and the maximum pass; max+1, -1, booleans and text are refused naming the field (a
    value past 2**64-1 needs a bignum tag, which no frame may carry: malformed_frame)."""
    assert isinstance(site.codec, UInt)
    base = _base(cls)
    for good in (0, site.codec.max_value):
        _accepts(cls, edited(base, site.location, good))
    for bad in (-1, True, False, "1", b"\x01"):
        _refuses(cls, edited(base, site.location, bad), ErrorCode.INVALID_FIELD, site.name)
    beyond = edited(base, site.location, site.codec.max_value + 1)
    if site.codec.max_value < UINT64_MAX:
        _refuses(cls, beyond, ErrorCode.INVALID_FIELD, site.name)
    else:
        assert _refusal(canonical_body(beyond), cls.DIRECTION).code is ErrorCode.MALFORMED_FRAME


def test_request_ids_are_u32() -> None:
    """rid is at most 2**32-1 in every request (the answer echoes it)."""
    rid_sites = [(cls, site) for cls, site in SITES if site.location == ("rid",)]
    assert {cls.TYPE for cls, _ in rid_sites} >= {"auth", "send", "bundle_get", "prekeys_put"}
    for _, site in rid_sites:
        assert isinstance(site.codec, UInt)
        assert site.codec.max_value == 2**32 - 1


@pytest.mark.parametrize(("cls", "site"), _sites_of(Bytes))
def test_byte_strings_at_their_length_bounds_are_accepted_and_beyond_refused(
    cls: type[Message], site: FieldSite
) -> None:
    assert isinstance(site.codec, Bytes)
    base = _base(cls)
    low, high = site.codec.min_len, site.codec.max_len
    _accepts(cls, edited(base, site.location, bytes(high)))
    _accepts(cls, edited(base, site.location, b"\x01" * low))
    _refuses(cls, edited(base, site.location, bytes(high + 1)), ErrorCode.INVALID_FIELD, site.name)
    if low > 0:
        short = edited(base, site.location, bytes(low - 1))
        _refuses(cls, short, ErrorCode.INVALID_FIELD, site.name)
    as_text = edited(base, site.location, "x" * max(low, 1))
    _refuses(cls, as_text, ErrorCode.INVALID_FIELD, site.name)


@pytest.mark.parametrize(("cls", "site"), _sites_of(Text))
def test_text_at_its_byte_limit_is_accepted_and_one_byte_more_refused(
    cls: type[Message], site: FieldSite
) -> None:
    """Limits count UTF-8 bytes, not characters: two-byte characters fill the limit in half as
    many characters. Identifiers (user, device, clinic, code) must be non-empty and free of
    control characters; other text may hold them."""
    assert isinstance(site.codec, Text)
    base = _base(cls)
    limit = site.codec.max_bytes
    at_limit = "é" * (limit // 2) + "a" * (limit % 2)
    assert len(at_limit.encode()) == limit
    _accepts(cls, edited(base, site.location, at_limit))
    _refuses(cls, edited(base, site.location, at_limit + "a"), ErrorCode.INVALID_FIELD, site.name)
    over_in_bytes = "é" * (limit // 2 + 1)
    assert len(over_in_bytes) <= limit < len(over_in_bytes.encode())
    _refuses(cls, edited(base, site.location, over_in_bytes), ErrorCode.INVALID_FIELD, site.name)
    _refuses(cls, edited(base, site.location, b"a"), ErrorCode.INVALID_FIELD, site.name)
    controls = ["a\x00", "\x1f", "a\x7fb", "\x85", "\x9f"]
    if site.codec.identifier:
        _refuses(cls, edited(base, site.location, ""), ErrorCode.INVALID_FIELD, site.name)
        for bad in controls:
            _refuses(cls, edited(base, site.location, bad), ErrorCode.INVALID_FIELD, site.name)
    else:
        _accepts(cls, edited(base, site.location, ""))
        for text in controls:
            _accepts(cls, edited(base, site.location, text))


@pytest.mark.parametrize(("cls", "site"), _sites_of(Choice))
def test_choices_refuse_any_other_value(cls: type[Message], site: FieldSite) -> None:
    base = _base(cls)
    for bad in ("bogus", "", "MSG", 1):
        _refuses(cls, edited(base, site.location, bad), ErrorCode.INVALID_FIELD, site.name)


@pytest.mark.parametrize(("cls", "site"), _sites_of(ListOf))
def test_lists_at_their_count_bounds_are_accepted_and_beyond_refused(
    cls: type[Message], site: FieldSite
) -> None:
    """min and max items pass, one more or one fewer is refused, and a bad item is named by its
    index (the last one, so the index is not trivially 0)."""
    codec = site.codec
    assert isinstance(codec, ListOf)
    base = _base(cls)

    def items(count: int) -> list[object]:
        return [codec.item.to_wire(sample_value(codec.item, i)) for i in range(count)]

    _accepts(cls, edited(base, site.location, items(codec.max_items)))
    _accepts(cls, edited(base, site.location, items(codec.min_items)))
    too_many = edited(base, site.location, items(codec.max_items + 1))
    _refuses(cls, too_many, ErrorCode.INVALID_FIELD, site.name)
    if codec.min_items > 0:
        too_few = edited(base, site.location, items(codec.min_items - 1))
        _refuses(cls, too_few, ErrorCode.INVALID_FIELD, site.name)
    for not_a_list in ({"a": 1}, b"", "", 0):
        _refuses(cls, edited(base, site.location, not_a_list), ErrorCode.INVALID_FIELD, site.name)
    two = items(2)
    two[1] = {"bad": "item"} if not isinstance(codec.item, Nested) else "not a map"
    bad_item = edited(base, site.location, two)
    _refuses(cls, bad_item, ErrorCode.INVALID_FIELD, f"{site.name}[1]")


@pytest.mark.parametrize(("cls", "site"), _sites_of(Nested))
def test_nested_maps_must_be_maps(cls: type[Message], site: FieldSite) -> None:
    base = _base(cls)
    bad_values: list[object] = [[], "map", 1, b""]
    for bad in bad_values:
        _refuses(cls, edited(base, site.location, bad), ErrorCode.INVALID_FIELD, site.name)


def test_every_field_kind_is_exercised_by_the_limit_tests() -> None:
    """Fails when a codec class appears that none of the tests above probes."""
    tested = (UInt, Bool, Bytes, Text, Choice, ListOf, Nested)
    for _, site in SITES:
        assert isinstance(site.codec, tested), f"{site.name}: {type(site.codec).__name__}"


@pytest.mark.parametrize(("cls", "site"), _sites_of(Bool))
def test_booleans_are_cbor_booleans_only(cls: type[Message], site: FieldSite) -> None:
    base = _base(cls)
    _accepts(cls, edited(base, site.location, True))
    _accepts(cls, edited(base, site.location, False))
    for wrong in (0, 1, "true", b"\x01", None):
        if wrong is None and site.optional:
            continue
        _refuses(cls, edited(base, site.location, wrong), ErrorCode.INVALID_FIELD, site.name)


# -- unknown, missing and null fields ----------------------------------------------------------


@pytest.mark.parametrize(("cls", "site"), [pytest.param(c, s, id=s.name) for c, s in SITES])
def test_a_missing_required_field_is_named_and_an_absent_optional_one_is_fine(
    cls: type[Message], site: FieldSite
) -> None:
    """Removing a required field is `invalid_field` naming it as missing; removing an optional
    one is accepted (unless a cross-field rule needs it, like a message item's ciphertext:
    then the refusal names the item, not a missing field)."""
    base = _base(cls)
    without = edited(base, site.location, DELETE)
    if not site.optional:
        exc = _refuses(cls, without, ErrorCode.INVALID_FIELD, site.name)
        assert "missing" in exc.message
        return
    try:
        _accepts(cls, without)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.INVALID_FIELD
        parent = site.name.rsplit(".", 1)[0]
        assert exc.message.startswith(f"{parent}: "), exc.message


@pytest.mark.parametrize(
    ("cls", "site"), [pytest.param(c, s, id=s.name) for c, s in SITES if s.optional]
)
def test_an_optional_field_present_as_null_is_refused(cls: type[Message], site: FieldSite) -> None:
    """Absent optional fields are omitted, so each value has one encoding (§2)."""
    exc = _refuses(cls, edited(_base(cls), site.location, None), ErrorCode.INVALID_FIELD, site.name)
    assert "null" in exc.message


@pytest.mark.parametrize(
    ("cls", "site"), [pytest.param(c, s, id=s.name) for c, s in SITES if not s.optional]
)
def test_a_required_field_present_as_null_is_refused(cls: type[Message], site: FieldSite) -> None:
    _refuses(cls, edited(_base(cls), site.location, None), ErrorCode.INVALID_FIELD, site.name)


@pytest.mark.parametrize("type_name", sorted(MESSAGE_TYPES))
def test_unknown_fields_are_refused_and_named_at_every_level(type_name: str) -> None:
    """New fields come with a new protocol version: an unknown key is invalid_field, named with
    its full path, whether at the top of the frame or inside a nested map."""
    cls = MESSAGE_TYPES[type_name]
    base = _base(cls)
    extra = dict(base, zz=1)
    _refuses(cls, extra, ErrorCode.INVALID_FIELD, f"{type_name}.zz")
    for site in message_sites(cls):
        if isinstance(read(base, site.location), dict):
            nested = dict(read(base, site.location), zz=1)
            _refuses(
                cls, edited(base, site.location, nested), ErrorCode.INVALID_FIELD, f"{site.name}.zz"
            )


def test_an_unknown_field_with_a_long_or_binary_key_gives_a_short_printable_message() -> None:
    """The message goes back to the peer in an `error` frame (text of at most 512 bytes) and
    into logs: peer-controlled keys are shown shortened and escaped."""
    base = _base(BundleGet)
    for key in ("k" * 100_000, "é" * 400, "a\nb\x00"):
        exc = _refuses(BundleGet, dict(base, **{key: 1}), ErrorCode.INVALID_FIELD)
        assert len(exc.message.encode()) <= 200 and exc.message.isprintable()
    binary_key: dict[object, object] = {b"\xff" * 5000: 1}
    binary_key.update(base)
    body = canonical_body(binary_key)
    exc = _refusal(body)
    assert exc.code is ErrorCode.INVALID_FIELD and len(exc.message.encode()) <= 200


# -- cross-field rules -------------------------------------------------------------------------


def test_a_send_with_two_envelopes_for_one_device_is_refused() -> None:
    base = _base(Send)
    envelope = base["env"][0]
    _refuses(
        Send,
        dict(base, env=[envelope, dict(envelope, c=b"other")]),
        ErrorCode.INVALID_FIELD,
        "send",
    )


def test_delivered_items_carry_a_ciphertext_exactly_when_they_are_messages() -> None:
    base = _base(Deliver)
    item = base["items"][0]
    assert item["k"] == "msg"
    without = {k: v for k, v in item.items() if k != "c"}
    _refuses(Deliver, dict(base, items=[without]), ErrorCode.INVALID_FIELD, "deliver.items[0]")
    expired = dict(item, k="expired")
    _refuses(Deliver, dict(base, items=[expired]), ErrorCode.INVALID_FIELD, "deliver.items[0]")
    _accepts(Deliver, dict(base, items=[dict(without, k="expired")]))
    # A clinic notice travels in the same field (it is signed, not encrypted).
    _accepts(Deliver, dict(base, items=[dict(item, k="notice")]))
    _refuses(
        Deliver,
        dict(base, items=[dict(without, k="notice")]),
        ErrorCode.INVALID_FIELD,
        "deliver.items[0]",
    )
    assert isinstance(decode_body(canonical_body(base), Direction.SERVER_TO_CLIENT), Deliver)


# -- version and type ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 255, 2**32, True, "1", b"\x01", None, DELETE])
def test_a_frame_of_another_version_is_unsupported_and_echoes_its_rid(version: object) -> None:
    base = _base(BundleGet)
    frame_map = edited(base, ("v",), version)
    exc = _refuses(BundleGet, frame_map, ErrorCode.UNSUPPORTED_VERSION)
    assert len(exc.message) < 200


@pytest.mark.parametrize("type_value", ["nope", "", "HELLO", b"hello", 1, None, DELETE, "t" * 5000])
def test_an_unknown_type_is_refused_and_echoes_the_rid(type_value: object) -> None:
    frame_map = edited(_base(BundleGet), ("t",), type_value)
    exc = _refuses(BundleGet, frame_map, ErrorCode.UNKNOWN_TYPE)
    assert len(exc.message.encode()) <= 200


@pytest.mark.parametrize("rid", [-1, 2**32, True, "7", None])
def test_an_unreadable_rid_is_not_echoed(rid: object) -> None:
    frame_map = edited(_base(BundleGet), ("rid",), rid)
    assert _refusal(canonical_body(frame_map)).rid is None


def test_the_rid_is_echoed_from_a_frame_with_an_invalid_field() -> None:
    frame_map = edited(_base(Send), ("env", 0, "c"), b"")
    exc = _refuses(Send, frame_map, ErrorCode.INVALID_FIELD, "send.env[0].c")
    assert exc.rid == RID


# -- CBOR a frame may not carry ------------------------------------------------------------------


def _head(major: int, value: int, width: int | None = None) -> bytes:
    """A CBOR head, minimal unless `width` (1, 2, 4 or 8 bytes of argument) forces otherwise."""
    if width is None:
        if value < 24:
            return bytes([major << 5 | value])
        width = 1 if value < 2**8 else 2 if value < 2**16 else 4 if value < 2**32 else 8
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + value.to_bytes(width, "big")


def _text(s: str) -> bytes:
    return cbor2.dumps(s)


def _map(pairs: list[tuple[bytes, bytes]], head: bytes | None = None) -> bytes:
    return (head or _head(5, len(pairs))) + b"".join(k + v for k, v in pairs)


def _bundle_get(
    rid: bytes = b"", user: bytes = b"", t: bytes = b"", v: bytes = b""
) -> list[tuple[bytes, bytes]]:
    """The four entries of a bundle_get in canonical order, each value overridable raw."""
    return [
        (_text("t"), t or _text("bundle_get")),
        (_text("v"), v or _head(0, 1)),
        (_text("rid"), rid or cbor2.dumps(RID)),
        (_text("user"), user or _text("alice")),
    ]


def test_the_hand_built_reference_body_is_accepted() -> None:
    body = _map(_bundle_get())
    assert body == encode_body(BundleGet(rid=RID, user="alice"))
    assert decode_body(body, C2S) == BundleGet(rid=RID, user="alice")


NON_CANONICAL_BODIES = {
    "keys in the wrong order": _map(list(reversed(_bundle_get()))),
    "rid key before v": _map(
        [_bundle_get()[0], _bundle_get()[2], _bundle_get()[1], _bundle_get()[3]]
    ),
    "non-minimal integer": _map(_bundle_get(rid=_head(0, RID, width=8))),
    "non-minimal small integer": _map(_bundle_get(v=_head(0, 1, width=1))),
    "non-minimal text length": _map(_bundle_get(user=_head(3, 5, width=1) + b"alice")),
    "non-minimal map length": _map(_bundle_get(), head=_head(5, 4, width=2)),
    "indefinite-length map": _map(_bundle_get(), head=b"\xbf") + b"\xff",
    "indefinite-length text": _map(
        _bundle_get(user=b"\x7f" + _text("ali") + _text("ce") + b"\xff")
    ),
    "duplicate key": _map([*_bundle_get(), (_text("user"), _text("bob"))], head=_head(5, 5)),
}


@pytest.mark.parametrize("body", NON_CANONICAL_BODIES.values(), ids=NON_CANONICAL_BODIES.keys())
def test_valid_but_non_deterministic_cbor_is_non_canonical_and_echoes_the_rid(body: bytes) -> None:
    """§2: definite lengths only, minimal heads, sorted keys, no duplicates; refused with
    non_canonical, and the rid (readable from the decoded map) is echoed."""
    exc = _refusal(body)
    assert exc.code is ErrorCode.NON_CANONICAL, exc.message
    assert exc.rid == RID


def test_unsorted_keys_in_a_nested_map_are_non_canonical() -> None:
    base = _base(Send)
    envelope = base["env"][0]
    unsorted = cbor2.dumps({k: envelope[k] for k in reversed(list(envelope))})
    body = encode_body(sample_message(Send)).replace(cbor2.dumps(envelope), unsorted)
    exc = _refusal(body)
    assert exc.code is ErrorCode.NON_CANONICAL


def _float(value: bytes) -> bytes:
    return _map(_bundle_get(rid=value))


FOREIGN_BODIES = {
    "float16": _float(b"\xf9\x3c\x00"),
    "float32": _float(b"\xfa\x3f\x80\x00\x00"),
    "float64": _float(b"\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00"),
    "float64 NaN": _float(b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00"),
    "undefined": _float(b"\xf7"),
    "simple value 16": _float(b"\xf0"),
    "simple value 99": _float(b"\xf8\x63"),
    "bignum": _float(b"\xc2\x49\x01" + bytes(8)),
    "negative bignum": _float(b"\xc3\x41\x01"),
    "date tag": _float(b"\xc1\x01"),
    "regex tag": _float(b"\xd8\x23" + _text("a+")),
    "shared reference": _map(_bundle_get(rid=b"\xd8\x1c" + cbor2.dumps(RID))),
    "unknown tag": _float(b"\xd9\x27\x0f\x01"),
    "self-described CBOR": b"\xd9\xd9\xf7" + _map(_bundle_get()),
    "trailing bytes": _map(_bundle_get()) + b"\x00",
    "two maps": _map(_bundle_get()) + _map(_bundle_get()),
    "truncated": _map(_bundle_get())[:-1],
    "invalid UTF-8": _map(_bundle_get(user=b"\x62\xc3\x28")),
    "reserved additional info": _float(b"\x1c"),
    "lone break": _float(b"\xff"),
    "integer map key": _map([(b"\x01", b"\x01"), *_bundle_get()], head=_head(5, 5)),
    "array body": cbor2.dumps([1, 2]),
    "integer body": b"\x01",
    "empty body": b"",
}


@pytest.mark.parametrize("body", FOREIGN_BODIES.values(), ids=FOREIGN_BODIES.keys())
def test_cbor_a_frame_never_uses_is_a_malformed_frame(body: bytes) -> None:
    """Floats, undefined and other simple values, tags (bignums, dates, regular expressions,
    shared references, anything), trailing bytes, invalid CBOR: malformed_frame, however wide
    the float (a float16 is not merely a non-canonical float64)."""
    exc = _refusal(body)
    assert exc.code is ErrorCode.MALFORMED_FRAME, exc.message


@pytest.mark.parametrize("depth", [6, 7, 50, 5000])
def test_nesting_deeper_than_six_levels_is_malformed(depth: int) -> None:
    """The frame map is level 1; six levels are valid CBOR for a frame (the field is then
    merely wrong), seven are not; very deep nesting never reaches the recursion limit."""
    inner = b"\x81" * (depth - 2) + b"\x01"
    body = _map(_bundle_get(user=b"\x81" + inner))
    exc = _refusal(body)
    expected = ErrorCode.INVALID_FIELD if depth <= 6 else ErrorCode.MALFORMED_FRAME
    assert exc.code is expected, exc.message


def test_huge_declared_lengths_are_refused_without_allocating() -> None:
    """A tiny body announcing 2**64-1 items or bytes is malformed, not a MemoryError."""
    for head in (b"\x9b", b"\xbb", b"\x5b", b"\x7b"):
        exc = _refusal(head + b"\xff" * 8 + b"\x00")
        assert exc.code is ErrorCode.MALFORMED_FRAME


def test_every_refusal_is_a_protocol_error_with_a_stable_code() -> None:
    """Sanity over all the bodies above: RemoteProtocolError, a known code, never fatal."""
    for body in [*NON_CANONICAL_BODIES.values(), *FOREIGN_BODIES.values()]:
        try:
            decode_body(body, C2S)
        except ProtocolError as exc:
            assert isinstance(exc, RemoteProtocolError)
            assert exc.code in set(ErrorCode)
            assert not exc.fatal
        else:
            raise AssertionError(body.hex())


@pytest.mark.parametrize(
    ("seqs", "index"), [([1, -1], 1), ([1, 2, True], 2), ([False], 0), ([1, "2"], 1)]
)
def test_a_bad_sequence_number_in_an_ack_is_named_by_its_index(
    seqs: list[object], index: int
) -> None:
    """Integer lists (ack seqs, hello versions) refuse negative numbers, booleans and text,
    naming the first bad index."""
    exc = _refusal(canonical_body({"t": "ack", "v": 1, "seqs": seqs}))
    assert exc.code is ErrorCode.INVALID_FIELD
    assert exc.message.startswith(f"ack.seqs[{index}]: "), exc.message


@pytest.mark.parametrize("seq", [2**64, 1.0, 1.5])
def test_a_bignum_or_float_sequence_number_is_malformed(seq: object) -> None:
    exc = _refusal(canonical_body({"t": "ack", "v": 1, "seqs": [1, seq]}))
    assert exc.code is ErrorCode.MALFORMED_FRAME


def test_a_float64_sequence_number_is_malformed_and_named() -> None:
    """A float64 re-encodes to itself, so it reaches the field codec, which still reports a
    type frames never use (not a merely wrong field) and names where it was."""
    body = _map(
        [
            (_text("t"), _text("ack")),
            (_text("v"), b"\x01"),
            (_text("seqs"), b"\x82\x01" + cbor2.dumps(2.5)),
        ]
    )
    assert cbor2.dumps(2.5)[0] == 0xFB
    exc = _refusal(body)
    assert exc.code is ErrorCode.MALFORMED_FRAME
    assert exc.message.startswith("ack.seqs[1]: "), exc.message


def test_hello_versions_past_255_are_refused_by_index() -> None:
    body = canonical_body({"t": "hello", "v": 1, "agent": "", "versions": [1, 255, 256]})
    exc = _refusal(body)
    assert exc.code is ErrorCode.INVALID_FIELD
    assert exc.message.startswith("hello.versions[2]: "), exc.message
