"""Domain errors of the relay, each carrying a stable wire code.

The connection handler turns a `RelayError` into an `error` frame; the HTTP adapter maps the code
to a status. Messages are written for the person at the client and never contain secrets or
message content.
"""

from __future__ import annotations

from medrelay.protocol.errors import ErrorCode


class RelayError(Exception):
    """A request the relay refuses, with the code clients branch on."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        missing: tuple[tuple[str, str], ...] = (),
        extra: tuple[tuple[str, str], ...] = (),
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.missing = missing
        self.extra = extra
        self.fatal = fatal

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RelayError) and (
            other.code,
            other.message,
            other.missing,
            other.extra,
        ) == (self.code, self.message, self.missing, self.extra)

    def __hash__(self) -> int:
        return hash((self.code, self.message))

    def __repr__(self) -> str:
        return f"RelayError({self.code.value!r}, {self.message!r})"


def stale_devices(missing: set[tuple[str, str]], extra: set[tuple[str, str]]) -> RelayError:
    return RelayError(
        ErrorCode.STALE_DEVICES,
        "the device list is out of date; refresh it and send again",
        missing=tuple(sorted(missing)),
        extra=tuple(sorted(extra)),
    )


def unknown_user(username: str) -> RelayError:
    # The username is the requester's own input, echoed back only to them; never logged.
    return RelayError(ErrorCode.UNKNOWN_USER, f"no such user: {username}")


# Factories, not shared instances: raising one exception object again and again chains a new
# traceback onto it each time, keeping every frame it passed through alive.


def queue_full() -> RelayError:
    return RelayError(
        ErrorCode.QUEUE_FULL,
        "a recipient's device has too many undelivered messages; nothing was sent",
    )


def id_conflict() -> RelayError:
    return RelayError(
        ErrorCode.ID_CONFLICT, "this message id was already used for a different message"
    )


def server_busy() -> RelayError:
    return RelayError(
        ErrorCode.SERVER_BUSY, "the server cannot store messages right now; try again shortly"
    )
