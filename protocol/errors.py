"""Protocol errors and their stable wire codes.

`ErrorCode` values are part of protocol v1: they appear in `error` frames and clients branch on
them, so a value is never renamed or reused. Domain errors anywhere in medrelay carry one of these
codes; HTTP status codes appear only in the HTTP adapter (`medrelay.server.transport`).

Following h11, errors split by who is at fault: `RemoteProtocolError` (the peer sent something
invalid) and `LocalProtocolError` (our own code tried to send something invalid, a bug).
`fatal` says whether the byte stream can still be trusted: a frame whose length prefix is too large
poisons the stream (fatal); a well-delimited frame with bad content does not.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Stable error codes (docs/protocol.md, "Error codes")."""

    # framing and encoding
    FRAME_TOO_LARGE = "frame_too_large"
    MALFORMED_FRAME = "malformed_frame"
    NON_CANONICAL = "non_canonical"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    UNEXPECTED_MESSAGE = "unexpected_message"
    # authentication
    NOT_AUTHENTICATED = "not_authenticated"
    AUTH_FAILED = "auth_failed"
    TOKEN_INVALID = "token_invalid"  # noqa: S105 (an error code, not a secret)
    DEVICE_REVOKED = "device_revoked"
    SESSION_REPLACED = "session_replaced"
    # enrollment
    ENROLLMENT_FAILED = "enrollment_failed"
    # authorisation and addressing
    FORBIDDEN = "forbidden"
    UNKNOWN_USER = "unknown_user"
    STALE_DEVICES = "stale_devices"
    ON_CALL_CHANGED = "on_call_changed"
    # delivery and resources
    QUEUE_FULL = "queue_full"
    ID_CONFLICT = "id_conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    SERVER_BUSY = "server_busy"
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """A protocol violation with a stable `code`.

    `rid` is the request id of the offending request when it could be read, so the error frame can
    be matched to the request; `fatal` means the connection must close.
    """

    def __init__(
        self, code: ErrorCode, message: str, *, fatal: bool = False, rid: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.rid = rid


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol."""


class LocalProtocolError(ProtocolError):
    """Our own code tried to send something the protocol does not allow (a bug)."""
