"""The profile store: private files, sealing bound to table and row, the passphrase, the schema
version, transactions, tokens and the public read used by `whoami`."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.store import (
    Database,
    Sealer,
    SqlSessionStore,
    clear_token_txn,
    connect,
    database_path,
    get_token_txn,
    inline_runner,
    open_profile,
    read_public_info,
    row_ad,
    set_meta_txn,
    set_token_txn,
)
from medrelay.clients.engine.testing import TEST_PASSPHRASE, ClientWorld
from medrelay.crypto.identity import DeviceAddress
from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.sealing import StorageKey


@pytest.fixture
def world(tmp_path: Path) -> ClientWorld:
    world = ClientWorld(tmp_path)
    world.enroll("alice")
    return world


def test_the_profile_directory_and_database_are_private(world: ClientWorld) -> None:
    profile = world.profile_dir("alice")
    assert stat.S_IMODE(profile.stat().st_mode) == 0o700
    assert stat.S_IMODE(database_path(profile).stat().st_mode) == 0o600


def test_the_right_passphrase_opens_the_keys_that_were_certified(world: ClientWorld) -> None:
    profile = world.run(
        open_profile(
            world.profile_dir("alice"), TEST_PASSPHRASE, runner=inline_runner, rng=world.rng
        )
    )
    assert profile.secrets.identity_key.verify_key == profile.info.user_certificate.identity_key
    assert (
        profile.secrets.device.identity.certificate_hash == profile.info.device_certificate.hash()
    )
    world.run(profile.db.close())


def test_a_wrong_passphrase_is_a_clear_error(world: ClientWorld) -> None:
    with pytest.raises(ClientError) as caught:
        world.run(
            open_profile(world.profile_dir("alice"), "wrong", runner=inline_runner, rng=world.rng)
        )
    assert caught.value.code is LocalCode.WRONG_PASSPHRASE
    assert "wrong passphrase" in caught.value.message


def test_a_missing_profile_is_not_enrolled(tmp_path: Path) -> None:
    with pytest.raises(ClientError) as caught:
        connect(tmp_path / "nothing", create=False)
    assert caught.value.code is LocalCode.NOT_ENROLLED


def test_a_profile_of_another_schema_version_is_refused(world: ClientWorld) -> None:
    conn = connect(world.profile_dir("alice"), create=False)
    set_meta_txn(conn, "schema_version", 99)
    conn.close()
    with pytest.raises(ClientError) as caught:
        world.run(
            open_profile(
                world.profile_dir("alice"), TEST_PASSPHRASE, runner=inline_runner, rng=world.rng
            )
        )
    assert caught.value.code is LocalCode.PROFILE_CORRUPT
    assert "schema version 99" in caught.value.message


def test_a_file_that_is_not_a_database_is_refused(world: ClientWorld, tmp_path: Path) -> None:
    tmp_path.joinpath("junk").mkdir()
    tmp_path.joinpath("junk", "profile.sqlite3").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ClientError) as caught:
        world.run(read_public_info(tmp_path / "junk", runner=inline_runner))
    assert caught.value.code is LocalCode.PROFILE_CORRUPT


def test_sealed_values_round_trip_and_are_bound_to_their_row() -> None:
    rng = seeded_rng(b"sealer")
    sealer = Sealer(StorageKey.generate(rng), rng)
    sealed = sealer.seal(b"ratchet state", "sessions", "bob", "phone")
    assert sealer.open(sealed, "sessions", "bob", "phone") == b"ratchet state"
    for table, row in (("sessions", ("bob", "tablet")), ("secrets", ("bob", "phone"))):
        with pytest.raises(ClientError) as caught:
            sealer.open(sealed, table, *row)
        assert caught.value.code is LocalCode.PROFILE_CORRUPT
    other = Sealer(StorageKey.generate(rng), rng)
    with pytest.raises(ClientError):
        other.open(sealed, "sessions", "bob", "phone")


def test_row_associated_data_cannot_be_confused_across_boundaries() -> None:
    assert row_ad("t", "a", "bc") != row_ad("t", "ab", "c")
    assert row_ad("messages", b"\x01") == b"messages\x0001"


def test_a_session_record_moved_to_another_peer_does_not_open(world: ClientWorld) -> None:
    """Swapping sealed rows in the database (to make bob's session answer for mallory) is
    detected: the row's associated data names its peer device."""
    world.enroll("bob")
    alice = world.open("alice")
    world.run(alice.send_message("bob", "hi"))
    bob_device = world.relay.only_device("bob").device_id
    conn = sqlite3.connect(database_path(world.profile_dir("alice")))
    conn.execute("UPDATE sessions SET user_id = 'mallory' WHERE user_id = 'bob'")
    conn.commit()
    conn.close()

    def load(txn: sqlite3.Connection) -> object:
        return SqlSessionStore(txn, alice.profile.sealer).load(DeviceAddress("mallory", bob_device))

    with pytest.raises(ClientError) as caught:
        world.run(alice.profile.db.run_interaction("load", load))
    assert caught.value.code is LocalCode.PROFILE_CORRUPT
    world.run(alice.close())


def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    conn = connect(tmp_path / "p", create=True)
    conn.execute("CREATE TABLE t (x INTEGER)")
    db = Database(conn, inline_runner)

    def insert_then_fail(txn: sqlite3.Connection) -> None:
        txn.execute("INSERT INTO t VALUES (1)")
        raise ValueError("boom")

    d = db.run_interaction("fails", insert_then_fail)
    failures: list[object] = []
    d.addErrback(failures.append)
    assert len(failures) == 1
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
    conn.close()


def test_the_session_token_is_sealed_expires_and_can_be_forgotten(world: ClientWorld) -> None:
    engine = world.open("alice")
    db, sealer = engine.profile.db, engine.profile.sealer
    token = b"\x07" * 32
    world.run(db.run_interaction("set", set_token_txn, sealer, token, 2_000))
    assert world.run(db.run_interaction("get", get_token_txn, sealer, 1_000)) == token
    assert world.run(db.run_interaction("get", get_token_txn, sealer, 2_000)) is None
    raw = database_path(engine.profile.path).read_bytes()
    wal = Path(f"{database_path(engine.profile.path)}-wal")
    raw += wal.read_bytes() if wal.exists() else b""
    assert token not in raw
    world.run(db.run_interaction("clear", clear_token_txn))
    assert world.run(db.run_interaction("get", get_token_txn, sealer, 1_000)) is None
    world.run(engine.close())


def test_public_facts_are_readable_without_the_passphrase(world: ClientWorld) -> None:
    info = world.run(read_public_info(world.profile_dir("alice"), runner=inline_runner))
    assert (info.user_id, info.clinic_id) == ("alice", "clinic.test")
    assert info.root_key == world.clinic.root.verify_key
