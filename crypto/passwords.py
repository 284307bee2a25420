"""Account password hashing: Argon2id PHC strings through argon2-cffi
(notes/reliability-security.md §2.3).

Defaults are RFC 9106's second recommendation, argon2-cffi's `profiles.RFC_9106_LOW_MEMORY`
(t=3, m=64 MiB, p=4, 16-byte salt, 32-byte tag), about 0.17 s per hash on the reference 2-core
host. The salt comes from the injected rng, never from argon2-cffi's own `os.urandom`.

Callers must run `hash` and `verify` in a thread pool with *bounded* concurrency (the server
does): each call holds 64 MiB for its duration, so a burst of logins run unbounded would exhaust
memory, and run on the reactor thread it would stall every connection.

Stored hashes are parsed strictly before argon2-cffi sees them (argon2-cffi itself trusts its
caller): only `$argon2id$v=19$m=..,t=..,p=..$salt$tag` in canonical unpadded base64, with costs
under `MAX_MEMORY_COST_KIB` / `MAX_TIME_COST` / `MAX_PARALLELISM`, so a corrupted or planted row
cannot make verification allocate gigabytes. Hashes produced by libsodium
(`nacl.pwhash.argon2id.str`) are the same format and verify here (and ours verify there).

A `str` password is NFC-normalised before UTF-8 encoding (as RFC 8265 OpaqueString), so the same
password typed on systems that compose characters differently verifies. Passwords are limited to
`MAX_PASSWORD_BYTES`; any policy on minimum length or content belongs to the caller.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

import argon2
import argon2.exceptions
import argon2.profiles

from medrelay.crypto.errors import CryptoError, MalformedEncoding
from medrelay.crypto.rng import Rng

MAX_PASSWORD_BYTES: Final = 1024
MAX_STORED_HASH_CHARS: Final = 512

ARGON2_VERSION: Final = 19  # 0x13, the only version argon2-cffi and libsodium produce
MIN_SALT_BYTES: Final = 16  # RFC 9106 §4: 128 bits
MIN_HASH_BYTES: Final = 16
MAX_SALT_BYTES: Final = 64
MAX_HASH_BYTES: Final = 64
# Ceilings on what we agree to run, for our own parameters and for any stored hash.
MAX_TIME_COST: Final = 16
MAX_MEMORY_COST_KIB: Final = 1024 * 1024  # 1 GiB
MAX_PARALLELISM: Final = 16

_LOW_MEMORY: Final = argon2.profiles.RFC_9106_LOW_MEMORY

_PHC = re.compile(
    r"\$argon2id\$v=(?P<v>[1-9][0-9]{0,2})"
    r"\$m=(?P<m>[1-9][0-9]{0,9}),t=(?P<t>[1-9][0-9]{0,9}),p=(?P<p>[1-9][0-9]{0,9})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<tag>[A-Za-z0-9+/]+)",
    re.ASCII,
)


class PasswordTooLong(CryptoError):
    """A password longer than `MAX_PASSWORD_BYTES` once encoded."""

    code = "password_too_long"


class MalformedPasswordHash(MalformedEncoding):
    """A stored password hash that is not an Argon2id PHC string we accept."""

    code = "malformed_password_hash"


@dataclass(frozen=True, slots=True)
class PasswordParams:
    """Argon2id costs: `time_cost` passes over `memory_cost_kib` KiB in `parallelism` lanes."""

    time_cost: int = _LOW_MEMORY.time_cost
    memory_cost_kib: int = _LOW_MEMORY.memory_cost
    parallelism: int = _LOW_MEMORY.parallelism
    salt_len: int = _LOW_MEMORY.salt_len
    hash_len: int = _LOW_MEMORY.hash_len

    def __post_init__(self) -> None:
        if not 1 <= self.time_cost <= MAX_TIME_COST:
            raise ValueError(f"Argon2id time cost must be within [1, {MAX_TIME_COST}]")
        if not 1 <= self.parallelism <= MAX_PARALLELISM:
            raise ValueError(f"Argon2id parallelism must be within [1, {MAX_PARALLELISM}]")
        # Argon2 needs at least 8 KiB per lane.
        if not 8 * self.parallelism <= self.memory_cost_kib <= MAX_MEMORY_COST_KIB:
            raise ValueError(
                f"Argon2id memory cost must be within [8 * parallelism, {MAX_MEMORY_COST_KIB}] KiB"
            )
        if not MIN_SALT_BYTES <= self.salt_len <= MAX_SALT_BYTES:
            raise ValueError(f"salt length must be within [{MIN_SALT_BYTES}, {MAX_SALT_BYTES}]")
        if not MIN_HASH_BYTES <= self.hash_len <= MAX_HASH_BYTES:
            raise ValueError(f"tag length must be within [{MIN_HASH_BYTES}, {MAX_HASH_BYTES}]")

    @classmethod
    def for_tests(cls) -> PasswordParams:
        """Argon2's minimum costs (t=1, 8 KiB, p=1): fast, and never for real passwords."""
        return cls(time_cost=1, memory_cost_kib=8, parallelism=1)


