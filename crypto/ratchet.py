"""The Double Ratchet (Signal specification §3, notes/crypto.md §3.3 and §9.4): one session's
state and its encrypt/decrypt steps. Nothing else in medrelay derives or uses message keys.

Construction (fixed; checked message for message against python-doubleratchet 1.3.0):

    KDF_RK(rk, dh_out) = HKDF-SHA256(salt=rk, IKM=dh_out, info=b"MedRelay_Ratchet", L=64)
                         -> (rk' = okm[:32], ck = okm[32:])
    KDF_CK(ck)         = (ck' = HMAC-SHA256(ck, 0x02), mk = HMAC-SHA256(ck, 0x01))
    ENCRYPT(mk, pt, ad): key || nonce = HKDF-SHA256(salt=0^32, IKM=mk,
                                                    info=b"MedRelay_MessageKeys", L=56)
                         XChaCha20-Poly1305(key, nonce, pad(pt, 256), CONCAT(ad, header))
    header             = u8 version (1) || ratchet public key (32) || u32be pn || u32be n
    CONCAT(ad, header) = u16be(len(ad)) || ad || header
    wire message       = header || AEAD ciphertext

The nonce is derived rather than random: every message key is used exactly once (spec §5.2 allows
"derived from mk alongside an independent AEAD key"), and it makes exact known answers possible.
`pad` is libsodium's ISO/IEC 7816-4 padding, so the relay learns lengths only in 256-byte steps.
The version byte's high bit (0x80) is reserved for a future header-encrypted variant (spec §4) and
refused for now.

Initialisation follows spec §3.3 after X3DH: the initiator starts with the X3DH secret, the
associated data and the responder's signed-prekey public key as the first remote ratchet key; the
responder uses its signed-prekey key pair as its first ratchet key pair and cannot send until the
first message from the initiator has arrived.

Limits: at most `MAX_SKIP` message keys are derived for one chain in one step (a message further
ahead raises `SkipLimitExceeded`), at most `MAX_STORED_SKIPPED` skipped keys are kept per session
(oldest evicted first), message numbers are u32 and never wrap.

Failures never change the session (spec §3.5, "discard all state changes"): `decrypt` computes the
whole step on local values (the new chain keys and a list of newly skipped keys) and writes them
into the session only after the ciphertext authenticated, so the skipped-key store is never copied.
The new ratchet key pair is drawn only after success too, so a forged message costs one X25519,
not three.

Besides the spec's state, the session remembers the last `MAX_PREVIOUS_CHAINS` remote ratchet keys
with the length their chain ended at. A message naming one of them is answered without a DH step:
`DuplicateMessage` when its key is no longer held (a replay, or a skipped key that was evicted:
the bytes cannot tell the two apart), `DecryptionFailed` when it lies beyond the end of its chain.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from itertools import islice
from typing import Final

from medrelay.crypto import aead
from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import (
    DecryptionFailed,
    DuplicateMessage,
    InvalidKey,
    MalformedEncoding,
    SessionError,
    SkipLimitExceeded,
)
from medrelay.crypto.kdf import hkdf_sha256
from medrelay.crypto.keys import KEY_SIZE, DHPrivateKey, DHPublicKey
from medrelay.crypto.rng import Rng

HEADER_VERSION: Final = 1
HEADER_ENCRYPTED_FLAG: Final = 0x80
HEADER_SIZE: Final = 41
PADDING_BLOCK: Final = 256

MAX_SKIP: Final = 1000
MAX_STORED_SKIPPED: Final = 2000
MAX_PREVIOUS_CHAINS: Final = 32
MAX_ASSOCIATED_DATA: Final = 1024
MAX_MESSAGE_NUMBER: Final = 0xFFFF_FFFE
"""The largest message number: one more still fits the u32 chain length carried as `pn`."""

ROOT_KDF_INFO: Final = b"MedRelay_Ratchet"
MESSAGE_KEY_INFO: Final = b"MedRelay_MessageKeys"

STATE_VERSION: Final = 1
MAX_STATE_SIZE: Final = (
    1  # version
    + 4
    + MAX_ASSOCIATED_DATA
    + 32  # root key
    + KEY_SIZE  # own ratchet private key
    + 1  # phase
    + KEY_SIZE  # remote ratchet key
    + 32 * 2  # sending and receiving chain keys
    + 4 * 3  # ns, pn, nr
    + 4
    + MAX_PREVIOUS_CHAINS * (KEY_SIZE + 4)
    + 4
    + MAX_STORED_SKIPPED * (KEY_SIZE + 4 + 4 + 32)  # worst case: one skipped key per chain
)
"""The largest encoded state (about 143 KiB); `from_bytes` refuses anything longer unread."""

_HEADER = struct.Struct(">B32sII")
_U16 = struct.Struct(">H")
_ZERO_SALT = bytes(32)
_MESSAGE_KEY_SEED = b"\x01"
_CHAIN_KEY_SEED = b"\x02"
_MESSAGE_KEY_INFO_1 = MESSAGE_KEY_INFO + b"\x01"
_MESSAGE_KEY_INFO_2 = MESSAGE_KEY_INFO + b"\x02"
_MIN_MESSAGE_SIZE = HEADER_SIZE + PADDING_BLOCK + aead.TAG_SIZE

# Session phases, as encoded in the state. The responder cannot send before it has received; the
# initiator has a sending chain from the start but no receiving chain until the first reply.
_AWAITING_FIRST_MESSAGE: Final = 0
_SENT_NOT_RECEIVED: Final = 1
_ESTABLISHED: Final = 2


def kdf_rk(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """KDF_RK: the next root key and a new chain key from a DH ratchet output."""
    if len(root_key) != 32 or len(dh_out) != 32:
        raise ValueError("KDF_RK takes a 32-byte root key and a 32-byte DH output")
    okm = hkdf_sha256(dh_out, root_key, ROOT_KDF_INFO, 64)
    return okm[:32], okm[32:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """KDF_CK: (next chain key, message key) from a chain key."""
    if len(chain_key) != 32:
        raise ValueError("KDF_CK takes a 32-byte chain key")
    # One keyed HMAC state copied for the two inputs: with OpenSSL 3 this is about a third
    # cheaper than two `hmac.digest` calls, and this runs once per message and skipped key.
    next_chain = hmac.new(chain_key, digestmod="sha256")
    message = next_chain.copy()
    next_chain.update(_CHAIN_KEY_SEED)
    message.update(_MESSAGE_KEY_SEED)
    return next_chain.digest(), message.digest()


def _message_cipher_keys(message_key: bytes) -> tuple[bytes, bytes]:
    """key || nonce = HKDF-SHA256(salt=0^32, IKM=mk, info=MESSAGE_KEY_INFO, L=56).

    RFC 5869 written out for its two output blocks (T1 = key, first 24 bytes of T2 = nonce), on
    stdlib HMAC like `kdf.hkdf_sha256`, which the tests check it against; the per-message cost
    of the generic loop and of one-shot `hmac.digest` matters on this path.
    """
    prk = hmac.new(_ZERO_SALT, message_key, "sha256").digest()
    first = hmac.new(prk, digestmod="sha256")
    second = first.copy()
    first.update(_MESSAGE_KEY_INFO_1)
    key = first.digest()
    second.update(key + _MESSAGE_KEY_INFO_2)
    return key, second.digest()[: aead.NONCE_SIZE]


def _seal(message_key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    key, nonce = _message_cipher_keys(message_key)
    return aead.encrypt(key, nonce, aead.pad(plaintext, PADDING_BLOCK), associated_data)


def _open(message_key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    key, nonce = _message_cipher_keys(message_key)
    return aead.unpad(aead.decrypt(key, nonce, ciphertext, associated_data), PADDING_BLOCK)


def _unpack_header(message: bytes) -> tuple[bytes, int, int]:
    """(ratchet key bytes, pn, n) after every check except the key's validity."""
    size = len(message)
    if size < _MIN_MESSAGE_SIZE:
        raise MalformedEncoding("ratchet message: truncated")
    if (size - HEADER_SIZE - aead.TAG_SIZE) % PADDING_BLOCK:
        raise MalformedEncoding("ratchet message: ciphertext is not a whole number of blocks")
    version, key, previous_chain_length, message_number = _HEADER.unpack_from(message)
    if version != HEADER_VERSION:
        if version & HEADER_ENCRYPTED_FLAG:
            raise MalformedEncoding("ratchet message: header encryption is not supported")
        raise MalformedEncoding(f"ratchet message: unsupported version {version}")
    if message_number > MAX_MESSAGE_NUMBER:
        raise MalformedEncoding("ratchet message: message number out of range")
    return key, previous_chain_length, message_number


