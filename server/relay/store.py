"""What the relay needs from storage, as one interface (`RelayStore`) with two implementations:
`InMemoryRelayStore` here (unit tests of the relay logic, no threads, no SQL) and the SQL store
in `medrelay.server.storage.relay_store` (SQLite and PostgreSQL). A conformance suite runs the
same tests against all of them.

The hot path is `apply_writes`: the sends and acknowledgements gathered during one reactor turn
are applied in ONE transaction (group commit). Every check a send needs (addressed users exist,
the policy table allows it given each recipient's role and care link, the device set is current,
no queue is full, the id is new) happens inside that transaction, so a device added or revoked,
or a care link ended, concurrently can never be half-applied. A refused send does not affect the
others of its batch. Both stores judge a recipient with `send_refusal` (`medrelay.server.policy`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from medrelay.crypto.certificates import Role
from medrelay.protocol.messages import ItemKind
from medrelay.server.availability.offhours import AfterHoursTally, OffHours
from medrelay.server.policy import (
    Decision,
    LinkSpan,
    PairState,
    Relationship,
    RequestType,
    Standing,
    decide,
    pair_state,
    refusal,
)
from medrelay.server.relay.errors import (
    RelayError,
    id_conflict,
    queue_full,
    stale_devices,
    unknown_user,
)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """An enrolled device and the account it belongs to."""

    pk: int
    username: str
    device_id: str
    role: str
    certificate: bytes
    signing_key: bytes
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Envelope:
    """One ciphertext a send asks the relay to queue for one device."""

    username: str
    device_id: str
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class SendRequest:
    sender: DeviceRecord
    message_id: bytes
    envelopes: tuple[Envelope, ...]
    digest: bytes
    """SHA-256 over the canonical envelope list: a resend with the same id must match it."""
    urgent: bool = False


@dataclass(frozen=True, slots=True)
class QueuedItem:
    """One row of a device's queue."""

    device_pk: int
    seq: int
    kind: ItemKind
    message_id: bytes
    time_ms: int
    peer_user: str
    peer_device: str
    ciphertext: bytes | None
    flags: int = 0
    """"msg": FLAG_* bits of medrelay.server.availability.offhours (urgent, after hours, held)."""

    @property
    def size(self) -> int:
        """Bytes this item costs in flight (ciphertext plus a fixed allowance for the fields)."""
        return 64 + (len(self.ciphertext) if self.ciphertext is not None else 0)


@dataclass(frozen=True, slots=True)
class SendAccepted:
    """The send is durably stored (or was already: `duplicate`). `items` are the new queue rows,
    one per target device, for pushing to connected devices; empty for a duplicate."""

    time_ms: int
    items: tuple[QueuedItem, ...]
    duplicate: bool = False
    held: bool = False
    """Some envelopes wait for a clinician's hours (the patient's message arrived outside)."""
    reads_at_ms: int | None = None
    """When the clinician addressed, outside their hours, reads it (next opening)."""
    on_call: str | None = None
    """An urgent message reached this on-call clinician at once."""


SendOutcome = SendAccepted | RelayError


@functools.cache
def _send_decision(sender_role: str, role: str, relationship: Relationship, own: bool) -> Decision:
    # Memoised: this runs for every recipient of every send, and the table never changes.
    return decide(RequestType.SEND, Role(sender_role), Role(role), relationship, own_account=own)


def send_refusal(
    sender: DeviceRecord, username: str, role: str, *, closed: bool, state: PairState
) -> RelayError | None:
    """The policy table's verdict on `sender` writing to user `username` (of `role`; `closed`
    when the account is revoked; `state` from the pair's care links). The sender's own account
    (copies for its other devices) is decided too: closed, it is refused."""
    relationship = Relationship.REVOKED if closed else state.relationship
    own = username == sender.username
    decision = _send_decision(sender.role, role, relationship, own)
    if decision is Decision.ALLOWED:
        return None
    return refusal(
        decision,
        RequestType.SEND,
        Role(sender.role),
        Role(role),
        target_name=username,
        ended_ms=state.ended_ms,
        own_account=own,
    )