class PasswordHasher:
    """Hashes and verifies account passwords with one set of `PasswordParams`."""

    __slots__ = ("_hasher", "_params")

    def __init__(self, params: PasswordParams | None = None) -> None:
        self._params = params or PasswordParams()
        self._hasher = argon2.PasswordHasher(
            time_cost=self._params.time_cost,
            memory_cost=self._params.memory_cost_kib,
            parallelism=self._params.parallelism,
            hash_len=self._params.hash_len,
            salt_len=self._params.salt_len,
            type=argon2.Type.ID,
        )

    @property
    def params(self) -> PasswordParams:
        return self._params

    def hash(self, password: str | bytes, rng: Rng) -> str:
        """The PHC string of `password` with a fresh salt from `rng`."""
        encoded = _password_bytes(password)
        try:
            return self._hasher.hash(encoded, salt=rng(self._params.salt_len))
        except argon2.exceptions.HashingError:
            # In practice only an allocation failure inside the C library.
            raise CryptoError("Argon2id hashing failed") from None

    def verify(self, stored_hash: str, password: str | bytes) -> bool:
        """Whether `password` matches `stored_hash`. A stored hash we do not accept is
        `MalformedPasswordHash`, never a silent False."""
        _parse(stored_hash)
        encoded = _password_bytes(password)
        try:
            return self._hasher.verify(stored_hash, encoded)
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            # The strict parse above leaves only inputs the C decoder still dislikes.
            raise MalformedPasswordHash("stored password hash is not valid Argon2id") from None

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether `stored_hash` was made with other parameters than this hasher's (rehash it
        after the next successful login)."""
        return _parse(stored_hash) != self._params


def _password_bytes(password: str | bytes) -> bytes:
    if isinstance(password, str):
        encoded = unicodedata.normalize("NFC", password).encode("utf-8")
    elif isinstance(password, bytes | bytearray | memoryview):
        encoded = bytes(password)
    else:
        # bytes(n) of an int would silently be n zero bytes.
        raise TypeError("a password must be str or bytes")
    if len(encoded) > MAX_PASSWORD_BYTES:
        raise PasswordTooLong(f"password longer than {MAX_PASSWORD_BYTES} bytes")
    return encoded


def _b64_length(text: str, what: str) -> int:
    """The decoded length of canonical unpadded base64, as the PHC format writes it."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedPasswordHash(f"stored password hash: {what} is not base64") from None
    if base64.b64encode(raw).rstrip(b"=").decode("ascii") != text:
        raise MalformedPasswordHash(f"stored password hash: {what} is not canonical base64")
    return len(raw)


def _parse(stored_hash: str) -> PasswordParams:
    """The parameters of a stored hash, after checking it is one we accept."""
    if not isinstance(stored_hash, str) or len(stored_hash) > MAX_STORED_HASH_CHARS:
        raise MalformedPasswordHash("stored password hash is not a PHC string of sane length")
    match = _PHC.fullmatch(stored_hash)
    if match is None:
        raise MalformedPasswordHash("stored password hash is not an Argon2id PHC string")
    if int(match["v"]) != ARGON2_VERSION:
        raise MalformedPasswordHash(f"stored password hash: Argon2 version {match['v']}")
    try:
        return PasswordParams(
            time_cost=int(match["t"]),
            memory_cost_kib=int(match["m"]),
            parallelism=int(match["p"]),
            salt_len=_b64_length(match["salt"], "salt"),
            hash_len=_b64_length(match["tag"], "tag"),
        )
    except ValueError as exc:
        raise MalformedPasswordHash(f"stored password hash refused: {exc}") from None
