"""Message-for-message interop of medrelay.crypto.ratchet with an independent Double Ratchet:
python-doubleratchet 1.3.0 (Syndace), configured as in notes/crypto.md §5 with our KDF labels,
our CONCAT(ad, header) and an AEAD plugin that implements our ENCRYPT from `cryptography`'s HKDF
and libsodium's XChaCha20-Poly1305 and padding (not from medrelay code).

Every message either side encrypts, the other decrypts to the same bytes: our initiator against
their responder and the reverse, with out-of-order delivery inside a chain and across chains and
several DH ratchet turns. The test translates between the library's `EncryptedMessage` and our
wire form (header bytes || ciphertext).
"""

from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import dataclass, field
from typing import Protocol

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from doubleratchet import DoubleRatchet
from doubleratchet.aead import AEAD, AuthenticationFailedException, DecryptionFailedException
from doubleratchet.recommended import (
    diffie_hellman_ratchet_curve25519,
    kdf_hkdf,
    kdf_separate_hmacs,
)
from doubleratchet.recommended.crypto_provider import HashFunction
from doubleratchet.types import EncryptedMessage, Header
from nacl import bindings
from nacl.exceptions import CryptoError as NaclCryptoError

from medrelay.crypto.keys import DHPrivateKey, DHPublicKey
from medrelay.crypto.ratchet import RatchetSession, parse_header
from medrelay.crypto.rng import Rng, seeded_rng

SHARED_SECRET = bytes(range(100, 132))
AD = b"alice device ad || bob device ad || certificate hashes"
WIRE_HEADER = struct.Struct(">B32sII")


class RootChainKDF(kdf_hkdf.KDF):
    """KDF_RK: HKDF-SHA256, salt = root key, IKM = DH output, info b"MedRelay_Ratchet"."""

    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return b"MedRelay_Ratchet"


class MessageChainKDF(kdf_separate_hmacs.KDF):
    """KDF_CK with constant b"\\x02\\x01": HMAC(ck, 2) || HMAC(ck, 1) = next chain key || mk."""

    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256


class MedRelayAEAD(AEAD):
    """Our ENCRYPT: key || nonce = HKDF-SHA256(0^32, mk, b"MedRelay_MessageKeys", 56), then
    XChaCha20-Poly1305 over ISO 7816-4 padding to 256-byte blocks."""

    @staticmethod
    def _keys(key: bytes) -> tuple[bytes, bytes]:
        okm = HKDF(
            algorithm=hashes.SHA256(), length=56, salt=bytes(32), info=b"MedRelay_MessageKeys"
        ).derive(key)
        return okm[:32], okm[32:]

    @staticmethod
    async def encrypt(plaintext: bytes, key: bytes, associated_data: bytes) -> bytes:
        aead_key, nonce = MedRelayAEAD._keys(key)
        padded = bindings.sodium_pad(plaintext, 256)
        ciphertext: bytes = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            padded, associated_data, nonce, aead_key
        )
        return ciphertext

    @staticmethod
    async def decrypt(ciphertext: bytes, key: bytes, associated_data: bytes) -> bytes:
        aead_key, nonce = MedRelayAEAD._keys(key)
        try:
            padded = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext, associated_data, nonce, aead_key
            )
        except NaclCryptoError as exc:
            raise AuthenticationFailedException() from exc
        try:
            plaintext: bytes = bindings.sodium_unpad(padded, 256)
        except (NaclCryptoError, ValueError) as exc:
            raise DecryptionFailedException() from exc
        return plaintext


class MedRelayDoubleRatchet(DoubleRatchet):
    @staticmethod
    def _build_associated_data(associated_data: bytes, header: Header) -> bytes:
        # CONCAT(ad, header) with our header layout, version byte included
        encoded_header = WIRE_HEADER.pack(
            1,
            header.ratchet_pub,
            header.previous_sending_chain_length,
            header.sending_chain_length,
        )
        return struct.pack(">H", len(associated_data)) + associated_data + encoded_header


def seeded_dh_ratchet_class(
    rng: Rng,
) -> type[diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet]:
    """The library's X25519 ratchet, with key pairs from a seeded rng instead of the OS."""

    class SeededDiffieHellmanRatchet(diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet):
        @staticmethod
        def _generate_priv() -> bytes:
            return rng(32)

    return SeededDiffieHellmanRatchet


