"""Sesame-style session management: per peer device, one active session and a few inactive ones;
fan-out of one plaintext to many devices, and receiving from one (notes/crypto.md §3.4, §9.6;
Signal's Sesame specification, revision 2).

Rules of this file:

- A `SessionRecord` belongs to one peer device: an active `SessionState` and at most
  `MAX_INACTIVE` inactive ones, newest first. A new session (started by us or by the peer)
  becomes active and the previous active one becomes the newest inactive one; the oldest beyond
  the limit is dropped. A message that decrypts on an inactive session promotes it to active.
- A session is used only with the peer identity it was set up with: its ratchet's associated
  data (X3DH's ``Enc(DIK_A) ‖ Enc(DIK_B) ‖ cert_hash_A ‖ cert_hash_B``) must equal what the
  current identities of both devices give. After a certificate change the old sessions are
  neither used for sending (a new bundle is needed) nor tried for receiving.
- The initiator sends every message of a session as a `PrekeyMessage` (carrying its X3DH
  header) until the session has received a message from the peer (Sesame §3.2).
- A `PrekeyMessage` whose ephemeral key (the session's *base key*) matches a session we created
  as responder is decrypted on that session, never by a second X3DH: a replay cannot create a
  second session. Otherwise X3DH `respond` makes a new session.
- A one-time prekey is consumed only after the first message of its session decrypted.
- Every operation computes all its results on records loaded from the stores (loading returns a
  copy the caller owns) and writes back only when everything succeeded, so a failure leaves both
  stores unchanged. A persistent store should run one call inside one transaction.

Device ciphertext (what the relay carries for one device; opaque to it):

    u8 type (1 = PrekeyMessage, 2 = ratchet message) ‖ the message's own encoding

State encodings (versioned, bounded, strictly decoded) are documented on each `to_bytes`. They
hold private keys and ratchet secrets: callers seal them before storing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final, Protocol

from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import (
    CryptoError,
    DuplicateMessage,
    InvalidKey,
    MalformedEncoding,
    SessionError,
    UnknownPrekey,
)
from medrelay.crypto.identity import MAX_ID_BYTES, DeviceAddress, DeviceIdentity, DeviceKeys
from medrelay.crypto.keys import ENCODED_KEY_SIZE, DHPrivateKey, DHPublicKey
from medrelay.crypto.ratchet import RatchetSession, parse_header
from medrelay.crypto.rng import Rng
from medrelay.crypto.x3dh import (
    MAX_RATCHET_MESSAGE_BYTES,
    OneTimePrekey,
    OneTimePrekeyPair,
    PrekeyBundle,
    PrekeyMessage,
    PrekeyMessageHeader,
    SignedPrekey,
    SignedPrekeyPair,
    associated_data,
    check_sender,
    initiate,
    respond,
)

CIPHERTEXT_PREKEY: Final = 1
CIPHERTEXT_RATCHET: Final = 2
MAX_DEVICE_CIPHERTEXT_BYTES: Final = 1 + 1024 + MAX_RATCHET_MESSAGE_BYTES
"""A type byte, a PrekeyMessage header (under 300 bytes) and a length-prefixed ratchet message."""

MAX_INACTIVE: Final = 40

SESSION_STATE_VERSION: Final = 1
SESSION_RECORD_VERSION: Final = 1
SESSION_STORE_VERSION: Final = 1
PREKEY_STORE_VERSION: Final = 1

MAX_RATCHET_STATE_BYTES: Final = 256 * 1024
"""Bound on one encoded ratchet state (ratchet.py caps skipped keys at 2000: about 150 KB)."""
MAX_SESSION_RECORD_BYTES: Final = (1 + MAX_INACTIVE) * (MAX_RATCHET_STATE_BYTES + 512)
MAX_STORED_RECORDS: Final = 100_000
MAX_SIGNED_PREKEYS: Final = 16
MAX_ONE_TIME_PREKEYS: Final = 10_000
_MAX_PREKEY_RECORD_BYTES: Final = 512

SIGNED_PREKEY_GRACE_MS: Final = 35 * 24 * 3600 * 1000
"""How long a replaced signed prekey's private key is kept: the relay's 30-day message TTL plus
a margin for a bundle fetched shortly before the rotation."""


class MissingPrekeyBundle(SessionError):
    """A fan-out target with no usable session and no prekey bundle supplied for it."""

    code = "missing_prekey_bundle"

    def __init__(self, addresses: Sequence[DeviceAddress]) -> None:
        self.addresses = tuple(addresses)
        listed = ", ".join(f"{a.user_id}/{a.device_id}" for a in self.addresses)
        super().__init__(f"no session and no prekey bundle for: {listed}")


class NoSession(SessionError):
    """A ratchet message from a device we have no (current) session with."""

    code = "no_session"


# ---------------------------------------------------------------------------------------------
# Device ciphertext


def encode_device_ciphertext(message: PrekeyMessage | bytes) -> bytes:
    """Tag a PrekeyMessage (type 1) or a ratchet wire message (type 2) for the relay."""
    if isinstance(message, PrekeyMessage):
        return bytes((CIPHERTEXT_PREKEY,)) + message.encode()
    if len(message) > MAX_RATCHET_MESSAGE_BYTES:
        raise ValueError("ratchet message too long")
    return bytes((CIPHERTEXT_RATCHET,)) + bytes(message)


def decode_device_ciphertext(data: bytes) -> PrekeyMessage | bytes:
    """The PrekeyMessage, or the ratchet wire message (its header already checked)."""
    data = bytes(data)
    if not data:
        raise MalformedEncoding("device ciphertext: empty")
    if len(data) > MAX_DEVICE_CIPHERTEXT_BYTES:
        raise MalformedEncoding("device ciphertext: too long")
    kind, body = data[0], data[1:]
    if kind == CIPHERTEXT_PREKEY:
        return PrekeyMessage.decode(body)
    if kind == CIPHERTEXT_RATCHET:
        if len(body) > MAX_RATCHET_MESSAGE_BYTES:
            raise MalformedEncoding("device ciphertext: ratchet message too long")
        parse_header(body)
        return body
    raise MalformedEncoding(f"device ciphertext: unknown type {kind}")


# ---------------------------------------------------------------------------------------------
# Session state and records


class SessionState:
    """One X3DH + Double Ratchet session with a peer device.

    `base_key` is the X3DH ephemeral key that started it (ours if `initiated`, the peer's if
    not); `pending_header` is the X3DH header an initiator still attaches to its messages.
    """

    __slots__ = ("base_key", "initiated", "pending_header", "ratchet")

    def __init__(
        self,
        ratchet: RatchetSession,
        *,
        initiated: bool,
        base_key: DHPublicKey,
        pending_header: PrekeyMessageHeader | None,
    ) -> None:
        if pending_header is not None:
            if not initiated:
                raise ValueError("only an initiator session carries an X3DH header")
            if pending_header.ephemeral_key != base_key:
                raise ValueError("the pending X3DH header is not this session's")
        self.ratchet = ratchet
        self.initiated = initiated
        self.base_key = base_key
        self.pending_header = pending_header
        self.note_progress()

    def note_progress(self) -> None:
        """Drop the X3DH header once the peer has answered (Sesame: the reply confirms it)."""
        if self.ratchet.has_received:
            self.pending_header = None

    def belongs_to(self, own: DeviceIdentity, peer: DeviceIdentity) -> bool:
        """Whether the session was set up between exactly these two certified identities."""
        expected = associated_data(own, peer) if self.initiated else associated_data(peer, own)
        return self.ratchet.associated_data == expected

    def encrypt(self, plaintext: bytes, rng: Rng) -> bytes:
        """A device ciphertext: a PrekeyMessage while the X3DH header is pending."""
        message = self.ratchet.encrypt(plaintext, rng)
        if self.pending_header is not None:
            return encode_device_ciphertext(PrekeyMessage(self.pending_header, message))
        return encode_device_ciphertext(message)

    def write(self, writer: Writer) -> Writer:
        """u8 version ‖ bool initiated ‖ 33-byte base key ‖ bool pending [‖ X3DH header] ‖
        blob ratchet state."""
        writer.u8(SESSION_STATE_VERSION).boolean(self.initiated)
        writer.fixed(self.base_key.encode(), ENCODED_KEY_SIZE)
        writer.boolean(self.pending_header is not None)
        if self.pending_header is not None:
            self.pending_header.write(writer)
        return writer.blob(self.ratchet.to_bytes(), MAX_RATCHET_STATE_BYTES)

    @classmethod
    def read(cls, reader: Reader) -> SessionState:
        reader.version(SESSION_STATE_VERSION)
        initiated = reader.boolean()
        base_key = _read_public_key(reader)
        try:
            pending = PrekeyMessageHeader.read(reader) if reader.boolean() else None
        except InvalidKey:
            raise MalformedEncoding("session state: invalid key in the X3DH header") from None
        ratchet = RatchetSession.from_bytes(reader.blob(MAX_RATCHET_STATE_BYTES))
        if (pending is not None) != (initiated and not ratchet.has_received):
            raise MalformedEncoding(
                "session state: an unanswered initiator session must keep its X3DH header, "
                "and no other session may"
            )
        try:
            return cls(ratchet, initiated=initiated, base_key=base_key, pending_header=pending)
        except ValueError as exc:
            raise MalformedEncoding(f"session state: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"SessionState(initiated={self.initiated}, base_key={self.base_key!r}, "
            f"pending_header={self.pending_header is not None}, ratchet={self.ratchet!r})"
        )


def _read_public_key(reader: Reader) -> DHPublicKey:
    try:
        return DHPublicKey.decode(reader.fixed(ENCODED_KEY_SIZE))
    except InvalidKey:
        raise MalformedEncoding("invalid public key in stored state") from None


def _read_private_key(reader: Reader) -> DHPrivateKey:
    try:
        return DHPrivateKey.decode(reader.fixed(ENCODED_KEY_SIZE))
    except InvalidKey:
        raise MalformedEncoding("invalid private key in stored state") from None


class SessionRecord:
    """All sessions with one peer device: the active one, then up to `MAX_INACTIVE` inactive
    ones, newest first."""

    __slots__ = ("_active", "_inactive")

    def __init__(self, active: SessionState, inactive: Iterable[SessionState] = ()) -> None:
        self._active = active
        self._inactive = list(inactive)
        if len(self._inactive) > MAX_INACTIVE:
            raise ValueError(f"at most {MAX_INACTIVE} inactive sessions")

    @property
    def active(self) -> SessionState:
        return self._active

    @property
    def inactive(self) -> tuple[SessionState, ...]:
        return tuple(self._inactive)

    def __iter__(self) -> Iterator[SessionState]:
        """The active session first, then the inactive ones, newest first."""
        yield self._active
        yield from self._inactive

    def __len__(self) -> int:
        return 1 + len(self._inactive)

    def activate_new(self, state: SessionState) -> None:
        """Make a new session active; the previous one becomes the newest inactive one."""
        self._inactive.insert(0, self._active)
        self._active = state
        del self._inactive[MAX_INACTIVE:]

    def promote(self, state: SessionState) -> None:
        """Make an existing session (which just decrypted a message) the active one."""
        if state is self._active:
            return
        self._inactive.remove(state)
        self._inactive.insert(0, self._active)
        self._active = state

    def to_bytes(self) -> bytes:
        """u8 version ‖ active state ‖ u8 inactive count ‖ inactive states (newest first)."""
        writer = Writer().u8(SESSION_RECORD_VERSION)
        self._active.write(writer)
        writer.u8(len(self._inactive))
        for state in self._inactive:
            state.write(writer)
        return writer.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionRecord:
        if len(data) > MAX_SESSION_RECORD_BYTES:
            raise MalformedEncoding("session record: too long")
        reader = Reader(data, "session record")
        reader.version(SESSION_RECORD_VERSION)
        active = SessionState.read(reader)
        count = reader.u8()
        if count > MAX_INACTIVE:
            raise MalformedEncoding(f"session record: {count} inactive sessions")
        inactive = [SessionState.read(reader) for _ in range(count)]
        reader.finish()
        return cls(active, inactive)

    def __repr__(self) -> str:
        return f"SessionRecord(sessions={len(self)})"


# ---------------------------------------------------------------------------------------------
# Store interfaces and in-memory implementations


class SessionStore(Protocol):
    """Session records by peer device. `load` returns a record the caller owns: changes to it
    take effect only through `save`."""

    def load(self, address: DeviceAddress) -> SessionRecord | None: ...

    def save(self, address: DeviceAddress, record: SessionRecord) -> None: ...

    def delete(self, address: DeviceAddress) -> None: ...


class PrekeyStore(Protocol):
    """This device's own prekey private keys, looked up by the ids in incoming X3DH headers."""

    def signed_prekey(self, prekey_id: int) -> DHPrivateKey | None:
        """The current signed prekey or a replaced one still within its grace period."""
        ...

    def one_time_prekey(self, prekey_id: int) -> DHPrivateKey | None:
        """An unused one-time prekey."""
        ...

    def consume_one_time_prekey(self, prekey_id: int) -> None:
        """Delete a one-time prekey for good (its session's first message decrypted)."""
        ...


