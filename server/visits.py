"""Teleconsultation visits over the protocol: `visit_open`, `visit_close` and `visit_list`
(docs/protocol.md §18).

A doctor opens a visit for a patient with whom an ACTIVE care link exists (the link records the
in-person visit that must come first), for one of the clinic's indications (`[visits]
indications`); the server names it ("V" and 8 Crockford base32 characters) and its thread (16
random bytes), and stores the clinic's consent mode in force at opening. The visit's doctor
closes it with the id of the conclusion message already sent in the thread. Conclusions and
consent travel end to end as messages (clients/engine/record_messages.py): the server keeps only
who, why, ids and times.

Each request is one transaction that applies the policy table (`medrelay.server.policy`) and
refuses bad input with `invalid_field` before it writes anything. Opening and closing append
their audit record in their own transaction, naming the fields set (never the indication or the
conclusion id); an attempt refused as `forbidden` is recorded as refused (the attempt commits,
the change does not), as availability changes are. A visit that is not the requester's is
answered exactly as one that does not exist.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Final

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from medrelay.crypto.certificates import Role
from medrelay.crypto.rng import Rng
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.limits import MAX_VISITS, MESSAGE_ID_SIZE
from medrelay.protocol.messages import (
    Message,
    VisitClose,
    VisitInfo,
    VisitList,
    VisitOpen,
    Visits,
)
from medrelay.server import audit
from medrelay.server.availability.service import run_audited_change
from medrelay.server.config import VisitsConfig
from medrelay.server.metrics import RelayMetrics
from medrelay.server.policy import (
    Decision,
    PairState,
    Relationship,
    RequestType,
    decide,
    last_day,
    refusal,
    relationship_of,
)
from medrelay.server.relay.errors import RelayError, server_busy, unknown_user
from medrelay.server.relay.store import DeviceRecord
from medrelay.server.storage import care as care_store
from medrelay.server.storage import visits as store
from medrelay.server.storage.database import Database

# --- visit ids ----------------------------------------------------------------------------------

CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
VISIT_ID_BYTES: Final = 5
"""40 random bits: 8 base32 characters."""
VISIT_ID: Final = re.compile(r"V[0-9A-HJKMNP-TV-Z]{8}")
ID_CANDIDATES: Final = 4
"""Fresh ids drawn per opening. At a million visits each is taken with odds of about 2**-20, all
four about 2**-80; that is answered `server_busy`."""
_TYPED: Final = str.maketrans({"O": "0", "I": "1", "L": "1"})


def visit_id_of(raw: bytes) -> str:
    """ "V" and the 8 Crockford base32 characters of 5 random bytes."""
    if len(raw) != VISIT_ID_BYTES:
        raise ValueError(f"a visit id is made of {VISIT_ID_BYTES} bytes")
    number = int.from_bytes(raw, "big")
    return "V" + "".join(CROCKFORD[(number >> shift) & 31] for shift in range(35, -1, -5))


def normalize_visit_id(text: str) -> str:
    """A visit id as typed (lower case; O for 0, I or L for 1, as Crockford allows) in its
    canonical form; anything that is not one is returned as given (and found nowhere)."""
    typed = text.strip().upper()
    canonical = typed[:1] + typed[1:].translate(_TYPED)
    return canonical if VISIT_ID.fullmatch(canonical) else text


def draw_ids(rng: Rng, count: int = ID_CANDIDATES) -> tuple[tuple[str, bytes], ...]:
    """Candidate (visit id, thread id) pairs, drawn on the reactor thread (a transaction may
    run again and must not touch anything outside its connection)."""
    return tuple((visit_id_of(rng(VISIT_ID_BYTES)), rng(MESSAGE_ID_SIZE)) for _ in range(count))


# --- requests -----------------------------------------------------------------------------------


def _info(visit: store.VisitRecord) -> VisitInfo:
    return VisitInfo(
        visit=visit.visit_id,
        thread=visit.thread_id,
        patient=visit.patient,
        clinician=visit.clinician,
        indication=visit.indication,
        consent=visit.consent,
        opened_ms=visit.opened_ms,
        closed_ms=visit.closed_ms,
        conclusion=visit.conclusion_id,
    )


def _answer(rid: int, config: VisitsConfig, found: Sequence[store.VisitRecord]) -> Visits:
    """Every answer carries the clinic's indications and consent mode."""
    return Visits(
        rid=rid,
        visits=tuple(_info(v) for v in found),
        indications=config.wire_indications(),
        consent=config.consent.value,
    )


