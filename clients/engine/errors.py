"""The client engine's errors: one `ClientError` type with a stable `code`, so a front end (the
CLI, the records gateway) can branch on it and print one clear line.

Codes are either the server's wire codes (`medrelay.protocol.errors.ErrorCode`, for a request the
relay refused) or the local codes of `LocalCode` (for what went wrong on this side: no profile, a
wrong passphrase, an unreachable server, a peer whose certificates do not verify...). Messages
never carry a passphrase, a token, a key or message text.
"""

from __future__ import annotations

import enum

from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.messages import DeviceRef


class LocalCode(enum.StrEnum):
    """Stable codes of failures detected by the client itself."""

    NOT_ENROLLED = "not_enrolled"
    ALREADY_ENROLLED = "already_enrolled"
    WRONG_PASSPHRASE = "wrong_passphrase"  # noqa: S105 (an error code, not a secret)
    PROFILE_CORRUPT = "profile_corrupt"
    PROFILE_LOCKED = "profile_locked"
    BAD_URL = "bad_url"
    SERVER_UNREACHABLE = "server_unreachable"
    BAD_SERVER_ANSWER = "bad_server_answer"
    PEER_UNVERIFIED = "peer_unverified"
    LOG_CONFLICT = "log_conflict"
    """The server's identity log contradicts what this device saw: a possible attack."""
    TIMEOUT = "timeout"
    CONNECTION_LOST = "connection_lost"
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ATTACHMENT_INVALID = "attachment_invalid"
    NOT_SENT = "not_sent"
    LINK_REFUSED = "link_refused"
    """A device link was refused: the digits did not match, or someone answered no."""
    CLOSED = "closed"
    RECORD_REFUSED = "record_refused"
    """A visit or thread cannot be saved in the medical record (yet): still open, no consent,
    nothing to save, or the bundle does not verify on this device."""


class ClientError(Exception):
    """A failure the user or the calling program should hear about, with a stable `code`."""

    def __init__(self, code: LocalCode | ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class RemoteError(ClientError):
    """The relay refused a request (an `error` frame, or an HTTP error body).

    `missing`/`extra` are the device sets of a `stale_devices` refusal.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        missing: tuple[DeviceRef, ...] = (),
        extra: tuple[DeviceRef, ...] = (),
    ) -> None:
        super().__init__(code, message)
        self.missing = missing
        self.extra = extra


def remote_code(code: str) -> ErrorCode:
    """The ErrorCode for a code string from the server; an unknown one (a newer server) reads as
    INTERNAL_ERROR rather than crashing the client."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL_ERROR


# Fatal login refusals: reconnecting cannot help, the user must act.
FATAL_LOGIN_CODES = frozenset({ErrorCode.AUTH_FAILED, ErrorCode.DEVICE_REVOKED})
