"""The canonical binary encoding of everything medrelay.crypto signs, hashes or serialises.

Fields are written in a fixed order with fixed-width big-endian integers and u32 length prefixes,
so every value has exactly one encoding and a decoder can check it completely: a `Reader` rejects
truncation, over-long fields, invalid UTF-8, non-0/1 booleans and trailing bytes. Each structure
begins with its own version byte, written by the structure's module, not here.

(The wire protocol uses deterministic CBOR; crypto cannot depend on cbor2, and signed bytes are
easier to audit in a grammar this small.)
"""

from __future__ import annotations

import struct

from medrelay.crypto.errors import MalformedEncoding

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _as_bytes(data: object) -> bytes:
    # bytes(n) of an int is n zero bytes: refuse anything that is not already bytes-like.
    if type(data) is bytes:
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"expected bytes, got {type(data).__name__}")


class Writer:
    """Builds a canonical encoding field by field; every method returns the writer."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def _pack(self, packer: struct.Struct, value: int) -> Writer:
        try:
            self._parts.append(packer.pack(value))
        except struct.error:
            # struct.error is not a ValueError; callers should not have to know about struct.
            raise ValueError(
                f"{value!r} does not fit an unsigned {packer.size * 8}-bit field"
            ) from None
        return self

    def u8(self, value: int) -> Writer:
        return self._pack(_U8, value)

    def u16(self, value: int) -> Writer:
        return self._pack(_U16, value)

    def u32(self, value: int) -> Writer:
        return self._pack(_U32, value)

    def u64(self, value: int) -> Writer:
        return self._pack(_U64, value)

    def boolean(self, value: bool) -> Writer:
        return self.u8(1 if value else 0)

    def fixed(self, data: bytes, size: int) -> Writer:
        """Exactly `size` bytes, no length prefix."""
        data = _as_bytes(data)
        if len(data) != size:
            raise ValueError(f"expected {size} bytes, got {len(data)}")
        self._parts.append(data)
        return self

    def blob(self, data: bytes, max_len: int) -> Writer:
        """A u32 length prefix, then the bytes."""
        data = _as_bytes(data)
        if len(data) > max_len:
            raise ValueError(f"field of {len(data)} bytes exceeds its limit of {max_len}")
        self._pack(_U32, len(data))
        self._parts.append(data)
        return self

    def text(self, value: str, max_len: int) -> Writer:
        """UTF-8 bytes with a u32 length prefix; `max_len` counts bytes."""
        return self.blob(value.encode("utf-8"), max_len)

    def raw(self, data: bytes) -> Writer:
        """Bytes that are already a complete canonical encoding (a nested structure)."""
        self._parts.append(_as_bytes(data))
        return self

    def to_bytes(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Parses a canonical encoding; every failure is a `MalformedEncoding` naming `what`.

    Integers are unpacked in place (`unpack_from`) and only the bytes of a field are copied out:
    this sits on the message-receive path, where decoding signed content is a good share of the
    per-message cost.
    """

    __slots__ = ("_data", "_end", "_offset", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = _as_bytes(data)
        self._end = len(self._data)
        self._offset = 0
        self._what = what

    def _advance(self, n: int) -> int:
        """Claim the next `n` bytes; returns where they start."""
        if n < 0:
            raise ValueError("cannot read a negative number of bytes")
        start = self._offset
        end = start + n
        if end > self._end:
            raise MalformedEncoding(f"{self._what}: truncated")
        self._offset = end
        return start

    def _take(self, n: int) -> bytes:
        start = self._advance(n)
        return self._data[start : start + n]

    def u8(self) -> int:
        start = self._advance(1)
        return self._data[start]

    def u16(self) -> int:
        value: int = _U16.unpack_from(self._data, self._advance(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack_from(self._data, self._advance(4))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack_from(self._data, self._advance(8))[0]
        return value

    def boolean(self) -> bool:
        value = self.u8()
        if value not in (0, 1):
            raise MalformedEncoding(f"{self._what}: boolean field is {value}, not 0 or 1")
        return value == 1

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def blob(self, max_len: int) -> bytes:
        # The prefix is checked against the limit and then against the bytes actually present
        # (in `_take`) before anything is sliced: a forged length allocates nothing.
        length = self.u32()
        if length > max_len:
            raise MalformedEncoding(f"{self._what}: field of {length} bytes exceeds {max_len}")
        return self._take(length)

    def text(self, max_len: int) -> str:
        data = self.blob(max_len)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEncoding(f"{self._what}: text field is not valid UTF-8") from None

    def version(self, expected: int) -> None:
        """Read the leading version byte and insist on `expected`."""
        found = self.u8()
        if found != expected:
            raise MalformedEncoding(f"{self._what}: unsupported version {found}")

    def rest(self) -> bytes:
        """All remaining bytes (for a trailing nested structure)."""
        return self._take(self._end - self._offset)

    def finish(self) -> None:
        """Insist that every byte was consumed."""
        if self._offset != self._end:
            raise MalformedEncoding(
                f"{self._what}: {self._end - self._offset} unexpected trailing bytes"
            )
