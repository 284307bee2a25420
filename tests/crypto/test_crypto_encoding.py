"""medrelay.crypto.encoding: the canonical binary encoding round-trips any field sequence, and the
Reader refuses everything else (truncation, trailing bytes, over-limit or forged length prefixes,
invalid UTF-8, booleans other than 0/1, wrong versions) with MalformedEncoding, never with
struct.error, IndexError or UnicodeDecodeError."""

from __future__ import annotations

import contextlib
import tracemalloc
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import MalformedEncoding


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a schema and the value written into it (`limit` is the size or max_len)."""

    kind: str
    value: object
    limit: int = 0


INT_BITS = {"u8": 8, "u16": 16, "u32": 32, "u64": 64}


def _write(writer: Writer, field: Field) -> None:
    value = field.value
    if field.kind in INT_BITS:
        assert isinstance(value, int)
        getattr(writer, field.kind)(value)
    elif field.kind == "boolean":
        assert isinstance(value, bool)
        writer.boolean(value)
    elif field.kind == "fixed":
        assert isinstance(value, bytes)
        writer.fixed(value, field.limit)
    elif field.kind == "blob":
        assert isinstance(value, bytes)
        writer.blob(value, field.limit)
    else:
        assert field.kind == "text" and isinstance(value, str)
        writer.text(value, field.limit)


def _read(reader: Reader, field: Field) -> object:
    if field.kind in INT_BITS or field.kind == "boolean":
        value: object = getattr(reader, field.kind)()
        return value
    if field.kind == "fixed":
        return reader.fixed(field.limit)
    if field.kind == "blob":
        return reader.blob(field.limit)
    return reader.text(field.limit)


def _encode(fields: list[Field]) -> bytes:
    writer = Writer()
    for field in fields:
        _write(writer, field)
    return writer.to_bytes()


def _decode(data: bytes, fields: list[Field]) -> list[object]:
    reader = Reader(data, "test structure")
    values = [_read(reader, field) for field in fields]
    reader.finish()
    return values


def _int_field(kind: str) -> st.SearchStrategy[Field]:
    return st.integers(0, 2 ** INT_BITS[kind] - 1).map(lambda v: Field(kind, v))


_texts = st.text(max_size=20)
fields = st.one_of(
    *[_int_field(kind) for kind in INT_BITS],
    st.booleans().map(lambda v: Field("boolean", v)),
    st.binary(max_size=40).map(lambda b: Field("fixed", b, len(b))),
    st.tuples(st.binary(max_size=40), st.integers(0, 10)).map(
        lambda t: Field("blob", t[0], len(t[0]) + t[1])
    ),
    st.tuples(_texts, st.integers(0, 10)).map(
        lambda t: Field("text", t[0], len(t[0].encode("utf-8")) + t[1])
    ),
)
schemas = st.lists(fields, max_size=12)


@settings(max_examples=200, deadline=None)
@given(schema=schemas)
def test_any_field_sequence_round_trips(schema: list[Field]) -> None:
    """Reading back with the same schema gives exactly the written values and consumes every
    byte."""
    assert _decode(_encode(schema), schema) == [field.value for field in schema]


@settings(max_examples=100, deadline=None)
@given(schema=schemas)
def test_every_truncation_is_refused(schema: list[Field]) -> None:
    """Each proper prefix of a valid encoding is MalformedEncoding for the same schema."""
    data = _encode(schema)
    for end in range(len(data)):
        with pytest.raises(MalformedEncoding):
            _decode(data[:end], schema)


@settings(max_examples=100, deadline=None)
@given(schema=schemas, extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_refused(schema: list[Field], extra: bytes) -> None:
    """finish() refuses any byte after the last field."""
    with pytest.raises(MalformedEncoding, match="trailing"):
        _decode(_encode(schema) + extra, schema)


@settings(max_examples=300, deadline=None)
@given(schema=schemas, noise=st.binary(max_size=80), edit=st.data())
def test_arbitrary_or_mutated_bytes_parse_or_raise_only_malformed_encoding(
    schema: list[Field], noise: bytes, edit: st.DataObject
) -> None:
    """Fuzz: random bytes, and a valid encoding with one byte replaced, either parse or raise
    MalformedEncoding; struct.error, IndexError and UnicodeDecodeError never escape."""
    valid = _encode(schema)
    candidates = [noise]
    if valid:
        position = edit.draw(st.integers(0, len(valid) - 1))
        value = edit.draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xC0, 0xFF]))
        candidates.append(valid[:position] + bytes((value,)) + valid[position + 1 :])
    for data in candidates:
        with contextlib.suppress(MalformedEncoding):
            _decode(data, schema)


def test_integers_are_fixed_width_big_endian_and_blobs_u32_prefixed() -> None:
    """The layout itself (signatures depend on it): big-endian fixed-width integers, booleans as
    one byte, u32 length prefixes, fixed fields and raw bytes without prefix."""
    data = (
        Writer()
        .u8(1)
        .u16(0x0203)
        .u32(0x04050607)
        .u64(0x08090A0B0C0D0E0F)
        .boolean(True)
        .boolean(False)
        .fixed(b"ab", 2)
        .blob(b"cd", 2)
        .text("é", 2)
        .raw(b"\xff")
        .to_bytes()
    )
    assert data.hex() == ("0102030405060708090a0b0c0d0e0f0100616200000002636400000002c3a9ff")


@pytest.mark.parametrize("value", [v for v in range(256) if v not in (0, 1)])
def test_booleans_other_than_0_and_1_are_refused(value: int) -> None:
    """A boolean byte of 2..255 is MalformedEncoding (two encodings of "true" would not be
    canonical)."""
    with pytest.raises(MalformedEncoding, match="boolean"):
        Reader(bytes((value,)), "flag").boolean()


@pytest.mark.parametrize(
    "bad_utf8",
    [
        b"\xff",
        b"\xc0\x80",  # overlong NUL
        b"\xe0\x80\xaf",  # overlong "/"
        b"\xed\xa0\x80",  # UTF-16 surrogate
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\x80",  # lone continuation byte
        b"abc\xe2\x82",  # truncated sequence
    ],
)
def test_invalid_utf8_text_is_refused(bad_utf8: bytes) -> None:
    """Text fields accept only strict UTF-8: overlongs, surrogates, out-of-range code points and
    broken sequences are MalformedEncoding."""
    data = Writer().blob(bad_utf8, 100).to_bytes()
    with pytest.raises(MalformedEncoding, match="UTF-8"):
        Reader(data, "name").text(100)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=30))
def test_text_accepts_exactly_the_valid_utf8_blobs(data: bytes) -> None:
    """For any bytes, text() succeeds iff Python's strict UTF-8 decoder does."""
    try:
        expected: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        expected = None
    reader = Reader(Writer().blob(data, 30).to_bytes(), "name")
    if expected is None:
        with pytest.raises(MalformedEncoding):
            reader.text(30)
    else:
        assert reader.text(30) == expected


