"""Project Wycheproof vectors (tests/data/wycheproof, C2SP/wycheproof testvectors_v1 at dac1dd4)
run through medrelay's own wrappers (`medrelay.crypto.keys`, `aead`, `kdf`), never PyNaCl directly,
so they prove the wrappers and not just libsodium.

Every test case is its own pytest case, named `tc<id>-<comment or flags>`, so a failure names the
vector. For each file a counting test checks that the number of collected cases equals the file's
`numberOfTests`: a group of an unexpected type (which the collector would skip) fails the suite.

What each Wycheproof result means here:

- X25519 (`x25519_test.json`): "valid" → `DHPrivateKey(private).exchange(DHPublicKey(public))`
  returns exactly `shared`. "acceptable" is decided by flag:
  * `LowOrderPublic` (all of which are also `ZeroSharedSecret`) → **refused**: `DHPublicKey` itself
    raises `InvalidKey` (a low-order point is useless as a peer key and its secret predictable);
  * `ZeroSharedSecret` without `LowOrderPublic` (none in this snapshot) → **refused** by `exchange`
    with `InvalidKey`;
  * everything else (`Twist`, `NonCanonicalPublic`, edge-case multiplications) → **accepted** with
    the exact expected secret, as RFC 7748 §5 requires implementations to accept any u.
  "invalid" (none in this snapshot) → some `CryptoError`.
- Ed25519 (`ed25519_test.json`): "valid" → `VerifyKey(pk).verify(msg, sig)` returns; "invalid" →
  `BadSignature` (or, should a key ever be unusable, `InvalidKey` when it is constructed). Every
  group's key is a valid main-subgroup point, and the file has no "acceptable" case; one would fail.
- XChaCha20-Poly1305 (`xchacha20_poly1305_test.json`): "valid" → `aead.encrypt` gives exactly
  `ct ‖ tag` and `aead.decrypt` gives back `msg`; "invalid" → `aead.decrypt` refuses with a
  `CryptoError`: `DecryptionFailed` for a modified tag, `AeadParameterError` for a nonce that is not
  24 bytes (and `aead.encrypt` refuses that nonce too).
- HKDF-SHA256 (`hkdf_sha256_test.json`): "valid" → `kdf.hkdf_sha256(ikm, salt, info, size)` is
  exactly `okm` (an empty salt is RFC 5869's default of HashLen zeros); "invalid" (`SizeTooLarge`,
  L > 255·32) → `ValueError`, which `hkdf_expand` documents for lengths it cannot produce.
- HMAC-SHA256 (`hmac_sha256_test.json`): a pure function, so "valid" → the first `tagSize/8` bytes
  of `kdf.hmac_sha256(key, msg)` equal `tag` (compared with `constant_time_equal`, as callers
  must), "invalid" → they differ.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medrelay.crypto import aead, kdf
from medrelay.crypto.errors import BadSignature, CryptoError, DecryptionFailed, InvalidKey
from medrelay.crypto.keys import DHPrivateKey, DHPublicKey, VerifyKey

WYCHEPROOF = Path(__file__).resolve().parent.parent / "data" / "wycheproof"

# Each file and the only group type its tests know how to run.
GROUP_TYPES = {
    "x25519_test.json": "XdhComp",
    "ed25519_test.json": "EddsaVerify",
    "xchacha20_poly1305_test.json": "AeadTest",
    "hkdf_sha256_test.json": "HkdfTest",
    "hmac_sha256_test.json": "MacTest",
}
RESULTS = {"valid", "invalid", "acceptable"}


@dataclass(frozen=True, slots=True)
class Vector:
    """One Wycheproof test case together with its group's shared parameters."""

    group: dict[str, Any]
    test: dict[str, Any]

    def hex(self, name: str) -> bytes:
        return bytes.fromhex(self.test[name])

    @property
    def result(self) -> str:
        result: str = self.test["result"]
        return result

    @property
    def flags(self) -> frozenset[str]:
        return frozenset(self.test["flags"])


def _load(file_name: str) -> dict[str, Any]:
    with (WYCHEPROOF / file_name).open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def _case_id(test: dict[str, Any]) -> str:
    label = test["comment"] or "-".join(test["flags"]) or "case"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")[:60].rstrip("-")
    return f"tc{test['tcId']}-{slug}"


def _vectors(file_name: str) -> Iterator[Vector]:
    """Every test of the groups of the expected type (others are left out and counted below)."""
    for group in _load(file_name)["testGroups"]:
        if group["type"] == GROUP_TYPES[file_name]:
            for test in group["tests"]:
                yield Vector(group, test)


def _params(file_name: str) -> list[Any]:
    return [pytest.param(vector, id=_case_id(vector.test)) for vector in _vectors(file_name)]


@pytest.mark.parametrize("file_name", sorted(GROUP_TYPES))
def test_every_vector_of_the_file_is_run(file_name: str) -> None:
    """The parametrised cases cover the file's `numberOfTests` exactly, with unique tcIds and only
    the three known results: nothing is skipped silently."""
    data = _load(file_name)
    vectors = list(_vectors(file_name))
    assert len(vectors) == data["numberOfTests"]
    assert len({vector.test["tcId"] for vector in vectors}) == len(vectors)
    assert {vector.result for vector in vectors} <= RESULTS


