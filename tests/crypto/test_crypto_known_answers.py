"""Known-answer tests for the base primitives, from tests/data/known_answers.json: RFC 5869 A.1
(HKDF-SHA256), RFC 7748 §6.1 (X25519 Diffie-Hellman), RFC 8032 §7.1 TEST 1 (Ed25519) and
libsodium's `test/default/kdf.exp` (crypto_kdf).

PyNaCl 1.6.2 does not bind `crypto_kdf_derive_from_key` (notes/crypto.md §2). libsodium defines it
as BLAKE2b-512 keyed with the master key, with salt = LE64(subkey_id) ‖ 0^8 and personal = context
(8 bytes) ‖ 0^8, over the empty message, truncated by the digest-size parameter. The test below
reproduces libsodium's own vectors with `hashlib.blake2b` in exactly that shape, and checks that
PyNaCl's `crypto_generichash_blake2b_salt_personal` gives the same bytes, so either can stand in for
crypto_kdf should medrelay ever need it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from nacl import bindings

from medrelay.crypto import kdf
from medrelay.crypto.keys import DHPrivateKey, DHPublicKey, SigningKey, VerifyKey, x25519

# Values printed in the RFCs but not repeated in known_answers.json.
RFC5869_A1_PRK = bytes.fromhex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
RFC7748_BOB_PUBLIC = bytes.fromhex(
    "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
)


def _hex(entry: dict[str, Any], name: str) -> bytes:
    return bytes.fromhex(entry[name])


def test_rfc5869_a1_hkdf_sha256(known_answers: dict[str, Any]) -> None:
    """HKDF-SHA256 reproduces RFC 5869 A.1: PRK from extract, OKM from expand and the one-shot."""
    entry = known_answers["rfc5869_a1_hkdf_sha256"]
    ikm, salt, info, okm = (_hex(entry, name) for name in ("ikm", "salt", "info", "okm"))
    prk = kdf.hkdf_extract(salt, ikm)
    assert prk == RFC5869_A1_PRK
    assert kdf.hkdf_expand(prk, info, entry["L"]) == okm
    assert kdf.hkdf_sha256(ikm, salt, info, entry["L"]) == okm


def test_rfc7748_6_1_x25519(known_answers: dict[str, Any]) -> None:
    """RFC 7748 §6.1: both public keys from the private scalars, and both sides of the exchange
    (through the key classes and the raw helper) reach the same published shared secret."""
    entry = known_answers["rfc7748_6_1_x25519"]
    alice = DHPrivateKey(_hex(entry, "alice_private"))
    bob = DHPrivateKey(_hex(entry, "bob_private"))
    assert alice.public_key.raw == _hex(entry, "alice_public")
    assert bob.public_key.raw == RFC7748_BOB_PUBLIC
    shared = _hex(entry, "shared")
    assert alice.exchange(DHPublicKey(RFC7748_BOB_PUBLIC)) == shared
    assert bob.exchange(DHPublicKey(_hex(entry, "alice_public"))) == shared
    assert x25519(_hex(entry, "alice_private"), RFC7748_BOB_PUBLIC) == shared


def test_rfc8032_7_1_test1_ed25519(known_answers: dict[str, Any]) -> None:
    """RFC 8032 TEST 1: the public key from the seed, the deterministic signature of the empty
    message, and its verification through a freshly decoded VerifyKey."""
    entry = known_answers["rfc8032_7_1_test1_ed25519"]
    signing_key = SigningKey(_hex(entry, "seed"))
    assert signing_key.verify_key.raw == _hex(entry, "public")
    message, signature = _hex(entry, "message"), _hex(entry, "signature")
    assert signing_key.sign(message) == signature
    VerifyKey(_hex(entry, "public")).verify(message, signature)


def _crypto_kdf(master_key: bytes, subkey_id: int, context: bytes, length: int) -> bytes:
    """libsodium crypto_kdf_derive_from_key, written as its BLAKE2b definition."""
    return hashlib.blake2b(
        b"",
        digest_size=length,
        key=master_key,
        salt=subkey_id.to_bytes(8, "little") + bytes(8),
        person=context + bytes(8),
    ).digest()


@pytest.mark.parametrize(
    ("subkey_id", "length", "field"),
    [(0, 64, "subkey_0_len64_prefix"), (16, 16, "subkey_16_len16")],
)
def test_libsodium_kdf_is_blake2b_with_salt_and_personal(
    known_answers: dict[str, Any], subkey_id: int, length: int, field: str
) -> None:
    """crypto_kdf emulated with hashlib.blake2b reproduces libsodium's kdf.exp, and PyNaCl's
    salt/personal BLAKE2b binding agrees byte for byte."""
    entry = known_answers["libsodium_kdf"]
    master, context, expected = (
        _hex(entry, "master_key"),
        entry["context"].encode(),
        _hex(entry, field),
    )
    assert len(context) == 8
    derived = _crypto_kdf(master, subkey_id, context, length)
    assert derived[: len(expected)] == expected
    via_pynacl = bindings.crypto_generichash_blake2b_salt_personal(
        b"",
        digest_size=length,
        key=master,
        salt=subkey_id.to_bytes(8, "little") + bytes(8),
        person=context + bytes(8),
    )
    assert via_pynacl == derived
