"""The profile store: one device's local state in SQLite, every secret sealed by the passphrase.

A profile is a directory (mode 0700) holding `profile.sqlite3` (mode 0600). The database holds:

- `meta`: public facts (schema version, the key-derivation header, server URL, user and device
  ids, the pinned clinic id and root key, certificates, counters);
- `secrets`: the identity key, the device signing and DH keys, the prekey store (signed and
  one-time prekey private keys) and the session token, each sealed;
- `sessions`: one sealed Sesame session record per peer device;
- `peer_users` / `peer_devices`: certificates of peers, re-verified whenever they are loaded;
- `conversations` / `thread_heads`: the thread used with each peer and the hash of our last
  content in each thread (for `previous_hash`);
- `messages`: every message sent or received, its signed content (text and attachment keys:
  medical secrets) sealed, ids and times plain; `outbox`: sends not yet confirmed by the relay;
- `notices`: items that could not be decrypted or verified, expiry notices, and the clinic's
  signed notices (automatic replies, urgent routing).

Rules of this file:

- Every SQL statement is in a synchronous `*_txn(conn, ...)` function and runs through
  `Database.run_interaction`, one transaction per call (`BEGIN IMMEDIATE` ... `COMMIT`, rolled
  back on any exception). The runner decides the thread: a one-thread pool in the application,
  inline in tests. Times are passed in, never read here.
- Secrets are sealed with the profile's `StorageKey` (random, wrapped under the passphrase by
  Argon2id: `medrelay.crypto.sealing`) with associated data naming the table and the row, so a
  sealed value moved to another row does not open.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, Final, ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.crypto.certificates import (
    ClinicKeyCertificate,
    DeviceCertificate,
    UserCertificate,
    verify_device,
)
from medrelay.crypto.errors import CryptoError, WrongPassphrase
from medrelay.crypto.identity import DeviceAddress, DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, SigningKey, VerifyKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.sealing import (
    KeyDerivationHeader,
    StorageKey,
    derive_storage_key,
)
from medrelay.crypto.sessions import InMemoryPrekeyStore, SessionRecord

SCHEMA_VERSION: Final = 2
DB_FILENAME: Final = "profile.sqlite3"
BUSY_TIMEOUT_MS: Final = 5000

_T = TypeVar("_T")
_P = ParamSpec("_P")

_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE secrets (name TEXT PRIMARY KEY, sealed BLOB NOT NULL)",
    """CREATE TABLE sessions (
        user_id TEXT NOT NULL, device_id TEXT NOT NULL, sealed BLOB NOT NULL,
        PRIMARY KEY (user_id, device_id))""",
    """CREATE TABLE peer_users (
        user_id TEXT PRIMARY KEY, user_certificate BLOB NOT NULL,
        first_identity_key TEXT NOT NULL, fetched_ms INTEGER NOT NULL)""",
    """CREATE TABLE peer_devices (
        user_id TEXT NOT NULL, device_id TEXT NOT NULL, certificate BLOB NOT NULL,
        PRIMARY KEY (user_id, device_id))""",
    """CREATE TABLE conversations (
        peer_user TEXT PRIMARY KEY, thread_id BLOB NOT NULL, updated_ms INTEGER NOT NULL)""",
    """CREATE TABLE thread_heads (
        thread_id BLOB PRIMARY KEY, last_own_hash BLOB NOT NULL, sent_at_ms INTEGER NOT NULL)""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        message_id BLOB NOT NULL, sender_user TEXT NOT NULL, sender_device TEXT NOT NULL,
        peer_user TEXT NOT NULL, outgoing INTEGER NOT NULL, thread_id BLOB NOT NULL,
        sent_at_ms INTEGER NOT NULL, server_ms INTEGER, stored_ms INTEGER NOT NULL,
        status TEXT NOT NULL, error TEXT, read INTEGER NOT NULL DEFAULT 0,
        sealed BLOB NOT NULL, flags TEXT NOT NULL DEFAULT '',
        UNIQUE (sender_user, sender_device, message_id))""",
    "CREATE INDEX messages_by_message_id ON messages (message_id)",
    """CREATE TABLE outbox (
        message_id BLOB PRIMARY KEY, peer_user TEXT NOT NULL, body BLOB NOT NULL,
        created_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE notices (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL, message_id BLOB NOT NULL,
        user_id TEXT NOT NULL, device_id TEXT NOT NULL, server_ms INTEGER NOT NULL,
        recorded_ms INTEGER NOT NULL, reason TEXT NOT NULL, read INTEGER NOT NULL DEFAULT 0,
        detail BLOB,
        UNIQUE (kind, user_id, device_id, message_id))""",
)

# How a profile written by an older medrelay reaches SCHEMA_VERSION: the statements that take
# version N to N + 1, run in one transaction when the profile is opened.
_UPGRADES: Final[dict[int, tuple[str, ...]]] = {
    # 2: the relay's flags on received messages (urgent, after hours, held), and clinic notices
    # kept whole (their signed encoding) so they can be shown and checked again later.
    1: (
        "ALTER TABLE messages ADD COLUMN flags TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE notices ADD COLUMN detail BLOB",
    ),
}

# Secret names (rows of `secrets`).
ROW_IDENTITY_KEY: Final = "identity_key"
ROW_DEVICE_SIGNING_KEY: Final = "device_signing_key"
ROW_DEVICE_DH_KEY: Final = "device_dh_key"
ROW_PREKEYS: Final = "prekeys"
ROW_TOKEN: Final = "session_token"  # noqa: S105 (a row name, not a token)

# Message statuses.
STATUS_RECEIVED: Final = "received"
STATUS_SENDING: Final = "sending"
STATUS_SENT: Final = "sent"
STATUS_FAILED: Final = "failed"

NOTICE_FAILED: Final = "failed"
NOTICE_EXPIRED: Final = "expired"
NOTICE_SECURITY: Final = "security"
"""A transparency-log warning: an unknown device on our account, a split view, ..."""


# --- running transactions ---------------------------------------------------------------------


class Runner(Protocol):
    """Runs a blocking function somewhere and returns a Deferred of its result."""

    def __call__(self, fn: Callable[[], _T], /) -> Deferred[_T]: ...


def inline_runner(fn: Callable[[], _T]) -> Deferred[_T]:
    """Run at once on the calling thread (tests, and short-lived tools)."""
    try:
        result = fn()
    except BaseException as exc:
        return fail(exc)
    return succeed(result)


class ThreadRunner:
    """A one-thread pool: SQLite work and Argon2id run off the reactor thread, in order."""

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="medrelay-profile")
        self._pool.start()

    def __call__(self, fn: Callable[[], _T], /) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._pool, fn)

    def stop(self) -> None:
        self._pool.stop()


class Database:
    """One SQLite connection and the runner its transactions go through."""

    def __init__(self, conn: sqlite3.Connection, runner: Runner) -> None:
        self._conn = conn
        self._runner = runner

    @property
    def runner(self) -> Runner:
        return self._runner

    def run_interaction(
        self,
        desc: str,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> Deferred[_T]:
        """Run `fn(conn, *args)` in one transaction; `desc` names it in errors."""
        conn = self._conn

        def transaction() -> _T:
            with _translate_sqlite_errors(desc):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn, *args, **kwargs)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result

        return self._runner(transaction)

    def close(self) -> Deferred[None]:
        return self._runner(self._conn.close)


@contextlib.contextmanager
def _translate_sqlite_errors(desc: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise ClientError(
                LocalCode.PROFILE_LOCKED, "the profile is busy in another medrelay process"
            ) from None
        raise ClientError(
            LocalCode.PROFILE_CORRUPT, f"the profile database failed ({desc}): {exc}"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise ClientError(
            LocalCode.PROFILE_CORRUPT, f"the profile database is damaged ({desc}): {exc}"
        ) from None


# --- files ------------------------------------------------------------------------------------


def database_path(profile_dir: Path) -> Path:
    return profile_dir / DB_FILENAME


def profile_exists(profile_dir: Path) -> bool:
    return database_path(profile_dir).is_file()


def connect(profile_dir: Path, *, create: bool) -> sqlite3.Connection:
    """Open (or create, with private permissions) the profile database. Blocking."""
    path = database_path(profile_dir)
    if create:
        profile_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(profile_dir, stat.S_IRWXU)
        # Created with 0600 before SQLite opens it; SQLite gives its journal files the same mode.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ClientError(
                LocalCode.ALREADY_ENROLLED, f"{profile_dir} already holds a profile"
            ) from None
        os.close(fd)
    elif not path.is_file():
        raise ClientError(
            LocalCode.NOT_ENROLLED,
            f"no profile in {profile_dir} (run `medrelay enroll` first)",
        )
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # Overwrite deleted rows (used one-time prekeys, old ratchet states): forward secrecy.
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        raise ClientError(
            LocalCode.PROFILE_CORRUPT, f"{path} is not a medrelay profile database: {exc}"
        ) from None
    return conn


# --- sealing ----------------------------------------------------------------------------------


def row_ad(table: str, *parts: str | bytes) -> bytes:
    """Associated data binding a sealed value to its table and row. Ids never contain control
    characters, so NUL separates them unambiguously; byte parts are written as hex."""
    encoded = [p.hex() if isinstance(p, bytes) else p for p in parts]
    return "\x00".join([table, *encoded]).encode("utf-8")


class Sealer:
    """Seals and opens rows with the profile's storage key."""

    def __init__(self, key: StorageKey, rng: Rng) -> None:
        self._key = key
        self._rng = rng

    def seal(self, plaintext: bytes, table: str, *row: str | bytes) -> bytes:
        return self._key.seal(plaintext, self._rng, row_ad(table, *row))

    def open(self, sealed: bytes, table: str, *row: str | bytes) -> bytes:
        try:
            return self._key.open(sealed, row_ad(table, *row))
        except CryptoError:
            raise ClientError(
                LocalCode.PROFILE_CORRUPT,
                f"a sealed value in the profile ({table}) does not open: the file was altered",
            ) from None


# --- schema and meta --------------------------------------------------------------------------


def create_schema_txn(conn: sqlite3.Connection, header: KeyDerivationHeader) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)
    set_meta_txn(conn, "schema_version", SCHEMA_VERSION)
    set_meta_txn(conn, "kdf_header", header.encode())


