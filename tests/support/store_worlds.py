"""One interface over every `RelayStore` implementation, so the relay's tests run against each:
the in-memory store, SQLite (a migrated file, real WAL and synchronous=FULL) and PostgreSQL (a
schema of its own; only when MEDRELAY_TEST_POSTGRES_URL is set). SQL stores run their
transactions synchronously (no threads), so tests stay deterministic."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from medrelay.crypto.certificates import Role
from medrelay.server.policy import utc_date
from medrelay.server.relay.store import DeviceRecord, InMemoryRelayStore, QueuedItem, RelayStore
from medrelay.server.storage import accounts, care, devices, queue
from medrelay.server.storage.database import Database, SynchronousRunner, make_engine
from medrelay.server.storage.migrate import upgrade_to_head
from medrelay.server.storage.relay_store import SqlRelayStore, _queued
from medrelay.server.storage.schema import metadata

POSTGRES_URL = os.environ.get("MEDRELAY_TEST_POSTGRES_URL", "")
NO_POSTGRES = "MEDRELAY_TEST_POSTGRES_URL is not set (e.g. postgresql://postgres@127.0.0.1/test)"
STORE_KINDS = ("memory", "sqlite", "postgresql")

T = TypeVar("T")

_CODE_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
_EPOCH_MS = 1_000_000_000_000
"""Set-up rows are written at this time: before any test clock."""
_FAR_FUTURE_MS = 4_000_000_000_000


def result(d: Deferred[T]) -> T:
    """The value of an already-fired Deferred (raising its failure)."""
    outcome: list[T | Failure] = []
    d.addBoth(outcome.append)
    if not outcome:
        raise AssertionError("the Deferred has not fired")
    value = outcome[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value


class StoreWorld(Protocol):
    store: RelayStore

    def add_account(self, username: str, role: str) -> None: ...

    def add_device(self, username: str, device_id: str, *, signing_key: bytes) -> DeviceRecord: ...

    def revoke_device(self, username: str, device_id: str) -> None: ...

    def revoke_account(self, username: str) -> None: ...

    def add_care_link(self, patient: str, clinician: str, *, start_ms: int, ends_ms: int) -> None:
        """A care link created at `start_ms` (after a visit that day), ending at `ends_ms`."""

    def end_care_link(self, patient: str, clinician: str, now_ms: int) -> None:
        """End the pair's active care link early, at `now_ms`."""

    def queue_of(self, device_pk: int) -> list[QueuedItem]: ...


class MemoryWorld:
    def __init__(self) -> None:
        self.memory = InMemoryRelayStore()
        self.store: RelayStore = self.memory

    def add_account(self, username: str, role: str) -> None:
        self.memory.add_account(username, role)

    def add_device(self, username: str, device_id: str, *, signing_key: bytes) -> DeviceRecord:
        return self.memory.add_device(username, device_id, signing_key=signing_key)

    def revoke_device(self, username: str, device_id: str) -> None:
        self.memory.revoke_device(username, device_id)

    def revoke_account(self, username: str) -> None:
        self.memory.revoke_account(username)

    def add_care_link(self, patient: str, clinician: str, *, start_ms: int, ends_ms: int) -> None:
        self.memory.add_care_link(patient, clinician, start_ms=start_ms, ends_ms=ends_ms)

    def end_care_link(self, patient: str, clinician: str, now_ms: int) -> None:
        self.memory.end_care_link(patient, clinician, now_ms)

    def queue_of(self, device_pk: int) -> list[QueuedItem]:
        return self.memory.queue_of(device_pk)


class _NoThreads:
    def callFromThread(self, f: Callable[..., Any], /, *args: Any, **kw: Any) -> None:  # noqa: N802
        raise AssertionError("the synchronous runner never calls the reactor")


