"""X3DH against an independent implementation: python-x3dh 1.3.0 (Syndace), in both directions.

python-x3dh has no separate DH identity key, so our agreement core runs in "mode B" here
(notes/crypto.md §3.5, §5): one Ed25519 identity key per party, converted to X25519 with
`crypto_sign_ed25519_{pk,sk}_to_curve25519` for DH1/DH2, the SPK signed by plain Ed25519 over its
raw 32 bytes, and AD = IK_A(Ed25519) ‖ IK_B(Ed25519). Everything else (0xFF prefix, zero salt,
info, DH order, SHA-256) is exactly what production uses, so byte-identical SK and AD show that
the core is the X3DH of the specification.

python-x3dh draws its keys from `secrets`; the tests swap that module's `secrets` for a seeded
source so every run is reproducible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import x3dh
import x3dh.base_state
import xeddsa
from nacl import bindings
from x3dh.identity_key_pair import IdentityKeyPairSeed

from medrelay.crypto.errors import BadSignature
from medrelay.crypto.identity import DeviceIdentity, DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, DHPublicKey, SigningKey, VerifyKey
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.x3dh import (
    INFO,
    PrekeyMessageHeader,
    initiator_shared_secret,
    respond,
    responder_shared_secret,
)


class InteropState(x3dh.BaseState):
    """The configuration that interoperated (notes §5): raw public keys, no encoding."""

    @staticmethod
    def _encode_public_key(key_format: Any, pub: bytes) -> bytes:
        return pub


class SeededSecrets:
    """Stands in for the `secrets` module inside python-x3dh."""

    def __init__(self, rng: Rng) -> None:
        self._rng = rng

    def token_bytes(self, n: int) -> bytes:
        return self._rng(n)

    def choice(self, seq: Sequence[bytes]) -> bytes:
        return sorted(seq)[0]


@pytest.fixture(autouse=True)
def seeded_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(x3dh.base_state, "secrets", SeededSecrets(seeded_rng(b"oracle")))


def oracle_state(seed: bytes, one_time_prekeys: int) -> Any:
    state = InteropState.create(
        x3dh.IdentityKeyFormat.ED_25519,
        x3dh.HashFunction.SHA_256,
        INFO,
        IdentityKeyPairSeed(seed),
    )
    state.generate_pre_keys(one_time_prekeys)
    return state


class ModeBIdentity:
    """Our side in mode B: one Ed25519 key, its X25519 twin for DH."""

    def __init__(self, seed: bytes) -> None:
        self.signing_key = SigningKey(seed)
        _, secret = bindings.crypto_sign_seed_keypair(seed)
        self.dh_key = DHPrivateKey(bindings.crypto_sign_ed25519_sk_to_curve25519(secret))

    @property
    def ed25519_public(self) -> bytes:
        return self.signing_key.verify_key.raw

    def device_keys(self, user_id: str, device_id: str) -> DeviceKeys:
        identity = DeviceIdentity(
            user_id, device_id, self.signing_key.verify_key, self.dh_key.public_key, bytes(32)
        )
        return DeviceKeys(identity, self.signing_key, self.dh_key)


def dh_twin(ed25519_public: bytes) -> DHPublicKey:
    return DHPublicKey(bindings.crypto_sign_ed25519_pk_to_curve25519(ed25519_public))


def test_mode_b_dh_key_is_the_oracles_identity_dh_key() -> None:
    """Our Ed25519→X25519 conversion of the seed equals python-x3dh's (pk and sk sides)."""
    seed = b"\x42" * 32
    ours = ModeBIdentity(seed)
    assert ours.dh_key.raw == xeddsa.seed_to_priv(seed)
    assert ours.dh_key.public_key == dh_twin(ours.ed25519_public)
    assert ours.ed25519_public == xeddsa.seed_to_ed25519_pub(seed)


@pytest.mark.parametrize("with_one_time", [True, False])
def test_oracle_initiates_and_we_respond(rng: Rng, with_one_time: bool) -> None:
    """python-x3dh (Alice) runs the active side on our bundle; we derive the same SK and AD."""
    alice = oracle_state(b"\xa1" * 32, 0)
    bob = ModeBIdentity(b"\xb0" * 32)
    spk = DHPrivateKey.generate(rng)
    opk = DHPrivateKey.generate(rng)
    bundle = x3dh.Bundle(
        identity_key=bob.ed25519_public,
        signed_pre_key=spk.public_key.raw,
        signed_pre_key_sig=bob.signing_key.sign(spk.public_key.raw),
        pre_keys=frozenset({opk.public_key.raw}) if with_one_time else frozenset(),
    )
    shared_secret, ad, header = asyncio.run(
        alice.get_shared_secret_active(bundle, require_pre_key=with_one_time)
    )
    assert header.signed_pre_key == spk.public_key.raw
    assert header.pre_key == (opk.public_key.raw if with_one_time else None)

    ours = responder_shared_secret(
        bob.dh_key,
        spk,
        opk if with_one_time else None,
        dh_twin(header.identity_key),
        DHPublicKey(header.ephemeral_key),
    )
    assert ours == shared_secret
    assert header.identity_key + bob.ed25519_public == ad

    # The production entry point, given mode-B device keys, computes the same SK (its AD is the
    # layout-A one, so only the secret is comparable).
    bob_device = bob.device_keys("bob", "laptop")
    alice_identity = DeviceIdentity(
        "alice",
        "phone",
        VerifyKey(header.identity_key),
        dh_twin(header.identity_key),
        bytes(32),
    )
    our_header = PrekeyMessageHeader(
        "alice",
        "phone",
        alice_identity.dh_key,
        DHPublicKey(header.ephemeral_key),
        1,
        2 if with_one_time else None,
    )
    via_respond, _ = respond(
        bob_device, alice_identity, our_header, spk, opk if with_one_time else None
    )
    assert via_respond == shared_secret


