"""One conformance suite for the relay's store, run against every database it supports (in the
style of Tahoe-LAFS `test_istorageserver.py`): SQLite in a temporary file with real WAL and
synchronous=FULL, and PostgreSQL in a fresh schema of `MEDRELAY_TEST_POSTGRES_URL` (created for
this session, dropped at its end; skipped with a reason when the variable is unset).

Every test runs the store functions through `Database.run_interaction` on the synchronous runner,
so the transaction, rollback and error-mapping behaviour is the production one; only the thread is
missing. A few tests open raw connections to interleave two transactions on PostgreSQL.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from twisted.python.failure import Failure

from medrelay.server.storage import accounts, blobs, devices, prekeys, queue
from medrelay.server.storage.database import (
    Database,
    SynchronousRunner,
    make_engine,
)
from medrelay.server.storage.errors import (
    AccountExists,
    BlobExists,
    DatabaseUnavailable,
    DeviceExists,
    EnrollmentConflict,
    IdConflict,
    QueueFull,
    SchemaOutOfDate,
    StaleDevice,
    StorageConfigError,
)
from medrelay.server.storage.migrate import (
    current_revision,
    head_revision,
    is_up_to_date,
    require_up_to_date,
    upgrade_to_head,
)
from medrelay.server.storage.schema import ALL_TABLES, metadata

P = ParamSpec("P")
T = TypeVar("T")

POSTGRES_URL = os.environ.get("MEDRELAY_TEST_POSTGRES_URL")
NO_POSTGRES = "MEDRELAY_TEST_POSTGRES_URL is not set (e.g. postgresql://postgres@127.0.0.1/test)"

NOW = 1_763_884_800_000
HOUR = 3_600_000
DAY = 24 * HOUR
TTL = 30 * DAY
CAP = 3


class _NoThreads:
    """A reactor stand-in for the synchronous runner, which never calls it."""

    def callFromThread(self, callable: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        raise AssertionError("the synchronous runner must not use the reactor")


# --- databases ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once; each test gets a copy (faster than migrating)."""
    path = tmp_path_factory.mktemp("storage-template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_to_head(engine)
    engine.dispose()  # the last connection checkpoints the WAL into the main file
    return path


def _schema_url(url: str, schema: str) -> str:
    parsed = sa.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh schema for this test session, migrated to head, dropped at the end."""
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    schema = f"medrelay_storage_test_{secrets.token_hex(4)}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = _schema_url(POSTGRES_URL, schema)
    try:
        upgrade_to_head(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


@dataclass
class Store:
    """A migrated, empty database and a way to run store functions on it."""

    db: Database
    url: str

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def __call__(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn` through run_interaction (synchronous runner) and return or raise its
        outcome."""
        outcome: list[T | Failure] = []
        self.db.run_interaction("test", fn, *args, **kwargs).addBoth(outcome.append)
        (result,) = outcome
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def rows(self, table: sa.Table) -> int:
        with self.db.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        path = tmp_path / "relay.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
        database = Database(make_engine(url), _NoThreads(), runner=SynchronousRunner())
        yield Store(database, url)
        database.close()
    else:
        if not POSTGRES_URL:
            pytest.skip(NO_POSTGRES)
        engine: Engine = request.getfixturevalue("postgres_engine")
        with engine.begin() as conn:
            names = ", ".join(table.name for table in ALL_TABLES)
            conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        # The engine is shared by the session: this Database is not closed.
        yield Store(
            Database(engine, _NoThreads(), runner=SynchronousRunner()),
            request.getfixturevalue("postgres_url"),
        )


# --- test data ----------------------------------------------------------------------------------

CODE_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"


def make_account(
    store: Store, username: str, *, role: str = "doctor", code_expires_ms: int = NOW + DAY
) -> int:
    return store(
        accounts.create_account_txn,
        username=username,
        role=role,
        display_name=f"Name of {username}",
        specialty="therapy" if role == "doctor" else None,
        department=None,
        code_hash=CODE_HASH,
        now_ms=NOW,
        code_expires_ms=code_expires_ms,
    )


def enroll(
    store: Store,
    account_id: int,
    device_id: str,
    *,
    otks: int = 3,
    now_ms: int = NOW,
) -> devices.DeviceRow:
    """Enroll a device (a second device re-issues a code first)."""
    if store(accounts.get_pending_enrollment_txn, _username(store, account_id)) is None:
        store(
            accounts.replace_enrollment_code_txn,
            account_id,
            code_hash=CODE_HASH,
            now_ms=now_ms,
            expires_ms=now_ms + DAY,
        )
    return store(
        accounts.complete_enrollment_txn,
        account_id=account_id,
        identity_key=b"ik-%d" % account_id,
        user_certificate=b"user-cert-%d" % account_id,
        device_id=device_id,
        device_certificate=f"cert-{device_id}".encode(),
        signing_key=device_id.encode().ljust(32, b"\0"),
        signed_prekey=f"spk-{device_id}".encode(),
        one_time_prekeys=[f"otk-{device_id}-{i}".encode() for i in range(otks)],
        now_ms=now_ms,
    )


def _username(store: Store, account_id: int) -> str:
    def txn(conn: Connection) -> str:
        return str(
            conn.execute(
                sa.text("SELECT username FROM accounts WHERE pk = :pk"), {"pk": account_id}
            ).scalar_one()
        )

    return store(txn)


@dataclass
class People:
    alice_id: int
    bob_id: int
    alice_phone: devices.DeviceRow
    alice_laptop: devices.DeviceRow
    bob_phone: devices.DeviceRow


def people(store: Store) -> People:
    alice_id = make_account(store, "dr.alice")
    bob_id = make_account(store, "bob", role="patient")
    phone = enroll(store, alice_id, "phone")
    laptop = enroll(store, alice_id, "laptop")
    bob_phone = enroll(store, bob_id, "bphone")
    return People(alice_id, bob_id, phone, laptop, bob_phone)


def send(
    store: Store,
    sender: devices.DeviceRow,
    targets: list[tuple[int, bytes]],
    *,
    message_id: bytes = b"m" * 16,
    digest: bytes = b"d" * 32,
    now_ms: int = NOW,
    cap: int = CAP,
) -> queue.StoredMessage:
    return store(
        queue.store_message_txn,
        sender_device_pk=sender.pk,
        sender_username=sender.username,
        sender_device_id=sender.device_id,
        message_id=message_id,
        digest=digest,
        targets=targets,
        now_ms=now_ms,
        expires_ms=now_ms + TTL,
        queue_cap=cap,
    )


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def fetch(store: Store, device_pk: int, **kwargs: int) -> list[queue.QueueItem]:
    options = {"after_seq": 0, "limit": 256, "max_bytes": 1 << 20, **kwargs}
    return store(queue.fetch_queue_txn, device_pk, **options)


# --- schema and migrations ----------------------------------------------------------------------


def test_migrated_schema_equals_metadata(store: Store) -> None:
    """A database migrated to head has exactly the tables, columns, types, keys and indexes of
    schema.metadata (Alembic's autogenerate comparison finds nothing to do)."""
    with store.db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
    assert current_revision(store.db.engine) == head_revision()
    assert is_up_to_date(store.url)


def test_unmigrated_database_is_refused(tmp_path: Path) -> None:
    """A database never migrated reports no revision, and the startup check refuses it naming
    the command to run; upgrading twice is harmless."""
    url = f"sqlite:///{tmp_path / 'new' / 'relay.db'}"
    assert current_revision(url) is None
    assert not is_up_to_date(url)
    with pytest.raises(SchemaOutOfDate, match="medrelay-server migrate"):
        require_up_to_date(url)
    upgrade_to_head(url)
    upgrade_to_head(url)
    require_up_to_date(url)


# --- durability ---------------------------------------------------------------------------------


def _result(d: Any) -> Any:
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


def test_durability_check_accepts_the_relay_settings(store: Store) -> None:
    """With the relay's own connection settings both databases pass the durability check."""
    assert _result(store.db.check_durability()) is None


def _sqlite_with(path: Path, *pragmas: str) -> Database:
    engine = sa.create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: object) -> None:
        for pragma in pragmas:
            dbapi_connection.execute(pragma)

    return Database(engine, _NoThreads(), runner=SynchronousRunner())


