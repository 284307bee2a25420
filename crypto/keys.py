"""Key types: Ed25519 signing keys and X25519 Diffie-Hellman keys, with versioned encodings.

Binary encoding: one type byte, then the 32 raw key bytes. The type byte names both the algorithm
and the encoding version, so a future key type or layout gets a new byte rather than an ambiguity:

    0x01  Ed25519 public key        0x81  Ed25519 private key (the 32-byte seed)
    0x02  X25519 public key         0x82  X25519 private key

Text encoding (configuration files, JSON, logs of *public* keys only): `ed25519-v1:<base64url>` and
`x25519-v1:<base64url>`, unpadded and canonical (exactly one text per key).

Public keys are validated when they are constructed or decoded: an Ed25519 key must be a canonical
point of the main subgroup that is not of small order (libsodium
`crypto_core_ed25519_is_valid_point`, fixed for CVE-2025-69277 in PyNaCl 1.6.2), an X25519 key must
not be one of the low-order points (RFC 7748 §6.1: their shared secret is all-zero or predictable).
Non-canonical X25519 encodings of other points (u >= p, or the ignored top bit set) are accepted, as
RFC 7748 §5 requires. Private keys never print their bytes in `repr`.

Hot-path notes: the Ed25519 point check costs a scalar multiplication (~60 µs), so its result is
memoised per public key (a bounded cache of a pure predicate over public bytes, not state any
behaviour depends on), and a public key *derived* from a private key is not re-validated (it is
valid by construction). An X25519 private key computes its public key lazily.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Final

from nacl import bindings
from nacl.exceptions import CryptoError as NaclCryptoError

from medrelay.crypto.errors import BadSignature, InvalidKey, MalformedEncoding
from medrelay.crypto.rng import Rng

KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
ENCODED_KEY_SIZE: Final = 33

TYPE_ED25519_PUBLIC: Final = 0x01
TYPE_X25519_PUBLIC: Final = 0x02
TYPE_ED25519_PRIVATE: Final = 0x81
TYPE_X25519_PRIVATE: Final = 0x82

_TEXT_PREFIX: Final = {TYPE_ED25519_PUBLIC: "ed25519-v1:", TYPE_X25519_PUBLIC: "x25519-v1:"}

# X25519 u-coordinates of small order (and their non-canonical aliases u + p), as in libsodium's
# crypto_scalarmult_curve25519 blocklist: the points of order 1, 2, 4 and 8 on the curve and on
# its twist. A DH with any of them yields a predictable (usually all-zero) secret.
_P: Final = 2**255 - 19
_LOW_ORDER_U: Final = frozenset(
    {
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P - 1,
        _P,
        _P + 1,
    }
)
# The same points as byte strings, with and without the top bit that RFC 7748 says to ignore:
# one set lookup instead of an integer conversion on every decoded ratchet header.
_LOW_ORDER_ENCODINGS: Final = frozenset(
    (u | top_bit).to_bytes(KEY_SIZE, "little") for u in _LOW_ORDER_U for top_bit in (0, 1 << 255)
)

# Bounded: an attacker sending many distinct keys only costs us the validation we would do anyway.
_VALIDATED_KEY_CACHE_SIZE: Final = 1024


def _check_raw(raw: bytes, what: str) -> bytes:
    if type(raw) is bytes and len(raw) == KEY_SIZE:
        return raw
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise InvalidKey(f"{what} must be bytes")
    raw = bytes(raw)
    if len(raw) != KEY_SIZE:
        raise InvalidKey(f"{what} must be {KEY_SIZE} bytes, got {len(raw)}")
    return raw


def _split_encoding(data: bytes, expected_type: int, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEncoding(f"{what}: expected bytes")
    if len(data) != ENCODED_KEY_SIZE:
        raise MalformedEncoding(f"{what}: expected {ENCODED_KEY_SIZE} bytes, got {len(data)}")
    if data[0] != expected_type:
        raise MalformedEncoding(f"{what}: unexpected key type 0x{data[0]:02x}")
    return bytes(data[1:])


def _from_text(text: str, key_type: int, what: str) -> bytes:
    prefix = _TEXT_PREFIX[key_type]
    if not isinstance(text, str) or not text.startswith(prefix):
        raise MalformedEncoding(f"{what}: expected the prefix {prefix!r}")
    body = text[len(prefix) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, binascii.Error):
        raise MalformedEncoding(f"{what}: not base64url") from None
    # urlsafe_b64decode skips characters outside the alphabet and tolerates non-zero spare bits;
    # re-encoding is the only way to insist on the one canonical text.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != body:
        raise MalformedEncoding(f"{what}: non-canonical base64url")
    if len(raw) != KEY_SIZE:
        raise MalformedEncoding(f"{what}: expected {KEY_SIZE} bytes, got {len(raw)}")
    return raw


def _to_text(raw: bytes, key_type: int) -> str:
    return _TEXT_PREFIX[key_type] + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _check_message(message: bytes) -> None:
    # bytes(n) of an int is n zero bytes: without this a mistyped argument would be signed.
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TypeError("a signed message must be bytes")


@functools.lru_cache(maxsize=_VALIDATED_KEY_CACHE_SIZE)
def _is_valid_ed25519_public(raw: bytes) -> bool:
    # `raw` is exactly 32 bytes (checked by the caller), the only thing the binding could refuse.
    return bool(bindings.crypto_core_ed25519_is_valid_point(raw))


class VerifyKey:
    """An Ed25519 public key: a canonical main-subgroup point that is not of small order."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        raw = _check_raw(raw, "Ed25519 public key")
        if not _is_valid_ed25519_public(raw):
            raise InvalidKey("Ed25519 public key is not a valid main-subgroup point")
        self._raw = raw

    @classmethod
    def _derived(cls, raw: bytes) -> VerifyKey:
        """A public key computed by libsodium from a seed: [a]B with a clamped, hence non-zero
        mod L, so it is a canonical main-subgroup point and needs no check."""
        key = cls.__new__(cls)
        key._raw = raw
        return key

    @property
    def raw(self) -> bytes:
        return self._raw

    def encode(self) -> bytes:
        return bytes((TYPE_ED25519_PUBLIC,)) + self._raw

    @classmethod
    def decode(cls, data: bytes) -> VerifyKey:
        return cls(_split_encoding(data, TYPE_ED25519_PUBLIC, "Ed25519 public key"))

    def to_text(self) -> str:
        return _to_text(self._raw, TYPE_ED25519_PUBLIC)

    @classmethod
    def from_text(cls, text: str) -> VerifyKey:
        return cls(_from_text(text, TYPE_ED25519_PUBLIC, "Ed25519 public key"))

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise `BadSignature` unless `signature` is this key's signature of `message`.

        libsodium refuses a non-canonical S (S >= L) and a small-order R; together with the key
        check on construction this is the strict verification Wycheproof expects.
        """
        _check_message(message)
        if not isinstance(signature, bytes | bytearray | memoryview):
            raise BadSignature("signature must be bytes")
        if len(signature) != SIGNATURE_SIZE:
            raise BadSignature("signature must be 64 bytes")
        try:
            bindings.crypto_sign_open(bytes(signature) + bytes(message), self._raw)
        except (NaclCryptoError, ValueError):
            raise BadSignature("signature does not verify") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash((TYPE_ED25519_PUBLIC, self._raw))

    def __repr__(self) -> str:
        return f"VerifyKey({self.to_text()})"


class SigningKey:
    """An Ed25519 private key, held as its 32-byte seed."""

    __slots__ = ("_secret", "_seed", "_verify_key")

    def __init__(self, seed: bytes) -> None:
        seed = _check_raw(seed, "Ed25519 seed")
        public, secret = bindings.crypto_sign_seed_keypair(seed)
        self._seed = seed
        self._secret = secret
        self._verify_key = VerifyKey._derived(public)

    @classmethod
    def generate(cls, rng: Rng) -> SigningKey:
        return cls(rng(KEY_SIZE))

    @property
    def seed(self) -> bytes:
        return self._seed

    @property
    def verify_key(self) -> VerifyKey:
        return self._verify_key

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached signature of `message` (deterministic, RFC 8032)."""
        _check_message(message)
        signed: bytes = bindings.crypto_sign(bytes(message), self._secret)
        return signed[:SIGNATURE_SIZE]

    def encode(self) -> bytes:
        return bytes((TYPE_ED25519_PRIVATE,)) + self._seed

    @classmethod
    def decode(cls, data: bytes) -> SigningKey:
        return cls(_split_encoding(data, TYPE_ED25519_PRIVATE, "Ed25519 private key"))

    def __repr__(self) -> str:
        return f"SigningKey(public={self._verify_key.to_text()})"


