"""Strict parsing of the JSON bodies of the HTTP endpoints (enrollment, device linking).

One place for what every body needs: a size bound checked before parsing, exactly the expected
fields (no unknown, missing or repeated key), canonical unpadded base64url, keys in their text
form, and the prekeys a new device brings. Every refusal is a `RelayError` `invalid_field` whose
message names the field (`payload_too_large` for an oversized body).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from medrelay.crypto.errors import CryptoError
from medrelay.crypto.x3dh import OneTimePrekey, SignedPrekey
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import MAX_ONE_TIME_PREKEYS_PER_UPLOAD, MAX_PREKEY_SIZE
from medrelay.server.relay.errors import RelayError

MAX_KEY_TEXT: Final = 128
"""A key in its text form (`ed25519-v1:...`, `x25519-v1:...`) is far shorter."""

_T = TypeVar("_T")


def invalid(field: str, problem: str) -> RelayError:
    return RelayError(ErrorCode.INVALID_FIELD, f"{field}: {problem}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise invalid(str(key)[:64], "appears twice")
        result[key] = value
    return result


def parse_object(
    body: bytes, fields: Sequence[str], *, max_bytes: int, empty_is_object: bool = False
) -> dict[str, Any]:
    """The body as a JSON object with exactly `fields`; with `empty_is_object`, an empty body
    counts as `{}` (for steps that carry nothing)."""
    if len(body) > max_bytes:
        raise RelayError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"the request is larger than {max_bytes} bytes"
        )
    if not body and empty_is_object:
        body = b"{}"
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise invalid("body", "is not a JSON object") from None
    return fields_of(document, fields, "body")


def fields_of(document: object, fields: Sequence[str], what: str) -> dict[str, Any]:
    """`document` as an object with exactly `fields` (`what` names it in errors)."""
    if not isinstance(document, dict):
        raise invalid(what, "is not a JSON object")
    for key in document:
        if key not in fields:
            raise invalid(str(key)[:64], "unknown field")
    for key in fields:
        if key not in document:
            raise invalid(key, "missing")
    return document


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(value: object, field: str, max_bytes: int) -> bytes:
    """Strict unpadded base64url (one text per value), bounded before decoding."""
    if not isinstance(value, str):
        raise invalid(field, "must be a base64url string")
    if len(value) > (max_bytes * 4 + 2) // 3:
        raise invalid(field, f"longer than {max_bytes} bytes")
    try:
        data = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, binascii.Error):
        raise invalid(field, "is not base64url") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != value:
        raise invalid(field, "is not canonical unpadded base64url")
    if not data:
        raise invalid(field, "is empty")
    return data


def decoded(
    value: object, field: str, max_bytes: int, decode: Callable[[bytes], _T]
) -> tuple[_T, bytes]:
    """A base64url value decoded by one of the crypto encodings (`X.decode`), and its bytes as
    sent (what is stored and signed)."""
    data = b64url_decode(value, field, max_bytes)
    try:
        return decode(data), data
    except CryptoError as exc:
        raise invalid(field, str(exc)) from None


def key_text(value: object, field: str, parse: Callable[[str], _T], expected: str) -> _T:
    """A key in its text form; `expected` says which (`an ed25519-v1: key`)."""
    if not isinstance(value, str) or len(value) > MAX_KEY_TEXT:
        raise invalid(field, f"must be {expected}")
    try:
        return parse(value)
    except CryptoError as exc:
        raise invalid(field, str(exc)) from None


def signed_prekey(value: object, field: str = "signed_prekey") -> tuple[SignedPrekey, bytes]:
    """A signed prekey (shape only: the caller checks whose it is and its signature) and its
    bytes as sent."""
    return decoded(value, field, MAX_PREKEY_SIZE, SignedPrekey.decode)


def one_time_prekeys(value: object, field: str = "one_time_prekeys") -> tuple[bytes, ...]:
    """A list of encoded one-time prekeys, each checked to decode."""
    if not isinstance(value, list) or len(value) > MAX_ONE_TIME_PREKEYS_PER_UPLOAD:
        raise invalid(field, f"must be a list of at most {MAX_ONE_TIME_PREKEYS_PER_UPLOAD}")
    return tuple(
        decoded(item, f"{field}[{index}]", MAX_PREKEY_SIZE, OneTimePrekey.decode)[1]
        for index, item in enumerate(value)
    )
