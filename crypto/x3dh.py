"""X3DH session setup between two devices: signed and one-time prekeys, the prekey bundle, the
key agreement itself and the initial (prekey) message.

Construction (notes/crypto.md §3.1, §9.1-9.3; Signal's X3DH specification):

- Key layout (A): each device has a separate Ed25519 device signing key (DSK) and an X25519
  device identity DH key (DIK), bound together by the device certificate. The DSK signs the
  signed prekey (SPK); the DIK takes part in the DH. No key is used with two primitives, so no
  XEdDSA is needed.
- ``DH1 = DH(DIK_A, SPK_B)``, ``DH2 = DH(EK_A, DIK_B)``, ``DH3 = DH(EK_A, SPK_B)``,
  ``DH4 = DH(EK_A, OPK_B)`` when Bob's bundle had a one-time prekey (OPK).
- ``SK = HKDF-SHA256(salt = 32 zero bytes, IKM = 0xFF*32 ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4],
  info = b"MedRelay_CURVE25519_SHA-256", L = 32)``. The 0xFF prefix is X3DH's domain separator
  from XEdDSA; we keep it although we do not use XEdDSA, at no cost, and it keeps the
  agreement byte-compatible with python-x3dh.
- ``AD = Enc(DIK_A) ‖ Enc(DIK_B) ‖ certificate_hash_A ‖ certificate_hash_B`` with Enc the 33-byte
  `DHPublicKey.encode()`: binding the device certificates is the "identifying information" the
  spec allows the application to append, and ties the session to one certificate per side.

The agreement core (`initiator_shared_secret`, `responder_shared_secret`, `derive_shared_secret`)
works on bare X25519 keys and the associated data is built separately (`associated_data`), so the
interop tests can also run the core in the single-key "mode B" that python-x3dh implements.

`initiate` checks every element of the bundle that the caller has not already verified (the SPK
belongs to the bundle's device and carries that device's signature; keys are valid points) before
it draws the ephemeral key or computes any Diffie-Hellman value.

Wire format of the initial message (`PrekeyMessage`), strictly bounded:

    u8 suite (0x01 = X25519 / SHA-256; 0x02 reserved for an ML-KEM-768 hybrid)
    text sender user id ‖ text sender device id
    33-byte Enc(DIK_A) ‖ 33-byte Enc(EK_A)
    u32 signed prekey id ‖ bool has one-time prekey [‖ u32 one-time prekey id]
    blob ratchet message
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import (
    BadSignature,
    MalformedEncoding,
    SessionError,
    UnknownPrekey,
)
from medrelay.crypto.identity import (
    MAX_ID_BYTES,
    DeviceIdentity,
    DeviceKeys,
    check_id,
)
from medrelay.crypto.kdf import hkdf_sha256
from medrelay.crypto.keys import (
    ENCODED_KEY_SIZE,
    KEY_SIZE,
    SIGNATURE_SIZE,
    DHPrivateKey,
    DHPublicKey,
)
from medrelay.crypto.rng import Rng

SIGNED_PREKEY_VERSION: Final = 1
ONE_TIME_PREKEY_VERSION: Final = 1
SIGNED_PREKEY_CONTEXT: Final = b"MEDRELAY/v1/signed-prekey\x00"

SUITE_X25519_SHA256: Final = 0x01
"""Classical X3DH over X25519 with HKDF-SHA256 (v1)."""
SUITE_X25519_MLKEM768_SHA256: Final = 0x02
"""Reserved for a PQXDH-style hybrid (notes §3.2, §4); not implemented, refused on decode."""
SUPPORTED_SUITES: Final = frozenset({SUITE_X25519_SHA256})

INFO: Final = b"MedRelay_CURVE25519_SHA-256"
SHARED_SECRET_SIZE: Final = 32
_KDF_PREFIX: Final = b"\xff" * KEY_SIZE
_KDF_SALT: Final = bytes(32)

MAX_PREKEY_ID: Final = 0xFFFF_FFFF
MAX_RATCHET_MESSAGE_BYTES: Final = 1 << 20
"""Upper bound on the ratchet message carried inside a `PrekeyMessage`."""


class PrekeyMismatch(BadSignature):
    """A signed prekey that is validly signed but not by or for the device it is presented for
    (another device's SPK in a bundle)."""

    code = "prekey_mismatch"


class SenderMismatch(SessionError):
    """An X3DH initial message whose sender fields disagree with the verified sender identity."""

    code = "sender_mismatch"


def _check_prekey_id(prekey_id: int, what: str) -> int:
    if not isinstance(prekey_id, int) or not 0 <= prekey_id <= MAX_PREKEY_ID:
        raise ValueError(f"{what} must be a u32")
    return prekey_id


# ---------------------------------------------------------------------------------------------
# Prekeys


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    """A device's signed prekey as published in its bundle (public, signed by the device's DSK)."""

    user_id: str
    device_id: str
    prekey_id: int
    public_key: DHPublicKey
    created_at_ms: int
    signature: bytes

    def __post_init__(self) -> None:
        check_id(self.user_id, "user id")
        check_id(self.device_id, "device id")
        _check_prekey_id(self.prekey_id, "signed prekey id")
        if not 0 <= self.created_at_ms < 1 << 64:
            raise ValueError("created_at_ms must be a u64")
        if len(self.signature) != SIGNATURE_SIZE:
            raise ValueError("signature must be 64 bytes")

    @staticmethod
    def _body(
        user_id: str, device_id: str, prekey_id: int, public_key: DHPublicKey, created_at_ms: int
    ) -> bytes:
        return (
            Writer()
            .u8(SIGNED_PREKEY_VERSION)
            .text(user_id, MAX_ID_BYTES)
            .text(device_id, MAX_ID_BYTES)
            .u32(prekey_id)
            .fixed(public_key.encode(), ENCODED_KEY_SIZE)
            .u64(created_at_ms)
            .to_bytes()
        )

    @classmethod
    def create(
        cls, device: DeviceKeys, prekey_id: int, public_key: DHPublicKey, created_at_ms: int
    ) -> SignedPrekey:
        """Sign `public_key` as `device`'s signed prekey number `prekey_id`."""
        identity = device.identity
        body = cls._body(
            identity.user_id,
            identity.device_id,
            _check_prekey_id(prekey_id, "signed prekey id"),
            public_key,
            created_at_ms,
        )
        signature = device.signing_key.sign(SIGNED_PREKEY_CONTEXT + body)
        return cls(
            identity.user_id,
            identity.device_id,
            prekey_id,
            public_key,
            created_at_ms,
            signature,
        )

    def signed_bytes(self) -> bytes:
        """The exact bytes the device signing key signs: context string, then the body."""
        return SIGNED_PREKEY_CONTEXT + self._body(
            self.user_id, self.device_id, self.prekey_id, self.public_key, self.created_at_ms
        )

    def verify(self, identity: DeviceIdentity) -> None:
        """Check that this SPK is `identity`'s: it names that device and its signature verifies
        under that device's signing key. Raises `PrekeyMismatch` or `BadSignature`."""
        if (self.user_id, self.device_id) != (identity.user_id, identity.device_id):
            raise PrekeyMismatch(
                f"signed prekey is for device {self.user_id!r}/{self.device_id!r}, "
                f"not {identity.user_id!r}/{identity.device_id!r}"
            )
        try:
            identity.signing_key.verify(self.signed_bytes(), self.signature)
        except BadSignature:
            raise BadSignature("signed prekey signature does not verify") from None

    def encode(self) -> bytes:
        return (
            Writer()
            .raw(
                self._body(
                    self.user_id,
                    self.device_id,
                    self.prekey_id,
                    self.public_key,
                    self.created_at_ms,
                )
            )
            .fixed(self.signature, SIGNATURE_SIZE)
            .to_bytes()
        )

    @classmethod
    def read(cls, reader: Reader) -> SignedPrekey:
        reader.version(SIGNED_PREKEY_VERSION)
        user_id = reader.text(MAX_ID_BYTES)
        device_id = reader.text(MAX_ID_BYTES)
        prekey_id = reader.u32()
        public_key = DHPublicKey.decode(reader.fixed(ENCODED_KEY_SIZE))
        created_at_ms = reader.u64()
        signature = reader.fixed(SIGNATURE_SIZE)
        try:
            return cls(user_id, device_id, prekey_id, public_key, created_at_ms, signature)
        except ValueError as exc:
            raise MalformedEncoding(f"signed prekey: {exc}") from None

    @classmethod
    def decode(cls, data: bytes) -> SignedPrekey:
        reader = Reader(data, "signed prekey")
        record = cls.read(reader)
        reader.finish()
        return record


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    """A one-time prekey as published (public, unsigned as in Signal: the server could withhold
    or swap it, which costs the session only DH4's extra forward secrecy, not authentication)."""

    prekey_id: int
    public_key: DHPublicKey

    def __post_init__(self) -> None:
        _check_prekey_id(self.prekey_id, "one-time prekey id")

    def encode(self) -> bytes:
        return (
            Writer()
            .u8(ONE_TIME_PREKEY_VERSION)
            .u32(self.prekey_id)
            .fixed(self.public_key.encode(), ENCODED_KEY_SIZE)
            .to_bytes()
        )

    @classmethod
    def read(cls, reader: Reader) -> OneTimePrekey:
        reader.version(ONE_TIME_PREKEY_VERSION)
        prekey_id = reader.u32()
        public_key = DHPublicKey.decode(reader.fixed(ENCODED_KEY_SIZE))
        return cls(prekey_id, public_key)

    @classmethod
    def decode(cls, data: bytes) -> OneTimePrekey:
        reader = Reader(data, "one-time prekey")
        record = cls.read(reader)
        reader.finish()
        return record


@dataclass(frozen=True, slots=True)
class SignedPrekeyPair:
    """A signed prekey together with its private key (kept on the device)."""

    record: SignedPrekey
    private_key: DHPrivateKey

    def __post_init__(self) -> None:
        if self.private_key.public_key != self.record.public_key:
            raise ValueError("private key does not match the signed prekey")


@dataclass(frozen=True, slots=True)
class OneTimePrekeyPair:
    """A one-time prekey together with its private key (kept on the device until used)."""

    record: OneTimePrekey
    private_key: DHPrivateKey

    def __post_init__(self) -> None:
        if self.private_key.public_key != self.record.public_key:
            raise ValueError("private key does not match the one-time prekey")


def generate_signed_prekey(
    device: DeviceKeys, prekey_id: int, now_ms: int, rng: Rng
) -> SignedPrekeyPair:
    """A fresh signed prekey for `device`, signed by its device signing key."""
    private_key = DHPrivateKey.generate(rng)
    record = SignedPrekey.create(device, prekey_id, private_key.public_key, now_ms)
    return SignedPrekeyPair(record, private_key)


def generate_one_time_prekeys(first_id: int, count: int, rng: Rng) -> list[OneTimePrekeyPair]:
    """`count` fresh one-time prekeys numbered `first_id`, `first_id + 1`, ..."""
    if count < 0:
        raise ValueError("count must not be negative")
    _check_prekey_id(first_id, "first one-time prekey id")
    if count:
        _check_prekey_id(first_id + count - 1, "last one-time prekey id")
    pairs: list[OneTimePrekeyPair] = []
    for prekey_id in range(first_id, first_id + count):
        private_key = DHPrivateKey.generate(rng)
        pairs.append(
            OneTimePrekeyPair(OneTimePrekey(prekey_id, private_key.public_key), private_key)
        )
    return pairs


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """What an initiator fetches for one target device.

    `identity` must already have been verified by the caller from the certificate chain (and
    log proofs); `initiate` verifies everything else in the bundle.
    """

    identity: DeviceIdentity
    signed_prekey: SignedPrekey
    one_time_prekey: OneTimePrekey | None = None


# ---------------------------------------------------------------------------------------------
# The agreement core, on bare X25519 keys


def derive_shared_secret(dh_outputs: Sequence[bytes], info: bytes = INFO) -> bytes:
    """X3DH's KDF: HKDF-SHA256 over ``0xFF*32 ‖ DH1 ‖ ... ‖ DHn`` with a zero salt, 32 bytes."""
    if len(dh_outputs) not in (3, 4) or any(len(dh) != KEY_SIZE for dh in dh_outputs):
        raise ValueError("X3DH needs three or four 32-byte DH outputs")
    return hkdf_sha256(_KDF_PREFIX + b"".join(dh_outputs), _KDF_SALT, info, SHARED_SECRET_SIZE)


def initiator_shared_secret(
    identity_key: DHPrivateKey,
    ephemeral_key: DHPrivateKey,
    peer_identity_key: DHPublicKey,
    peer_signed_prekey: DHPublicKey,
    peer_one_time_prekey: DHPublicKey | None,
    *,
    info: bytes = INFO,
) -> bytes:
    """SK as Alice computes it. An all-zero DH result raises `InvalidKey` (from keys.py)."""
    dh_outputs = [
        identity_key.exchange(peer_signed_prekey),
        ephemeral_key.exchange(peer_identity_key),
        ephemeral_key.exchange(peer_signed_prekey),
    ]
    if peer_one_time_prekey is not None:
        dh_outputs.append(ephemeral_key.exchange(peer_one_time_prekey))
    return derive_shared_secret(dh_outputs, info)


def responder_shared_secret(
    identity_key: DHPrivateKey,
    signed_prekey: DHPrivateKey,
    one_time_prekey: DHPrivateKey | None,
    peer_identity_key: DHPublicKey,
    peer_ephemeral_key: DHPublicKey,
    *,
    info: bytes = INFO,
) -> bytes:
    """SK as Bob computes it (the same DH values, from the other side)."""
    dh_outputs = [
        signed_prekey.exchange(peer_identity_key),
        identity_key.exchange(peer_ephemeral_key),
        signed_prekey.exchange(peer_ephemeral_key),
    ]
    if one_time_prekey is not None:
        dh_outputs.append(one_time_prekey.exchange(peer_ephemeral_key))
    return derive_shared_secret(dh_outputs, info)


def associated_data(initiator: DeviceIdentity, responder: DeviceIdentity) -> bytes:
    """``Enc(DIK_A) ‖ Enc(DIK_B) ‖ certificate_hash_A ‖ certificate_hash_B`` (130 bytes)."""
    return (
        initiator.dh_key.encode()
        + responder.dh_key.encode()
        + initiator.certificate_hash
        + responder.certificate_hash
    )


# ---------------------------------------------------------------------------------------------
# The initial message


@dataclass(frozen=True, slots=True)
class PrekeyMessageHeader:
    """What Bob needs, besides his own keys, to finish the X3DH that Alice started."""

    sender_user_id: str
    sender_device_id: str
    sender_identity_key: DHPublicKey
    ephemeral_key: DHPublicKey
    signed_prekey_id: int
    one_time_prekey_id: int | None
    suite: int = SUITE_X25519_SHA256

    def __post_init__(self) -> None:
        check_id(self.sender_user_id, "sender user id")
        check_id(self.sender_device_id, "sender device id")
        _check_prekey_id(self.signed_prekey_id, "signed prekey id")
        if self.one_time_prekey_id is not None:
            _check_prekey_id(self.one_time_prekey_id, "one-time prekey id")
        if self.suite not in SUPPORTED_SUITES:
            raise ValueError(f"unsupported X3DH suite 0x{self.suite:02x}")

    def write(self, writer: Writer) -> Writer:
        writer.u8(self.suite)
        writer.text(self.sender_user_id, MAX_ID_BYTES).text(self.sender_device_id, MAX_ID_BYTES)
        writer.fixed(self.sender_identity_key.encode(), ENCODED_KEY_SIZE)
        writer.fixed(self.ephemeral_key.encode(), ENCODED_KEY_SIZE)
        writer.u32(self.signed_prekey_id)
        writer.boolean(self.one_time_prekey_id is not None)
        if self.one_time_prekey_id is not None:
            writer.u32(self.one_time_prekey_id)
        return writer

    @classmethod
    def read(cls, reader: Reader) -> PrekeyMessageHeader:
        suite = reader.u8()
        if suite not in SUPPORTED_SUITES:
            raise MalformedEncoding(f"prekey message: unsupported suite 0x{suite:02x}")
        user_id = reader.text(MAX_ID_BYTES)
        device_id = reader.text(MAX_ID_BYTES)
        identity_key = DHPublicKey.decode(reader.fixed(ENCODED_KEY_SIZE))
        ephemeral_key = DHPublicKey.decode(reader.fixed(ENCODED_KEY_SIZE))
        signed_prekey_id = reader.u32()
        one_time_prekey_id = reader.u32() if reader.boolean() else None
        try:
            return cls(
                user_id,
                device_id,
                identity_key,
                ephemeral_key,
                signed_prekey_id,
                one_time_prekey_id,
                suite,
            )
        except ValueError as exc:
            raise MalformedEncoding(f"prekey message: {exc}") from None

    def encode(self) -> bytes:
        return self.write(Writer()).to_bytes()

    @classmethod
    def decode(cls, data: bytes) -> PrekeyMessageHeader:
        reader = Reader(data, "prekey message header")
        header = cls.read(reader)
        reader.finish()
        return header


@dataclass(frozen=True, slots=True)
class PrekeyMessage:
    """The X3DH initial message: the header, then a ratchet message encrypted under SK."""

    header: PrekeyMessageHeader
    ratchet_message: bytes

    def __post_init__(self) -> None:
        if len(self.ratchet_message) > MAX_RATCHET_MESSAGE_BYTES:
            raise ValueError("ratchet message too long")

    def encode(self) -> bytes:
        writer = self.header.write(Writer())
        return writer.blob(self.ratchet_message, MAX_RATCHET_MESSAGE_BYTES).to_bytes()

    @classmethod
    def decode(cls, data: bytes) -> PrekeyMessage:
        reader = Reader(data, "prekey message")
        header = PrekeyMessageHeader.read(reader)
        ratchet_message = reader.blob(MAX_RATCHET_MESSAGE_BYTES)
        reader.finish()
        return cls(header, ratchet_message)


# ---------------------------------------------------------------------------------------------
# Both sides of the protocol


@dataclass(frozen=True, slots=True)
class InitiatorSetup:
    """The outcome of `initiate`: the secrets for the ratchet and the header for Bob."""

    shared_secret: bytes = field(repr=False)
    associated_data: bytes
    header: PrekeyMessageHeader
    peer_signed_prekey: DHPublicKey
    """Bob's SPK public key: the initiator's first ratchet peer key."""

    @property
    def ephemeral_key(self) -> DHPublicKey:
        return self.header.ephemeral_key

    @property
    def signed_prekey_id(self) -> int:
        return self.header.signed_prekey_id

    @property
    def one_time_prekey_id(self) -> int | None:
        return self.header.one_time_prekey_id


def verify_bundle(own: DeviceKeys, bundle: PrekeyBundle) -> None:
    """Everything `initiate` checks before any DH: the target is not this device, and the SPK
    is the bundle device's, validly signed. (Key validity is enforced by `DHPublicKey`
    itself, so a bundle holding a low-order key cannot be built or decoded.)"""
    if bundle.identity.address == own.identity.address:
        raise SessionError("cannot set up a session with this device itself")
    bundle.signed_prekey.verify(bundle.identity)


def initiate(own: DeviceKeys, bundle: PrekeyBundle, rng: Rng) -> InitiatorSetup:
    """Alice's half of X3DH towards the device of `bundle`.

    Verifies the bundle first (`verify_bundle`) and raises `PrekeyMismatch`, `BadSignature` or
    `SessionError` without drawing randomness or computing any DH when it does not hold.
    """
    verify_bundle(own, bundle)
    ephemeral = DHPrivateKey.generate(rng)
    one_time = bundle.one_time_prekey
    shared_secret = initiator_shared_secret(
        own.dh_key,
        ephemeral,
        bundle.identity.dh_key,
        bundle.signed_prekey.public_key,
        None if one_time is None else one_time.public_key,
    )
    header = PrekeyMessageHeader(
        sender_user_id=own.identity.user_id,
        sender_device_id=own.identity.device_id,
        sender_identity_key=own.identity.dh_key,
        ephemeral_key=ephemeral.public_key,
        signed_prekey_id=bundle.signed_prekey.prekey_id,
        one_time_prekey_id=None if one_time is None else one_time.prekey_id,
    )
    return InitiatorSetup(
        shared_secret=shared_secret,
        associated_data=associated_data(own.identity, bundle.identity),
        header=header,
        peer_signed_prekey=bundle.signed_prekey.public_key,
    )


def check_sender(sender: DeviceIdentity, header: PrekeyMessageHeader) -> None:
    """Raise `SenderMismatch` unless the header names `sender` and carries its DH identity key."""
    if (header.sender_user_id, header.sender_device_id) != (sender.user_id, sender.device_id):
        raise SenderMismatch("prekey message names a different sender device")
    if header.sender_identity_key != sender.dh_key:
        raise SenderMismatch(
            "prekey message carries a DH identity key not in the sender's certificate"
        )


def respond(
    own: DeviceKeys,
    sender: DeviceIdentity,
    header: PrekeyMessageHeader,
    signed_prekey_private: DHPrivateKey,
    one_time_prekey_private: DHPrivateKey | None,
) -> tuple[bytes, bytes]:
    """Bob's half: `(shared_secret, associated_data)` for the X3DH that `header` started.

    `sender` is the verified identity of the device the relay says sent the message; the caller
    looked the prekeys up by the header's ids (and raises `UnknownPrekey` for unknown ones).
    """
    check_sender(sender, header)
    if sender.address == own.identity.address:
        raise SessionError("refusing a prekey message from this device itself")
    if (header.one_time_prekey_id is None) != (one_time_prekey_private is None):
        raise UnknownPrekey(
            "the one-time prekey named by the message does not match the one supplied"
        )
    shared_secret = responder_shared_secret(
        own.dh_key,
        signed_prekey_private,
        one_time_prekey_private,
        sender.dh_key,
        header.ephemeral_key,
    )
    return shared_secret, associated_data(sender, own.identity)