class DHPublicKey:
    """An X25519 public key (a Montgomery u-coordinate) that is not of low order."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        raw = _check_raw(raw, "X25519 public key")
        if raw in _LOW_ORDER_ENCODINGS:
            raise InvalidKey("X25519 public key is a low-order point")
        self._raw = raw

    @classmethod
    def _derived(cls, raw: bytes) -> DHPublicKey:
        """A public key computed from a clamped private scalar: a multiple of the prime-order
        base point by a scalar that is non-zero mod its order, so never low-order."""
        key = cls.__new__(cls)
        key._raw = raw
        return key

    @property
    def raw(self) -> bytes:
        return self._raw

    def encode(self) -> bytes:
        return bytes((TYPE_X25519_PUBLIC,)) + self._raw

    @classmethod
    def decode(cls, data: bytes) -> DHPublicKey:
        return cls(_split_encoding(data, TYPE_X25519_PUBLIC, "X25519 public key"))

    def to_text(self) -> str:
        return _to_text(self._raw, TYPE_X25519_PUBLIC)

    @classmethod
    def from_text(cls, text: str) -> DHPublicKey:
        return cls(_from_text(text, TYPE_X25519_PUBLIC, "X25519 public key"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DHPublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash((TYPE_X25519_PUBLIC, self._raw))

    def __repr__(self) -> str:
        return f"DHPublicKey({self.to_text()})"


class DHPrivateKey:
    """An X25519 private scalar (clamped by libsodium when used)."""

    __slots__ = ("_public", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = _check_raw(raw, "X25519 private key")
        # Computed on first use: a ratchet that decodes its state per message often only needs
        # `exchange`, and the base-point multiplication is its most expensive step.
        self._public: DHPublicKey | None = None

    @classmethod
    def generate(cls, rng: Rng) -> DHPrivateKey:
        return cls(rng(KEY_SIZE))

    @property
    def raw(self) -> bytes:
        return self._raw

    @property
    def public_key(self) -> DHPublicKey:
        public = self._public
        if public is None:
            public = DHPublicKey._derived(bindings.crypto_scalarmult_base(self._raw))
            self._public = public
        return public

    def exchange(self, peer: DHPublicKey) -> bytes:
        """X25519(self, peer); an all-zero result (a contributory-behaviour failure) is refused."""
        if not isinstance(peer, DHPublicKey):
            raise TypeError("exchange needs a DHPublicKey")
        try:
            shared: bytes = bindings.crypto_scalarmult(self._raw, peer.raw)
        except (RuntimeError, NaclCryptoError):
            raise InvalidKey("X25519 produced an all-zero shared secret") from None
        return shared

    def encode(self) -> bytes:
        return bytes((TYPE_X25519_PRIVATE,)) + self._raw

    @classmethod
    def decode(cls, data: bytes) -> DHPrivateKey:
        return cls(_split_encoding(data, TYPE_X25519_PRIVATE, "X25519 private key"))

    def __repr__(self) -> str:
        return f"DHPrivateKey(public={self.public_key.to_text()})"


def x25519(private_raw: bytes, public_raw: bytes) -> bytes:
    """Raw X25519 on byte strings, for known-answer tests; same refusals as the key classes."""
    return DHPrivateKey(private_raw).exchange(DHPublicKey(public_raw))