def test_length_prefix_over_the_limit_is_refused() -> None:
    """A blob or text whose prefix exceeds max_len is refused even when the bytes are present."""
    data = Writer().blob(b"x" * 11, 11).to_bytes()
    with pytest.raises(MalformedEncoding, match="exceeds"):
        Reader(data, "blob").blob(10)
    with pytest.raises(MalformedEncoding, match="exceeds"):
        Reader(data, "text").text(10)
    assert Reader(data, "blob").blob(11) == b"x" * 11


def test_a_forged_huge_length_prefix_allocates_nothing() -> None:
    """A 4 GiB length prefix under a 4 GiB limit, followed by 3 bytes, is refused as truncated
    without allocating anything near its claimed size."""
    data = (0xFFFF_FFFF).to_bytes(4, "big") + b"abc"
    tracemalloc.start()
    try:
        with pytest.raises(MalformedEncoding, match="truncated"):
            Reader(data, "blob").blob(0xFFFF_FFFF)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_version_byte_must_match() -> None:
    """version(n) accepts exactly n and refuses every other leading byte."""
    Reader(b"\x01", "thing").version(1)
    for found in (0, 2, 255):
        with pytest.raises(MalformedEncoding, match="version"):
            Reader(bytes((found,)), "thing").version(1)


def test_errors_name_the_structure_being_read() -> None:
    """Every refusal starts with the `what` given to the Reader, so logs say what was malformed."""
    with pytest.raises(MalformedEncoding, match=r"^device certificate: truncated"):
        Reader(b"", "device certificate").u32()


def test_rest_returns_all_remaining_bytes() -> None:
    """rest() hands back the unread tail (for a trailing nested structure) and finish() then
    passes."""
    reader = Reader(b"\x01tail", "outer")
    assert reader.u8() == 1
    assert reader.rest() == b"tail"
    reader.finish()


def test_reader_and_writer_accept_bytes_like_and_refuse_other_types() -> None:
    """bytearray/memoryview are copied in; an int or str is a TypeError (bytes(5) would be five
    zero bytes)."""
    # Annotated as bytes; any bytes-like object is accepted at run time.
    assert Reader(bytearray(b"\x07"), "x").u8() == 7  # type: ignore[arg-type]
    writer = Writer().raw(memoryview(b"ab"))  # type: ignore[arg-type]
    assert writer.fixed(bytearray(b"c"), 1).to_bytes() == b"abc"  # type: ignore[arg-type]
    for bad in (5, "ab"):
        with pytest.raises(TypeError):
            Reader(bad, "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            Writer().raw(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "bits"), sorted(INT_BITS.items()))
def test_writer_refuses_integers_that_do_not_fit_with_value_error(kind: str, bits: int) -> None:
    """Negative or too-wide integers are ValueError (never struct.error); the bounds fit."""
    writer = Writer()
    getattr(writer, kind)(0)
    getattr(writer, kind)(2**bits - 1)
    for bad in (-1, 2**bits):
        with pytest.raises(ValueError, match="does not fit"):
            getattr(writer, kind)(bad)


def test_writer_refuses_fields_that_break_their_declared_size() -> None:
    """fixed() of the wrong size and blob()/text() above max_len are ValueError at write time, so
    nothing is ever written that the reader would refuse."""
    with pytest.raises(ValueError):
        Writer().fixed(b"abc", 2)
    with pytest.raises(ValueError):
        Writer().blob(b"abc", 2)
    with pytest.raises(ValueError):
        Writer().text("ééé", 5)


def test_negative_read_sizes_are_a_programming_error() -> None:
    """fixed(-1) is a ValueError instead of silently moving the cursor backwards."""
    reader = Reader(b"abc", "x")
    reader.fixed(2)
    with pytest.raises(ValueError):
        reader.fixed(-1)
