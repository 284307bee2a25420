"""medrelay.crypto.identity: ids are validated (empty, too long, control characters, surrogates),
DeviceIdentity insists on the right key types and a 32-byte certificate hash, and DeviceKeys only
pairs private keys with the identity they belong to."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.crypto.identity import (
    CERTIFICATE_HASH_SIZE,
    MAX_ID_BYTES,
    DeviceAddress,
    DeviceIdentity,
    DeviceKeys,
    check_id,
)
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.rng import seeded_rng

CERT_HASH = bytes(range(CERTIFICATE_HASH_SIZE))


def _keys(label: bytes) -> tuple[SigningKey, DHPrivateKey]:
    rng = seeded_rng(label)
    return SigningKey.generate(rng), DHPrivateKey.generate(rng)


def _identity(signing: SigningKey, dh: DHPrivateKey, **changes: Any) -> DeviceIdentity:
    fields: dict[str, Any] = {
        "user_id": "dr.ivanova",
        "device_id": "phone-1",
        "signing_key": signing.verify_key,
        "dh_key": dh.public_key,
        "certificate_hash": CERT_HASH,
    }
    fields.update(changes)
    return DeviceIdentity(**fields)


# ---------------------------------------------------------------------------------------------
# check_id


@pytest.mark.parametrize(
    "value",
    ["a", "dr.ivanova", "Иванова", "患者-17", "a b", "x" * MAX_ID_BYTES, "é" * (MAX_ID_BYTES // 2)],
)
def test_ordinary_ids_are_accepted_unchanged(value: str) -> None:
    """ASCII, Cyrillic, CJK, inner spaces and ids of exactly 64 UTF-8 bytes pass and come back
    as given."""
    assert check_id(value, "user id") == value


def test_empty_ids_are_refused() -> None:
    """An empty id is a ValueError naming the field."""
    with pytest.raises(ValueError, match="device id must not be empty"):
        check_id("", "device id")


@pytest.mark.parametrize("value", ["x" * (MAX_ID_BYTES + 1), "é" * 33, "患" * 22])
def test_ids_longer_than_64_utf8_bytes_are_refused(value: str) -> None:
    """The limit counts UTF-8 bytes, not characters: 33 two-byte or 22 three-byte characters are
    too long."""
    with pytest.raises(ValueError, match="longer than 64 bytes"):
        check_id(value, "user id")


@pytest.mark.parametrize("code_point", [*range(0x20), 0x7F, *range(0x80, 0xA0)])
def test_control_characters_are_refused_anywhere(code_point: int) -> None:
    """C0 controls, DEL and C1 controls (all of Unicode category Cc) are refused at the start,
    inside and at the end of an id."""
    char = chr(code_point)
    for value in (char + "abc", "ab" + char + "c", "abc" + char):
        with pytest.raises(ValueError, match="control"):
            check_id(value, "user id")


def test_lone_surrogates_are_refused() -> None:
    """A lone surrogate cannot be encoded as UTF-8: ValueError, not UnicodeEncodeError leaking
    its own message."""
    with pytest.raises(ValueError, match="surrogate"):
        check_id("ab\ud800", "user id")


def test_non_string_ids_are_type_errors() -> None:
    """bytes or None as an id is a TypeError."""
    for value in (b"alice", None, 5):
        with pytest.raises(TypeError):
            check_id(value, "user id")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=70))
def test_check_id_accepts_exactly_the_documented_set(value: str) -> None:
    """For any string: accepted iff non-empty, no Cc control, no surrogate and <= 64 UTF-8 bytes
    (the rule other modules' tests generate ids by)."""
    valid = (
        bool(value)
        and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        and len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES
    )
    if valid:
        assert check_id(value, "id") == value
    else:
        with pytest.raises(ValueError):
            check_id(value, "id")


# ---------------------------------------------------------------------------------------------
# DeviceAddress and DeviceIdentity


def test_device_address_validates_both_ids() -> None:
    """DeviceAddress refuses an invalid user or device id like DeviceIdentity does."""
    assert DeviceAddress("u", "d") == DeviceAddress("u", "d")
    with pytest.raises(ValueError, match="user id"):
        DeviceAddress("", "d")
    with pytest.raises(ValueError, match="device id"):
        DeviceAddress("u", "d\n")


def test_device_identity_is_a_hashable_value_with_an_address() -> None:
    """Equal fields make equal, equally hashed identities; `address` is its (user, device)."""
    signing, dh = _keys(b"id")
    identity = _identity(signing, dh)
    assert identity == _identity(signing, dh)
    assert hash(identity) == hash(_identity(signing, dh))
    assert identity.address == DeviceAddress("dr.ivanova", "phone-1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.user_id = "mallory"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("user_id", "", "user id must not be empty"),
        ("device_id", "", "device id must not be empty"),
        ("user_id", "x" * 65, "user id is longer"),
        ("device_id", "ph\x00ne", "device id contains control"),
        ("user_id", "dr\u0085ivanova", "user id contains control"),
    ],
)
def test_device_identity_refuses_invalid_ids(field: str, value: str, message: str) -> None:
    """Each id rule applies to both ids of a DeviceIdentity, with a message naming the field."""
    signing, dh = _keys(b"id")
    with pytest.raises(ValueError, match=message):
        _identity(signing, dh, **{field: value})


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_device_identity_refuses_certificate_hashes_that_are_not_32_bytes(length: int) -> None:
    """The certificate hash is a SHA-256: any other length is a ValueError."""
    signing, dh = _keys(b"id")
    with pytest.raises(ValueError, match="32 bytes"):
        _identity(signing, dh, certificate_hash=bytes(length))