class InMemorySessionStore:
    """A `SessionStore` over a dict of encoded records (so every load is an independent copy)."""

    __slots__ = ("_records",)

    def __init__(self) -> None:
        self._records: dict[DeviceAddress, bytes] = {}

    def load(self, address: DeviceAddress) -> SessionRecord | None:
        data = self._records.get(address)
        return None if data is None else SessionRecord.from_bytes(data)

    def save(self, address: DeviceAddress, record: SessionRecord) -> None:
        self._records[address] = record.to_bytes()

    def delete(self, address: DeviceAddress) -> None:
        self._records.pop(address, None)

    def addresses(self) -> list[DeviceAddress]:
        return sorted(self._records, key=lambda a: (a.user_id, a.device_id))

    def to_bytes(self) -> bytes:
        """u8 version ‖ u32 count ‖ {text user id ‖ text device id ‖ blob record}, sorted."""
        writer = Writer().u8(SESSION_STORE_VERSION).u32(len(self._records))
        for address in self.addresses():
            writer.text(address.user_id, MAX_ID_BYTES).text(address.device_id, MAX_ID_BYTES)
            writer.blob(self._records[address], MAX_SESSION_RECORD_BYTES)
        return writer.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> InMemorySessionStore:
        reader = Reader(data, "session store")
        reader.version(SESSION_STORE_VERSION)
        count = reader.u32()
        if count > MAX_STORED_RECORDS:
            raise MalformedEncoding("session store: too many records")
        store = cls()
        previous: tuple[str, str] | None = None
        for _ in range(count):
            key = (reader.text(MAX_ID_BYTES), reader.text(MAX_ID_BYTES))
            if previous is not None and key <= previous:
                raise MalformedEncoding("session store: addresses not sorted or repeated")
            previous = key
            record = reader.blob(MAX_SESSION_RECORD_BYTES)
            SessionRecord.from_bytes(record)
            store._records[DeviceAddress(*key)] = record
        reader.finish()
        return store


