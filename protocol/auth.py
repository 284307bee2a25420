"""The bytes a device signs to log in (the signature itself is made and checked by the crypto
layer; the protocol only defines what is signed).

The transcript binds the per-connection challenge from `welcome`, the clinic's identifier (so a
signature for one server is useless at another) and the user and device logging in. Fields are
length-prefixed so no two different tuples give the same bytes.
"""

from __future__ import annotations

import struct
from typing import Final

AUTH_CONTEXT: Final = b"MEDRELAY/v1/auth\x00"


def auth_transcript(challenge: bytes, clinic: str, user: str, device: str) -> bytes:
    parts = [challenge, clinic.encode("utf-8"), user.encode("utf-8"), device.encode("utf-8")]
    return AUTH_CONTEXT + b"".join(struct.pack(">I", len(p)) + p for p in parts)
