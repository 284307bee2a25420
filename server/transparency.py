"""The identity transparency log as the server serves it (docs/protocol.md §13).

The leaves live in the database (`log_entries`, appended inside the transactions that certify
users, add devices and revoke them). This service mirrors their leaf hashes in an in-memory
`MerkleTree`, catching up from the database before each answer (another process, such as an
admin command, may have appended), signs checkpoints with the clinic's log key, and answers
`log_get` with the checkpoint, the clinic key certificates, consistency proofs and a user's
event chain with inclusion proofs.

Memory: 32 bytes per leaf per tree level amortised (about 64 bytes a leaf); a clinic of 10^5
users with a few devices each holds well under 50 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy.engine import Connection
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from medrelay.crypto.certificates import ClinicKeyCertificate
from medrelay.crypto.checkpoint import Checkpoint, sign_checkpoint
from medrelay.crypto.errors import CryptoError
from medrelay.crypto.merkle import MerkleTree, leaf_hash
from medrelay.crypto.transparency import ClinicTrust, LogAudit, audit_log, log_origin
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import MAX_USER_LOG_EVENTS
from medrelay.protocol.messages import ConsistencyProof, LogAnswer, LogGet, LogLeaf
from medrelay.server.clinic import ClinicKeys
from medrelay.server.relay.errors import RelayError
from medrelay.server.storage import transparency as store
from medrelay.server.storage.chains import read_chain_head_txn
from medrelay.server.storage.database import Database

_log = Logger()

_CATCH_UP_BATCH: Final = 5000


class TransparencyLog(Service):
    """Serves the identity log; one per server process. Starting it logs the serving clinic key
    certificates and loads the tree; answers wait for that (they take the same lock)."""

    def __init__(self, *, database: Database, keys: ClinicKeys, clock: IReactorTime) -> None:
        self._clock = clock
        self._database = database
        self._keys = keys
        self._origin = log_origin(keys.clinic_id)
        self._tree = MerkleTree()
        self._lock = DeferredLock()
        self._note: tuple[int, bytes] | None = None
        self._clinic_certificates: tuple[bytes, ...] = ()

    @property
    def size(self) -> int:
        return self._tree.size

    def startService(self) -> None:  # noqa: N802 (Twisted's IService name)
        super().startService()  # type: ignore[no-untyped-call]
        self.start().addErrback(
            lambda failure: _log.failure("identity log: could not start", failure)
        )

    def start(self) -> Deferred[None]:
        """Log the serving clinic key certificates if they are not yet, then load the tree."""
        certificates = [c.encode() for c in self._keys.all_certificates()]
        now_ms = int(self._clock.seconds() * 1000)

        async def run() -> None:
            added = await self._database.run_interaction(
                "log_clinic_keys", store.log_clinic_certificates_txn, certificates, now_ms
            )
            if added:
                _log.info("identity log: {added} clinic key certificate(s) logged", added=added)
            await self._catch_up()

        return self._lock.run(lambda: Deferred.fromCoroutine(run()))

    def refresh(self) -> Deferred[None]:
        """Catch the in-memory tree up with the database (one refresh at a time)."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._catch_up()))

    async def _catch_up(self) -> None:
        grew = False
        while True:
            leaves = await self._database.run_interaction(
                "log_leaves", store.leaves_txn, start=self._tree.size, limit=_CATCH_UP_BATCH
            )
            for data in leaves:
                self._tree.append(leaf_hash(data))
            grew = grew or bool(leaves)
            if len(leaves) < _CATCH_UP_BATCH:
                break
        if grew or not self._clinic_certificates:
            self._clinic_certificates = tuple(
                await self._database.run_interaction(
                    "log_clinic_certificates", store.clinic_certificates_txn
                )
            )

    def checkpoint_note(self) -> bytes:
        """The signed checkpoint of the current tree (signed once per size)."""
        size = self._tree.size
        if self._note is None or self._note[0] != size:
            checkpoint = Checkpoint(self._origin, size, self._tree.root())
            note = sign_checkpoint(checkpoint, self._origin, self._keys.log_key)
            self._note = (size, note.encode("utf-8"))
        return self._note[1]

    def answer(self, message: LogGet) -> Deferred[LogAnswer]:
        return Deferred.fromCoroutine(self._answer(message))

    async def _answer(self, message: LogGet) -> LogAnswer:
        await self.refresh()
        if not self._clinic_certificates:
            raise RelayError(ErrorCode.SERVER_BUSY, "the identity log is not ready; try again")
        size = self._tree.size
        for old in message.sizes:
            if not 0 < old <= size:
                raise RelayError(
                    ErrorCode.INVALID_FIELD,
                    f"log_get.sizes: {old} is not between 1 and the log's size ({size} leaves)",
                )
        events: list[LogLeaf] = []
        if message.user is not None:
            entries = await self._database.run_interaction(
                "log_user", store.user_entries_txn, message.user, MAX_USER_LOG_EVENTS + 1
            )
            if len(entries) > MAX_USER_LOG_EVENTS:
                raise RelayError(
                    ErrorCode.SERVER_BUSY,
                    f"the log history of {message.user} is longer than one answer can carry",
                )
            # Entries committed after the refresh above are left for the next answer: every
            # proof must be into this checkpoint.
            events = [
                LogLeaf(index=index, event=data, proof=self._tree.inclusion_proof(index, size))
                for index, data in entries
                if index < size
            ]
        return LogAnswer(
            rid=message.rid,
            checkpoint=self.checkpoint_note(),
            clinic_keys=self._clinic_certificates,
            consistency=tuple(
                ConsistencyProof(old_size=old, proof=self._tree.consistency_proof(old, size))
                for old in message.sizes
            ),
            events=tuple(events),
            user=message.user,
        )