def _forbidden(message: str) -> RelayError:
    return RelayError(ErrorCode.FORBIDDEN, message)


def _role_check(request: RequestType, role: Role) -> None:
    """Refuse a role the table never lets make `request` (before looking anything up, so a
    refused role learns nothing about accounts or visits)."""
    if decide(request, role, Role.PATIENT, Relationship.ACTIVE) is Decision.FORBIDDEN:
        raise refusal(Decision.FORBIDDEN, request, role, Role.PATIENT, target_name="")


def _not_yours(visit: str) -> RelayError:
    return RelayError(ErrorCode.NOT_FOUND, f"no visit {visit} of yours")


def visit_open_txn(
    conn: Connection,
    *,
    device: DeviceRecord,
    message: VisitOpen,
    config: VisitsConfig,
    candidates: Sequence[tuple[str, bytes]],
    now: int,
) -> Visits:
    role = Role(device.role)
    _role_check(RequestType.VISIT_OPEN, role)
    if message.indication not in config.codes:
        raise RelayError(
            ErrorCode.INVALID_FIELD,
            f"indication: {message.indication!r} is not one of the clinic's indications "
            f"({', '.join(config.codes)})",
        )
    patient = store.account_txn(conn, message.patient, lock=True)
    clinician = store.account_txn(conn, device.username)
    if patient is None or clinician is None:
        raise unknown_user(message.patient)
    if patient.active:
        # The care link alone counts (not an on-call shift): it records the in-person visit.
        spans = care_store.pair_spans_txn(conn, [patient.username], [clinician.username])
        state = relationship_of(spans.get((patient.username, clinician.username), ()), now)
    else:
        state = PairState(Relationship.REVOKED)
    own = patient.pk == clinician.pk
    decision = decide(
        RequestType.VISIT_OPEN, role, Role(patient.role), state.relationship, own_account=own
    )
    if decision is Decision.NO_CARE_LINK:
        raise _forbidden(
            f"you have no care link with {patient.username}: a teleconsultation follows an "
            "in-person visit; ask the front desk to record it (medrelay-server admin link)"
        )
    if decision is Decision.CARE_LINK_ENDED:
        when = f" on {last_day(state.ended_ms)}" if state.ended_ms is not None else ""
        raise _forbidden(
            f"your care link with {patient.username} ended{when}: a teleconsultation needs an "
            "active one; ask the front desk to renew it (medrelay-server admin link)"
        )
    if decision is not Decision.ALLOWED:
        raise refusal(
            decision,
            RequestType.VISIT_OPEN,
            role,
            Role(patient.role),
            target_name=patient.username,
            own_account=own,
        )
    existing = store.open_visit_of_pair_txn(conn, patient.pk, clinician.pk)
    if existing is not None:
        raise _forbidden(
            f"{patient.username} already has an open visit with you, {existing.visit_id}; "
            "close it first"
        )
    ids = store.free_ids_txn(conn, candidates)
    if ids is None:  # pragma: no cover - see ID_CANDIDATES
        raise server_busy()
    visit_id, thread_id = ids
    store.insert_visit_txn(
        conn,
        visit_id=visit_id,
        thread_id=thread_id,
        patient_pk=patient.pk,
        clinician_pk=clinician.pk,
        indication=message.indication,
        consent=config.consent.value,
        opened_ms=now,
    )
    audit.append_audit_txn(
        conn,
        actor=device.username,
        action=audit.AuditAction.VISIT_OPEN,
        target=patient.username,
        result=audit.AuditResult.OK,
        now_ms=now,
        detail=f"visit={visit_id}; fields=indication,consent",
    )
    opened = store.VisitRecord(
        visit_id=visit_id,
        thread_id=thread_id,
        patient=patient.username,
        clinician=clinician.username,
        indication=message.indication,
        consent=config.consent.value,
        opened_ms=now,
    )
    return _answer(message.rid, config, [opened])


