"""The clinic's minimal keys: a root key, an issuing key and a log key, on disk.

    <keys dir>/                       (0700)
      root-key.sealed   the clinic root key, sealed by a passphrase (medrelay.crypto.sealing)
      root-key.pub      its public key, `ed25519-v1:...` (what clients pin)
      issuing.key       the online issuing key (signs user certificates)
      issuing.cert      its ClinicKeyCertificate (purpose ISSUING), signed by the root key
      log.key           the online log key (signs transparency-log checkpoints, later)
      log.cert          its ClinicKeyCertificate (purpose LOG), signed by the root key
      root-passphrase   only when the keys were made automatically on a first start
      retired/          certificates of issuing and log keys rotated away (public; what they
                        signed stays verifiable), named <purpose>-<serial>.cert

Every file is 0600. The set is written atomically: into a fresh temporary directory, fsynced,
then renamed into place, so a crash never leaves half a set and two processes racing to create
it end with one set. The serving process reads only the public root key, the online keys and
their certificates (`load_clinic_keys`); the sealed root key is needed again only to certify new
online keys, and can live offline (see docs/operations.md).

`create_clinic_keys` is what `medrelay-server init` runs with the operator's passphrase;
`ensure_clinic_keys` is what a first `serve` runs when there are none (the newcomer's
`make run`): the root key is then sealed under a random passphrase written next to it, which is
convenient and NOT a safe place for it; the server logs a warning until `init --reseal` moves the
root key under a passphrase only the operator knows.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from medrelay.crypto.certificates import (
    ClinicKeyCertificate,
    ClinicKeyPurpose,
    issue_clinic_key_certificate,
    verify_clinic_key,
)
from medrelay.crypto.errors import CryptoError, WrongPassphrase
from medrelay.crypto.keys import SigningKey, VerifyKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.sealing import SealParams, open_sealed, seal

ROOT_SEALED: Final = "root-key.sealed"
ROOT_PUBLIC: Final = "root-key.pub"
ISSUING_KEY: Final = "issuing.key"
ISSUING_CERT: Final = "issuing.cert"
LOG_KEY: Final = "log.key"
LOG_CERT: Final = "log.cert"
AUTO_PASSPHRASE: Final = "root-passphrase"  # noqa: S105 (a file name, not a secret)
RETIRED_DIR: Final = "retired"
MAX_RETIRED: Final = 32
KEY_FILES: Final = (ROOT_SEALED, ROOT_PUBLIC, ISSUING_KEY, ISSUING_CERT, LOG_KEY, LOG_CERT)

CLINIC_KEY_VALIDITY_MS: Final = 5 * 365 * 24 * 3600 * 1000
BACKDATE_MS: Final = 3600 * 1000
"""Certificates start an hour in the past, so a client whose clock is a little behind the
server's does not find a certificate issued a second ago 'not yet valid'."""
MIN_PASSPHRASE_CHARS: Final = 12
MAX_KEY_FILE_BYTES: Final = 64 * 1024
_AUTO_PASSPHRASE_BYTES: Final = 32
_SERIAL_BITS: Final = 63


class ClinicKeyError(Exception):
    """The clinic keys cannot be created, read or used; the message says what to do."""


@dataclass(frozen=True, slots=True, repr=False)
class ClinicKeys:
    """What the serving process holds: the public root key and the two online keys."""

    clinic_id: str
    root_key: VerifyKey
    issuing_key: SigningKey
    issuing_certificate: ClinicKeyCertificate
    log_key: SigningKey
    log_certificate: ClinicKeyCertificate
    automatic: bool = False
    """The root key is sealed under a passphrase stored next to it (first-start keys)."""
    retired: tuple[ClinicKeyCertificate, ...] = ()
    """Certificates of issuing and log keys rotated away (still valid for what they signed)."""

    def all_certificates(self) -> tuple[ClinicKeyCertificate, ...]:
        """Every clinic key certificate, retired ones first: what clients may need to verify."""
        return (*self.retired, self.issuing_certificate, self.log_certificate)

    def __repr__(self) -> str:
        return f"ClinicKeys({self.clinic_id!r}, root={self.root_key.to_text()})"


def random_serial(rng: Rng) -> int:
    """A certificate serial: 63 random bits (positive in every signed 64-bit representation)."""
    return int.from_bytes(rng(8), "big") >> (64 - _SERIAL_BITS)


