"""The client's side of the identity transparency log (docs/protocol.md §13).

`LogVerifier` keeps this profile's newest verified checkpoint and the clinic keys it trusts, and
checks everything the server says about identities against the log:

- every `log` answer: the checkpoint is signed by a log key the pinned root certified, and is
  consistent with the checkpoint kept before (a log that shrank or forked is an attack: the old
  checkpoint stays and the error says so);
- a user's keys: every event of the user's chain is included in that checkpoint, the chain
  replays (sequence, previous hashes, every signature), and the caller compares the result with
  what the relay's `bundle`/`device_list` said;
- a message's `log_view` (the sender's checkpoint): consistent with ours, or a split view.

The profile stores the checkpoint note and the clinic key certificates in `meta`, so trust
survives restarts and follows issuing and log key rotations (each new key certified by the root).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from medrelay.clients.engine.connection import Connector, expect
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.store import OpenProfile, get_meta_txn, set_meta_txn
from medrelay.crypto import merkle
from medrelay.crypto.certificates import ClinicKeyCertificate
from medrelay.crypto.checkpoint import Checkpoint, verify_checkpoint_update
from medrelay.crypto.content import LogView
from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import CryptoError, MalformedEncoding, ProofError
from medrelay.crypto.transparency import ClinicTrust, LogEvent, UserState, replay_user_events
from medrelay.protocol.messages import LogAnswer, LogGet

_log = Logger()

META_CHECKPOINT: Final = "log_checkpoint"
META_CLINIC_KEYS: Final = "clinic_keys"
META_OWN_DEVICES: Final = "own_devices"
_MAX_STORED_KEYS: Final = 64

SECURITY_ADVICE: Final = (
    "do not use this account's keys; report it to clinic IT (the server may be compromised)"
)


def _log_conflict(detail: str) -> ClientError:
    return ClientError(
        LocalCode.LOG_CONFLICT, f"SECURITY WARNING: the identity log {detail}; {SECURITY_ADVICE}"
    )


@dataclass(frozen=True, slots=True)
class UserEvidence:
    """One `log` answer about a user, verified: the checkpoint (note and parsed), the clinic key
    certificates it came with, and the user's events as (leaf index, event, inclusion proof)."""

    user_id: str
    note: bytes
    checkpoint: Checkpoint
    clinic_keys: tuple[ClinicKeyCertificate, ...]
    events: tuple[tuple[int, bytes, tuple[bytes, ...]], ...]


@dataclass(frozen=True, slots=True)
class PinnedLog:
    checkpoint: Checkpoint
    note: bytes


# --- profile storage ------------------------------------------------------------------------------


def encode_certificates(certificates: Iterable[ClinicKeyCertificate]) -> bytes:
    writer = Writer()
    items = list(certificates)
    writer.u16(len(items))
    for cert in items:
        writer.blob(cert.encode(), 4096)
    return writer.to_bytes()


def decode_certificates(data: bytes) -> list[ClinicKeyCertificate]:
    reader = Reader(data, "stored clinic keys")
    count = reader.u16()
    if count > _MAX_STORED_KEYS:
        raise MalformedEncoding("too many stored clinic keys")
    certificates = [ClinicKeyCertificate.decode(reader.blob(4096)) for _ in range(count)]
    reader.finish()
    return certificates


def load_trust_txn(conn: sqlite3.Connection, profile: OpenProfile) -> ClinicTrust:
    """The clinic keys this profile trusts: the enrollment's issuing key plus every key a log
    answer showed certified by the pinned root."""
    info = profile.info
    stored = get_meta_txn(conn, META_CLINIC_KEYS)
    certificates = [info.issuing_certificate]
    if isinstance(stored, bytes):
        certificates.extend(decode_certificates(stored))
    return ClinicTrust.build(info.clinic_id, info.root_key, certificates)


def load_own_devices_txn(conn: sqlite3.Connection, own_device: str) -> set[str]:
    """The devices of this account that this device enrolled or linked itself."""
    stored = get_meta_txn(conn, META_OWN_DEVICES)
    known = {own_device}
    if isinstance(stored, str | bytes):
        known.update(str(d) for d in json.loads(stored))
    return known