def test_sqlite_synchronous_normal_is_refused(tmp_path: Path) -> None:
    """WAL with synchronous=NORMAL can lose the last commits on power loss: refused, naming the
    setting."""
    db = _sqlite_with(tmp_path / "x.db", "PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL")
    with pytest.raises(StorageConfigError, match="synchronous"):
        _result(db.check_durability())
    db.close()


def test_sqlite_without_wal_is_refused(tmp_path: Path) -> None:
    """A rollback-journal database is refused, naming journal_mode (so is an in-memory one)."""
    db = _sqlite_with(tmp_path / "x.db", "PRAGMA journal_mode=DELETE", "PRAGMA synchronous=FULL")
    with pytest.raises(StorageConfigError, match="journal_mode"):
        _result(db.check_durability())
    db.close()
    memory = Database(make_engine("sqlite://"), _NoThreads(), runner=SynchronousRunner())
    with pytest.raises(StorageConfigError, match="journal_mode"):
        _result(memory.check_durability())
    memory.close()


def test_postgres_synchronous_commit_off_is_refused(postgres_url: str) -> None:
    """synchronous_commit=off acknowledges commits before they are flushed: refused."""
    engine = sa.create_engine(
        sa.make_url(postgres_url).set(drivername="postgresql+psycopg"),
        connect_args={"options": "-c synchronous_commit=off"},
    )
    db = Database(engine, _NoThreads(), runner=SynchronousRunner())
    with pytest.raises(StorageConfigError, match="synchronous_commit"):
        _result(db.check_durability())
    db.close()


# --- accounts and enrollment --------------------------------------------------------------------


def test_account_is_created_with_a_pending_code(store: Store) -> None:
    """create_account stores the profile and a pending code; the account is not enrolled yet."""
    account_id = make_account(store, "dr.ivanova")
    account = store(accounts.get_account_txn, "dr.ivanova")
    assert account is not None
    assert account.pk == account_id
    assert (account.role, account.display_name, account.specialty, account.department) == (
        "doctor",
        "Name of dr.ivanova",
        "therapy",
        None,
    )
    assert account.active and not account.enrolled and account.created_ms == NOW
    pending = store(accounts.get_pending_enrollment_txn, "dr.ivanova")
    assert pending == accounts.EnrollmentRow(
        account_id=account_id,
        username="dr.ivanova",
        role="doctor",
        code_hash=CODE_HASH,
        created_ms=NOW,
        expires_ms=NOW + DAY,
        failed_attempts=0,
    )
    assert store(accounts.get_account_txn, "nobody") is None
    assert store(accounts.get_pending_enrollment_txn, "nobody") is None


def test_duplicate_username_is_refused(store: Store) -> None:
    """A second account with a taken username raises AccountExists and changes nothing."""
    make_account(store, "dr.ivanova")
    with pytest.raises(AccountExists):
        make_account(store, "dr.ivanova", role="nurse")
    account = store(accounts.get_account_txn, "dr.ivanova")
    assert account is not None and account.role == "doctor"
    assert store.rows(metadata.tables["accounts"]) == 1