def set_meta_txn(conn: sqlite3.Connection, key: str, value: str | bytes | int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def get_meta_txn(conn: sqlite3.Connection, key: str) -> object:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def _meta_str(conn: sqlite3.Connection, key: str) -> str:
    value = get_meta_txn(conn, key)
    if not isinstance(value, str):
        raise ClientError(LocalCode.PROFILE_CORRUPT, f"the profile has no valid {key}")
    return value


def _meta_bytes(conn: sqlite3.Connection, key: str) -> bytes:
    value = get_meta_txn(conn, key)
    if not isinstance(value, bytes):
        raise ClientError(LocalCode.PROFILE_CORRUPT, f"the profile has no valid {key}")
    return value


def _meta_int(conn: sqlite3.Connection, key: str) -> int:
    value = get_meta_txn(conn, key)
    if not isinstance(value, int):
        raise ClientError(LocalCode.PROFILE_CORRUPT, f"the profile has no valid {key}")
    return value


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a profile of an older schema to SCHEMA_VERSION, all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have upgraded meanwhile.
        current = get_meta_txn(conn, "schema_version")
        while isinstance(current, int) and current in _UPGRADES:
            for statement in _UPGRADES[current]:
                conn.execute(statement)
            current += 1
            set_meta_txn(conn, "schema_version", current)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def check_schema_txn(conn: sqlite3.Connection) -> KeyDerivationHeader:
    """The key-derivation header of a profile whose schema this code understands."""
    try:
        version = get_meta_txn(conn, "schema_version")
    except sqlite3.OperationalError:
        raise ClientError(LocalCode.PROFILE_CORRUPT, "not a medrelay profile database") from None
    if isinstance(version, int) and version in _UPGRADES:
        _upgrade(conn)
        version = get_meta_txn(conn, "schema_version")
    if version != SCHEMA_VERSION:
        raise ClientError(
            LocalCode.PROFILE_CORRUPT,
            f"profile schema version {version!r}; this medrelay reads version {SCHEMA_VERSION}",
        )
    try:
        return KeyDerivationHeader.decode(_meta_bytes(conn, "kdf_header"))
    except CryptoError as exc:
        raise ClientError(
            LocalCode.PROFILE_CORRUPT, f"the profile's key header is damaged: {exc}"
        ) from None


def unlock(header: KeyDerivationHeader, passphrase: str) -> StorageKey:
    """The storage key (Argon2id: run it off the reactor)."""
    try:
        return derive_storage_key(passphrase, header)
    except WrongPassphrase:
        raise ClientError(LocalCode.WRONG_PASSPHRASE, "wrong passphrase for this profile") from None
    except CryptoError as exc:
        raise ClientError(LocalCode.PROFILE_CORRUPT, f"cannot unlock the profile: {exc}") from None


# --- the enrolled identity --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileInfo:
    """The public facts of an enrolled profile."""

    server_url: str
    clinic_id: str
    root_key: VerifyKey
    user_id: str
    device_id: str
    issuing_certificate: ClinicKeyCertificate
    user_certificate: UserCertificate
    device_certificate: DeviceCertificate
    enrolled_at_ms: int


@dataclass(frozen=True, slots=True)
class ProfileSecrets:
    """The long-term private keys, unsealed while the profile is open (their reprs print only
    public keys)."""

    identity_key: SigningKey
    device: DeviceKeys


def write_enrollment_txn(
    conn: sqlite3.Connection,
    sealer: Sealer,
    info: ProfileInfo,
    secrets: ProfileSecrets,
    prekeys: InMemoryPrekeyStore,
    *,
    next_one_time_prekey_id: int,
    next_signed_prekey_id: int,
) -> None:
    """Record a completed enrollment (the schema already exists)."""
    if get_meta_txn(conn, "user_id") is not None:
        raise ClientError(LocalCode.ALREADY_ENROLLED, "this profile is already enrolled")
    for key, value in (
        ("server_url", info.server_url),
        ("clinic_id", info.clinic_id),
        ("root_key", info.root_key.to_text()),
        ("user_id", info.user_id),
        ("device_id", info.device_id),
        ("issuing_certificate", info.issuing_certificate.encode()),
        ("user_certificate", info.user_certificate.encode()),
        ("device_certificate", info.device_certificate.encode()),
        ("enrolled_at_ms", info.enrolled_at_ms),
        ("next_one_time_prekey_id", next_one_time_prekey_id),
        ("next_signed_prekey_id", next_signed_prekey_id),
    ):
        set_meta_txn(conn, key, value)
    put_secret_txn(conn, sealer, ROW_IDENTITY_KEY, secrets.identity_key.encode())
    put_secret_txn(conn, sealer, ROW_DEVICE_SIGNING_KEY, secrets.device.signing_key.encode())
    put_secret_txn(conn, sealer, ROW_DEVICE_DH_KEY, secrets.device.dh_key.encode())
    save_prekeys_txn(conn, sealer, prekeys)


def load_profile_txn(
    conn: sqlite3.Connection, sealer: Sealer
) -> tuple[ProfileInfo, ProfileSecrets]:
    """The enrolled identity; its own certificates are decoded and its keys checked against them."""
    info = _public_info_txn(conn)
    try:
        identity_key = SigningKey.decode(get_secret_txn(conn, sealer, ROW_IDENTITY_KEY))
        signing_key = SigningKey.decode(get_secret_txn(conn, sealer, ROW_DEVICE_SIGNING_KEY))
        dh_key = DHPrivateKey.decode(get_secret_txn(conn, sealer, ROW_DEVICE_DH_KEY))
        cert = info.device_certificate
        identity = verify_device(info.user_certificate, cert)
        device = DeviceKeys(identity=identity, signing_key=signing_key, dh_key=dh_key)
    except (CryptoError, ValueError) as exc:
        raise ClientError(
            LocalCode.PROFILE_CORRUPT, f"the profile is inconsistent: {exc}"
        ) from None
    if identity_key.verify_key != info.user_certificate.identity_key:
        raise ClientError(
            LocalCode.PROFILE_CORRUPT, "the stored identity key is not the certified one"
        )
    return info, ProfileSecrets(identity_key=identity_key, device=device)


# --- secrets ----------------------------------------------------------------------------------


def put_secret_txn(conn: sqlite3.Connection, sealer: Sealer, name: str, value: bytes) -> None:
    conn.execute(
        "INSERT INTO secrets (name, sealed) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed",
        (name, sealer.seal(value, "secrets", name)),
    )


def find_secret_txn(conn: sqlite3.Connection, sealer: Sealer, name: str) -> bytes | None:
    row = conn.execute("SELECT sealed FROM secrets WHERE name = ?", (name,)).fetchone()
    return None if row is None else sealer.open(row[0], "secrets", name)


def get_secret_txn(conn: sqlite3.Connection, sealer: Sealer, name: str) -> bytes:
    value = find_secret_txn(conn, sealer, name)
    if value is None:
        raise ClientError(LocalCode.PROFILE_CORRUPT, f"the profile has lost its {name}")
    return value


def delete_secret_txn(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM secrets WHERE name = ?", (name,))


# --- session token ----------------------------------------------------------------------------


def get_token_txn(conn: sqlite3.Connection, sealer: Sealer, now_ms: int) -> bytes | None:
    """The stored session token, unless it has expired."""
    expires = get_meta_txn(conn, "token_expires_ms")
    if not isinstance(expires, int) or expires <= now_ms:
        return None
    return find_secret_txn(conn, sealer, ROW_TOKEN)


def set_token_txn(conn: sqlite3.Connection, sealer: Sealer, token: bytes, expires_ms: int) -> None:
    put_secret_txn(conn, sealer, ROW_TOKEN, token)
    set_meta_txn(conn, "token_expires_ms", expires_ms)


def clear_token_txn(conn: sqlite3.Connection) -> None:
    delete_secret_txn(conn, ROW_TOKEN)
    conn.execute("DELETE FROM meta WHERE key = 'token_expires_ms'")


# --- prekeys ----------------------------------------------------------------------------------


def load_prekeys_txn(conn: sqlite3.Connection, sealer: Sealer) -> InMemoryPrekeyStore:
    try:
        return InMemoryPrekeyStore.from_bytes(get_secret_txn(conn, sealer, ROW_PREKEYS))
    except CryptoError as exc:
        raise ClientError(
            LocalCode.PROFILE_CORRUPT, f"the prekey store is damaged: {exc}"
        ) from None


def save_prekeys_txn(
    conn: sqlite3.Connection, sealer: Sealer, prekeys: InMemoryPrekeyStore
) -> None:
    put_secret_txn(conn, sealer, ROW_PREKEYS, prekeys.to_bytes())


def allocate_one_time_prekey_ids_txn(conn: sqlite3.Connection, count: int) -> int:
    """Reserve `count` fresh one-time prekey ids; returns the first."""
    first = _meta_int(conn, "next_one_time_prekey_id")
    set_meta_txn(conn, "next_one_time_prekey_id", first + count)
    return first


# --- sessions ---------------------------------------------------------------------------------


class SqlSessionStore:
    """A `medrelay.crypto.sessions.SessionStore` inside one transaction: records are sealed per
    peer device, and a failed operation's writes roll back with the transaction."""

    def __init__(self, conn: sqlite3.Connection, sealer: Sealer) -> None:
        self._conn = conn
        self._sealer = sealer

    def load(self, address: DeviceAddress) -> SessionRecord | None:
        row = self._conn.execute(
            "SELECT sealed FROM sessions WHERE user_id = ? AND device_id = ?",
            (address.user_id, address.device_id),
        ).fetchone()
        if row is None:
            return None
        data = self._sealer.open(row[0], "sessions", address.user_id, address.device_id)
        try:
            return SessionRecord.from_bytes(data)
        except CryptoError as exc:
            raise ClientError(
                LocalCode.PROFILE_CORRUPT, f"a stored session record is damaged: {exc}"
            ) from None

    def save(self, address: DeviceAddress, record: SessionRecord) -> None:
        sealed = self._sealer.seal(
            record.to_bytes(), "sessions", address.user_id, address.device_id
        )
        self._conn.execute(
            "INSERT INTO sessions (user_id, device_id, sealed) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id, device_id) DO UPDATE SET sealed = excluded.sealed",
            (address.user_id, address.device_id, sealed),
        )

    def delete(self, address: DeviceAddress) -> None:
        self._conn.execute(
            "DELETE FROM sessions WHERE user_id = ? AND device_id = ?",
            (address.user_id, address.device_id),
        )


# --- peers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredPeer:
    """A peer's certificates as last fetched (to be verified again before use)."""

    user_id: str
    user_certificate: bytes
    devices: tuple[tuple[str, bytes], ...]
    first_identity_key: str
    fetched_ms: int


def load_peer_txn(conn: sqlite3.Connection, user_id: str) -> StoredPeer | None:
    row = conn.execute(
        "SELECT user_certificate, first_identity_key, fetched_ms FROM peer_users WHERE user_id = ?",
        (user_id,),
    ).fetchone()
    if row is None:
        return None
    devices = conn.execute(
        "SELECT device_id, certificate FROM peer_devices WHERE user_id = ? ORDER BY device_id",
        (user_id,),
    ).fetchall()
    return StoredPeer(user_id, row[0], tuple((d, c) for d, c in devices), row[1], row[2])


def save_peer_txn(
    conn: sqlite3.Connection,
    user_id: str,
    *,
    user_certificate: bytes,
    identity_key: str,
    devices: Sequence[tuple[str, bytes]],
    now_ms: int,
) -> str:
    """Replace a peer's certificates; returns the identity key first seen for the peer (equal to
    `identity_key` unless the clinic certified a new one since)."""
    row = conn.execute(
        "SELECT first_identity_key FROM peer_users WHERE user_id = ?", (user_id,)
    ).fetchone()
    first = identity_key if row is None else str(row[0])
    conn.execute(
        "INSERT INTO peer_users (user_id, user_certificate, first_identity_key, fetched_ms) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
        "user_certificate = excluded.user_certificate, fetched_ms = excluded.fetched_ms",
        (user_id, user_certificate, first, now_ms),
    )
    conn.execute("DELETE FROM peer_devices WHERE user_id = ?", (user_id,))
    conn.executemany(
        "INSERT INTO peer_devices (user_id, device_id, certificate) VALUES (?, ?, ?)",
        [(user_id, device_id, cert) for device_id, cert in devices],
    )
    return first


def accept_identity_key_txn(conn: sqlite3.Connection, user_id: str, identity_key: str) -> None:
    """The user has seen the new safety number: the current key becomes the reference."""
    conn.execute(
        "UPDATE peer_users SET first_identity_key = ? WHERE user_id = ?", (identity_key, user_id)
    )


# --- threads ----------------------------------------------------------------------------------


def get_conversation_txn(conn: sqlite3.Connection, peer_user: str) -> bytes | None:
    row = conn.execute(
        "SELECT thread_id FROM conversations WHERE peer_user = ?", (peer_user,)
    ).fetchone()
    return None if row is None else bytes(row[0])


def set_conversation_txn(
    conn: sqlite3.Connection, peer_user: str, thread_id: bytes, now_ms: int
) -> None:
    conn.execute(
        "INSERT INTO conversations (peer_user, thread_id, updated_ms) VALUES (?, ?, ?) "
        "ON CONFLICT (peer_user) DO UPDATE SET thread_id = excluded.thread_id, "
        "updated_ms = excluded.updated_ms",
        (peer_user, thread_id, now_ms),
    )


def get_thread_head_txn(conn: sqlite3.Connection, thread_id: bytes) -> bytes | None:
    row = conn.execute(
        "SELECT last_own_hash FROM thread_heads WHERE thread_id = ?", (thread_id,)
    ).fetchone()
    return None if row is None else bytes(row[0])


def set_thread_head_txn(
    conn: sqlite3.Connection, thread_id: bytes, content_hash: bytes, sent_at_ms: int
) -> None:
    """Our latest content in a thread (a copy from another of our devices counts too, unless it
    is older than what we have)."""
    conn.execute(
        "INSERT INTO thread_heads (thread_id, last_own_hash, sent_at_ms) VALUES (?, ?, ?) "
        "ON CONFLICT (thread_id) DO UPDATE SET last_own_hash = excluded.last_own_hash, "
        "sent_at_ms = excluded.sent_at_ms WHERE excluded.sent_at_ms >= thread_heads.sent_at_ms",
        (thread_id, content_hash, sent_at_ms),
    )


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message row with its signed content unsealed (`signed_content` is the exact bytes
    that were signed and decrypted)."""

    row_id: int
    message_id: bytes
    sender_user: str
    sender_device: str
    peer_user: str
    outgoing: bool
    thread_id: bytes
    sent_at_ms: int
    server_ms: int | None
    stored_ms: int
    status: str
    error: str | None
    read: bool
    signed_content: bytes
    flags: tuple[str, ...] = ()
    """What the relay said about a received message: urgent, after_hours, held."""

    def __repr__(self) -> str:
        return (
            f"StoredMessage(row_id={self.row_id}, message_id={self.message_id.hex()}, "
            f"status={self.status})"
        )


_MESSAGE_COLUMNS: Final = (
    "id, message_id, sender_user, sender_device, peer_user, outgoing, thread_id, sent_at_ms, "
    "server_ms, stored_ms, status, error, read, sealed, flags"
)


def _message_from_row(row: Sequence[object], sealer: Sealer) -> StoredMessage:
    (row_id, message_id, sender_user, sender_device, peer_user, outgoing, thread_id, sent_at,
     server_ms, stored_ms, status, error, read, sealed, flags) = row  # fmt: skip
    assert isinstance(message_id, bytes) and isinstance(sealed, bytes)  # noqa: S101 (schema)
    signed = sealer.open(sealed, "messages", str(sender_user), str(sender_device), message_id)
    return StoredMessage(
        row_id=int(row_id),  # type: ignore[call-overload]
        message_id=message_id,
        sender_user=str(sender_user),
        sender_device=str(sender_device),
        peer_user=str(peer_user),
        outgoing=bool(outgoing),
        thread_id=bytes(thread_id),  # type: ignore[call-overload]
        sent_at_ms=int(sent_at),  # type: ignore[call-overload]
        server_ms=None if server_ms is None else int(server_ms),  # type: ignore[call-overload]
        stored_ms=int(stored_ms),  # type: ignore[call-overload]
        status=str(status),
        error=None if error is None else str(error),
        read=bool(read),
        signed_content=signed,
        flags=tuple(sorted(str(flags).split())),
    )


def insert_message_txn(
    conn: sqlite3.Connection,
    sealer: Sealer,
    *,
    message_id: bytes,
    sender_user: str,
    sender_device: str,
    peer_user: str,
    outgoing: bool,
    thread_id: bytes,
    sent_at_ms: int,
    server_ms: int | None,
    stored_ms: int,
    status: str,
    signed_content: bytes,
    read: bool,
    flags: Sequence[str] = (),
) -> int:
    sealed = sealer.seal(signed_content, "messages", sender_user, sender_device, message_id)
    cursor = conn.execute(
        "INSERT INTO messages (message_id, sender_user, sender_device, peer_user, outgoing, "
        "thread_id, sent_at_ms, server_ms, stored_ms, status, read, sealed, flags) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message_id,
            sender_user,
            sender_device,
            peer_user,
            int(outgoing),
            thread_id,
            sent_at_ms,
            server_ms,
            stored_ms,
            status,
            int(read),
            sealed,
            " ".join(sorted(flags)),
        ),
    )
    row_id = cursor.lastrowid
    assert row_id is not None  # noqa: S101 (an INSERT always sets it)
    return row_id


def item_seen_txn(
    conn: sqlite3.Connection, sender_user: str, sender_device: str, message_id: bytes
) -> bool:
    """Whether a delivered item was already stored or recorded as a failure (deduplication)."""
    row = conn.execute(
        "SELECT 1 FROM messages WHERE sender_user = ? AND sender_device = ? AND message_id = ? "
        "UNION ALL SELECT 1 FROM notices WHERE kind = ? AND user_id = ? AND device_id = ? "
        "AND message_id = ? LIMIT 1",
        (sender_user, sender_device, message_id, NOTICE_FAILED, sender_user, sender_device,
         message_id),
    ).fetchone()  # fmt: skip
    return row is not None


def set_message_status_txn(
    conn: sqlite3.Connection,
    sender_user: str,
    sender_device: str,
    message_id: bytes,
    status: str,
    *,
    server_ms: int | None = None,
    error: str | None = None,
) -> None:
    conn.execute(
        "UPDATE messages SET status = ?, server_ms = COALESCE(?, server_ms), error = ? "
        "WHERE sender_user = ? AND sender_device = ? AND message_id = ?",
        (status, server_ms, error, sender_user, sender_device, message_id),
    )


def get_message_txn(
    conn: sqlite3.Connection,
    sealer: Sealer,
    sender_user: str,
    sender_device: str,
    message_id: bytes,
) -> StoredMessage | None:
    row = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages "  # noqa: S608 (constant column list)
        "WHERE sender_user = ? AND sender_device = ? AND message_id = ?",
        (sender_user, sender_device, message_id),
    ).fetchone()
    return None if row is None else _message_from_row(row, sealer)


def replace_signed_content_txn(
    conn: sqlite3.Connection,
    sealer: Sealer,
    *,
    sender_user: str,
    sender_device: str,
    message_id: bytes,
    signed_content: bytes,
) -> None:
    """Our own queued message, signed again (re-addressed before the relay accepted it)."""
    sealed = sealer.seal(signed_content, "messages", sender_user, sender_device, message_id)
    conn.execute(
        "UPDATE messages SET sealed = ? WHERE sender_user = ? AND sender_device = ? "
        "AND message_id = ?",
        (sealed, sender_user, sender_device, message_id),
    )


def find_messages_txn(
    conn: sqlite3.Connection, sealer: Sealer, message_id: bytes
) -> list[StoredMessage]:
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ? "  # noqa: S608
        "ORDER BY id DESC",
        (message_id,),
    ).fetchall()
    return [_message_from_row(row, sealer) for row in rows]


def list_messages_txn(
    conn: sqlite3.Connection, sealer: Sealer, *, unread_only: bool, limit: int = 1000
) -> list[StoredMessage]:
    """Messages in the order they were stored (oldest first), the last `limit` of them."""
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages "  # noqa: S608 (a constant column list)
        "WHERE (? OR read = 0) ORDER BY id DESC LIMIT ?",
        (not unread_only, limit),
    ).fetchall()
    return [_message_from_row(row, sealer) for row in reversed(rows)]


def list_thread_messages_txn(
    conn: sqlite3.Connection, sealer: Sealer, thread_id: bytes
) -> list[StoredMessage]:
    """Every message of one thread, sent or received, in the order they were stored."""
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages "  # noqa: S608 (a constant column list)
        "WHERE thread_id = ? ORDER BY id",
        (thread_id,),
    ).fetchall()
    return [_message_from_row(row, sealer) for row in rows]


def list_received_after_txn(
    conn: sqlite3.Connection, sealer: Sealer, row_id: int, limit: int
) -> list[StoredMessage]:
    """Received messages (not our own, nor copies of them) stored after row `row_id`."""
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages "  # noqa: S608 (a constant column list)
        "WHERE id > ? AND outgoing = 0 ORDER BY id LIMIT ?",
        (row_id, limit),
    ).fetchall()
    return [_message_from_row(row, sealer) for row in rows]


def mark_messages_read_txn(conn: sqlite3.Connection, row_ids: Sequence[int]) -> None:
    conn.executemany("UPDATE messages SET read = 1 WHERE id = ?", [(i,) for i in row_ids])


# --- outbox -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A send the relay has not confirmed: `body` is the encoded `send` frame body with rid 0
    (ciphertexts only, nothing to seal); it is resent byte for byte apart from the rid."""

    message_id: bytes
    peer_user: str
    body: bytes
    created_ms: int
    attempts: int


def put_outbox_txn(
    conn: sqlite3.Connection, message_id: bytes, peer_user: str, body: bytes, now_ms: int
) -> None:
    conn.execute(
        "INSERT INTO outbox (message_id, peer_user, body, created_ms) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (message_id) DO UPDATE SET body = excluded.body",
        (message_id, peer_user, body, now_ms),
    )


def note_outbox_attempt_txn(conn: sqlite3.Connection, message_id: bytes) -> None:
    conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE message_id = ?", (message_id,))


def delete_outbox_txn(conn: sqlite3.Connection, message_id: bytes) -> None:
    conn.execute("DELETE FROM outbox WHERE message_id = ?", (message_id,))


def list_outbox_txn(conn: sqlite3.Connection) -> list[OutboxEntry]:
    rows = conn.execute(
        "SELECT message_id, peer_user, body, created_ms, attempts FROM outbox "
        "ORDER BY created_ms, rowid"
    ).fetchall()
    return [OutboxEntry(bytes(m), str(p), bytes(b), int(c), int(a)) for m, p, b, c, a in rows]


# --- notices ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredNotice:
    """A failed item (`kind` "failed"), an expiry notice ("expired"), a security warning
    ("security") or a clinic notice (its `NoticeKind` value, with `detail`)."""

    row_id: int
    kind: str
    message_id: bytes
    user_id: str
    device_id: str
    server_ms: int
    recorded_ms: int
    reason: str
    read: bool
    detail: bytes | None = None
    """A clinic notice: its signed encoding (medrelay.crypto.notices), verified on receipt."""


def insert_notice_txn(
    conn: sqlite3.Connection,
    *,
    kind: str,
    message_id: bytes,
    user_id: str,
    device_id: str,
    server_ms: int,
    recorded_ms: int,
    reason: str,
    detail: bytes | None = None,
) -> int | None:
    """Record a notice; None when the same one was recorded before (a redelivery)."""
    cursor = conn.execute(
        "INSERT INTO notices (kind, message_id, user_id, device_id, server_ms, recorded_ms, "
        "reason, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (kind, message_id, user_id, device_id, server_ms, recorded_ms, reason, detail),
    )
    return cursor.lastrowid if cursor.rowcount == 1 else None


def list_notices_txn(conn: sqlite3.Connection, *, unread_only: bool) -> list[StoredNotice]:
    rows = conn.execute(
        "SELECT id, kind, message_id, user_id, device_id, server_ms, recorded_ms, reason, read, "
        "detail FROM notices WHERE (? OR read = 0) ORDER BY id",
        (not unread_only,),
    ).fetchall()
    return [
        StoredNotice(
            int(i), str(k), bytes(m), str(u), str(d), int(s), int(r), str(why), bool(rd),
            None if detail is None else bytes(detail),
        )
        for i, k, m, u, d, s, r, why, rd, detail in rows
    ]  # fmt: skip


def mark_notices_read_txn(conn: sqlite3.Connection, row_ids: Sequence[int]) -> None:
    conn.executemany("UPDATE notices SET read = 1 WHERE id = ?", [(i,) for i in row_ids])


# --- an open profile --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenProfile:
    """An unlocked profile: the database, its sealer, the identity and its private keys."""

    db: Database
    sealer: Sealer
    info: ProfileInfo
    secrets: ProfileSecrets
    path: Path

    def __repr__(self) -> str:
        return f"OpenProfile({self.info.user_id}/{self.info.device_id})"


def open_profile(
    profile_dir: Path, passphrase: str, *, runner: Runner, rng: Rng
) -> Deferred[OpenProfile]:
    """Unlock an enrolled profile: NOT_ENROLLED, WRONG_PASSPHRASE or PROFILE_CORRUPT otherwise.
    Argon2id and all file access run through `runner` (off the reactor)."""

    def unlock_blocking() -> OpenProfile:
        conn = connect(profile_dir, create=False)
        try:
            with _translate_sqlite_errors("open"):
                header = check_schema_txn(conn)
                sealer = Sealer(unlock(header, passphrase), rng)
                info, secrets = load_profile_txn(conn, sealer)
        except BaseException:
            conn.close()
            raise
        return OpenProfile(Database(conn, runner), sealer, info, secrets, profile_dir)

    return runner(unlock_blocking)


def read_public_info(profile_dir: Path, *, runner: Runner) -> Deferred[ProfileInfo]:
    """The public facts of an enrolled profile, without the passphrase (nothing is unsealed)."""

    def read_blocking() -> ProfileInfo:
        conn = connect(profile_dir, create=False)
        try:
            with _translate_sqlite_errors("read_info"):
                check_schema_txn(conn)
                return _public_info_txn(conn)
        finally:
            conn.close()

    return runner(read_blocking)


def _public_info_txn(conn: sqlite3.Connection) -> ProfileInfo:
    if get_meta_txn(conn, "user_id") is None:
        raise ClientError(LocalCode.NOT_ENROLLED, "this profile's enrollment never completed")
    try:
        return ProfileInfo(
            server_url=_meta_str(conn, "server_url"),
            clinic_id=_meta_str(conn, "clinic_id"),
            root_key=VerifyKey.from_text(_meta_str(conn, "root_key")),
            user_id=_meta_str(conn, "user_id"),
            device_id=_meta_str(conn, "device_id"),
            issuing_certificate=ClinicKeyCertificate.decode(
                _meta_bytes(conn, "issuing_certificate")
            ),
            user_certificate=UserCertificate.decode(_meta_bytes(conn, "user_certificate")),
            device_certificate=DeviceCertificate.decode(_meta_bytes(conn, "device_certificate")),
            enrolled_at_ms=_meta_int(conn, "enrolled_at_ms"),
        )
    except CryptoError as exc:
        raise ClientError(
            LocalCode.PROFILE_CORRUPT, f"the profile is inconsistent: {exc}"
        ) from None