def check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise ClinicKeyError(
            f"the root-key passphrase must have at least {MIN_PASSPHRASE_CHARS} characters"
        )


def clinic_keys_exist(keys_dir: Path) -> bool:
    """Whether any clinic key file is present (then nothing may be created over it)."""
    return any((keys_dir / name).exists() for name in (*KEY_FILES, AUTO_PASSPHRASE))


def create_clinic_keys(
    keys_dir: Path,
    *,
    clinic_id: str,
    passphrase: str,
    now_ms: int,
    rng: Rng,
    seal_params: SealParams | None = None,
    automatic: bool = False,
) -> ClinicKeys:
    """Create a new key set in `keys_dir` (which must not hold one). With `automatic`, the
    passphrase is also written to `root-passphrase` (first-start keys)."""
    if not automatic:
        check_passphrase(passphrase)
    if clinic_keys_exist(keys_dir):
        raise ClinicKeyError(
            f"clinic keys already exist in {keys_dir}; refusing to overwrite them "
            "(enrolled devices trust that root key)"
        )
    root = SigningKey.generate(rng)
    issuing = SigningKey.generate(rng)
    log = SigningKey.generate(rng)

    def certify(key: SigningKey, purpose: ClinicKeyPurpose) -> ClinicKeyCertificate:
        return issue_clinic_key_certificate(
            root,
            clinic_id=clinic_id,
            purpose=purpose,
            key=key.verify_key,
            not_before_ms=max(0, now_ms - BACKDATE_MS),
            not_after_ms=now_ms + CLINIC_KEY_VALIDITY_MS,
            serial=random_serial(rng),
        )

    issuing_cert = certify(issuing, ClinicKeyPurpose.ISSUING)
    log_cert = certify(log, ClinicKeyPurpose.LOG)
    files = {
        ROOT_SEALED: seal(root.encode(), passphrase, rng, seal_params),
        ROOT_PUBLIC: (root.verify_key.to_text() + "\n").encode("ascii"),
        ISSUING_KEY: issuing.encode(),
        ISSUING_CERT: issuing_cert.encode(),
        LOG_KEY: log.encode(),
        LOG_CERT: log_cert.encode(),
    }
    if automatic:
        files[AUTO_PASSPHRASE] = (passphrase + "\n").encode("ascii")
    _write_directory(keys_dir, files, rng)
    return ClinicKeys(
        clinic_id=clinic_id,
        root_key=root.verify_key,
        issuing_key=issuing,
        issuing_certificate=issuing_cert,
        log_key=log,
        log_certificate=log_cert,
        automatic=automatic,
    )


def ensure_clinic_keys(
    keys_dir: Path,
    *,
    clinic_id: str,
    now_ms: int,
    rng: Rng,
    seal_params: SealParams | None = None,
) -> tuple[ClinicKeys, bool]:
    """The clinic keys, created automatically (root key sealed under a random passphrase kept in
    `root-passphrase`) when there are none. Returns the keys and whether they were created."""
    if clinic_keys_exist(keys_dir):
        return load_clinic_keys(keys_dir, clinic_id=clinic_id, now_ms=now_ms), False
    passphrase = base64.urlsafe_b64encode(rng(_AUTO_PASSPHRASE_BYTES)).rstrip(b"=").decode()
    try:
        keys = create_clinic_keys(
            keys_dir,
            clinic_id=clinic_id,
            passphrase=passphrase,
            now_ms=now_ms,
            rng=rng,
            seal_params=seal_params,
            automatic=True,
        )
    except ClinicKeyError:
        if not clinic_keys_exist(keys_dir):
            raise
        # Another process created them first: use theirs.
        return load_clinic_keys(keys_dir, clinic_id=clinic_id, now_ms=now_ms), False
    return keys, True