def visit_close_txn(
    conn: Connection, *, device: DeviceRecord, message: VisitClose, config: VisitsConfig, now: int
) -> Visits:
    _role_check(RequestType.VISIT_CLOSE, Role(device.role))
    visit_id = normalize_visit_id(message.visit)
    visit = store.visit_txn(conn, visit_id, lock=True)
    if visit is None or visit.clinician != device.username:
        raise _not_yours(message.visit)
    if not visit.is_open:
        if visit.conclusion_id == message.conclusion:
            return _answer(message.rid, config, [visit])  # a repeat (the answer was lost)
        when = audit.utc_text(visit.closed_ms) if visit.closed_ms is not None else "earlier"
        raise _forbidden(
            f"visit {visit_id} was already closed at {when}; its conclusion cannot change"
        )
    store.close_visit_txn(conn, visit_id, now, message.conclusion)
    audit.append_audit_txn(
        conn,
        actor=device.username,
        action=audit.AuditAction.VISIT_CLOSE,
        target=visit.patient,
        result=audit.AuditResult.OK,
        now_ms=now,
        detail=f"visit={visit_id}; fields=conclusion",
    )
    closed = dataclasses.replace(visit, closed_ms=now, conclusion_id=message.conclusion)
    return _answer(message.rid, config, [closed])


def visit_list_txn(
    conn: Connection, device: DeviceRecord, message: VisitList, config: VisitsConfig
) -> Visits:
    role = Role(device.role)
    open_only = bool(message.open_only)
    if message.visit is not None:
        # Any visit by its id: the records gateway; otherwise only one's own.
        any_visit = decide(RequestType.VISIT_LIST, role, Role.PATIENT, Relationship.NONE)
        visit = store.visit_txn(conn, normalize_visit_id(message.visit))
        mine = visit is not None and device.username in (visit.patient, visit.clinician)
        if visit is None or not (mine or any_visit is Decision.ALLOWED):
            if any_visit is Decision.ALLOWED:
                raise RelayError(ErrorCode.NOT_FOUND, f"no visit {message.visit}")
            raise _not_yours(message.visit)
        return _answer(message.rid, config, [] if open_only and not visit.is_open else [visit])
    if decide(RequestType.VISIT_LIST, role, role, Relationship.NONE, own_account=True) is not (
        Decision.ALLOWED
    ):  # pragma: no cover - every role may list its own
        raise refusal(Decision.FORBIDDEN, RequestType.VISIT_LIST, role, role, target_name="")
    account = store.account_txn(conn, device.username)
    if account is None:  # pragma: no cover - the session proves the account
        raise unknown_user(device.username)
    found = store.visits_of_txn(conn, account.pk, open_only=open_only, limit=MAX_VISITS)
    return _answer(message.rid, config, found)


VisitRequest = VisitOpen | VisitClose | VisitList


class VisitService:
    """The visit requests of connected clients; time and randomness injected."""

    def __init__(
        self,
        *,
        database: Database,
        clock: IReactorTime,
        rng: Rng,
        config: VisitsConfig,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self._database = database
        self._clock = clock
        self._rng = rng
        self.config = config
        self._metrics = metrics

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def handle(self, device: DeviceRecord, message: VisitRequest) -> Deferred[Message]:
        now = self.now_ms()
        if isinstance(message, VisitList):
            return self._database.run_interaction(
                "visit_list", visit_list_txn, device, message, self.config
            )
        change: Callable[[Connection], Message]
        if isinstance(message, VisitOpen):
            change = functools.partial(
                visit_open_txn,
                device=device,
                message=message,
                config=self.config,
                candidates=draw_ids(self._rng),
                now=now,
            )
            action, target, detail, event = (
                audit.AuditAction.VISIT_OPEN,
                message.patient,
                "",
                "opened",
            )
        else:
            change = functools.partial(
                visit_close_txn, device=device, message=message, config=self.config, now=now
            )
            action, target, detail, event = (
                audit.AuditAction.VISIT_CLOSE,
                "",
                f"visit={message.visit}",
                "closed",
            )
        answer = run_audited_change(
            self._database,
            message.TYPE,
            change,
            device=device,
            action=action,
            target=target,
            detail=detail,
            now=now,
        )

        def done(result: Message) -> Message:
            # A repeated close answers the visit as it was closed earlier: not counted again.
            fresh = not isinstance(result, Visits) or all(
                v.closed_ms in (None, now) for v in result.visits
            )
            if self._metrics is not None and fresh:
                self._metrics.visits.labels(event).inc()
            return result

        return answer.addCallback(done)
