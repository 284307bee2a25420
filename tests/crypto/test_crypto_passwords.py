"""Account password hashing (medrelay.crypto.passwords): Argon2id PHC strings."""

from __future__ import annotations

import base64
import unicodedata

import argon2.profiles
import nacl.pwhash.argon2id
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.exceptions import InvalidkeyError

from medrelay.crypto.errors import MalformedEncoding
from medrelay.crypto.passwords import (
    MalformedPasswordHash,
    PasswordHasher,
    PasswordParams,
    PasswordTooLong,
)
from medrelay.crypto.rng import Rng, seeded_rng

FAST = PasswordParams.for_tests()
FAST_HASHER = PasswordHasher(FAST)


def test_default_params_are_rfc9106_low_memory() -> None:
    """The default is RFC 9106's second recommendation: t=3, 64 MiB, p=4, 16-byte salt,
    32-byte tag, the same as argon2-cffi's RFC_9106_LOW_MEMORY profile."""
    params = PasswordParams()
    assert (params.time_cost, params.memory_cost_kib, params.parallelism) == (3, 65536, 4)
    assert (params.salt_len, params.hash_len) == (16, 32)
    profile = argon2.profiles.RFC_9106_LOW_MEMORY
    assert (params.time_cost, params.memory_cost_kib, params.parallelism) == (
        profile.time_cost,
        profile.memory_cost,
        profile.parallelism,
    )
    assert PasswordHasher().params == params


def test_test_params_are_argon2_minimums() -> None:
    """`for_tests` is t=1, 8 KiB, p=1, with the same salt and tag sizes as the default."""
    assert PasswordParams(time_cost=1, memory_cost_kib=8, parallelism=1) == FAST
    assert (FAST.salt_len, FAST.hash_len) == (16, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"time_cost": 0},
        {"time_cost": 17},
        {"parallelism": 0},
        {"parallelism": 17},
        {"memory_cost_kib": 31, "parallelism": 4},  # under 8 KiB per lane
        {"memory_cost_kib": 1024 * 1024 + 1},
        {"salt_len": 8},
        {"hash_len": 8},
        {"hash_len": 65},
    ],
)
def test_params_outside_the_allowed_range_are_refused(kwargs: dict[str, int]) -> None:
    """PasswordParams are always something Argon2 accepts and we agree to run."""
    with pytest.raises(ValueError):
        PasswordParams(**kwargs)


def test_hash_is_an_argon2id_phc_string_salted_from_the_rng() -> None:
    """The hash is `$argon2id$v=19$m=..,t=..,p=..$salt$tag`, and the salt is the rng's bytes."""
    salt_source = seeded_rng(b"salt")
    expected_salt = base64.b64encode(salt_source(16)).rstrip(b"=").decode()
    stored = FAST_HASHER.hash("hunter2", seeded_rng(b"salt"))
    assert stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert stored.split("$")[4] == expected_salt
    assert stored == FAST_HASHER.hash("hunter2", seeded_rng(b"salt"))
    assert stored != FAST_HASHER.hash("hunter2", seeded_rng(b"other salt"))


def test_right_password_verifies_and_wrong_is_false(rng: Rng) -> None:
    """verify is True for the password and False (not an exception) for any other."""
    stored = FAST_HASHER.hash("correct horse", rng)
    assert FAST_HASHER.verify(stored, "correct horse") is True
    assert FAST_HASHER.verify(stored, b"correct horse") is True
    assert FAST_HASHER.verify(stored, "correct horsE") is False
    assert FAST_HASHER.verify(stored, "") is False


@settings(max_examples=25, deadline=None)
@given(password=st.text(max_size=64), other=st.text(max_size=64))
def test_hash_verify_property(password: str, other: str) -> None:
    """Any password verifies against its own hash; another password does not."""
    stored = FAST_HASHER.hash(password, seeded_rng(password.encode()))
    assert FAST_HASHER.verify(stored, password)
    same = unicodedata.normalize("NFC", other) == unicodedata.normalize("NFC", password)
    assert FAST_HASHER.verify(stored, other) is same


def test_str_passwords_are_nfc_normalised(rng: Rng) -> None:
    """A password typed decomposed verifies against the composed one."""
    stored = FAST_HASHER.hash(unicodedata.normalize("NFD", "pässwörd"), rng)
    assert FAST_HASHER.verify(stored, unicodedata.normalize("NFC", "pässwörd"))


def test_hashes_verify_with_another_hasher_of_other_params(rng: Rng) -> None:
    """A hash carries its own parameters: a hasher configured differently still verifies it."""
    stored = FAST_HASHER.hash("pw", rng)
    other = PasswordHasher(PasswordParams(time_cost=2, memory_cost_kib=16, parallelism=2))
    assert other.verify(stored, "pw")
    assert not other.verify(stored, "wrong")


def test_password_length_is_bounded(rng: Rng) -> None:
    """1024 bytes is accepted; 1025 bytes is PasswordTooLong on hash and on verify."""
    stored = FAST_HASHER.hash(b"x" * 1024, rng)
    assert FAST_HASHER.verify(stored, b"x" * 1024)
    with pytest.raises(PasswordTooLong):
        FAST_HASHER.hash(b"x" * 1025, rng)
    with pytest.raises(PasswordTooLong):
        FAST_HASHER.hash("ü" * 513, rng)  # 1026 bytes of UTF-8
    with pytest.raises(PasswordTooLong):
        FAST_HASHER.verify(stored, "x" * 1025)