def test_enrollment_records_everything_and_uses_the_code(store: Store) -> None:
    """Enrollment stores the identity key, user certificate, device, signed prekey and one-time
    prekeys, and the code is no longer pending; using it again is refused."""
    account_id = make_account(store, "dr.ivanova")
    device = enroll(store, account_id, "phone", otks=5)
    assert device == devices.DeviceRow(
        pk=device.pk,
        account_id=account_id,
        username="dr.ivanova",
        role="doctor",
        device_id="phone",
        certificate=b"cert-phone",
        signing_key=b"phone".ljust(32, b"\0"),
        created_ms=NOW,
        revoked=False,
    )
    account = store(accounts.get_account_txn, "dr.ivanova")
    assert account is not None and account.enrolled
    assert (account.identity_key, account.user_certificate) == (
        b"ik-%d" % account_id,
        b"user-cert-%d" % account_id,
    )
    assert store(prekeys.one_time_prekey_count_txn, device.pk) == 5
    assert store(accounts.get_pending_enrollment_txn, "dr.ivanova") is None
    with pytest.raises(EnrollmentConflict):
        store(
            accounts.complete_enrollment_txn,
            account_id=account_id,
            identity_key=b"ik2",
            user_certificate=b"uc2",
            device_id="tablet",
            device_certificate=b"c",
            signing_key=b"k" * 32,
            signed_prekey=b"s",
            one_time_prekeys=[],
            now_ms=NOW + 1,
        )
    assert [d.device_id for d in store(devices.list_devices_txn, "dr.ivanova")] == ["phone"]


def _enrollment_state(store: Store) -> tuple[int, int, int]:
    return (
        store.rows(metadata.tables["devices"]),
        store.rows(metadata.tables["signed_prekeys"]),
        store.rows(metadata.tables["one_time_prekeys"]),
    )


def test_expired_code_is_refused_and_nothing_is_created(store: Store) -> None:
    """At or after its expiry a code cannot complete an enrollment; no device, key or prekey is
    left behind and the account stays unenrolled."""
    account_id = make_account(store, "dr.ivanova", code_expires_ms=NOW + HOUR)
    with pytest.raises(EnrollmentConflict):
        enroll(store, account_id, "phone", now_ms=NOW + HOUR)
    assert _enrollment_state(store) == (0, 0, 0)
    account = store(accounts.get_account_txn, "dr.ivanova")
    assert account is not None and not account.enrolled


def test_enrollment_is_atomic_when_a_late_step_fails(store: Store) -> None:
    """A failure after the code was consumed (here: an invalid one-time prekey, the last thing
    written) rolls everything back: the code is still pending and nothing was created."""
    account_id = make_account(store, "dr.ivanova")
    with pytest.raises(sa.exc.IntegrityError):
        store(
            accounts.complete_enrollment_txn,
            account_id=account_id,
            identity_key=b"ik",
            user_certificate=b"uc",
            device_id="phone",
            device_certificate=b"c",
            signing_key=b"k" * 32,
            signed_prekey=b"s",
            one_time_prekeys=[b"ok", None],  # type: ignore[list-item]
            now_ms=NOW,
        )
    assert _enrollment_state(store) == (0, 0, 0)
    assert store(accounts.get_pending_enrollment_txn, "dr.ivanova") is not None
    account = store(accounts.get_account_txn, "dr.ivanova")
    assert account is not None and not account.enrolled


def test_existing_device_id_is_refused_before_the_code_is_used(store: Store) -> None:
    """Re-enrolling a device id the account already has raises DeviceExists and leaves the new
    code pending."""
    account_id = make_account(store, "dr.ivanova")
    enroll(store, account_id, "phone")
    store(
        accounts.replace_enrollment_code_txn,
        account_id,
        code_hash=CODE_HASH,
        now_ms=NOW,
        expires_ms=NOW + DAY,
    )
    with pytest.raises(DeviceExists):
        enroll(store, account_id, "phone")
    assert store(accounts.get_pending_enrollment_txn, "dr.ivanova") is not None


def test_wrong_codes_are_counted_and_burn_the_code(store: Store) -> None:
    """Each failure is counted; at max_attempts the code is burned: no longer pending, and it
    cannot complete an enrollment even with the right code."""
    account_id = make_account(store, "dr.ivanova")
    counts = [
        store(accounts.record_enrollment_failure_txn, account_id, max_attempts=3) for _ in range(3)
    ]
    assert counts == [1, 2, 3]
    assert store(accounts.get_pending_enrollment_txn, "dr.ivanova") is None
    with pytest.raises(EnrollmentConflict):
        store(
            accounts.complete_enrollment_txn,
            account_id=account_id,
            identity_key=b"ik",
            user_certificate=b"uc",
            device_id="phone",
            device_certificate=b"c",
            signing_key=b"k" * 32,
            signed_prekey=b"s",
            one_time_prekeys=[],
            now_ms=NOW,
        )
    # Further failures change nothing; an account without any code reports 0.
    assert store(accounts.record_enrollment_failure_txn, account_id, max_attempts=3) == 3
    assert store(accounts.record_enrollment_failure_txn, 999_999, max_attempts=3) == 0


def test_replacing_the_code_resets_it(store: Store) -> None:
    """A new code replaces the old one (new hash and expiry, no failed attempts), so an account
    never has two pending codes; a burned account can be given a fresh code."""
    account_id = make_account(store, "dr.ivanova")
    for _ in range(3):
        store(accounts.record_enrollment_failure_txn, account_id, max_attempts=3)
    store(
        accounts.replace_enrollment_code_txn,
        account_id,
        code_hash="$argon2id$new",
        now_ms=NOW + HOUR,
        expires_ms=NOW + 2 * DAY,
    )
    pending = store(accounts.get_pending_enrollment_txn, "dr.ivanova")
    assert pending is not None
    assert (pending.code_hash, pending.created_ms, pending.expires_ms, pending.failed_attempts) == (
        "$argon2id$new",
        NOW + HOUR,
        NOW + 2 * DAY,
        0,
    )
    assert store.rows(metadata.tables["enrollment_codes"]) == 1