# ---------------------------------------------------------------------------------------------
# X25519


def _x25519(vector: Vector) -> bytes:
    return DHPrivateKey(vector.hex("private")).exchange(DHPublicKey(vector.hex("public")))


@pytest.mark.parametrize("vector", _params("x25519_test.json"))
def test_x25519(vector: Vector) -> None:
    """Valid and harmless acceptable vectors give the exact secret; low-order public keys are
    refused by DHPublicKey and zero shared secrets by exchange, both as InvalidKey."""
    if vector.result == "invalid":
        with pytest.raises(CryptoError):
            _x25519(vector)
    elif "LowOrderPublic" in vector.flags:
        with pytest.raises(InvalidKey):
            DHPublicKey(vector.hex("public"))
    elif "ZeroSharedSecret" in vector.flags:
        with pytest.raises(InvalidKey):
            _x25519(vector)
    else:
        assert _x25519(vector) == vector.hex("shared")


def test_x25519_acceptable_vectors_split_as_documented() -> None:
    """The snapshot's "acceptable" X25519 cases are 31 refused (low order, zero secret) and 223
    accepted (twist, non-canonical u, edge cases), as notes/crypto.md §2 observed for PyNaCl."""
    acceptable = [v for v in _vectors("x25519_test.json") if v.result == "acceptable"]
    refused = [v for v in acceptable if v.flags & {"LowOrderPublic", "ZeroSharedSecret"}]
    assert (len(refused), len(acceptable) - len(refused)) == (31, 223)


# ---------------------------------------------------------------------------------------------
# Ed25519


@pytest.mark.parametrize("vector", _params("ed25519_test.json"))
def test_ed25519_verify(vector: Vector) -> None:
    """Valid signatures verify; invalid ones (malleable S, bad encodings, truncations, garbage)
    raise BadSignature, never a PyNaCl error."""
    message, signature = vector.hex("msg"), vector.hex("sig")
    public = bytes.fromhex(vector.group["publicKey"]["pk"])
    assert vector.result in {"valid", "invalid"}
    if vector.result == "valid":
        VerifyKey(public).verify(message, signature)
    else:
        try:
            key = VerifyKey(public)
        except InvalidKey:
            return
        with pytest.raises(BadSignature):
            key.verify(message, signature)


# ---------------------------------------------------------------------------------------------
# XChaCha20-Poly1305


@pytest.mark.parametrize("vector", _params("xchacha20_poly1305_test.json"))
def test_xchacha20_poly1305(vector: Vector) -> None:
    """Valid vectors encrypt to exactly ct‖tag and decrypt back; a modified tag is
    DecryptionFailed and a nonce of the wrong size AeadParameterError, in both directions."""
    key, nonce, ad = vector.hex("key"), vector.hex("iv"), vector.hex("aad")
    message, sealed = vector.hex("msg"), vector.hex("ct") + vector.hex("tag")
    assert vector.result in {"valid", "invalid"}
    if vector.result == "valid":
        assert aead.encrypt(key, nonce, message, ad) == sealed
        assert aead.decrypt(key, nonce, sealed, ad) == message
    elif "InvalidNonceSize" in vector.flags:
        with pytest.raises(aead.AeadParameterError):
            aead.decrypt(key, nonce, sealed, ad)
        with pytest.raises(aead.AeadParameterError):
            aead.encrypt(key, nonce, message, ad)
    else:
        expected = DecryptionFailed if "ModifiedTag" in vector.flags else CryptoError
        with pytest.raises(expected):
            aead.decrypt(key, nonce, sealed, ad)


# ---------------------------------------------------------------------------------------------
# HKDF-SHA256


@pytest.mark.parametrize("vector", _params("hkdf_sha256_test.json"))
def test_hkdf_sha256(vector: Vector) -> None:
    """Valid vectors give exactly okm; sizes above 255·HashLen are a ValueError."""
    ikm, salt, info, size = (
        vector.hex("ikm"),
        vector.hex("salt"),
        vector.hex("info"),
        vector.test["size"],
    )
    assert vector.result in {"valid", "invalid"}
    if vector.result == "valid":
        assert kdf.hkdf_sha256(ikm, salt, info, size) == vector.hex("okm")
    else:
        assert size > kdf.MAX_HKDF_LENGTH
        with pytest.raises(ValueError):
            kdf.hkdf_sha256(ikm, salt, info, size)


# ---------------------------------------------------------------------------------------------
# HMAC-SHA256


@pytest.mark.parametrize("vector", _params("hmac_sha256_test.json"))
def test_hmac_sha256(vector: Vector) -> None:
    """The tagSize-bit prefix of HMAC-SHA256 matches valid tags and never matches invalid ones."""
    tag_bytes = vector.group["tagSize"] // 8
    computed = kdf.hmac_sha256(vector.hex("key"), vector.hex("msg"))[:tag_bytes]
    assert vector.result in {"valid", "invalid"}
    assert kdf.constant_time_equal(computed, vector.hex("tag")) is (vector.result == "valid")