MALFORMED = [
    "",
    "garbage",
    "$argon2id$",
    "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,  # not Argon2id
    "$argon2d$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,
    "$argon2id$v=16$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,  # old Argon2 version
    "$argon2id$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,  # no version
    "$argon2id$v=19$m=0,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,
    "$argon2id$v=19$m=08,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,  # leading zero
    "$argon2id$v=19$t=1,m=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,  # field order
    "$argon2id$v=19$m=8,t=1,p=1,x=2$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43,  # padded
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdB$" + "A" * 43,  # non-canonical bits
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$" + "A" * 43,  # 8-byte salt
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAA",  # 3-byte tag
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43 + " ",
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43 + "\n",
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 600,  # absurdly long
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 42 + "é",
]


@pytest.mark.parametrize("stored", MALFORMED)
def test_malformed_stored_hash_is_a_clean_crypto_error(stored: str) -> None:
    """verify and needs_rehash raise MalformedPasswordHash (a MalformedEncoding), never an
    argon2 exception and never a silent False."""
    with pytest.raises(MalformedPasswordHash) as info:
        FAST_HASHER.verify(stored, "pw")
    assert isinstance(info.value, MalformedEncoding)
    with pytest.raises(MalformedPasswordHash):
        FAST_HASHER.needs_rehash(stored)


@pytest.mark.parametrize(
    "costs",
    [
        "m=4194304,t=1,p=1",  # 4 GiB
        "m=1048577,t=1,p=1",  # just above 1 GiB
        "m=65536,t=4294967295,p=1",
        "m=65536,t=3,p=255",
        "m=9999999999,t=1,p=1",
    ],
)
def test_hostile_costs_in_a_stored_hash_are_refused_without_running(costs: str) -> None:
    """A planted hash asking for gigabytes or billions of passes is refused at once."""
    stored = f"$argon2id$v=19${costs}$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43
    with pytest.raises(MalformedPasswordHash, match="refused"):
        FAST_HASHER.verify(stored, "pw")


def test_non_string_stored_hash_is_malformed() -> None:
    """A stored hash that is not a str (a bytes column read raw) is refused clearly."""
    with pytest.raises(MalformedPasswordHash):
        FAST_HASHER.verify(b"$argon2id$v=19$m=8,t=1,p=1$AAAA$AAAA", "pw")  # type: ignore[arg-type]


def test_needs_rehash_flips_when_any_parameter_changes(rng: Rng) -> None:
    """A hash made with the hasher's own params needs no rehash; one made with any other time,
    memory, parallelism, salt or tag length does."""
    stored = FAST_HASHER.hash("pw", rng)
    assert FAST_HASHER.needs_rehash(stored) is False
    for changed in (
        PasswordParams(time_cost=2, memory_cost_kib=8, parallelism=1),
        PasswordParams(time_cost=1, memory_cost_kib=16, parallelism=1),
        PasswordParams(time_cost=1, memory_cost_kib=16, parallelism=2),
        PasswordParams(time_cost=1, memory_cost_kib=8, parallelism=1, salt_len=32),
        PasswordParams(time_cost=1, memory_cost_kib=8, parallelism=1, hash_len=64),
    ):
        upgraded = PasswordHasher(changed)
        assert upgraded.needs_rehash(stored) is True
        rehashed = upgraded.hash("pw", rng)
        assert upgraded.needs_rehash(rehashed) is False
        assert FAST_HASHER.needs_rehash(rehashed) is True
        assert upgraded.verify(rehashed, "pw")


def test_default_hasher_wants_test_hashes_rehashed(rng: Rng) -> None:
    """A hash made with weak test params is flagged by the default (RFC 9106) hasher."""
    assert PasswordHasher().needs_rehash(FAST_HASHER.hash("pw", rng)) is True


@pytest.mark.parametrize(
    "params",
    [FAST, PasswordParams(time_cost=2, memory_cost_kib=64, parallelism=4)],
    ids=["p1", "p4"],
)
def test_our_hashes_verify_in_libsodium(rng: Rng, params: PasswordParams) -> None:
    """argon2-cffi's PHC strings (also with 4 lanes) verify with nacl.pwhash.argon2id.verify,
    and libsodium rejects the wrong password."""
    stored = PasswordHasher(params).hash("interop pw", rng)
    assert nacl.pwhash.argon2id.verify(stored.encode("ascii"), b"interop pw")
    with pytest.raises(InvalidkeyError):
        nacl.pwhash.argon2id.verify(stored.encode("ascii"), b"other pw")


def test_libsodium_hashes_verify_here() -> None:
    """A hash made by nacl.pwhash.argon2id.str verifies here, and with matching params needs no
    rehash (libsodium writes p=1, 16-byte salt, 32-byte tag)."""
    stored = nacl.pwhash.argon2id.str(
        b"interop pw",
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
    ).decode("ascii")
    assert stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert FAST_HASHER.verify(stored, "interop pw")
    assert not FAST_HASHER.verify(stored, "other pw")
    assert FAST_HASHER.needs_rehash(stored) is False


def test_non_text_password_is_a_type_error(rng: Rng) -> None:
    """An int is not silently turned into zero bytes."""
    with pytest.raises(TypeError):
        FAST_HASHER.hash(8, rng)  # type: ignore[arg-type]