# --- devices and sessions -----------------------------------------------------------------------


def test_device_lookup_lists_and_sets(store: Store) -> None:
    """get_device finds any device (revoked flagged); list_devices and device_sets show active
    devices only; unknown users are absent and an account without devices maps to {}."""
    p = people(store)
    make_account(store, "dr.new")
    assert store(devices.get_device_txn, "dr.alice", "laptop") == p.alice_laptop
    assert store(devices.get_device_txn, "dr.alice", "tablet") is None
    assert store(devices.get_device_txn, "bob", "laptop") is None
    assert [d.device_id for d in store(devices.list_devices_txn, "dr.alice")] == [
        "phone",
        "laptop",
    ]
    assert store(devices.device_sets_txn, ["dr.alice", "bob", "dr.new", "ghost"]) == {
        "dr.alice": {"phone": p.alice_phone.pk, "laptop": p.alice_laptop.pk},
        "bob": {"bphone": p.bob_phone.pk},
        "dr.new": {},
    }
    assert store(devices.revoke_device_txn, p.alice_laptop.pk, now_ms=NOW + 1) is True
    assert store(devices.revoke_device_txn, p.alice_laptop.pk, now_ms=NOW + 2) is False
    revoked = store(devices.get_device_txn, "dr.alice", "laptop")
    assert revoked is not None and revoked.revoked
    assert [d.device_id for d in store(devices.list_devices_txn, "dr.alice")] == ["phone"]
    assert store(devices.device_sets_txn, ["dr.alice"]) == {"dr.alice": {"phone": p.alice_phone.pk}}
    assert store(devices.device_sets_txn, []) == {}
    assert store(accounts.account_roles_txn, ["dr.alice", "bob", "ghost"]) == {
        "dr.alice": "doctor",
        "bob": "patient",
    }
    store(devices.revoke_account_txn, p.bob_id, now_ms=NOW)
    assert store(accounts.account_roles_txn, ["dr.alice", "bob"]) == {"dr.alice": "doctor"}
    assert store(accounts.account_roles_txn, []) == {}


def test_sessions_are_found_by_digest_until_expiry_or_revocation(store: Store) -> None:
    """A session resolves to its device until it expires, or until the device is revoked;
    delete_expired_sessions removes exactly the expired ones."""
    p = people(store)
    for token, device, expires in [
        (b"a" * 32, p.alice_phone, NOW + HOUR),
        (b"b" * 32, p.alice_laptop, NOW + DAY),
        (b"c" * 32, p.bob_phone, NOW + DAY),
    ]:
        store(
            devices.create_session_txn,
            device_pk=device.pk,
            token_hash=token,
            now_ms=NOW,
            expires_ms=expires,
        )
    assert store(devices.get_session_txn, b"a" * 32, NOW) == p.alice_phone
    assert store(devices.get_session_txn, b"a" * 32, NOW + HOUR) is None
    assert store(devices.get_session_txn, b"x" * 32, NOW) is None
    store(devices.revoke_device_txn, p.alice_laptop.pk, now_ms=NOW)
    assert store(devices.get_session_txn, b"b" * 32, NOW) is None
    assert store(devices.delete_expired_sessions_txn, NOW + HOUR) == 1
    assert store(devices.get_session_txn, b"c" * 32, NOW + HOUR) == p.bob_phone


def test_revoking_an_account_revokes_its_devices(store: Store) -> None:
    """A revoked account disappears from device sets and bundles, its sessions stop working,
    and the revoked device pks are returned so live connections can be closed."""
    p = people(store)
    store(
        devices.create_session_txn,
        device_pk=p.alice_phone.pk,
        token_hash=b"a" * 32,
        now_ms=NOW,
        expires_ms=NOW + DAY,
    )
    revoked = store(devices.revoke_account_txn, p.alice_id, now_ms=NOW)
    assert revoked == sorted([p.alice_phone.pk, p.alice_laptop.pk])
    assert store(devices.get_session_txn, b"a" * 32, NOW) is None
    assert store(devices.device_sets_txn, ["dr.alice", "bob"]) == {
        "bob": {"bphone": p.bob_phone.pk}
    }
    assert store(prekeys.take_bundles_txn, "dr.alice") is None
    account = store(accounts.get_account_txn, "dr.alice")
    assert account is not None and account.status == "revoked"


# --- prekeys ------------------------------------------------------------------------------------


def test_one_time_prekeys_are_served_once_oldest_first(store: Store) -> None:
    """Each bundle takes one one-time prekey per device (oldest first) and removes it; when a
    device runs out its bundle carries None; the remaining count goes down."""
    p = people(store)
    assert store(prekeys.add_one_time_prekeys_txn, p.bob_phone.pk, [b"extra"]) == 4
    served = []
    for expected_remaining in (3, 2, 1, 0, 0):
        bundle = store(prekeys.take_bundles_txn, "bob")
        assert bundle is not None
        (device,) = bundle.devices
        assert device.remaining == expected_remaining
        served.append(device.one_time_prekey)
    assert served == [b"otk-bphone-0", b"otk-bphone-1", b"otk-bphone-2", b"extra", None]