def load_clinic_keys(keys_dir: Path, *, clinic_id: str, now_ms: int) -> ClinicKeys:
    """Read and check the serving keys: private files must be private, both certificates must
    verify under the root key for their purpose at `now_ms`, belong to `clinic_id`, and certify
    the keys next to them."""
    _check_private(keys_dir, directory=True)
    try:
        root_key = VerifyKey.from_text(_read(keys_dir, ROOT_PUBLIC).decode("ascii").strip())
        issuing = SigningKey.decode(_read(keys_dir, ISSUING_KEY, private=True))
        issuing_cert = ClinicKeyCertificate.decode(_read(keys_dir, ISSUING_CERT))
        log = SigningKey.decode(_read(keys_dir, LOG_KEY, private=True))
        log_cert = ClinicKeyCertificate.decode(_read(keys_dir, LOG_CERT))
    except (CryptoError, UnicodeDecodeError) as exc:
        raise ClinicKeyError(f"the clinic keys in {keys_dir} are damaged: {exc}") from None
    for cert, key, purpose in (
        (issuing_cert, issuing, ClinicKeyPurpose.ISSUING),
        (log_cert, log, ClinicKeyPurpose.LOG),
    ):
        name = purpose.value
        try:
            verify_clinic_key(root_key, cert, purpose, now_ms)
        except CryptoError as exc:
            raise ClinicKeyError(
                f"the {name} certificate in {keys_dir} does not verify under the root key ({exc})"
            ) from None
        if cert.key != key.verify_key:
            raise ClinicKeyError(f"the {name} certificate in {keys_dir} is for another key")
        if cert.clinic_id != clinic_id:
            raise ClinicKeyError(
                f"the clinic keys in {keys_dir} belong to clinic {cert.clinic_id!r}, but "
                f"server.clinic_id is {clinic_id!r}"
            )
    return ClinicKeys(
        clinic_id=clinic_id,
        root_key=root_key,
        issuing_key=issuing,
        issuing_certificate=issuing_cert,
        log_key=log,
        log_certificate=log_cert,
        automatic=(keys_dir / AUTO_PASSPHRASE).exists(),
        retired=_load_retired(keys_dir, root_key, clinic_id),
    )


def _load_retired(
    keys_dir: Path, root_key: VerifyKey, clinic_id: str
) -> tuple[ClinicKeyCertificate, ...]:
    directory = keys_dir / RETIRED_DIR
    if not directory.is_dir():
        return ()
    paths = sorted(directory.glob("*.cert"))
    if len(paths) > MAX_RETIRED:
        raise ClinicKeyError(f"{directory} holds more than {MAX_RETIRED} certificates")
    retired = []
    for path in paths:
        try:
            cert = ClinicKeyCertificate.decode(_read(directory, path.name))
            # Checked at its own start: a retired key may have expired since.
            verify_clinic_key(root_key, cert, cert.purpose, cert.not_before_ms)
        except CryptoError as exc:
            raise ClinicKeyError(f"{path} is not a certificate of this root key ({exc})") from None
        if cert.clinic_id != clinic_id:
            raise ClinicKeyError(f"{path} belongs to clinic {cert.clinic_id!r}")
        retired.append(cert)
    return tuple(retired)


def rotate_clinic_key(
    keys_dir: Path,
    purpose: ClinicKeyPurpose,
    *,
    passphrase: str,
    now_ms: int,
    rng: Rng,
) -> ClinicKeyCertificate:
    """Replace the issuing or log key with a new one certified by the root key (unsealed with
    `passphrase`); the old certificate moves to `retired/`, the old private key is deleted.
    Returns the new certificate. The serving process uses the new key after a restart."""
    root = open_root_key(keys_dir, passphrase)
    key_file, cert_file = (
        (ISSUING_KEY, ISSUING_CERT) if purpose is ClinicKeyPurpose.ISSUING else (LOG_KEY, LOG_CERT)
    )
    try:
        old = ClinicKeyCertificate.decode(_read(keys_dir, cert_file))
    except CryptoError as exc:
        raise ClinicKeyError(f"the {purpose.value} certificate is damaged: {exc}") from None
    new_key = SigningKey.generate(rng)
    cert = issue_clinic_key_certificate(
        root,
        clinic_id=old.clinic_id,
        purpose=purpose,
        key=new_key.verify_key,
        not_before_ms=max(0, now_ms - BACKDATE_MS),
        not_after_ms=now_ms + CLINIC_KEY_VALIDITY_MS,
        serial=random_serial(rng),
    )
    retired = keys_dir / RETIRED_DIR
    ensure_private_directory(retired)
    _write_file(retired, f"{purpose.value}-{old.serial}.cert", old.encode(), rng)
    # Certificate last: a crash in between leaves a key whose certificate does not match,
    # which `load_clinic_keys` reports (run the rotation again), never a silent mix.
    _write_file(keys_dir, key_file, new_key.encode(), rng)
    _write_file(keys_dir, cert_file, cert.encode(), rng)
    _fsync_dir(keys_dir)
    return cert