def to_wire(message: EncryptedMessage) -> bytes:
    header = message.header
    return (
        WIRE_HEADER.pack(
            1, header.ratchet_pub, header.previous_sending_chain_length, header.sending_chain_length
        )
        + message.ciphertext
    )


def from_wire(wire: bytes) -> EncryptedMessage:
    version, ratchet_pub, pn, n = WIRE_HEADER.unpack_from(wire)
    assert version == 1
    ours = parse_header(wire)
    assert (ours.ratchet_key.raw, ours.previous_chain_length, ours.message_number) == (
        ratchet_pub,
        pn,
        n,
    )
    return EncryptedMessage(header=Header(ratchet_pub, pn, n), ciphertext=wire[WIRE_HEADER.size :])


class Peer(Protocol):
    """One side of a conversation, whichever implementation it runs."""

    async def encrypt(self, plaintext: bytes) -> bytes: ...

    async def decrypt(self, wire: bytes) -> bytes: ...


class OurPeer:
    def __init__(self, session: RatchetSession, rng: Rng) -> None:
        self.session = session
        self.rng = rng

    async def encrypt(self, plaintext: bytes) -> bytes:
        return self.session.encrypt(plaintext, self.rng)

    async def decrypt(self, wire: bytes) -> bytes:
        return self.session.decrypt(wire, self.rng)


class TheirPeer:
    """python-doubleratchet; it creates its session with the first message it sends or gets."""

    def __init__(
        self,
        rng: Rng,
        *,
        recipient_ratchet_key: DHPublicKey | None = None,
        own_ratchet_key: DHPrivateKey | None = None,
    ) -> None:
        self.dh_class = seeded_dh_ratchet_class(rng)
        self.recipient_ratchet_key = recipient_ratchet_key
        self.own_ratchet_key = own_ratchet_key
        self.ratchet: MedRelayDoubleRatchet | None = None

    async def encrypt(self, plaintext: bytes) -> bytes:
        if self.ratchet is None:
            assert self.recipient_ratchet_key is not None, "their responder sent first"
            self.ratchet, message = await MedRelayDoubleRatchet.encrypt_initial_message(
                shared_secret=SHARED_SECRET,
                recipient_ratchet_pub=self.recipient_ratchet_key.raw,
                message=plaintext,
                associated_data=AD,
                diffie_hellman_ratchet_class=self.dh_class,
                root_chain_kdf=RootChainKDF,
                message_chain_kdf=MessageChainKDF,
                message_chain_constant=b"\x02\x01",
                dos_protection_threshold=1000,
                max_num_skipped_message_keys=2000,
                aead=MedRelayAEAD,
            )
        else:
            message = await self.ratchet.encrypt_message(plaintext, AD)
        return to_wire(message)

    async def decrypt(self, wire: bytes) -> bytes:
        message = from_wire(wire)
        if self.ratchet is None:
            assert self.own_ratchet_key is not None, "their initiator received first"
            self.ratchet, plaintext = await MedRelayDoubleRatchet.decrypt_initial_message(
                shared_secret=SHARED_SECRET,
                own_ratchet_priv=self.own_ratchet_key.raw,
                message=message,
                associated_data=AD,
                diffie_hellman_ratchet_class=self.dh_class,
                root_chain_kdf=RootChainKDF,
                message_chain_kdf=MessageChainKDF,
                message_chain_constant=b"\x02\x01",
                dos_protection_threshold=1000,
                max_num_skipped_message_keys=2000,
                aead=MedRelayAEAD,
            )
            return plaintext
        result: bytes = await self.ratchet.decrypt_message(message, AD)
        return result


@dataclass
class Conversation:
    """Messages in flight towards each side, and what was checked."""

    in_flight: dict[str, list[tuple[bytes, bytes]]] = field(
        default_factory=lambda: {"initiator": [], "responder": []}
    )
    delivered: int = 0
    ratchet_keys: set[bytes] = field(default_factory=set)
    out_of_order: int = 0


async def deliver(
    conversation: Conversation, to: str, peer: Peer, picks: list[tuple[bytes, bytes]]
) -> None:
    queue = conversation.in_flight[to]
    for item in picks:
        if item is not queue[0]:
            conversation.out_of_order += 1
        queue.remove(item)
        wire, plaintext = item
        assert await peer.decrypt(wire) == plaintext
        conversation.delivered += 1