def test_bundle_contents(store: Store) -> None:
    """A bundle has the user certificate and, per active device in enrollment order, its id,
    pk, certificate and current signed prekey; unknown and unenrolled users have none."""
    p = people(store)
    store(prekeys.set_signed_prekey_txn, p.alice_laptop.pk, b"spk-new", NOW + 1)
    bundle = store(prekeys.take_bundles_txn, "dr.alice")
    assert bundle is not None
    assert bundle.username == "dr.alice"
    assert bundle.user_certificate == b"user-cert-%d" % p.alice_id
    assert [
        (d.device_id, d.device_pk, d.certificate, d.signed_prekey, d.one_time_prekey)
        for d in bundle.devices
    ] == [
        ("phone", p.alice_phone.pk, b"cert-phone", b"spk-phone", b"otk-phone-0"),
        ("laptop", p.alice_laptop.pk, b"cert-laptop", b"spk-new", b"otk-laptop-0"),
    ]
    store(devices.revoke_device_txn, p.alice_laptop.pk, now_ms=NOW)
    bundle = store(prekeys.take_bundles_txn, "dr.alice")
    assert bundle is not None and [d.device_id for d in bundle.devices] == ["phone"]
    make_account(store, "dr.new")
    assert store(prekeys.take_bundles_txn, "dr.new") is None
    assert store(prekeys.take_bundles_txn, "ghost") is None


def test_concurrent_takers_get_different_one_time_prekeys(store: Store) -> None:
    """Two transactions taking bundles at the same time (neither committed yet) never get the
    same one-time prekey, and neither waits for the other (PostgreSQL: SKIP LOCKED)."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite has a single writer: takers cannot overlap")
    p = people(store)
    engine = store.db.engine
    with engine.connect() as first, engine.connect() as second:
        first.exec_driver_sql("SET lock_timeout = '2s'")
        second.exec_driver_sql("SET lock_timeout = '2s'")
        a = prekeys.take_bundles_txn(first, "bob")
        b = prekeys.take_bundles_txn(second, "bob")
        first.commit()
        second.commit()
    assert a is not None and b is not None
    assert a.devices[0].one_time_prekey == b"otk-bphone-0"
    assert b.devices[0].one_time_prekey == b"otk-bphone-1"
    assert store(prekeys.one_time_prekey_count_txn, p.bob_phone.pk) == 1


# --- sending ------------------------------------------------------------------------------------


def test_store_queues_one_item_per_device(store: Store) -> None:
    """A send queues its envelope for every target device with increasing seqs, and each
    device's fetch shows the sender, id, time and its own ciphertext."""
    p = people(store)
    stored = send(store, p.alice_phone, [(p.bob_phone.pk, b"to bob"), (p.alice_laptop.pk, b"me")])
    assert not stored.duplicate and stored.time_ms == NOW
    assert set(stored.seqs) == {p.bob_phone.pk, p.alice_laptop.pk}
    (item,) = fetch(store, p.bob_phone.pk)
    assert item == queue.QueueItem(
        seq=stored.seqs[p.bob_phone.pk],
        kind="msg",
        message_id=b"m" * 16,
        time_ms=NOW,
        peer_user="dr.alice",
        peer_device="phone",
        ciphertext=b"to bob",
    )
    assert [i.ciphertext for i in fetch(store, p.alice_laptop.pk)] == [b"me"]
    assert fetch(store, p.alice_phone.pk) == []
    assert store(queue.queue_depth_txn, p.bob_phone.pk) == 1
    second = send(store, p.alice_phone, [(p.bob_phone.pk, b"again")], message_id=mid(2))
    assert second.seqs[p.bob_phone.pk] > stored.seqs[p.bob_phone.pk]


def test_resend_is_idempotent(store: Store) -> None:
    """The same sender device, id and digest again returns the original time and stores
    nothing new."""
    p = people(store)
    first = send(store, p.alice_phone, [(p.bob_phone.pk, b"hi")])
    again = send(store, p.alice_phone, [(p.bob_phone.pk, b"hi")], now_ms=NOW + 5000)
    assert again == queue.StoredMessage(duplicate=True, time_ms=first.time_ms)
    assert len(fetch(store, p.bob_phone.pk)) == 1
    assert store(queue.queue_depth_txn, p.bob_phone.pk) == 1
    # The id is per sending device: another device may use the same id.
    other = send(store, p.alice_laptop, [(p.bob_phone.pk, b"hi")])
    assert not other.duplicate


def test_same_id_with_another_digest_is_a_conflict(store: Store) -> None:
    """Reusing an id for a different send raises IdConflict and stores nothing."""
    p = people(store)
    send(store, p.alice_phone, [(p.bob_phone.pk, b"hi")])
    with pytest.raises(IdConflict):
        send(store, p.alice_phone, [(p.alice_laptop.pk, b"other")], digest=b"e" * 32)
    assert fetch(store, p.alice_laptop.pk) == []
    assert store.rows(metadata.tables["messages"]) == 1


def test_full_queue_refuses_the_whole_send(store: Store) -> None:
    """If any target is at the cap, QueueFull names it and nothing is stored for any target
    (not even the message id: the same send succeeds once the queue drains)."""
    p = people(store)
    for n in range(CAP):
        send(store, p.alice_phone, [(p.bob_phone.pk, b"x")], message_id=mid(n))
    targets = [(p.alice_laptop.pk, b"copy"), (p.bob_phone.pk, b"x")]
    with pytest.raises(QueueFull) as refused:
        send(store, p.alice_phone, targets, message_id=mid(99))
    assert refused.value.device_pk == p.bob_phone.pk
    assert fetch(store, p.alice_laptop.pk) == []
    assert store(queue.queue_depth_txn, p.alice_laptop.pk) == 0
    assert store(queue.queue_depth_txn, p.bob_phone.pk) == CAP
    assert store.rows(metadata.tables["messages"]) == CAP
    first = fetch(store, p.bob_phone.pk)[0]
    assert store(queue.ack_txn, p.bob_phone.pk, [first.seq]) == 1
    assert not send(store, p.alice_phone, targets, message_id=mid(99)).duplicate


