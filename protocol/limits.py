"""Protocol v1 limits. The server announces its own values in `welcome`; these are the defaults
and the hard ceilings a decoder enforces. docs/protocol.md, "Limits", explains each one."""

from __future__ import annotations

from typing import Final

FRAME_HEADER_SIZE: Final = 4
MAX_FRAME_SIZE: Final = 1024 * 1024
"""Largest frame body after authentication (bytes of CBOR, not counting the 4-byte prefix)."""
MAX_UNAUTHENTICATED_FRAME_SIZE: Final = 16 * 1024
"""Before a connection authenticates only small frames are accepted (hello, auth, resume)."""
MAX_CIPHERTEXT_SIZE: Final = 256 * 1024
MAX_ENVELOPES_PER_SEND: Final = 128
MAX_DEVICES_PER_USER: Final = 16
MAX_USERS_PER_REQUEST: Final = 64
MAX_ACKS_PER_FRAME: Final = 1024
MAX_ITEMS_PER_DELIVER: Final = 256
MAX_ONE_TIME_PREKEYS_PER_UPLOAD: Final = 200
MAX_CERTIFICATE_SIZE: Final = 4096
MAX_PREKEY_SIZE: Final = 512
MAX_ID_BYTES: Final = 64
MESSAGE_ID_SIZE: Final = 16
TOKEN_SIZE: Final = 32
CHALLENGE_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