@pytest.mark.parametrize("with_one_time", [True, False])
def test_we_initiate_and_the_oracle_responds(with_one_time: bool) -> None:
    """We run the active side on python-x3dh's bundle (verifying its SPK signature with our
    Ed25519); python-x3dh derives the same SK and AD from our header."""
    bob = oracle_state(b"\xb1" * 32, 1 if with_one_time else 0)
    alice = ModeBIdentity(b"\xa0" * 32)
    bundle = bob.bundle
    VerifyKey(bundle.identity_key).verify(bundle.signed_pre_key, bundle.signed_pre_key_sig)
    opk = next(iter(bundle.pre_keys)) if with_one_time else None

    ephemeral = DHPrivateKey.generate(seeded_rng(b"alice ek"))
    ours = initiator_shared_secret(
        alice.dh_key,
        ephemeral,
        dh_twin(bundle.identity_key),
        DHPublicKey(bundle.signed_pre_key),
        None if opk is None else DHPublicKey(opk),
    )
    our_ad = alice.ed25519_public + bundle.identity_key

    header = x3dh.Header(
        identity_key=alice.ed25519_public,
        ephemeral_key=ephemeral.public_key.raw,
        signed_pre_key=bundle.signed_pre_key,
        pre_key=opk,
    )
    shared_secret, ad, _ = asyncio.run(
        bob.get_shared_secret_passive(header, require_pre_key=with_one_time)
    )
    assert shared_secret == ours
    assert ad == our_ad


def test_both_directions_agree_on_the_same_keys(rng: Rng) -> None:
    """Cross-check with fixed keys on both sides: the oracle's SK for a run equals ours whether
    it plays Alice or Bob, so neither direction hides a swapped DH order."""
    alice_seed, bob_seed = b"\x0a" * 32, b"\x0b" * 32
    alice_oracle = oracle_state(alice_seed, 0)
    bob_ours = ModeBIdentity(bob_seed)
    spk = DHPrivateKey.generate(rng)
    opk = DHPrivateKey.generate(rng)
    bundle = x3dh.Bundle(
        identity_key=bob_ours.ed25519_public,
        signed_pre_key=spk.public_key.raw,
        signed_pre_key_sig=bob_ours.signing_key.sign(spk.public_key.raw),
        pre_keys=frozenset({opk.public_key.raw}),
    )
    oracle_sk, _, header = asyncio.run(alice_oracle.get_shared_secret_active(bundle))

    # The oracle's ephemeral key came from the seeded `secrets`; replay the same stream to
    # recover it and run our initiator with Alice's mode-B key.
    replay = seeded_rng(b"oracle")
    replay(32)  # the oracle's signed prekey, drawn by create()
    ephemeral = DHPrivateKey(replay(32))
    assert ephemeral.public_key.raw == header.ephemeral_key
    ours = initiator_shared_secret(
        ModeBIdentity(alice_seed).dh_key,
        ephemeral,
        bob_ours.dh_key.public_key,
        spk.public_key,
        opk.public_key,
    )
    assert ours == oracle_sk


def test_oracle_refuses_our_bundle_with_a_tampered_signature(rng: Rng) -> None:
    """Negative control: the SPK signature the oracle checks is the one we make."""
    alice = oracle_state(b"\xa2" * 32, 0)
    bob = ModeBIdentity(b"\xb2" * 32)
    spk = DHPrivateKey.generate(rng)
    signature = bytearray(bob.signing_key.sign(spk.public_key.raw))
    signature[5] ^= 0x10
    bundle = x3dh.Bundle(
        identity_key=bob.ed25519_public,
        signed_pre_key=spk.public_key.raw,
        signed_pre_key_sig=bytes(signature),
        pre_keys=frozenset({DHPrivateKey.generate(rng).public_key.raw}),
    )
    with pytest.raises(x3dh.KeyAgreementException):
        asyncio.run(alice.get_shared_secret_active(bundle))


def test_we_refuse_the_oracles_bundle_with_a_tampered_signature() -> None:
    bob = oracle_state(b"\xb3" * 32, 1)
    bundle = bob.bundle
    signature = bytearray(bundle.signed_pre_key_sig)
    signature[0] ^= 0x01
    with pytest.raises(BadSignature):
        VerifyKey(bundle.identity_key).verify(bundle.signed_pre_key, bytes(signature))
