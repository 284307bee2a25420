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
MAX_LOG_EVENT_SIZE: Final = 8192
"""An encoded identity-log event (its payload is one certificate or revocation)."""
MAX_USER_LOG_EVENTS: Final = 64
"""Events of one user in a `log` answer (a user's whole history: certificate, devices, ...)."""
MAX_PROOF_HASHES: Final = 64
"""Hashes in one inclusion or consistency proof (a tree of up to 2**64 leaves needs fewer)."""
MAX_LOG_SIZES: Final = 4
"""Earlier tree sizes a client may ask consistency proofs from in one `log_get`."""
MAX_CLINIC_KEYS: Final = 64
"""Clinic key certificates (current and retired issuing and log keys) in one `log` answer."""
MAX_CHECKPOINT_SIZE: Final = 4096
MAX_DIRECTORY_ENTRIES: Final = 50
"""Users in one `directory` answer."""
MAX_QUERY_BYTES: Final = 128
"""A directory query, specialty or department filter."""
MAX_NAME_BYTES: Final = 256
"""A display name, specialty or department in `account_create` (the certificate's limits)."""
MAX_HOURS_INTERVALS: Final = 100
"""Weekly opening intervals of one clinician."""
MAX_ABSENCES: Final = 100
"""Absences kept for one clinician (past ones are dropped when the list is replaced)."""
MAX_AUTOREPLY_BYTES: Final = 1000
"""An automatic-reply template (plain text)."""
MAX_EMERGENCY_NUMBERS: Final = 8
MAX_ROSTER_SHIFTS: Final = 500
"""Shifts in one `roster` answer."""
MAX_NOTICE_SIZE: Final = 4096
"""A signed clinic notice (medrelay.crypto.notices)."""
MAX_VISIT_ID_BYTES: Final = 32
"""A visit id (the server makes them: short, readable, typed by hand in the CLI)."""
MAX_INDICATION_CODE_BYTES: Final = 64
"""A teleconsultation indication's code (the clinic's configured list)."""
MAX_INDICATIONS: Final = 32
"""Indications a clinic may allow."""
MAX_VISITS: Final = 200
"""Visits in one `visits` answer (newest first)."""