@dataclass(frozen=True, slots=True)
class RatchetHeader:
    """The cleartext header of a ratchet message (its first `HEADER_SIZE` bytes)."""

    version: int
    ratchet_key: DHPublicKey
    previous_chain_length: int
    message_number: int

    def __post_init__(self) -> None:
        if self.version != HEADER_VERSION:
            raise ValueError(f"ratchet header version must be {HEADER_VERSION}")
        if not 0 <= self.previous_chain_length <= 0xFFFF_FFFF:
            raise ValueError("previous chain length must be a u32")
        if not 0 <= self.message_number <= MAX_MESSAGE_NUMBER:
            raise ValueError("message number out of range")

    def encode(self) -> bytes:
        return _HEADER.pack(
            self.version, self.ratchet_key.raw, self.previous_chain_length, self.message_number
        )


def parse_header(message: bytes) -> RatchetHeader:
    """The header of a wire message, checked (sizes, version, key) without decrypting anything.

    Raises `MalformedEncoding`, or `InvalidKey` for a low-order ratchet key.
    """
    key, previous_chain_length, message_number = _unpack_header(bytes(message))
    return RatchetHeader(HEADER_VERSION, DHPublicKey(key), previous_chain_length, message_number)


def _derive_until(
    chain_key: bytes, start: int, until: int
) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Advance a receiving chain from message `start` to message `until`, returning the chain key
    for `until` and the message keys of `start..until-1`; refuses to derive more than MAX_SKIP."""
    if until - start > MAX_SKIP:
        raise SkipLimitExceeded(f"message is {until - start} keys ahead of its chain")
    skipped: list[tuple[int, bytes]] = []
    for number in range(start, until):
        chain_key, message_key = kdf_ck(chain_key)
        skipped.append((number, message_key))
    return chain_key, skipped


class RatchetSession:
    """One Double Ratchet session with one peer device.

    Mutating methods change the object in place, and only when they succeed. The state holds
    secrets: `to_bytes` output must be sealed by the caller before it is stored.
    """

    __slots__ = (
        "_ad_prefix",
        "_associated_data",
        "_header_prefix",
        "_previous_chains",
        "_previous_sending_length",
        "_receiving_chain_key",
        "_receiving_length",
        "_remote_key",
        "_root_key",
        "_self_key",
        "_sending_chain_key",
        "_sending_length",
        "_skipped",
        "_skipped_count",
    )

    _associated_data: bytes
    _ad_prefix: bytes
    _root_key: bytes
    _self_key: DHPrivateKey
    _header_prefix: bytes
    _remote_key: DHPublicKey | None
    _sending_chain_key: bytes | None
    _receiving_chain_key: bytes | None
    _sending_length: int
    _previous_sending_length: int
    _receiving_length: int
    # remote ratchet key -> length its receiving chain ended at; insertion order = age
    _previous_chains: dict[bytes, int]
    # remote ratchet key -> {message number -> message key}; insertion order = age (both levels)
    _skipped: dict[bytes, dict[int, bytes]]
    _skipped_count: int

    def __init__(
        self,
        *,
        associated_data: bytes,
        root_key: bytes,
        self_key: DHPrivateKey,
        remote_key: DHPublicKey | None,
        sending_chain_key: bytes | None,
        receiving_chain_key: bytes | None,
        sending_length: int = 0,
        previous_sending_length: int = 0,
        receiving_length: int = 0,
        previous_chains: dict[bytes, int] | None = None,
        skipped: dict[bytes, dict[int, bytes]] | None = None,
    ) -> None:
        """Internal: use `initiator`, `responder` or `from_bytes`."""
        self._associated_data = associated_data
        self._ad_prefix = _U16.pack(len(associated_data)) + associated_data
        self._root_key = root_key
        self._set_self_key(self_key)
        self._remote_key = remote_key
        self._sending_chain_key = sending_chain_key
        self._receiving_chain_key = receiving_chain_key
        self._sending_length = sending_length
        self._previous_sending_length = previous_sending_length
        self._receiving_length = receiving_length
        self._previous_chains = previous_chains if previous_chains is not None else {}
        self._skipped = skipped if skipped is not None else {}
        self._skipped_count = sum(len(chain) for chain in self._skipped.values())

    def _set_self_key(self, self_key: DHPrivateKey) -> None:
        self._self_key = self_key
        self._header_prefix = bytes((HEADER_VERSION,)) + self_key.public_key.raw

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def initiator(
        cls,
        shared_secret: bytes,
        associated_data: bytes,
        peer_ratchet_key: DHPublicKey,
        rng: Rng,
    ) -> RatchetSession:
        """Alice's session after X3DH: `peer_ratchet_key` is Bob's signed prekey."""
        _check_setup(shared_secret, associated_data)
        self_key = DHPrivateKey.generate(rng)
        root_key, sending_chain_key = kdf_rk(shared_secret, self_key.exchange(peer_ratchet_key))
        return cls(
            associated_data=bytes(associated_data),
            root_key=root_key,
            self_key=self_key,
            remote_key=peer_ratchet_key,
            sending_chain_key=sending_chain_key,
            receiving_chain_key=None,
        )

    @classmethod
    def responder(
        cls,
        shared_secret: bytes,
        associated_data: bytes,
        own_ratchet_key: DHPrivateKey,
    ) -> RatchetSession:
        """Bob's session after X3DH: `own_ratchet_key` is his signed-prekey key pair."""
        _check_setup(shared_secret, associated_data)
        return cls(
            associated_data=bytes(associated_data),
            root_key=bytes(shared_secret),
            self_key=own_ratchet_key,
            remote_key=None,
            sending_chain_key=None,
            receiving_chain_key=None,
        )

    # -- properties --------------------------------------------------------------------------

    @property
    def associated_data(self) -> bytes:
        return self._associated_data

    @property
    def has_received(self) -> bool:
        """True once a message from the peer has decrypted (Sesame: the initiator stops
        attaching its X3DH header then)."""
        return self._receiving_chain_key is not None

    @property
    def stored_skipped_keys(self) -> int:
        """How many skipped message keys the session currently holds."""
        return self._skipped_count

    # -- messages ----------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, rng: Rng) -> bytes:
        """The wire message (header || ciphertext) carrying `plaintext`.

        `rng` is unused by this construction (the nonce is derived from the message key); it is
        part of the signature so that a variant that needs randomness does not change callers.
        Raises `SessionError` for a responder that has not received yet, or an exhausted chain.
        """
        del rng
        chain_key = self._sending_chain_key
        if chain_key is None:
            raise SessionError("the responder cannot send before the first message arrives")
        number = self._sending_length
        if number > MAX_MESSAGE_NUMBER:
            raise SessionError("sending chain exhausted: message numbers are u32")
        next_chain_key, message_key = kdf_ck(chain_key)
        header = self._header_prefix + struct.pack(">II", self._previous_sending_length, number)
        ciphertext = _seal(message_key, plaintext, self._ad_prefix + header)
        self._sending_chain_key = next_chain_key
        self._sending_length = number + 1
        return header + ciphertext

    def decrypt(self, message: bytes, rng: Rng) -> bytes:
        """The plaintext of a wire message from the peer; `rng` draws the next ratchet key pair
        when the message starts a new remote chain.

        On failure the session is unchanged and one of: `MalformedEncoding` (bad header),
        `InvalidKey` (low-order ratchet key), `DecryptionFailed` (tampered or not for this
        session), `DuplicateMessage` (its key is no longer held), `SkipLimitExceeded`.
        """
        if type(message) is not bytes:
            message = bytes(message)
        key, previous_chain_length, number = _unpack_header(message)
        associated_data = self._ad_prefix + message[:HEADER_SIZE]
        ciphertext = message[HEADER_SIZE:]
        remote = self._remote_key
        receiving_chain_key = self._receiving_chain_key

        if remote is not None and key == remote.raw:
            if receiving_chain_key is None:
                # Only the initiator's first remote key (the signed prekey) has no chain.
                raise DecryptionFailed("no receiving chain for this ratchet key")
            start = self._receiving_length
            if number < start:
                return self._decrypt_skipped(key, number, ciphertext, associated_data)
            chain_key, skipped = _derive_until(receiving_chain_key, start, number)
            next_chain_key, message_key = kdf_ck(chain_key)
            plaintext = _open(message_key, ciphertext, associated_data)
            # success: commit
            self._receiving_chain_key = next_chain_key
            self._receiving_length = number + 1
            if skipped:
                self._store_skipped(key, skipped)
            return plaintext

        if key in self._skipped or key in self._previous_chains:
            return self._decrypt_skipped(key, number, ciphertext, associated_data)

        return self._decrypt_new_chain(
            key,
            previous_chain_length,
            number,
            ciphertext=ciphertext,
            associated_data=associated_data,
            rng=rng,
        )

    def _decrypt_skipped(
        self, key: bytes, number: int, ciphertext: bytes, associated_data: bytes
    ) -> bytes:
        chain = self._skipped.get(key)
        message_key = chain.get(number) if chain is not None else None
        if chain is None or message_key is None:
            end = self._previous_chains.get(key)
            if end is not None and number >= end:
                raise DecryptionFailed("message number beyond the end of a finished chain")
            raise DuplicateMessage("the key of this message was already used or discarded")
        plaintext = _open(message_key, ciphertext, associated_data)
        del chain[number]
        if not chain:
            del self._skipped[key]
        self._skipped_count -= 1
        return plaintext

    def _decrypt_new_chain(
        self,
        key: bytes,
        previous_chain_length: int,
        number: int,
        *,
        ciphertext: bytes,
        associated_data: bytes,
        rng: Rng,
    ) -> bytes:
        """The DH ratchet step (spec §3.5 DHRatchet), computed on locals and committed on
        success."""
        remote = DHPublicKey(key)
        old_remote = self._remote_key
        old_chain_key = self._receiving_chain_key
        old_skipped: list[tuple[int, bytes]] = []
        old_end = self._receiving_length
        if old_chain_key is not None:
            _, old_skipped = _derive_until(old_chain_key, old_end, previous_chain_length)
            old_end = max(old_end, previous_chain_length)
        root_key, chain_key = kdf_rk(self._root_key, self._self_key.exchange(remote))
        chain_key, skipped = _derive_until(chain_key, 0, number)
        next_chain_key, message_key = kdf_ck(chain_key)
        plaintext = _open(message_key, ciphertext, associated_data)

        # Authenticated: finish the step. These can still fail (a broken rng), so compute them
        # before touching the session.
        new_self_key = DHPrivateKey.generate(rng)
        root_key, sending_chain_key = kdf_rk(root_key, new_self_key.exchange(remote))

        if old_remote is not None and old_chain_key is not None:
            if old_skipped:
                self._store_skipped(old_remote.raw, old_skipped)
            self._remember_chain(old_remote.raw, old_end)
        if skipped:
            self._store_skipped(key, skipped)
        self._root_key = root_key
        self._set_self_key(new_self_key)
        self._remote_key = remote
        self._receiving_chain_key = next_chain_key
        self._receiving_length = number + 1
        self._previous_sending_length = self._sending_length
        self._sending_chain_key = sending_chain_key
        self._sending_length = 0
        return plaintext

    def _store_skipped(self, key: bytes, entries: list[tuple[int, bytes]]) -> None:
        # New keys always belong to the newest chain, so the dicts' insertion order is age.
        chain = self._skipped.get(key)
        if chain is None:
            chain = self._skipped[key] = {}
        chain.update(entries)
        self._skipped_count += len(entries)
        excess = self._skipped_count - MAX_STORED_SKIPPED
        while excess > 0:
            oldest_key = next(iter(self._skipped))
            oldest = self._skipped[oldest_key]
            if len(oldest) <= excess:
                del self._skipped[oldest_key]
                excess -= len(oldest)
                self._skipped_count -= len(oldest)
            else:
                self._skipped[oldest_key] = dict(islice(oldest.items(), excess, None))
                self._skipped_count -= excess
                excess = 0

    def _remember_chain(self, key: bytes, end: int) -> None:
        self._previous_chains[key] = end
        if len(self._previous_chains) > MAX_PREVIOUS_CHAINS:
            del self._previous_chains[next(iter(self._previous_chains))]

    # -- serialisation -----------------------------------------------------------------------

    def _phase(self) -> int:
        if self._sending_chain_key is None:
            return _AWAITING_FIRST_MESSAGE
        if self._receiving_chain_key is None:
            return _SENT_NOT_RECEIVED
        return _ESTABLISHED

    def to_bytes(self) -> bytes:
        """The canonical encoding of the whole state (version 1):

        u8 version, blob associated data, root key (32), own ratchet private key (32), u8 phase
        (0 awaiting first message, 1 sent but not received, 2 established), [phase >= 1: remote
        ratchet key (32), sending chain key (32)], [phase 2: receiving chain key (32)], u32 ns,
        u32 pn, u32 nr, u32 count of previous chains {key (32), u32 end}, u32 count of skipped-key
        chains {key (32), u32 count {u32 n, message key (32)}}; lists oldest first.
        """
        writer = Writer().u8(STATE_VERSION)
        writer.blob(self._associated_data, MAX_ASSOCIATED_DATA)
        writer.fixed(self._root_key, 32).fixed(self._self_key.raw, KEY_SIZE)
        phase = self._phase()
        writer.u8(phase)
        if self._remote_key is not None and self._sending_chain_key is not None:
            writer.fixed(self._remote_key.raw, KEY_SIZE).fixed(self._sending_chain_key, 32)
        if self._receiving_chain_key is not None:
            writer.fixed(self._receiving_chain_key, 32)
        writer.u32(self._sending_length).u32(self._previous_sending_length)
        writer.u32(self._receiving_length)
        writer.u32(len(self._previous_chains))
        for key, end in self._previous_chains.items():
            writer.fixed(key, KEY_SIZE).u32(end)
        writer.u32(len(self._skipped))
        for key, chain in self._skipped.items():
            writer.fixed(key, KEY_SIZE).u32(len(chain))
            for number, message_key in chain.items():
                writer.u32(number).fixed(message_key, 32)
        return writer.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetSession:
        """Decode `to_bytes` output; anything that is not exactly a valid state (wrong version,
        truncation, trailing bytes, an impossible combination, a low-order key, limits exceeded)
        raises `MalformedEncoding`."""
        try:
            return cls._decode(data)
        except InvalidKey:
            raise MalformedEncoding("ratchet session: invalid key in state") from None

    @classmethod
    def _decode(cls, data: bytes) -> RatchetSession:
        what = "ratchet session"
        if len(data) > MAX_STATE_SIZE:
            raise MalformedEncoding(f"{what}: longer than {MAX_STATE_SIZE} bytes")
        reader = Reader(data, what)
        reader.version(STATE_VERSION)
        associated_data = reader.blob(MAX_ASSOCIATED_DATA)
        root_key = reader.fixed(32)
        self_key = DHPrivateKey(reader.fixed(KEY_SIZE))
        phase = reader.u8()
        if phase not in (_AWAITING_FIRST_MESSAGE, _SENT_NOT_RECEIVED, _ESTABLISHED):
            raise MalformedEncoding(f"{what}: unknown phase {phase}")
        remote_key: DHPublicKey | None = None
        sending_chain_key: bytes | None = None
        receiving_chain_key: bytes | None = None
        if phase >= _SENT_NOT_RECEIVED:
            remote_key = DHPublicKey(reader.fixed(KEY_SIZE))
            sending_chain_key = reader.fixed(32)
        if phase == _ESTABLISHED:
            receiving_chain_key = reader.fixed(32)
        sending_length = reader.u32()
        previous_sending_length = reader.u32()
        receiving_length = reader.u32()
        if phase == _AWAITING_FIRST_MESSAGE and sending_length:
            raise MalformedEncoding(f"{what}: a responder that has not received has sent")
        if phase != _ESTABLISHED and (previous_sending_length or receiving_length):
            raise MalformedEncoding(f"{what}: chain lengths without a receiving chain")

        previous_chains: dict[bytes, int] = {}
        count = reader.u32()
        if count > MAX_PREVIOUS_CHAINS or (count and phase != _ESTABLISHED):
            raise MalformedEncoding(f"{what}: too many previous chains")
        for _ in range(count):
            key = DHPublicKey(reader.fixed(KEY_SIZE)).raw
            end = reader.u32()
            if key in previous_chains or (remote_key is not None and key == remote_key.raw):
                raise MalformedEncoding(f"{what}: repeated ratchet key")
            previous_chains[key] = end

        skipped: dict[bytes, dict[int, bytes]] = {}
        total = 0
        count = reader.u32()
        if count > MAX_STORED_SKIPPED or (count and phase != _ESTABLISHED):
            raise MalformedEncoding(f"{what}: too many skipped-key chains")
        for index in range(count):
            key = reader.fixed(KEY_SIZE)
            if key in skipped:
                raise MalformedEncoding(f"{what}: repeated skipped-key chain")
            if remote_key is not None and key == remote_key.raw:
                # keys are only ever added to the newest chain: the current one comes last
                if index != count - 1:
                    raise MalformedEncoding(f"{what}: current chain's skipped keys not last")
                end = receiving_length
            else:
                DHPublicKey(key)
                end = previous_chains.get(key, MAX_MESSAGE_NUMBER + 1)
            entries = reader.u32()
            total += entries
            if entries == 0 or total > MAX_STORED_SKIPPED:
                raise MalformedEncoding(f"{what}: skipped-key chain size out of range")
            chain: dict[int, bytes] = {}
            last = -1
            for _ in range(entries):
                number = reader.u32()
                if not last < number < end:
                    raise MalformedEncoding(f"{what}: skipped-key numbers out of order or range")
                chain[number] = reader.fixed(32)
                last = number
            skipped[key] = chain
        reader.finish()
        return cls(
            associated_data=associated_data,
            root_key=root_key,
            self_key=self_key,
            remote_key=remote_key,
            sending_chain_key=sending_chain_key,
            receiving_chain_key=receiving_chain_key,
            sending_length=sending_length,
            previous_sending_length=previous_sending_length,
            receiving_length=receiving_length,
            previous_chains=previous_chains,
            skipped=skipped,
        )

    def __repr__(self) -> str:
        return (
            f"RatchetSession(has_received={self.has_received}, sent={self._sending_length}, "
            f"received={self._receiving_length}, skipped_keys={self._skipped_count})"
        )


def _check_setup(shared_secret: bytes, associated_data: bytes) -> None:
    if len(shared_secret) != 32:
        raise ValueError("the X3DH shared secret must be 32 bytes")
    if len(associated_data) > MAX_ASSOCIATED_DATA:
        raise ValueError(f"associated data is limited to {MAX_ASSOCIATED_DATA} bytes")


__all__ = [
    "HEADER_SIZE",
    "HEADER_VERSION",
    "MAX_ASSOCIATED_DATA",
    "MAX_MESSAGE_NUMBER",
    "MAX_PREVIOUS_CHAINS",
    "MAX_SKIP",
    "MAX_STATE_SIZE",
    "MAX_STORED_SKIPPED",
    "RatchetHeader",
    "RatchetSession",
    "kdf_ck",
    "kdf_rk",
    "parse_header",
]
