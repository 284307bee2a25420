"""The clinic's minimal keys: `init` creates a chain that verifies, never overwrites, writes
private files atomically; a first start creates keys by itself; loading refuses keys that are
exposed, damaged, expired or made for another clinic; `--reseal` keeps the keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medrelay.crypto.certificates import (
    ClinicKeyPurpose,
    Role,
    issue_user_certificate,
    verify_clinic_key,
    verify_user,
)
from medrelay.crypto.keys import SigningKey
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.sealing import SealParams, open_sealed
from medrelay.server.clinic import (
    AUTO_PASSPHRASE,
    CLINIC_KEY_VALIDITY_MS,
    ISSUING_KEY,
    KEY_FILES,
    ROOT_SEALED,
    ClinicKeyError,
    create_clinic_keys,
    ensure_clinic_keys,
    load_clinic_keys,
    open_root_key,
    read_auto_passphrase,
    reseal_root_key,
)

NOW = 1_763_884_800_000
PASSPHRASE = "correct horse battery staple"
FAST = SealParams.for_tests()


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "var" / "keys"


def create(keys_dir: Path, rng: Rng, **kwargs: object) -> None:
    create_clinic_keys(
        keys_dir,
        clinic_id="clinic.test",
        passphrase=PASSPHRASE,
        now_ms=NOW,
        rng=rng,
        seal_params=FAST,
        **kwargs,  # type: ignore[arg-type]
    )


def test_init_creates_a_chain_that_verifies(keys_dir: Path, rng: Rng) -> None:
    """Root key → issuing certificate (ISSUING) and log certificate (LOG), for this clinic; a
    user certificate from the issuing key verifies against them, as a client checks it."""
    create(keys_dir, rng)
    keys = load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)
    verify_clinic_key(keys.root_key, keys.issuing_certificate, ClinicKeyPurpose.ISSUING, NOW)
    verify_clinic_key(keys.root_key, keys.log_certificate, ClinicKeyPurpose.LOG, NOW)
    assert keys.issuing_certificate.key == keys.issuing_key.verify_key
    assert keys.log_certificate.key == keys.log_key.verify_key
    assert keys.issuing_certificate.clinic_id == "clinic.test"
    assert not keys.automatic
    identity = SigningKey.generate(rng)
    user = issue_user_certificate(
        keys.issuing_key,
        user_id="dr.test",
        role=Role.DOCTOR,
        display_name="Dr. Test",
        identity_key=identity.verify_key,
        not_before_ms=NOW,
        not_after_ms=NOW + 1000,
        serial=1,
    )
    verify_user(keys.issuing_certificate, user, NOW)


def test_certificates_are_backdated_and_long_lived(keys_dir: Path, rng: Rng) -> None:
    """A client whose clock is a little behind still accepts a certificate made just now."""
    create(keys_dir, rng)
    keys = load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)
    cert = keys.issuing_certificate
    assert cert.not_before_ms < NOW - 60_000
    assert cert.not_after_ms == NOW + CLINIC_KEY_VALIDITY_MS
    assert keys.issuing_certificate.serial != keys.log_certificate.serial


def test_root_key_is_sealed_by_the_passphrase(keys_dir: Path, rng: Rng) -> None:
    create(keys_dir, rng)
    keys = load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)
    root = open_root_key(keys_dir, PASSPHRASE)
    assert root.verify_key == keys.root_key
    with pytest.raises(ClinicKeyError, match="wrong passphrase"):
        open_root_key(keys_dir, "not the passphrase")
    # The serving files never contain the root private key.
    for name in KEY_FILES:
        if name != ROOT_SEALED:
            assert root.seed not in (keys_dir / name).read_bytes()


def test_files_are_private(keys_dir: Path, rng: Rng) -> None:
    """Directory 0700, every file 0600, even under a permissive umask."""
    old = os.umask(0o002)
    try:
        create(keys_dir, rng)
    finally:
        os.umask(old)
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(keys_dir.parent.stat().st_mode) == 0o700
    for name in KEY_FILES:
        assert stat.S_IMODE((keys_dir / name).stat().st_mode) == 0o600, name
    assert sorted(p.name for p in keys_dir.iterdir()) == sorted(KEY_FILES)
    assert [p.name for p in keys_dir.parent.iterdir()] == ["keys"]  # no temporary left behind


def test_init_refuses_to_overwrite(keys_dir: Path, rng: Rng) -> None:
    create(keys_dir, rng)
    before = {name: (keys_dir / name).read_bytes() for name in KEY_FILES}
    with pytest.raises(ClinicKeyError, match="already exist"):
        create(keys_dir, rng)
    assert {name: (keys_dir / name).read_bytes() for name in KEY_FILES} == before


def test_init_refuses_even_a_single_leftover_file(keys_dir: Path, rng: Rng) -> None:
    keys_dir.mkdir(parents=True)
    (keys_dir / ISSUING_KEY).write_bytes(b"x")
    with pytest.raises(ClinicKeyError, match="already exist"):
        create(keys_dir, rng)


def test_init_may_fill_an_empty_directory(keys_dir: Path, rng: Rng) -> None:
    keys_dir.mkdir(parents=True)
    create(keys_dir, rng)
    load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)


def test_short_passphrase_is_refused(keys_dir: Path, rng: Rng) -> None:
    with pytest.raises(ClinicKeyError, match="at least 12"):
        create_clinic_keys(
            keys_dir, clinic_id="c", passphrase="short", now_ms=NOW, rng=rng, seal_params=FAST
        )
    assert not keys_dir.exists()


def test_first_start_creates_keys_with_a_stored_passphrase(keys_dir: Path, rng: Rng) -> None:
    keys, created = ensure_clinic_keys(
        keys_dir, clinic_id="clinic.test", now_ms=NOW, rng=rng, seal_params=FAST
    )
    assert created and keys.automatic
    passphrase = read_auto_passphrase(keys_dir)
    assert passphrase is not None and len(passphrase) >= 40
    assert stat.S_IMODE((keys_dir / AUTO_PASSPHRASE).stat().st_mode) == 0o600
    root = SigningKey.decode(open_sealed((keys_dir / ROOT_SEALED).read_bytes(), passphrase))
    assert root.verify_key == keys.root_key
    again, created_again = ensure_clinic_keys(
        keys_dir, clinic_id="clinic.test", now_ms=NOW, rng=rng, seal_params=FAST
    )
    assert not created_again and again.root_key == keys.root_key and again.automatic


def test_reseal_keeps_the_keys_and_removes_the_stored_passphrase(keys_dir: Path, rng: Rng) -> None:
    keys, _ = ensure_clinic_keys(
        keys_dir, clinic_id="clinic.test", now_ms=NOW, rng=rng, seal_params=FAST
    )
    old = read_auto_passphrase(keys_dir)
    assert old is not None
    reseal_root_key(
        keys_dir, old_passphrase=old, new_passphrase=PASSPHRASE, rng=rng, seal_params=FAST
    )
    assert not (keys_dir / AUTO_PASSPHRASE).exists()
    assert open_root_key(keys_dir, PASSPHRASE).verify_key == keys.root_key
    reloaded = load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)
    assert reloaded.issuing_key.seed == keys.issuing_key.seed and not reloaded.automatic
    assert stat.S_IMODE((keys_dir / ROOT_SEALED).stat().st_mode) == 0o600


def test_loading_refuses_exposed_private_files(keys_dir: Path, rng: Rng) -> None:
    create(keys_dir, rng)
    (keys_dir / ISSUING_KEY).chmod(0o644)
    with pytest.raises(ClinicKeyError, match="chmod 600"):
        load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)
    (keys_dir / ISSUING_KEY).chmod(0o600)
    keys_dir.chmod(0o755)
    with pytest.raises(ClinicKeyError, match="chmod 700"):
        load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)


def test_loading_refuses_another_clinic(keys_dir: Path, rng: Rng) -> None:
    create(keys_dir, rng)
    with pytest.raises(ClinicKeyError, match=r"belong to clinic 'clinic\.test'"):
        load_clinic_keys(keys_dir, clinic_id="other.clinic", now_ms=NOW)


def test_loading_refuses_expired_certificates(keys_dir: Path, rng: Rng) -> None:
    create(keys_dir, rng)
    with pytest.raises(ClinicKeyError, match="does not verify"):
        load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW + CLINIC_KEY_VALIDITY_MS)


def test_loading_refuses_a_swapped_key(keys_dir: Path, rng: Rng) -> None:
    create(keys_dir, rng)
    other = SigningKey.generate(seeded_rng(b"another key"))
    (keys_dir / ISSUING_KEY).write_bytes(other.encode())
    with pytest.raises(ClinicKeyError, match="for another key"):
        load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)


def test_loading_names_missing_and_damaged_files(keys_dir: Path, rng: Rng) -> None:
    with pytest.raises(ClinicKeyError, match="medrelay-server init"):
        load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)
    create(keys_dir, rng)
    (keys_dir / "log.cert").write_bytes(b"garbage")
    with pytest.raises(ClinicKeyError, match="damaged"):
        load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)


def test_serving_does_not_need_the_sealed_root_key(keys_dir: Path, rng: Rng) -> None:
    """The operator may move root-key.sealed offline: the serving keys still load, and a first
    start does not mistake the remaining set for missing keys."""
    create(keys_dir, rng)
    (keys_dir / ROOT_SEALED).unlink()
    keys = load_clinic_keys(keys_dir, clinic_id="clinic.test", now_ms=NOW)
    again, created = ensure_clinic_keys(
        keys_dir, clinic_id="clinic.test", now_ms=NOW, rng=rng, seal_params=FAST
    )
    assert not created and again.root_key == keys.root_key