def test_resend_to_a_full_queue_is_still_a_duplicate(store: Store) -> None:
    """A resend of a stored message answers 'duplicate' even when a target's queue has filled
    up since (the client must get its 'sent', not queue_full)."""
    p = people(store)
    first = send(store, p.alice_phone, [(p.bob_phone.pk, b"x")], message_id=mid(0))
    for n in range(1, CAP):
        send(store, p.alice_phone, [(p.bob_phone.pk, b"x")], message_id=mid(n))
    again = send(store, p.alice_phone, [(p.bob_phone.pk, b"x")], message_id=mid(0))
    assert again == queue.StoredMessage(duplicate=True, time_ms=first.time_ms)


def test_send_to_a_revoked_device_is_refused(store: Store) -> None:
    """A target revoked after the relay checked the device set raises StaleDevice; nothing is
    stored for the other targets."""
    p = people(store)
    store(devices.revoke_device_txn, p.alice_laptop.pk, now_ms=NOW)
    with pytest.raises(StaleDevice) as refused:
        send(store, p.alice_phone, [(p.bob_phone.pk, b"a"), (p.alice_laptop.pk, b"b")])
    assert refused.value.device_pk == p.alice_laptop.pk
    assert fetch(store, p.bob_phone.pk) == []
    with pytest.raises(StaleDevice):
        send(store, p.alice_phone, [(987_654, b"a")], message_id=mid(5))


def test_multi_device_store_is_atomic_under_a_fault(store: Store) -> None:
    """A fault after the queue rows were written but before commit leaves no message, no queue
    row and no count change for any device (D10)."""
    p = people(store)

    def store_then_fail(conn: Connection) -> None:
        queue.store_message_txn(
            conn,
            sender_device_pk=p.alice_phone.pk,
            sender_username="dr.alice",
            sender_device_id="phone",
            message_id=b"m" * 16,
            digest=b"d" * 32,
            targets=[(p.bob_phone.pk, b"a"), (p.alice_laptop.pk, b"b")],
            now_ms=NOW,
            expires_ms=NOW + TTL,
            queue_cap=CAP,
        )
        raise RuntimeError("injected fault before commit")

    with pytest.raises(RuntimeError, match="injected"):
        store(store_then_fail)
    assert store.rows(metadata.tables["queue_items"]) == 0
    assert store.rows(metadata.tables["messages"]) == 0
    assert store(queue.queue_depth_txn, p.bob_phone.pk) == 0
    assert store(queue.queue_depth_txn, p.alice_laptop.pk) == 0


def test_savepoints_isolate_sends_in_one_transaction(store: Store) -> None:
    """Group commit: several sends and acks in ONE transaction, each in a SAVEPOINT; a refused
    send rolls back only its own savepoint and the others commit."""
    p = people(store)
    for n in range(CAP):
        send(store, p.alice_phone, [(p.bob_phone.pk, b"fill")], message_id=mid(100 + n))
    fill = [item.seq for item in fetch(store, p.bob_phone.pk)]

    def group(conn: Connection) -> list[str]:
        outcomes = []
        operations: list[Callable[[], object]] = [
            lambda: queue.store_message_txn(
                conn,
                sender_device_pk=p.bob_phone.pk,
                sender_username="bob",
                sender_device_id="bphone",
                message_id=mid(1),
                digest=b"1" * 32,
                targets=[(p.alice_phone.pk, b"a1"), (p.alice_laptop.pk, b"l1")],
                now_ms=NOW,
                expires_ms=NOW + TTL,
                queue_cap=CAP,
            ),
            lambda: queue.store_message_txn(  # refused: bob's queue is full
                conn,
                sender_device_pk=p.alice_phone.pk,
                sender_username="dr.alice",
                sender_device_id="phone",
                message_id=mid(2),
                digest=b"2" * 32,
                targets=[(p.alice_laptop.pk, b"l2"), (p.bob_phone.pk, b"b2")],
                now_ms=NOW,
                expires_ms=NOW + TTL,
                queue_cap=CAP,
            ),
            lambda: queue.ack_txn(conn, p.bob_phone.pk, fill[:1]),
            lambda: queue.store_message_txn(
                conn,
                sender_device_pk=p.alice_laptop.pk,
                sender_username="dr.alice",
                sender_device_id="laptop",
                message_id=mid(3),
                digest=b"3" * 32,
                targets=[(p.bob_phone.pk, b"b3"), (p.alice_phone.pk, b"a3")],
                now_ms=NOW,
                expires_ms=NOW + TTL,
                queue_cap=CAP,
            ),
        ]
        for operation in operations:
            try:
                with conn.begin_nested():
                    operation()
                outcomes.append("ok")
            except QueueFull:
                outcomes.append("queue_full")
        return outcomes

    assert store(group) == ["ok", "queue_full", "ok", "ok"]
    assert [i.ciphertext for i in fetch(store, p.alice_phone.pk)] == [b"a1", b"a3"]
    assert [i.ciphertext for i in fetch(store, p.alice_laptop.pk)] == [b"l1"]
    assert [i.ciphertext for i in fetch(store, p.bob_phone.pk)] == [b"fill", b"fill", b"b3"]
    assert [store(queue.queue_depth_txn, d.pk) for d in (p.alice_phone, p.alice_laptop)] == [2, 1]
    assert store(queue.queue_depth_txn, p.bob_phone.pk) == CAP
    assert store.rows(metadata.tables["messages"]) == CAP + 2