async def converse(initiator: Peer, responder: Peer, seed: int, turns: int = 10) -> Conversation:
    """Alternate turns; each sender sends 1-4 messages of 0-600 bytes, the receiver then gets a
    random subset of what is in flight towards it in random order (old chains included), and
    everything left is delivered, shuffled, at the end."""
    schedule = random.Random(seed)
    conversation = Conversation()
    peers = {"initiator": initiator, "responder": responder}
    sent = 0
    for turn in range(turns):
        sender, receiver = (
            ("initiator", "responder") if turn % 2 == 0 else ("responder", "initiator")
        )
        for _ in range(schedule.randint(1, 4)):
            plaintext = f"{sender} message {sent} ".encode() + schedule.randbytes(
                schedule.randint(0, 600)
            )
            sent += 1
            wire = await peers[sender].encrypt(plaintext)
            conversation.ratchet_keys.add(wire[1:33])
            conversation.in_flight[receiver].append((wire, plaintext))
        queue = conversation.in_flight[receiver]
        picks = schedule.sample(queue, schedule.randint(1, len(queue)))
        await deliver(conversation, receiver, peers[receiver], picks)
    for name in ("initiator", "responder"):
        queue = conversation.in_flight[name]
        await deliver(conversation, name, peers[name], schedule.sample(queue, len(queue)))
    assert conversation.delivered == sent
    return conversation


SEEDS = [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("seed", SEEDS)
def test_our_initiator_with_their_responder(seed: int) -> None:
    rng = seeded_rng(b"interop ours first %d" % seed)
    spk = DHPrivateKey.generate(rng)
    ours = OurPeer(RatchetSession.initiator(SHARED_SECRET, AD, spk.public_key, rng), rng)
    theirs = TheirPeer(seeded_rng(b"theirs %d" % seed), own_ratchet_key=spk)
    conversation = asyncio.run(converse(ours, theirs, seed))
    assert len(conversation.ratchet_keys) >= 5, "several DH ratchet turns"
    assert conversation.out_of_order > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_their_initiator_with_our_responder(seed: int) -> None:
    rng = seeded_rng(b"interop theirs first %d" % seed)
    spk = DHPrivateKey.generate(rng)
    ours = OurPeer(RatchetSession.responder(SHARED_SECRET, AD, spk), rng)
    theirs = TheirPeer(seeded_rng(b"theirs %d" % seed), recipient_ratchet_key=spk.public_key)
    conversation = asyncio.run(converse(theirs, ours, seed))
    assert len(conversation.ratchet_keys) >= 5, "several DH ratchet turns"
    assert conversation.out_of_order > 0


def test_scripted_exchange_across_chains_both_ways() -> None:
    """A fixed script, so the cases are certain rather than likely: a message held back over two
    DH turns, skipped keys in the old chain named by pn, and out-of-order inside a chain."""

    async def script(first: Peer, second: Peer) -> None:
        a = [await first.encrypt(b"a%d" % i) for i in range(3)]
        assert await second.decrypt(a[2]) == b"a2"
        assert await second.decrypt(a[0]) == b"a0"
        b = [await second.encrypt(b"b%d" % i) for i in range(2)]
        assert await first.decrypt(b[1]) == b"b1"
        c = [await first.encrypt(b"c%d" % i) for i in range(2)]
        assert await second.decrypt(c[1]) == b"c1"
        d = await second.encrypt(b"d0")
        assert await first.decrypt(d) == b"d0"
        e = await first.encrypt(b"e0")
        assert await second.decrypt(e) == b"e0"
        # held back across two DH turns on each side
        assert await second.decrypt(a[1]) == b"a1"
        assert await second.decrypt(c[0]) == b"c0"
        assert await first.decrypt(b[0]) == b"b0"

    rng = seeded_rng(b"scripted")
    spk = DHPrivateKey.generate(rng)
    ours_first = OurPeer(RatchetSession.initiator(SHARED_SECRET, AD, spk.public_key, rng), rng)
    asyncio.run(script(ours_first, TheirPeer(seeded_rng(b"t1"), own_ratchet_key=spk)))
    spk = DHPrivateKey.generate(rng)
    ours_second = OurPeer(RatchetSession.responder(SHARED_SECRET, AD, spk), rng)
    asyncio.run(
        script(TheirPeer(seeded_rng(b"t2"), recipient_ratchet_key=spk.public_key), ours_second)
    )