class SqlWorld:
    """Accounts and devices are created through the storage layer's own enrollment functions."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.db = Database(self.engine, _NoThreads(), runner=SynchronousRunner())
        self.store: RelayStore = SqlRelayStore(self.db)
        self._accounts: dict[str, int] = {}

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return result(self.db.run_interaction("test_setup", fn, *args, **kwargs))

    def add_account(self, username: str, role: str) -> None:
        self._accounts[username] = self.run(
            accounts.create_account_txn,
            username=username,
            role=role,
            display_name=f"Name of {username}",
            specialty=None,
            department=None,
            code_hash=_CODE_HASH,
            now_ms=_EPOCH_MS,
            code_expires_ms=_FAR_FUTURE_MS,
        )

    def add_device(self, username: str, device_id: str, *, signing_key: bytes) -> DeviceRecord:
        account_id = self._accounts[username]
        if self.run(accounts.get_pending_enrollment_txn, username) is None:
            self.run(
                accounts.replace_enrollment_code_txn,
                account_id,
                code_hash=_CODE_HASH,
                now_ms=_EPOCH_MS,
                expires_ms=_FAR_FUTURE_MS,
            )
        row = self.run(
            accounts.complete_enrollment_txn,
            account_id=account_id,
            identity_key=b"identity-key",
            user_certificate=b"cert",
            device_id=device_id,
            device_certificate=b"device-cert",
            signing_key=signing_key,
            signed_prekey=b"spk",
            one_time_prekeys=[],
            now_ms=_EPOCH_MS,
        )
        return DeviceRecord(
            pk=row.pk,
            username=username,
            device_id=device_id,
            role=row.role,
            certificate=row.certificate,
            signing_key=row.signing_key,
        )

    def revoke_device(self, username: str, device_id: str) -> None:
        row = self.run(devices.get_device_txn, username, device_id)
        if row is None:
            raise KeyError(f"{username}/{device_id}")
        self.run(devices.revoke_device_txn, row.pk, now_ms=_EPOCH_MS)

    def revoke_account(self, username: str) -> None:
        self.run(devices.revoke_account_txn, self._accounts[username], now_ms=_EPOCH_MS)

    def add_care_link(self, patient: str, clinician: str, *, start_ms: int, ends_ms: int) -> None:
        self.run(
            care.create_link_txn,
            patient=patient,
            clinician=clinician,
            visit_date=utc_date(start_ms),
            created_by="operator",
            actor_role=Role.ADMIN,
            now_ms=start_ms,
            ends_ms=ends_ms,
        )

    def end_care_link(self, patient: str, clinician: str, now_ms: int) -> None:
        self.run(
            care.end_link_txn,
            patient=patient,
            clinician=clinician,
            ended_by="operator",
            actor_role=Role.ADMIN,
            now_ms=now_ms,
        )

    def queue_of(self, device_pk: int) -> list[QueuedItem]:
        items = self.run(
            queue.fetch_queue_txn, device_pk, after_seq=0, limit=1_000_000, max_bytes=1 << 40
        )
        return [_queued(device_pk, item) for item in items]

    def close(self) -> None:
        self.db.close()


def sqlite_template(directory: Path) -> Path:
    """A SQLite file migrated to head (copy it per test: faster than migrating each time)."""
    path = directory / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_to_head(engine)
    engine.dispose()
    return path


def sqlite_world(template: Path, directory: Path) -> SqlWorld:
    path = directory / "relay.db"
    shutil.copyfile(template, path)
    return SqlWorld(f"sqlite:///{path}")


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh migrated schema for this test session, dropped at the end; yields its URL."""
    schema = f"medrelay_test_{secrets.token_hex(4)}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = (
        sa.make_url(POSTGRES_URL)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        upgrade_to_head(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def postgres_world(url: str) -> SqlWorld:
    """A world on the session's schema, emptied first."""
    world = SqlWorld(url)
    with world.engine.begin() as conn:
        names = ", ".join(table.name for table in reversed(metadata.sorted_tables))
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    return world