# --- the auditor's replay (`medrelay-server log verify`) ------------------------------------------


@dataclass(frozen=True, slots=True)
class LogVerification:
    audit: LogAudit | None
    problem: str | None
    """The first problem found, one line; None when the log and the database agree."""


def verify_log_txn(conn: Connection, keys: ClinicKeys) -> LogVerification:
    """Replay the whole log as an auditor would (every event, chain, signature), check that the
    chain head and the tree agree, and that the database serves exactly what the log says:
    every enrolled account's certificate and active devices, and nothing else."""
    certificates = list(keys.all_certificates())
    try:
        certificates += [
            ClinicKeyCertificate.decode(data) for data in store.clinic_certificates_txn(conn)
        ]
        trust = ClinicTrust.build(keys.clinic_id, keys.root_key, certificates)
        audit = audit_log(store.iter_leaves_txn(conn), trust)
    except CryptoError as exc:
        return LogVerification(None, str(exc))
    head = read_chain_head_txn(conn, store.TRANSPARENCY_CHAIN)
    if head.size != audit.size:
        return LogVerification(
            audit, f"the log has {audit.size} leaves but its head records {head.size}"
        )
    enrolled = {a.username: a for a in store.enrolled_accounts_txn(conn)}
    for username in sorted(set(audit.states) - set(enrolled)):
        return LogVerification(audit, f"the log certifies {username}, unknown to the database")
    for username, account in sorted(enrolled.items()):
        state = audit.states.get(username)
        if state is None:
            return LogVerification(audit, f"{username} is certified but not in the log")
        if state.certificate.encode() != account.user_certificate:
            return LogVerification(audit, f"the certificate of {username} is not the logged one")
        logged = {d: cert.encode() for d, cert in state.devices.items()}
        if logged != account.devices:
            return LogVerification(audit, f"the active devices of {username} differ from the log's")
        if state.revoked != (account.status == "revoked"):
            return LogVerification(
                audit, f"the revocation state of {username} differs from the log's"
            )
    return LogVerification(audit, None)


def signed_checkpoint_txn(conn: Connection, keys: ClinicKeys) -> str:
    """The current checkpoint as a signed note, computed from the stored leaves."""
    tree = MerkleTree()
    for data in store.iter_leaves_txn(conn):
        tree.append(leaf_hash(data))
    origin = log_origin(keys.clinic_id)
    return sign_checkpoint(Checkpoint(origin, tree.size, tree.root()), origin, keys.log_key)
