"""docs/protocol.md cannot drift from the code: the message tables of §6.1 (client to server) and
§6.2 (server to client) name exactly the message types of each direction, and for each type
exactly the wire keys it declares, with the same optional marks (`key`?), including the keys of
nested maps (`{u: uid, d: did, c?: ...}`). The error-code table of §9 lists exactly ErrorCode."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from protocol_strategies import wire_fields

from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.fields import ListOf, Nested, Struct
from medrelay.protocol.messages import MESSAGE_TYPES, Direction, Message

SPEC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

Keys = frozenset[tuple[str, bool]]  # (wire key, optional)


@dataclass(frozen=True)
class SpecRow:
    type_name: str
    keys: Keys
    nested: dict[str, Keys]
    answer: str | None


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def _table_rows(section: str) -> list[list[str]]:
    """Data rows of the first markdown table in `section`, cells split on unescaped pipes."""
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if set("".join(cells)) <= set("-: ") or cells[0] in ("type", "code"):
            continue  # separator or header
        rows.append(cells)
    return rows


def _split_outside_backticks(text: str, separator: str) -> list[str]:
    parts, current, quoted = [], "", False
    for char in text:
        if char == "`":
            quoted = not quoted
        if char == separator and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


_LEADING_KEYS = re.compile(r"^((?:`[a-z_]+`\??(?:,\s*)?)+)(?::|$)")
_KEY = re.compile(r"`([a-z_]+)`(\?)?")
_NESTED = re.compile(r"`\{([^`]*)\}`")
_NESTED_KEY = re.compile(r"^\s*([a-z_]+)(\?)?\s*(?::|$)")


def _parse_fields(cell: str) -> tuple[Keys, dict[str, Keys]]:
    """`rid`; `otks`: array ...; `spk`?: bytes ... -> keys with optional marks, and the keys of
    any `{...}` nested map described after them."""
    keys: set[tuple[str, bool]] = set()
    nested: dict[str, Keys] = {}
    for raw_segment in _split_outside_backticks(cell, ";"):
        segment = raw_segment.strip()
        head = _LEADING_KEYS.match(segment)
        assert head, f"cannot read the field list segment {segment!r}"
        names = [(m.group(1), m.group(2) == "?") for m in _KEY.finditer(head.group(1))]
        keys.update(names)
        block = _NESTED.search(segment)
        if block:
            inner: set[tuple[str, bool]] = set()
            for part in block.group(1).replace("\\|", "|").split(","):
                match = _NESTED_KEY.match(part)
                assert match, f"cannot read nested key {part!r} in {segment!r}"
                inner.add((match.group(1), match.group(2) == "?"))
            for name, _ in names:
                nested[name] = frozenset(inner)
    return frozenset(keys), nested


def _spec_rows(heading: str) -> dict[str, SpecRow]:
    rows = {}
    for cells in _table_rows(_section(SPEC.read_text(encoding="utf-8"), heading)):
        type_name = cells[0].strip("`")
        keys, nested = _parse_fields(cells[1])
        answer = cells[2].strip("`") if len(cells) > 2 else None
        assert type_name not in rows, f"{type_name} listed twice"
        rows[type_name] = SpecRow(type_name, keys, nested, answer)
    return rows


def _code_keys(cls: type[Struct]) -> Keys:
    return frozenset((f.key, f.optional) for f in wire_fields(cls))


def _code_nested(cls: type[Struct]) -> dict[str, Keys]:
    out = {}
    for f in wire_fields(cls):
        codec = f.codec.item if isinstance(f.codec, ListOf) else f.codec
        if isinstance(codec, Nested):
            out[f.key] = _code_keys(codec.cls)
    return out


TABLES = {
    Direction.CLIENT_TO_SERVER: "### 6.1 Client to server",
    Direction.SERVER_TO_CLIENT: "### 6.2 Server to client",
}


def _types_of(direction: Direction) -> dict[str, type[Message]]:
    return {name: cls for name, cls in MESSAGE_TYPES.items() if cls.DIRECTION is direction}


@pytest.mark.parametrize("direction", list(TABLES), ids=lambda d: d.value)
def test_each_table_lists_exactly_the_types_of_its_direction(direction: Direction) -> None:
    assert set(_spec_rows(TABLES[direction])) == set(_types_of(direction))


@pytest.mark.parametrize(
    ("direction", "type_name"),
    [(d, name) for d in TABLES for name in sorted(_types_of(d))],
    ids=lambda value: value if isinstance(value, str) else value.value,
)
def test_the_table_names_exactly_the_declared_wire_keys(
    direction: Direction, type_name: str
) -> None:
    """Top-level keys and optional marks, then each nested map's keys and marks."""
    row = _spec_rows(TABLES[direction])[type_name]
    cls = MESSAGE_TYPES[type_name]
    assert row.keys == _code_keys(cls), f"{type_name}: docs {sorted(row.keys)}"
    assert row.nested == _code_nested(cls), f"{type_name}: docs {row.nested}"


def test_every_request_answer_in_6_1_is_a_server_to_client_type() -> None:
    for row in _spec_rows(TABLES[Direction.CLIENT_TO_SERVER]).values():
        assert row.answer is not None
        if row.answer != "none":
            assert MESSAGE_TYPES[row.answer].DIRECTION is Direction.SERVER_TO_CLIENT


def test_the_error_code_table_lists_exactly_the_error_codes() -> None:
    section = _section(SPEC.read_text(encoding="utf-8"), "## 9. Error codes")
    documented = [cells[0].strip("`") for cells in _table_rows(section)]
    assert sorted(documented) == sorted(code.value for code in ErrorCode)


def test_the_parser_reads_optional_marks_and_nested_maps() -> None:
    """The parser itself, on a row shaped like the trickiest ones (so a silent misparse cannot
    make the comparisons above vacuous)."""
    keys, nested = _parse_fields(
        "`rid`?: x; `missing`?, `extra`?: arrays of `{u, d}` (for `stale_devices`); "
        '`items`: `{k: "a"\\|"b", c?: y}`'
    )
    assert keys == {("rid", True), ("missing", True), ("extra", True), ("items", False)}
    assert nested == {
        "missing": {("u", False), ("d", False)},
        "extra": {("u", False), ("d", False)},
        "items": {("k", False), ("c", True)},
    }