def add_own_devices_txn(conn: sqlite3.Connection, own_device: str, devices: Iterable[str]) -> None:
    known = load_own_devices_txn(conn, own_device) | set(devices)
    set_meta_txn(conn, META_OWN_DEVICES, json.dumps(sorted(known)))


# --- the verifier ---------------------------------------------------------------------------------


class LogVerifier:
    """Verifies the relay's identity answers against the transparency log."""

    def __init__(self, profile: OpenProfile, connector: Connector) -> None:
        self._profile = profile
        self._connector = connector
        self._trust: ClinicTrust | None = None
        self._pinned: PinnedLog | None = None
        self._loaded = False
        self._consistent_views: set[tuple[int, bytes]] = set()
        # One log exchange at a time: an answer is checked against the checkpoint kept when it
        # was asked for, so answers must not overtake each other.
        self._lock = DeferredLock()

    @property
    def trust(self) -> ClinicTrust:
        """The clinic keys trusted now (after `load`)."""
        if self._trust is None:
            raise RuntimeError("LogVerifier.load() was not awaited")
        return self._trust

    def view(self) -> LogView | None:
        """Our checkpoint as a message's `log_view` (None before the first log answer)."""
        if self._pinned is None:
            return None
        checkpoint = self._pinned.checkpoint
        return LogView(checkpoint.size, checkpoint.root_hash)

    async def load(self) -> None:
        if self._loaded:
            return
        try:
            trust, note = await self._profile.db.run_interaction("load_log", self._load_txn)
        except CryptoError as exc:
            raise ClientError(
                LocalCode.PEER_UNVERIFIED,
                f"the clinic keys in this profile do not verify under its root key ({exc}); "
                "refusing to use any key",
            ) from None
        self._trust = trust
        if note is not None:
            try:
                self._pinned = PinnedLog(trust.open_checkpoint(note), note)
            except CryptoError as exc:
                raise ClientError(
                    LocalCode.PROFILE_CORRUPT, f"the stored log checkpoint does not verify: {exc}"
                ) from None
            view = self.view()
            if view is not None:
                self._consistent_views.add((view.tree_size, view.root_hash))
        self._loaded = True

    def _load_txn(self, conn: sqlite3.Connection) -> tuple[ClinicTrust, bytes | None]:
        note = get_meta_txn(conn, META_CHECKPOINT)
        return load_trust_txn(conn, self._profile), note if isinstance(note, bytes) else None

    async def user_state(self, user_id: str) -> UserState:
        """The user's state as the log proves it (fetching and verifying a fresh answer)."""
        await self._lock.acquire()
        try:
            return await self._user_state(user_id)
        finally:
            self._lock.release()

    async def _user_state(self, user_id: str) -> UserState:
        return (await self._user_answer(user_id))[2]

    async def _user_answer(self, user_id: str) -> tuple[LogAnswer, Checkpoint, UserState]:
        answer = await self._fetch(user=user_id)
        checkpoint = await self._accept(answer)
        if answer.user != user_id:
            raise ClientError(LocalCode.BAD_SERVER_ANSWER, "the log answered for another user")
        events = []
        try:
            for leaf in answer.events:
                merkle.verify_inclusion(
                    merkle.leaf_hash(leaf.event),
                    leaf.index,
                    checkpoint.size,
                    leaf.proof,
                    checkpoint.root_hash,
                )
                events.append(LogEvent.decode(leaf.event))
            return answer, checkpoint, replay_user_events(user_id, events, self.trust)
        except (ProofError, MalformedEncoding) as exc:
            raise ClientError(
                LocalCode.PEER_UNVERIFIED,
                f"the identity log does not prove the keys of {user_id} ({exc}); "
                "refusing to use them",
            ) from None

    async def evidence(self, user_id: str) -> UserEvidence:
        """A user's whole event chain with inclusion proofs into a fresh checkpoint, verified
        (and the checkpoint kept) as `user_state` does: what a record bundle carries."""
        await self._lock.acquire()
        try:
            answer, checkpoint, _ = await self._user_answer(user_id)
        finally:
            self._lock.release()
        try:
            keys = tuple(ClinicKeyCertificate.decode(data) for data in answer.clinic_keys)
        except CryptoError as exc:  # it verified in `_accept`: unreachable
            raise _log_conflict(f"answer does not decode ({exc})") from None
        return UserEvidence(
            user_id=user_id,
            note=answer.checkpoint,
            checkpoint=checkpoint,
            clinic_keys=keys,
            events=tuple((leaf.index, leaf.event, leaf.proof) for leaf in answer.events),
        )

    async def check_view(self, view: LogView) -> str | None:
        """A warning when a sender's `log_view` conflicts with our log, else None."""
        await self._lock.acquire()
        try:
            return await self._check_view(view)
        finally:
            self._lock.release()

    async def _check_view(self, view: LogView) -> str | None:
        key = (view.tree_size, view.root_hash)
        if key in self._consistent_views or view.tree_size == 0:
            return None
        await self.load()
        answer = await self._fetch(sizes=(view.tree_size,))
        checkpoint = await self._accept(answer)
        proofs = [p for p in answer.consistency if p.old_size == view.tree_size]
        try:
            if not proofs:
                raise ProofError("the server sent no proof for it")
            merkle.verify_consistency(
                view.tree_size,
                checkpoint.size,
                view.root_hash,
                checkpoint.root_hash,
                proofs[0].proof,
            )
        except ProofError as exc:
            return (
                "SECURITY WARNING: the sender saw a different identity log than this device "
                f"({exc}): the server may be showing different keys to different people; "
                f"{SECURITY_ADVICE}"
            )
        self._consistent_views.add(key)
        return None

    async def _fetch(self, *, user: str | None = None, sizes: Sequence[int] = ()) -> LogAnswer:
        await self.load()
        asked = tuple(sizes)
        if self._pinned is not None and self._pinned.checkpoint.size not in asked:
            asked = (self._pinned.checkpoint.size, *asked)
        answer = await self._connector.request(lambda rid: LogGet(rid=rid, sizes=asked, user=user))
        return expect(answer, LogAnswer)

    async def _accept(self, answer: LogAnswer) -> Checkpoint:
        """Verify the answer's checkpoint (keys, signature, consistency with ours) and keep it."""
        info = self._profile.info
        try:
            offered = [ClinicKeyCertificate.decode(data) for data in answer.clinic_keys]
            trust = ClinicTrust.build(
                info.clinic_id, info.root_key, [*self.trust.issuing, *self.trust.log, *offered]
            )
            checkpoint = trust.open_checkpoint(answer.checkpoint)
        except CryptoError as exc:
            raise _log_conflict(f"answer does not verify ({exc})") from None
        pinned = self._pinned
        if pinned is not None:
            proofs = [p.proof for p in answer.consistency if p.old_size == pinned.checkpoint.size]
            try:
                if not proofs and checkpoint.size != pinned.checkpoint.size:
                    raise ProofError("the server sent no consistency proof")
                verify_checkpoint_update(pinned.checkpoint, checkpoint, proofs[0] if proofs else ())
            except ProofError as exc:
                raise _log_conflict(
                    f"is not consistent with the one this device saw before ({exc})"
                ) from None
        if pinned is None or checkpoint.size > pinned.checkpoint.size or trust != self._trust:
            await self._profile.db.run_interaction(
                "save_log", _save_log_txn, answer.checkpoint, trust
            )
            self._pinned = PinnedLog(checkpoint, answer.checkpoint)
            self._trust = trust
            self._consistent_views.add((checkpoint.size, checkpoint.root_hash))
        return checkpoint


def _save_log_txn(conn: sqlite3.Connection, note: bytes, trust: ClinicTrust) -> None:
    set_meta_txn(conn, META_CHECKPOINT, note)
    set_meta_txn(conn, META_CLINIC_KEYS, encode_certificates([*trust.issuing, *trust.log]))