def open_root_key(keys_dir: Path, passphrase: str) -> SigningKey:
    """Unseal the clinic root key (for certifying new online keys, and re-sealing)."""
    try:
        root = SigningKey.decode(
            open_sealed(_read(keys_dir, ROOT_SEALED, private=True), passphrase)
        )
    except WrongPassphrase:
        raise ClinicKeyError("wrong passphrase for the clinic root key") from None
    except CryptoError as exc:
        raise ClinicKeyError(f"the sealed root key in {keys_dir} is damaged: {exc}") from None
    public = VerifyKey.from_text(_read(keys_dir, ROOT_PUBLIC).decode("ascii").strip())
    if root.verify_key != public:
        raise ClinicKeyError(f"the sealed root key in {keys_dir} does not match {ROOT_PUBLIC}")
    return root


def read_auto_passphrase(keys_dir: Path) -> str | None:
    """The passphrase of first-start keys, or None when the operator sealed the root key."""
    path = keys_dir / AUTO_PASSPHRASE
    if not path.exists():
        return None
    return _read(keys_dir, AUTO_PASSPHRASE, private=True).decode("ascii").strip()


def reseal_root_key(
    keys_dir: Path,
    *,
    old_passphrase: str,
    new_passphrase: str,
    rng: Rng,
    seal_params: SealParams | None = None,
) -> None:
    """Seal the root key under `new_passphrase` (atomically) and delete `root-passphrase`."""
    check_passphrase(new_passphrase)
    root = open_root_key(keys_dir, old_passphrase)
    _write_file(keys_dir, ROOT_SEALED, seal(root.encode(), new_passphrase, rng, seal_params), rng)
    (keys_dir / AUTO_PASSPHRASE).unlink(missing_ok=True)
    _fsync_dir(keys_dir)


# --- files --------------------------------------------------------------------------------------


def ensure_private_directory(path: Path) -> None:
    """Create `path` (and its parents) if missing, readable by this user only (the data
    directory holds the database and the keys). An existing directory is left as it is."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


def _read(keys_dir: Path, name: str, *, private: bool = False) -> bytes:
    path = keys_dir / name
    if private:
        _check_private(path, directory=False)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ClinicKeyError(
            f"{path} is missing (run `medrelay-server init` to create the clinic keys)"
        ) from None
    except OSError as exc:
        raise ClinicKeyError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ClinicKeyError(f"{path} is too large to be a key file")
    return data


def _check_private(path: Path, *, directory: bool) -> None:
    """Refuse private material that others can read (as ssh does), instead of using it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ClinicKeyError(
            f"{path} is missing (run `medrelay-server init` to create the clinic keys)"
        ) from None
    if directory and not stat.S_ISDIR(mode):
        raise ClinicKeyError(f"{path} is not a directory")
    if mode & 0o077:
        wanted = "700" if directory else "600"
        raise ClinicKeyError(
            f"{path} is accessible to other users (mode {stat.S_IMODE(mode):o}); "
            f"run chmod {wanted} {path}"
        )


def _write_directory(keys_dir: Path, files: dict[str, bytes], rng: Rng) -> None:
    parent = keys_dir.parent
    ensure_private_directory(parent)
    temporary = parent / f".{keys_dir.name}.tmp-{rng(6).hex()}"
    temporary.mkdir(mode=0o700)
    try:
        os.chmod(temporary, 0o700)  # mkdir's mode is filtered by the umask
        for name, data in files.items():
            _write_new(temporary / name, data)
        _fsync_dir(temporary)
        with contextlib.suppress(FileNotFoundError, OSError):
            keys_dir.rmdir()  # an empty directory may be replaced; a non-empty one may not
        try:
            temporary.rename(keys_dir)
        except OSError:
            raise ClinicKeyError(
                f"clinic keys already exist in {keys_dir}; refusing to overwrite them"
            ) from None
        _fsync_dir(parent)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _write_file(directory: Path, name: str, data: bytes, rng: Rng) -> None:
    """Replace one file atomically (write a temporary file, fsync, rename over)."""
    temporary = directory / f".{name}.tmp-{rng(6).hex()}"
    try:
        _write_new(temporary, data)
        temporary.replace(directory / name)
    finally:
        temporary.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