class InMemoryPrekeyStore:
    """A `PrekeyStore` that also keeps the public records, for publishing the bundle.

    Signed prekeys: the latest added is current; replaced ones are kept until
    `prune_signed_prekeys` finds their grace period over (at most `MAX_SIGNED_PREKEYS` in all,
    the oldest replaced ones dropped first).
    """

    __slots__ = ("_current_signed", "_one_time", "_signed")

    def __init__(self) -> None:
        # prekey id -> (pair, replaced_at_ms or None while current)
        self._signed: dict[int, tuple[SignedPrekeyPair, int | None]] = {}
        self._current_signed: int | None = None
        self._one_time: dict[int, OneTimePrekeyPair] = {}

    # -- PrekeyStore ----------------------------------------------------------------------

    def signed_prekey(self, prekey_id: int) -> DHPrivateKey | None:
        entry = self._signed.get(prekey_id)
        return None if entry is None else entry[0].private_key

    def one_time_prekey(self, prekey_id: int) -> DHPrivateKey | None:
        pair = self._one_time.get(prekey_id)
        return None if pair is None else pair.private_key

    def consume_one_time_prekey(self, prekey_id: int) -> None:
        self._one_time.pop(prekey_id, None)

    # -- management -----------------------------------------------------------------------

    def add_signed_prekey(self, pair: SignedPrekeyPair) -> None:
        """Make `pair` the current signed prekey; the previous one enters its grace period,
        counted from the new key's creation time."""
        prekey_id = pair.record.prekey_id
        if prekey_id in self._signed:
            raise ValueError(f"signed prekey id {prekey_id} already in use")
        if self._current_signed is not None:
            previous, _ = self._signed[self._current_signed]
            self._signed[self._current_signed] = (previous, pair.record.created_at_ms)
        self._signed[prekey_id] = (pair, None)
        self._current_signed = prekey_id
        while len(self._signed) > MAX_SIGNED_PREKEYS:
            del self._signed[next(iter(self._signed))]

    @property
    def current_signed_prekey(self) -> SignedPrekey | None:
        if self._current_signed is None:
            return None
        return self._signed[self._current_signed][0].record

    def prune_signed_prekeys(
        self, now_ms: int, grace_ms: int = SIGNED_PREKEY_GRACE_MS
    ) -> list[int]:
        """Forget replaced signed prekeys whose grace period has ended; returns their ids."""
        expired = [
            prekey_id
            for prekey_id, (_, replaced_at_ms) in self._signed.items()
            if replaced_at_ms is not None and now_ms - replaced_at_ms > grace_ms
        ]
        for prekey_id in expired:
            del self._signed[prekey_id]
        return expired

    def add_one_time_prekeys(self, pairs: Iterable[OneTimePrekeyPair]) -> None:
        pairs = list(pairs)
        ids = [pair.record.prekey_id for pair in pairs]
        if len(set(ids)) != len(ids) or any(i in self._one_time for i in ids):
            raise ValueError("one-time prekey ids must be unused")
        if len(self._one_time) + len(pairs) > MAX_ONE_TIME_PREKEYS:
            raise ValueError(f"at most {MAX_ONE_TIME_PREKEYS} one-time prekeys")
        for pair in pairs:
            self._one_time[pair.record.prekey_id] = pair

    def one_time_prekey_records(self) -> list[OneTimePrekey]:
        """The public one-time prekeys not used yet, by id (for the upload to the relay)."""
        return [self._one_time[i].record for i in sorted(self._one_time)]

    # -- serialisation --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """u8 version ‖ u8 signed count ‖ {blob SPK record ‖ 33-byte private key ‖ bool replaced
        [‖ u64 replaced_at_ms]} oldest first (the last one not replaced is current) ‖ u32
        one-time count ‖ {blob OPK record ‖ 33-byte private key} by id."""
        writer = Writer().u8(PREKEY_STORE_VERSION).u8(len(self._signed))
        for pair, replaced_at_ms in self._signed.values():
            writer.blob(pair.record.encode(), _MAX_PREKEY_RECORD_BYTES)
            writer.fixed(pair.private_key.encode(), ENCODED_KEY_SIZE)
            writer.boolean(replaced_at_ms is not None)
            if replaced_at_ms is not None:
                writer.u64(replaced_at_ms)
        writer.u32(len(self._one_time))
        for prekey_id in sorted(self._one_time):
            one_time = self._one_time[prekey_id]
            writer.blob(one_time.record.encode(), _MAX_PREKEY_RECORD_BYTES)
            writer.fixed(one_time.private_key.encode(), ENCODED_KEY_SIZE)
        return writer.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> InMemoryPrekeyStore:
        what = "prekey store"
        reader = Reader(data, what)
        reader.version(PREKEY_STORE_VERSION)
        store = cls()
        count = reader.u8()
        if count > MAX_SIGNED_PREKEYS:
            raise MalformedEncoding(f"{what}: too many signed prekeys")
        try:
            for _ in range(count):
                record = SignedPrekey.decode(reader.blob(_MAX_PREKEY_RECORD_BYTES))
                spk = SignedPrekeyPair(record, _read_private_key(reader))
                replaced_at_ms = reader.u64() if reader.boolean() else None
                if record.prekey_id in store._signed:
                    raise MalformedEncoding(f"{what}: repeated signed prekey id")
                if replaced_at_ms is None:
                    if store._current_signed is not None:
                        raise MalformedEncoding(f"{what}: two current signed prekeys")
                    store._current_signed = record.prekey_id
                store._signed[record.prekey_id] = (spk, replaced_at_ms)
            count = reader.u32()
            if count > MAX_ONE_TIME_PREKEYS:
                raise MalformedEncoding(f"{what}: too many one-time prekeys")
            for _ in range(count):
                opk_record = OneTimePrekey.decode(reader.blob(_MAX_PREKEY_RECORD_BYTES))
                opk = OneTimePrekeyPair(opk_record, _read_private_key(reader))
                if store._one_time and opk_record.prekey_id <= max(store._one_time):
                    raise MalformedEncoding(f"{what}: one-time prekeys not sorted or repeated")
                store._one_time[opk_record.prekey_id] = opk
        except (ValueError, InvalidKey) as exc:
            raise MalformedEncoding(f"{what}: {exc}") from None
        reader.finish()
        return store

    def __repr__(self) -> str:
        return (
            f"InMemoryPrekeyStore(signed={sorted(self._signed)}, "
            f"current={self._current_signed}, one_time={len(self._one_time)})"
        )


# ---------------------------------------------------------------------------------------------
# Fan-out and receive


def _start_session(own: DeviceKeys, bundle: PrekeyBundle, rng: Rng) -> SessionState:
    setup = initiate(own, bundle, rng)
    ratchet = RatchetSession.initiator(
        setup.shared_secret, setup.associated_data, setup.peer_signed_prekey, rng
    )
    return SessionState(
        ratchet, initiated=True, base_key=setup.ephemeral_key, pending_header=setup.header
    )


def encrypt_for_devices(  # noqa: PLR0917 (the fan-out API is positional, as specified)
    own: DeviceKeys,
    plaintext: bytes,
    targets: Sequence[DeviceIdentity],
    sessions: SessionStore,
    bundles: Mapping[DeviceAddress, PrekeyBundle],
    rng: Rng,
) -> dict[DeviceAddress, bytes]:
    """One device ciphertext of `plaintext` per target device.

    `targets` are the verified identities of every recipient device and of the sender's other
    devices (never this device). A target whose active session is missing or was set up with
    another certificate gets a new session from its bundle in `bundles` (bundles for targets
    with a usable session are ignored). All or nothing: on any failure nothing is saved.
    Raises `MissingPrekeyBundle` naming every target that needs a bundle and has none, before
    any cryptography.
    """
    own_address = own.identity.address
    addresses = [target.address for target in targets]
    if own_address in addresses:
        raise ValueError("the sending device itself cannot be a fan-out target")
    if len(set(addresses)) != len(addresses):
        raise ValueError("a fan-out target is listed twice")

    plans: list[tuple[DeviceIdentity, SessionRecord | None, bool]] = []
    missing: list[DeviceAddress] = []
    for target in targets:
        record = sessions.load(target.address)
        usable = record is not None and record.active.belongs_to(own.identity, target)
        if not usable and target.address not in bundles:
            missing.append(target.address)
        plans.append((target, record, usable))
    if missing:
        raise MissingPrekeyBundle(missing)

    ciphertexts: dict[DeviceAddress, bytes] = {}
    updated: list[tuple[DeviceAddress, SessionRecord]] = []
    for target, loaded, usable in plans:
        record = loaded
        if record is None or not usable:
            bundle = bundles[target.address]
            if bundle.identity != target:
                raise SessionError(
                    f"the bundle for {target.user_id}/{target.device_id} carries another identity"
                )
            state = _start_session(own, bundle, rng)
            if record is None:
                record = SessionRecord(state)
            else:
                record.activate_new(state)
        ciphertexts[target.address] = record.active.encrypt(plaintext, rng)
        updated.append((target.address, record))

    for address, record in updated:
        sessions.save(address, record)
    return ciphertexts


def decrypt_from_device(  # noqa: PLR0917 (mirrors encrypt_for_devices)
    own: DeviceKeys,
    sender: DeviceIdentity,
    ciphertext: bytes,
    sessions: SessionStore,
    prekeys: PrekeyStore,
    rng: Rng,
) -> bytes:
    """The plaintext of a device ciphertext that the relay says `sender` (a verified identity)
    sent to this device.

    Raises a `CryptoError` and leaves both stores unchanged on any failure: `MalformedEncoding`,
    `InvalidKey`, `DecryptionFailed`, `DuplicateMessage` (a replay, including a replayed
    PrekeyMessage whose session exists), `SkipLimitExceeded`, `UnknownPrekey` (a signed prekey
    past its grace period, a one-time prekey already used), `SenderMismatch`, `NoSession`.
    """
    if sender.address == own.identity.address:
        raise SessionError("refusing a message from this device itself")
    message = decode_device_ciphertext(ciphertext)
    record = sessions.load(sender.address)
    if isinstance(message, PrekeyMessage):
        return _receive_prekey_message(
            own, sender, message, record=record, sessions=sessions, prekeys=prekeys, rng=rng
        )

    candidates = [] if record is None else [s for s in record if s.belongs_to(own.identity, sender)]
    if record is None or not candidates:
        raise NoSession(f"no session with {sender.user_id}/{sender.device_id}")
    errors: list[CryptoError] = []
    for state in candidates:
        try:
            plaintext = state.ratchet.decrypt(message, rng)
        except CryptoError as exc:
            errors.append(exc)
            continue
        _commit_received(record, state, sender.address, sessions)
        return plaintext
    # A replay fails on its own session with DuplicateMessage and on every other session with
    # DecryptionFailed: the former is the one that explains what happened.
    duplicate = next((e for e in errors if isinstance(e, DuplicateMessage)), None)
    raise duplicate if duplicate is not None else errors[0]


def _commit_received(
    record: SessionRecord, state: SessionState, address: DeviceAddress, sessions: SessionStore
) -> None:
    state.note_progress()
    record.promote(state)
    sessions.save(address, record)


def _receive_prekey_message(
    own: DeviceKeys,
    sender: DeviceIdentity,
    message: PrekeyMessage,
    *,
    record: SessionRecord | None,
    sessions: SessionStore,
    prekeys: PrekeyStore,
    rng: Rng,
) -> bytes:
    header = message.header
    check_sender(sender, header)
    if record is not None:
        for state in record:
            if (
                not state.initiated
                and state.base_key == header.ephemeral_key
                and state.belongs_to(own.identity, sender)
            ):
                plaintext = state.ratchet.decrypt(message.ratchet_message, rng)
                _commit_received(record, state, sender.address, sessions)
                return plaintext

    signed_prekey = prekeys.signed_prekey(header.signed_prekey_id)
    if signed_prekey is None:
        raise UnknownPrekey(f"signed prekey {header.signed_prekey_id} is not held")
    one_time_prekey: DHPrivateKey | None = None
    if header.one_time_prekey_id is not None:
        one_time_prekey = prekeys.one_time_prekey(header.one_time_prekey_id)
        if one_time_prekey is None:
            raise UnknownPrekey(f"one-time prekey {header.one_time_prekey_id} is not held")
    shared_secret, ad = respond(own, sender, header, signed_prekey, one_time_prekey)
    ratchet = RatchetSession.responder(shared_secret, ad, signed_prekey)
    plaintext = ratchet.decrypt(message.ratchet_message, rng)

    state = SessionState(
        ratchet, initiated=False, base_key=header.ephemeral_key, pending_header=None
    )
    if record is None:
        record = SessionRecord(state)
    else:
        record.activate_new(state)
    # Session first: should the second write be lost, a replay still meets the session (and
    # fails as a duplicate) instead of the one-time prekey.
    sessions.save(sender.address, record)
    if header.one_time_prekey_id is not None:
        prekeys.consume_one_time_prekey(header.one_time_prekey_id)
    return plaintext