def test_device_identity_freezes_a_mutable_certificate_hash() -> None:
    """A bytearray hash is stored as bytes, so later changes to the caller's buffer do not reach
    the identity and it stays hashable; a 32-character str is a TypeError."""
    signing, dh = _keys(b"id")
    buffer = bytearray(CERT_HASH)
    identity = _identity(signing, dh, certificate_hash=buffer)
    buffer[0] ^= 0xFF
    assert identity.certificate_hash == CERT_HASH
    assert type(identity.certificate_hash) is bytes
    hash(identity)
    with pytest.raises(TypeError):
        _identity(signing, dh, certificate_hash="h" * 32)


def test_device_identity_refuses_swapped_or_private_keys() -> None:
    """The signing key must be a VerifyKey and the DH key a DHPublicKey: swapping them, or
    passing private keys, is a TypeError."""
    signing, dh = _keys(b"id")
    for changes in (
        {"signing_key": dh.public_key},
        {"dh_key": signing.verify_key},
        {"signing_key": signing},
        {"dh_key": dh},
    ):
        with pytest.raises(TypeError):
            _identity(signing, dh, **changes)


# ---------------------------------------------------------------------------------------------
# DeviceKeys


def test_device_keys_accept_the_private_keys_of_their_identity() -> None:
    """DeviceKeys holds the identity with the private keys that belong to it."""
    signing, dh = _keys(b"own")
    keys = DeviceKeys(_identity(signing, dh), signing, dh)
    assert keys.signing_key.verify_key == keys.identity.signing_key
    assert keys.dh_key.public_key == keys.identity.dh_key


def test_device_keys_refuse_mismatched_private_keys() -> None:
    """Another device's signing key or DH key is a ValueError naming which key does not match."""
    signing, dh = _keys(b"own")
    other_signing, other_dh = _keys(b"other")
    identity = _identity(signing, dh)
    with pytest.raises(ValueError, match="signing key does not match"):
        DeviceKeys(identity, other_signing, dh)
    with pytest.raises(ValueError, match="DH key does not match"):
        DeviceKeys(identity, signing, other_dh)


def test_device_keys_refuse_wrong_types() -> None:
    """Public keys in place of private ones, or a bare address as the identity, are TypeErrors."""
    signing, dh = _keys(b"own")
    identity = _identity(signing, dh)
    with pytest.raises(TypeError):
        DeviceKeys(identity, signing.verify_key, dh)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DeviceKeys(identity, signing, dh.public_key)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DeviceKeys(identity.address, signing, dh)  # type: ignore[arg-type]


def test_device_keys_repr_shows_no_private_key_bytes() -> None:
    """The dataclass repr of DeviceKeys goes through the keys' reprs: no seed in hex."""
    signing, dh = _keys(b"own")
    text = repr(DeviceKeys(_identity(signing, dh), signing, dh))
    assert signing.seed.hex() not in text
    assert dh.raw.hex() not in text
    assert "dr.ivanova" in text