@dataclass(frozen=True, slots=True)
class WriteBatch:
    sends: tuple[SendRequest, ...] = ()
    acks: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """(device pk, acknowledged seqs) pairs."""
    release: bool = False
    """Also move held messages of clinicians whose hours are open now into their queues."""
    expire_up_to: int = 0
    """Also delete up to this many expired items, queueing "expired" notices to their senders.
    Expiry rides in the group commit because every insert into a queue must go through the one
    writer, or sequence numbers could commit out of order (PostgreSQL assigns them at insert)."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    sends: tuple[SendOutcome, ...]
    """One outcome per send of the batch, in order."""
    notices: tuple[QueuedItem, ...] = ()
    """The "expired" notices queued by this batch, for pushing to connected senders."""
    expired: int = 0
    """How many undelivered items were deleted."""
    released: tuple[QueuedItem, ...] = ()
    """Held messages this batch moved into queues (for pushing)."""
    next_release_ms: int | None = None
    """With `release`: when the next clinician still holding messages opens (None: unknown)."""
    after_hours: AfterHoursTally | None = None


@dataclass(frozen=True, slots=True)
class WriteLimits:
    """Relay policy the store applies inside the transaction."""

    ttl_ms: int
    queue_cap: int
    offhours: OffHours | None = None
    """The availability rules (None: every clinician counts as always available)."""


@dataclass(frozen=True, slots=True)
class DeviceBundleRecord:
    device_id: str
    certificate: bytes
    signed_prekey: bytes
    one_time_prekey: bytes | None
    device_pk: int
    remaining_one_time: int


@dataclass(frozen=True, slots=True)
class BundleRecord:
    username: str
    user_certificate: bytes
    devices: tuple[DeviceBundleRecord, ...]


@dataclass(frozen=True, slots=True)
class DeviceListRecord:
    username: str
    user_certificate: bytes
    devices: tuple[DeviceRecord, ...]


class RelayStore(Protocol):
    """Storage as the relay sees it; every method returns a Deferred fired on the reactor."""

    def apply_writes(
        self, batch: WriteBatch, now_ms: int, limits: WriteLimits
    ) -> Deferred[WriteResult]:
        """Apply a group of acks, sends and expiry, in that order, in one transaction."""
        ...

    def fetch_queue(
        self, device_pk: int, *, after_seq: int, limit: int, max_bytes: int
    ) -> Deferred[list[QueuedItem]]:
        """Up to `limit` items with seq > after_seq in seq order, stopping at `max_bytes` (but
        always at least one item when there is one)."""
        ...

    def get_device(self, username: str, device_id: str) -> Deferred[DeviceRecord | None]: ...

    def create_session(
        self, device_pk: int, token_hash: bytes, now_ms: int, expires_ms: int
    ) -> Deferred[None]: ...

    def get_session(self, token_hash: bytes, now_ms: int) -> Deferred[DeviceRecord | None]:
        """The device of an unexpired session of an active device, or None."""
        ...

    def put_prekeys(
        self, device_pk: int, signed_prekey: bytes | None, one_time: Sequence[bytes], now_ms: int
    ) -> Deferred[int]:
        """Store prekeys; returns how many one-time prekeys the device now has."""
        ...

    def one_time_prekey_count(self, device_pk: int) -> Deferred[int]: ...

    def take_bundles(self, username: str) -> Deferred[BundleRecord | None]:
        """A bundle for every active device of the user, each one-time prekey served once."""
        ...

    def list_devices(self, username: str) -> Deferred[DeviceListRecord | None]: ...

    def standing(self, requester: str, username: str, now_ms: int) -> Deferred[Standing | None]:
        """User `username` as the policy sees it from `requester` (role, closed or not, their
        care-link relationship at `now_ms`), or None without such an account."""
        ...


# -- the in-memory implementation -----------------------------------------------------------


@dataclass
class _Account:
    username: str
    role: str
    user_certificate: bytes
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    closed: bool = False


@dataclass
class _Prekeys:
    signed: bytes
    one_time: list[bytes] = field(default_factory=list)


class InMemoryRelayStore:
    """A `RelayStore` in dictionaries, with the same semantics as the SQL store. For tests."""

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self._devices_by_pk: dict[int, DeviceRecord] = {}
        self._prekeys: dict[int, _Prekeys] = {}
        self._queues: dict[int, dict[int, QueuedItem]] = {}
        self._expiry: dict[tuple[int, int], tuple[int, int]] = {}
        """(device pk, seq) -> (expires_ms, sender device pk) for "msg" items."""
        self._messages: dict[tuple[int, bytes], tuple[bytes, int]] = {}
        self._sessions: dict[bytes, tuple[int, int]] = {}
        self._next_seq = itertools.count(1)
        self._next_pk = itertools.count(1)
        self._notice_ttl_ms = 0
        self._links: dict[tuple[str, str], list[LinkSpan]] = {}
        """(patient, clinician) -> when each of their care links was in force."""

    # Test set-up helpers (the SQL store gets these rows from enrollment).

    def add_account(self, username: str, role: str, user_certificate: bytes = b"cert") -> None:
        self._accounts[username] = _Account(username, role, user_certificate)

    def add_device(
        self,
        username: str,
        device_id: str,
        *,
        certificate: bytes = b"device-cert",
        signing_key: bytes = b"\x00" * 32,
        signed_prekey: bytes = b"spk",
    ) -> DeviceRecord:
        account = self._accounts[username]
        record = DeviceRecord(
            pk=next(self._next_pk),
            username=username,
            device_id=device_id,
            role=account.role,
            certificate=certificate,
            signing_key=signing_key,
        )
        account.devices[device_id] = record
        self._devices_by_pk[record.pk] = record
        self._prekeys[record.pk] = _Prekeys(signed_prekey)
        self._queues[record.pk] = {}
        return record

    def revoke_device(self, username: str, device_id: str) -> None:
        account = self._accounts[username]
        record = account.devices[device_id]
        revoked = DeviceRecord(
            record.pk,
            record.username,
            record.device_id,
            record.role,
            record.certificate,
            record.signing_key,
            revoked=True,
        )
        account.devices[device_id] = revoked
        self._devices_by_pk[record.pk] = revoked

    def revoke_account(self, username: str) -> None:
        """Close the account and revoke its devices (as `devices.revoke_account_txn`)."""
        self._accounts[username].closed = True
        for device_id, record in list(self._accounts[username].devices.items()):
            if not record.revoked:
                self.revoke_device(username, device_id)

    def add_care_link(self, patient: str, clinician: str, *, start_ms: int, ends_ms: int) -> None:
        """A care link in force from `start_ms` until `ends_ms` (as `care.create_link_txn`
        would record it, without its checks)."""
        self._links.setdefault((patient, clinician), []).append(LinkSpan(start_ms, ends_ms))

    def end_care_link(self, patient: str, clinician: str, now_ms: int) -> None:
        """End the pair's links that are in force at `now_ms` (as `care.end_link_txn`)."""
        spans = self._links.get((patient, clinician), [])
        self._links[(patient, clinician)] = [
            LinkSpan(s.start_ms, now_ms) if s.start_ms <= now_ms < s.end_ms else s for s in spans
        ]

    def queue_of(self, device_pk: int) -> list[QueuedItem]:
        return [self._queues[device_pk][s] for s in sorted(self._queues[device_pk])]

    # RelayStore

    def apply_writes(
        self, batch: WriteBatch, now_ms: int, limits: WriteLimits
    ) -> Deferred[WriteResult]:
        self._notice_ttl_ms = limits.ttl_ms
        # Acknowledgements first, as in the SQL store: they free room under the queue cap.
        for device_pk, seqs in batch.acks:
            queue = self._queues.get(device_pk, {})
            for seq in seqs:
                if queue.pop(seq, None) is not None:
                    self._expiry.pop((device_pk, seq), None)
        outcomes = tuple(self._store(send, now_ms, limits) for send in batch.sends)
        notices, expired = self._expire(now_ms, batch.expire_up_to)
        return succeed(WriteResult(outcomes, notices, expired))

    def _active_devices(self, username: str) -> dict[str, DeviceRecord]:
        return {d: r for d, r in self._accounts[username].devices.items() if not r.revoked}

    def _store(self, send: SendRequest, now_ms: int, limits: WriteLimits) -> SendOutcome:
        sender = send.sender
        key = (sender.pk, send.message_id)
        if key in self._messages:
            digest, time_ms = self._messages[key]
            if digest != send.digest:
                return id_conflict()
            return SendAccepted(time_ms=time_ms, items=(), duplicate=True)
        users = {e.username for e in send.envelopes} | {sender.username}
        for username in sorted(users):
            account = self._accounts.get(username)
            if account is None:
                return unknown_user(username)
            state = pair_state(self._links, sender.username, username, now_ms)
            refusal = send_refusal(
                sender, username, account.role, closed=account.closed, state=state
            )
            if refusal is not None:
                return refusal
        addressed = {(e.username, e.device_id) for e in send.envelopes}
        current = {
            (u, d)
            for u in users
            for d in self._active_devices(u)
            if (u, d) != (sender.username, sender.device_id)
        }
        if addressed != current:
            return stale_devices(current - addressed, addressed - current)
        targets = [(self._accounts[e.username].devices[e.device_id], e) for e in send.envelopes]
        if any(len(self._queues[d.pk]) >= limits.queue_cap for d, _ in targets):
            return queue_full()
        items = []
        for device, envelope in targets:
            item = QueuedItem(
                device_pk=device.pk,
                seq=next(self._next_seq),
                kind=ItemKind.MESSAGE,
                message_id=send.message_id,
                time_ms=now_ms,
                peer_user=sender.username,
                peer_device=sender.device_id,
                ciphertext=envelope.ciphertext,
            )
            self._queues[device.pk][item.seq] = item
            self._expiry[(device.pk, item.seq)] = (now_ms + limits.ttl_ms, sender.pk)
            items.append(item)
        self._messages[key] = (send.digest, now_ms)
        return SendAccepted(time_ms=now_ms, items=tuple(items))

    def fetch_queue(
        self, device_pk: int, *, after_seq: int, limit: int, max_bytes: int
    ) -> Deferred[list[QueuedItem]]:
        out: list[QueuedItem] = []
        total = 0
        for seq in sorted(s for s in self._queues.get(device_pk, {}) if s > after_seq):
            item = self._queues[device_pk][seq]
            if out and (len(out) >= limit or total + item.size > max_bytes):
                break
            out.append(item)
            total += item.size
        return succeed(out)

    def _expire(self, now_ms: int, limit: int) -> tuple[tuple[QueuedItem, ...], int]:
        notices: list[QueuedItem] = []
        expired = sorted(k for k, (exp, _) in self._expiry.items() if exp <= now_ms)[:limit]
        for device_pk, seq in expired:
            _, sender_pk = self._expiry.pop((device_pk, seq))
            item = self._queues[device_pk].pop(seq)
            sender = self._devices_by_pk.get(sender_pk)
            if item.kind is not ItemKind.MESSAGE or sender is None or sender.revoked:
                continue  # notices expire silently; a revoked sender gets none
            recipient = self._devices_by_pk[device_pk]
            notice = QueuedItem(
                device_pk=sender_pk,
                seq=next(self._next_seq),
                kind=ItemKind.EXPIRED,
                message_id=item.message_id,
                time_ms=now_ms,
                peer_user=recipient.username,
                peer_device=recipient.device_id,
                ciphertext=None,
            )
            self._queues[sender_pk][notice.seq] = notice
            self._expiry[(sender_pk, notice.seq)] = (now_ms + self._notice_ttl_ms, 0)
            notices.append(notice)
        return tuple(notices), len(expired)

    def get_device(self, username: str, device_id: str) -> Deferred[DeviceRecord | None]:
        account = self._accounts.get(username)
        return succeed(account.devices.get(device_id) if account else None)

    def create_session(
        self, device_pk: int, token_hash: bytes, now_ms: int, expires_ms: int
    ) -> Deferred[None]:
        self._sessions[token_hash] = (device_pk, expires_ms)
        return succeed(None)

    def get_session(self, token_hash: bytes, now_ms: int) -> Deferred[DeviceRecord | None]:
        entry = self._sessions.get(token_hash)
        if entry is None or entry[1] <= now_ms:
            return succeed(None)
        device = self._devices_by_pk[entry[0]]
        return succeed(None if device.revoked else device)

    def put_prekeys(
        self, device_pk: int, signed_prekey: bytes | None, one_time: Sequence[bytes], now_ms: int
    ) -> Deferred[int]:
        prekeys = self._prekeys[device_pk]
        if signed_prekey is not None:
            prekeys.signed = signed_prekey
        prekeys.one_time.extend(one_time)
        return succeed(len(prekeys.one_time))

    def one_time_prekey_count(self, device_pk: int) -> Deferred[int]:
        return succeed(len(self._prekeys[device_pk].one_time))

    def take_bundles(self, username: str) -> Deferred[BundleRecord | None]:
        account = self._accounts.get(username)
        if account is None or account.closed:
            return succeed(None)
        devices = []
        for record in self._active_devices(username).values():
            prekeys = self._prekeys[record.pk]
            one_time = prekeys.one_time.pop(0) if prekeys.one_time else None
            devices.append(
                DeviceBundleRecord(
                    device_id=record.device_id,
                    certificate=record.certificate,
                    signed_prekey=prekeys.signed,
                    one_time_prekey=one_time,
                    device_pk=record.pk,
                    remaining_one_time=len(prekeys.one_time),
                )
            )
        return succeed(BundleRecord(username, account.user_certificate, tuple(devices)))

    def list_devices(self, username: str) -> Deferred[DeviceListRecord | None]:
        account = self._accounts.get(username)
        if account is None or account.closed:
            return succeed(None)
        return succeed(
            DeviceListRecord(
                username, account.user_certificate, tuple(self._active_devices(username).values())
            )
        )

    def standing(self, requester: str, username: str, now_ms: int) -> Deferred[Standing | None]:
        account = self._accounts.get(username)
        if account is None:
            return succeed(None)
        if account.closed:
            state = PairState(Relationship.REVOKED)
        else:
            state = pair_state(self._links, requester, username, now_ms)
        return succeed(Standing(username, Role(account.role), state))
