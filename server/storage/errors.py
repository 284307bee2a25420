"""The error types of medrelay.server.storage.

Store functions raise these (never a bare SQLAlchemy or driver exception for a case a caller is
expected to handle), and `Database.run_interaction` turns "the database cannot be reached or cannot
take a write right now" into `DatabaseUnavailable`. Each error that can reach a client carries the
stable wire code the relay should answer with; the others carry `INTERNAL_ERROR` because they mean
a bug or an operator mistake, not something the client did.

Messages never contain a token, a key, a message id or a password-bearing database URL.
"""

from __future__ import annotations

from medrelay.protocol.errors import ErrorCode


class StorageError(Exception):
    """Base class of every storage error."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR


class DatabaseUnavailable(StorageError):
    """The database cannot be reached, is locked beyond the busy timeout, is full, or failed to
    commit. Nothing was committed; the request may be retried."""

    code = ErrorCode.SERVER_BUSY


class StorageConfigError(StorageError):
    """The database is set up in a way the server refuses to run with (not durable, unsupported
    URL, schema not migrated). The message names the setting."""


class SchemaOutOfDate(StorageConfigError):
    """The database schema is not at the migration head (run `medrelay-server migrate`)."""


class AccountExists(StorageError):
    """An account with this username already exists (an admin operation: the admin API maps it,
    no client ever sees it)."""


class DeviceExists(StorageError):
    """The account already has a device with this device id."""

    code = ErrorCode.ENROLLMENT_FAILED


class EnrollmentConflict(StorageError):
    """The enrollment code is no longer pending (used meanwhile, expired, burned or replaced)."""

    code = ErrorCode.ENROLLMENT_FAILED


class IdConflict(StorageError):
    """The sending device already used this message id for a send with another digest."""

    code = ErrorCode.ID_CONFLICT


class QueueFull(StorageError):
    """A target device's queue is at its cap; nothing was stored. `device_pk` names the first full
    device found (for metrics and logs; the wire error names nothing)."""

    code = ErrorCode.QUEUE_FULL

    def __init__(self, device_pk: int) -> None:
        super().__init__(f"queue of device #{device_pk} is full")
        self.device_pk = device_pk


class StaleDevice(StorageError):
    """A send targets a device that is unknown or revoked (it changed after the relay checked the
    device set); nothing was stored."""

    code = ErrorCode.STALE_DEVICES

    def __init__(self, device_pk: int) -> None:
        super().__init__(f"device #{device_pk} is not an active device")
        self.device_pk = device_pk


class BlobExists(StorageError):
    """A blob with this id already exists (the caller's random id collided, or it retried)."""