def test_concurrent_stores_to_one_device_are_serialised(store: Store) -> None:
    """On PostgreSQL a second transaction storing to a device waits for the first one's commit
    (the device row lock), so per device seq order is commit order."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite has a single writer")
    p = people(store)
    engine = store.db.engine

    def store_in(conn: Connection, n: int) -> queue.StoredMessage:
        return queue.store_message_txn(
            conn,
            sender_device_pk=p.alice_phone.pk,
            sender_username="dr.alice",
            sender_device_id="phone",
            message_id=mid(n),
            digest=b"d" * 32,
            targets=[(p.bob_phone.pk, b"x")],
            now_ms=NOW,
            expires_ms=NOW + TTL,
            queue_cap=CAP,
        )

    with engine.connect() as first, engine.connect() as second:
        store_in(first, 1)
        second.exec_driver_sql("SET lock_timeout = '50ms'")
        with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
            store_in(second, 2)
        second.rollback()
        first.commit()
        second.exec_driver_sql("SET lock_timeout = '2s'")
        later = store_in(second, 2)
        second.commit()
    seqs = [item.seq for item in fetch(store, p.bob_phone.pk)]
    assert seqs[-1] == later.seqs[p.bob_phone.pk] and seqs == sorted(seqs)


# --- delivery -----------------------------------------------------------------------------------


def test_fetch_order_and_limits(store: Store) -> None:
    """Items come in seq order after `after_seq`, at most `limit` of them and within
    `max_bytes`, but at least one even if it alone exceeds `max_bytes`."""
    p = people(store)
    sizes = [10, 20, 30, 40, 50]
    for n, size in enumerate(sizes):
        send(store, p.alice_phone, [(p.bob_phone.pk, b"x" * size)], message_id=mid(n), cap=10)
    items = fetch(store, p.bob_phone.pk)
    seqs = [item.seq for item in items]
    assert seqs == sorted(seqs) and [item.size for item in items] == sizes
    assert [i.seq for i in fetch(store, p.bob_phone.pk, limit=2)] == seqs[:2]
    assert [i.seq for i in fetch(store, p.bob_phone.pk, after_seq=seqs[1])] == seqs[2:]
    assert [i.seq for i in fetch(store, p.bob_phone.pk, max_bytes=60)] == seqs[:3]
    assert [i.seq for i in fetch(store, p.bob_phone.pk, max_bytes=59)] == seqs[:2]
    assert [i.seq for i in fetch(store, p.bob_phone.pk, after_seq=seqs[3], max_bytes=1)] == [
        seqs[4]
    ]
    assert fetch(store, p.bob_phone.pk, after_seq=seqs[4]) == []
    assert fetch(store, p.bob_phone.pk, limit=0) == []


def test_ack_deletes_only_the_devices_own_items(store: Store) -> None:
    """ack removes the named items of that device only; other devices' seqs, unknown seqs and
    repeated acks are ignored; the queue count follows."""
    p = people(store)
    stored = send(store, p.alice_phone, [(p.bob_phone.pk, b"b"), (p.alice_laptop.pk, b"l")])
    bob_seq, laptop_seq = stored.seqs[p.bob_phone.pk], stored.seqs[p.alice_laptop.pk]
    assert store(queue.ack_txn, p.bob_phone.pk, [laptop_seq, 424242]) == 0
    assert store(queue.queue_depth_txn, p.alice_laptop.pk) == 1
    assert store(queue.ack_txn, p.bob_phone.pk, [bob_seq, bob_seq]) == 1
    assert store(queue.ack_txn, p.bob_phone.pk, [bob_seq]) == 0
    assert store(queue.ack_txn, p.bob_phone.pk, []) == 0
    assert fetch(store, p.bob_phone.pk) == []
    assert store(queue.queue_depth_txn, p.bob_phone.pk) == 0
    assert [i.seq for i in fetch(store, p.alice_laptop.pk)] == [laptop_seq]


def test_seq_is_never_reused(store: Store) -> None:
    """After the highest item is acknowledged, the next item still gets a larger seq (clients
    may deduplicate by seq)."""
    p = people(store)
    first = send(store, p.alice_phone, [(p.bob_phone.pk, b"1")], message_id=mid(1))
    store(queue.ack_txn, p.bob_phone.pk, list(first.seqs.values()))
    second = send(store, p.alice_phone, [(p.bob_phone.pk, b"2")], message_id=mid(2))
    assert second.seqs[p.bob_phone.pk] > first.seqs[p.bob_phone.pk]


# --- expiry and cleanup -------------------------------------------------------------------------


def test_expiry_notifies_the_sender(store: Store) -> None:
    """Expired envelopes are deleted and the (active) sending device gets an "expired" item per
    device that missed the message, naming that device; the counts follow."""
    p = people(store)
    send(store, p.alice_phone, [(p.bob_phone.pk, b"b"), (p.alice_laptop.pk, b"l")])
    send(store, p.alice_phone, [(p.bob_phone.pk, b"later")], message_id=mid(2), now_ms=NOW + HOUR)
    result = store(queue.expire_queue_txn, NOW + TTL, batch=100)
    assert result.deleted == 2
    by_device = {n.item.peer_device: n for n in result.notices}
    assert set(by_device) == {"bphone", "laptop"}
    notice = by_device["bphone"]
    assert notice.device_pk == p.alice_phone.pk
    assert notice.item.kind == "expired" and notice.item.ciphertext is None
    assert (notice.item.message_id, notice.item.peer_user, notice.item.time_ms) == (
        b"m" * 16,
        "bob",
        NOW + TTL,
    )
    assert fetch(store, p.alice_phone.pk) == sorted(
        [n.item for n in result.notices], key=lambda item: item.seq
    )
    assert [i.ciphertext for i in fetch(store, p.bob_phone.pk)] == [b"later"]
    assert fetch(store, p.alice_laptop.pk) == []
    assert store(queue.queue_depth_txn, p.alice_phone.pk) == 2
    assert store(queue.queue_depth_txn, p.bob_phone.pk) == 1
    assert store(queue.queue_depth_txn, p.alice_laptop.pk) == 0


def test_expiry_works_in_bounded_batches(store: Store) -> None:
    """Each call deletes at most `batch` rows; a full batch means call again."""
    p = people(store)
    for n in range(3):
        send(store, p.alice_phone, [(p.bob_phone.pk, b"x")], message_id=mid(n))
    assert [
        len(store(queue.expire_txn, NOW + TTL, batch=2)),
        len(store(queue.expire_txn, NOW + TTL, batch=2)),
        len(store(queue.expire_txn, NOW + TTL, batch=2)),
    ] == [2, 1, 0]
    assert store(queue.expire_txn, NOW + TTL - 1, batch=2) == []


def test_expired_notices_expire_silently_and_revoked_senders_get_none(store: Store) -> None:
    """An "expired" notice nobody fetched is deleted at its own expiry without a new notice;
    a message from a device revoked meanwhile expires without any notice."""
    p = people(store)
    send(store, p.alice_phone, [(p.bob_phone.pk, b"x")])
    send(store, p.alice_laptop, [(p.bob_phone.pk, b"y")], message_id=mid(2))
    store(devices.revoke_device_txn, p.alice_laptop.pk, now_ms=NOW + 1)
    notices = store(queue.expire_txn, NOW + TTL, batch=100)
    assert [n.device_pk for n in notices] == [p.alice_phone.pk]
    result = store(queue.expire_queue_txn, NOW + 2 * TTL, batch=100)
    assert (result.deleted, result.notices) == (1, [])
    assert store.rows(metadata.tables["queue_items"]) == 0
    assert store(queue.queue_depth_txn, p.alice_phone.pk) == 0


def test_prune_messages_forgets_old_ids_in_batches(store: Store) -> None:
    """Message ids older than the horizon are deleted in batches; a pruned id can be sent
    again as a new message."""
    p = people(store)
    for n in range(3):
        send(store, p.alice_phone, [(p.bob_phone.pk, b"x")], message_id=mid(n), now_ms=NOW + n)
    assert store(queue.prune_messages_txn, NOW + 2, batch=1) == 1
    assert store(queue.prune_messages_txn, NOW + 2, batch=5) == 1
    assert store(queue.prune_messages_txn, NOW + 2, batch=5) == 0
    assert store.rows(metadata.tables["messages"]) == 1
    again = send(store, p.alice_phone, [(p.bob_phone.pk, b"x")], message_id=mid(0), cap=10)
    assert not again.duplicate


def test_revoked_devices_queues_are_purged_in_batches(store: Store) -> None:
    """Queue rows of a revoked device are deleted in bounded batches; others are untouched."""
    p = people(store)
    for n in range(3):
        send(
            store,
            p.bob_phone,
            [(p.alice_laptop.pk, b"l"), (p.alice_phone.pk, b"p")],
            message_id=mid(n),
        )
    store(devices.revoke_device_txn, p.alice_laptop.pk, now_ms=NOW)
    assert store(queue.purge_revoked_queues_txn, batch=2) == 2
    assert store(queue.purge_revoked_queues_txn, batch=2) == 1
    assert store(queue.purge_revoked_queues_txn, batch=2) == 0
    assert store(queue.queue_depth_txn, p.alice_laptop.pk) == 0
    assert len(fetch(store, p.alice_phone.pk)) == 3


# --- blobs --------------------------------------------------------------------------------------


def test_blobs_store_serve_and_expire(store: Store) -> None:
    """A blob is served until it expires, ids are unique, usage is per device and expired blobs
    are deleted in batches."""
    p = people(store)
    for n in range(3):
        store(
            blobs.put_blob_txn,
            blob_id=f"blob{n}",
            owner_device_pk=p.alice_phone.pk,
            data=b"z" * (n + 1),
            now_ms=NOW,
            expires_ms=NOW + HOUR * (n + 1),
        )
    with pytest.raises(BlobExists):
        store(
            blobs.put_blob_txn,
            blob_id="blob0",
            owner_device_pk=p.bob_phone.pk,
            data=b"other",
            now_ms=NOW,
            expires_ms=NOW + DAY,
        )
    blob = store(blobs.get_blob_txn, "blob0", NOW)
    assert blob == blobs.BlobRow("blob0", p.alice_phone.pk, 1, NOW, NOW + HOUR, b"z")
    assert store(blobs.get_blob_txn, "blob0", NOW + HOUR) is None
    assert store(blobs.get_blob_txn, "missing", NOW) is None
    assert store(blobs.blob_usage_txn, p.alice_phone.pk, NOW) == (3, 6)
    assert store(blobs.expire_blobs_txn, NOW + 2 * HOUR, batch=1) == 1
    assert store(blobs.expire_blobs_txn, NOW + 2 * HOUR, batch=5) == 1
    assert store(blobs.expire_blobs_txn, NOW + 2 * HOUR, batch=5) == 0
    assert store(blobs.get_blob_txn, "blob2", NOW) is not None


# --- availability -------------------------------------------------------------------------------


def test_unreachable_database_is_unavailable() -> None:
    """A PostgreSQL server that refuses connections surfaces as DatabaseUnavailable
    (server_busy), not as a driver error."""
    db = Database(
        make_engine("postgresql://medrelay@127.0.0.1:1/none?connect_timeout=2"),
        _NoThreads(),
        runner=SynchronousRunner(),
    )
    with pytest.raises(DatabaseUnavailable):
        _result(db.run_interaction("probe", lambda conn: conn.exec_driver_sql("SELECT 1")))
    db.close()
