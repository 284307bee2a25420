"""Teleconsultation visits and saving them in the medical record (DESIGN.md decision 6).

The relay keeps the visit (who, why, when, its thread, the id of its conclusion); everything
said travels end to end as signed messages of the visit's thread, with the kinds of
`medrelay.clients.engine.record_messages`:

- `open_visit`: `visit_open`, then a `visit_opened` notice to the patient that opens the visit's
  thread (it becomes the conversation thread with the patient, so replies land in it);
- `consent_to_visit` (patient): a `consent` message in the thread to the clinician;
- `close_visit`: a `conclusion` message in the thread, then `visit_close` with its id. A retry
  after a failure between the two reuses the conclusion already stored in the thread, so the
  patient never gets two conclusions and the relay always gets one that was sent;
- `save_record`: the thread's messages from this profile, the identity-log evidence of both
  users at one checkpoint, assembled into a `RecordBundle` that must verify here before it is
  sent, as the one attachment of a `record_bundle` message to the records account. That message
  goes in a fresh thread: the clinician's `previous_hash` chain in the visit's thread must never
  pass through a message the record cannot contain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from twisted.internet.interfaces import IReactorTime

from medrelay.clients.engine.connection import Connector, expect
from medrelay.clients.engine.enrollment import now_ms
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.messaging import Directory, Messenger
from medrelay.clients.engine.record_messages import (
    INDICATION_UNSPECIFIED,
    KIND_CONCLUSION,
    KIND_CONSENT,
    KIND_RECORD_BUNDLE,
    KIND_VISIT_OPENED,
    RECORD_BUNDLE_MEDIA_TYPE,
    RECORDS_USER,
    THREAD_EXPORT_PREFIX,
    THREAD_KINDS,
    RecordRequest,
)
from medrelay.clients.engine.store import (
    STATUS_FAILED,
    STATUS_SENDING,
    OpenProfile,
    StoredMessage,
    get_conversation_txn,
    list_thread_messages_txn,
)
from medrelay.clients.engine.transparency import LogVerifier, UserEvidence
from medrelay.clients.engine.views import (
    IndicationView,
    OutgoingFile,
    RecordSent,
    SentMessage,
    VisitsView,
    VisitView,
)
from medrelay.crypto.certificates import ClinicKeyCertificate, Role
from medrelay.crypto.content import SignedContent, new_thread_id
from medrelay.crypto.errors import CryptoError, ProofError
from medrelay.crypto.identity import check_id
from medrelay.crypto.records import (
    CLINICIAN_ROLES,
    MAX_CLINIC_KEYS,
    MAX_MESSAGES,
    RecordVisit,
    build_record_bundle,
    verify_record_bundle,
)
from medrelay.crypto.rng import Rng
from medrelay.protocol.messages import VisitClose, VisitInfo, VisitList, VisitOpen, Visits

CONSENT_EXPLICIT: Final = "explicit"
CONSENT_NOTICE: Final = "notice"
EVIDENCE_ATTEMPTS: Final = 3
"""Tries at fetching both users' log evidence at one checkpoint (the log may grow between)."""
MAX_BUNDLE_BYTES: Final = 25 * 1024 * 1024
"""A bundle travels as one attachment (messaging.MAX_BLOB_SIZE)."""


def visit_view(info: VisitInfo, names: dict[str, str]) -> VisitView:
    return VisitView(
        visit_id=info.visit,
        thread_id=info.thread,
        patient=info.patient,
        clinician=info.clinician,
        indication=info.indication,
        indication_name=names.get(info.indication),
        consent=info.consent,
        opened_ms=info.opened_ms,
        closed_ms=info.closed_ms,
        conclusion=info.conclusion,
    )


def visits_view(answer: Visits) -> VisitsView:
    names = {i.code: i.name for i in answer.indications}
    return VisitsView(
        visits=tuple(visit_view(v, names) for v in answer.visits),
        indications=tuple(IndicationView(i.code, i.name) for i in answer.indications),
        consent=answer.consent,
    )


def opened_notice(visit: VisitView) -> str:
    """The `visit_opened` text: plain words for the patient."""
    why = visit.indication_name or visit.indication
    text = (
        f"Teleconsultation visit {visit.visit_id} is open ({why}). This conversation, until "
        "the doctor closes the visit with a conclusion, will be saved in your medical record."
    )
    if visit.consent == CONSENT_EXPLICIT:
        text += (
            " Nothing is saved until you agree: to agree, run "
            f"`medrelay visit consent {visit.visit_id}`."
        )
    return text


def consent_text(visit_id: str) -> str:
    return f"I agree that visit {visit_id} is saved in my medical record."


def export_visit_id(thread_id: bytes, from_ms: int) -> str:
    """The visit id of a thread export (record_messages.THREAD_EXPORT_PREFIX)."""
    return f"{THREAD_EXPORT_PREFIX}{thread_id.hex()[:16]}-{from_ms}"


def _refused(message: str) -> ClientError:
    return ClientError(LocalCode.RECORD_REFUSED, message)


class VisitBook:
    """The visit requests of one profile (the engine's `visits`, `open_visit`...)."""

    def __init__(
        self,
        profile: OpenProfile,
        connector: Connector,
        messenger: Messenger,
        directory: Directory,
        log: LogVerifier,
        *,
        clock: IReactorTime,
        rng: Rng,
    ) -> None:
        self._profile = profile
        self._connector = connector
        self._messenger = messenger
        self._directory = directory
        self._log = log
        self._clock = clock
        self._rng = rng

    @property
    def _user_id(self) -> str:
        return self._profile.info.user_id

    # -- the relay's visits -----------------------------------------------------------------

    async def list_visits(self, *, visit: str | None = None, open_only: bool = False) -> VisitsView:
        answer = await self._connector.request(
            lambda rid: VisitList(rid=rid, visit=visit, open_only=True if open_only else None)
        )
        return visits_view(expect(answer, Visits))

    async def get(self, visit_id: str) -> VisitView:
        # The relay answers with the visit's canonical id (what was typed may be lower case).
        found = (await self.list_visits(visit=visit_id)).visits
        if len(found) != 1:
            raise ClientError(LocalCode.NOT_FOUND, f"no visit {visit_id}")
        return found[0]

    async def open(self, patient: str, indication: str) -> VisitView:
        _check_user(patient, "patient")
        answer = expect(
            await self._connector.request(
                lambda rid: VisitOpen(rid=rid, patient=patient, indication=indication)
            ),
            Visits,
        )
        listed = visits_view(answer)
        opened = [
            v
            for v in listed.visits
            if v.patient == patient and v.clinician == self._user_id and v.is_open
        ]
        if not opened:
            raise ClientError(LocalCode.BAD_SERVER_ANSWER, "the server did not return the visit")
        visit = max(opened, key=lambda v: v.opened_ms)
        try:
            await self._messenger.send_to(
                (patient,),
                opened_notice(visit),
                kind=KIND_VISIT_OPENED,
                thread_id=visit.thread_id,
            )
        except ClientError as exc:
            raise ClientError(
                exc.code,
                f"visit {visit.visit_id} is open, but telling {patient} failed: {exc.message}",
            ) from None
        return visit

    async def consent(self, visit_id: str) -> SentMessage:
        visit = await self.get(visit_id)
        if visit.patient != self._user_id:
            raise ClientError(
                LocalCode.INVALID_ARGUMENT, f"only the visit's patient ({visit.patient}) consents"
            )
        if not visit.is_open:
            raise ClientError(
                LocalCode.INVALID_ARGUMENT,
                f"visit {visit_id} is closed; consent counts only while a visit is open",
            )
        return await self._messenger.send_to(
            (visit.clinician,),
            consent_text(visit.visit_id),
            kind=KIND_CONSENT,
            thread_id=visit.thread_id,
        )

    async def close(
        self, visit_id: str, conclusion: str, files: Sequence[OutgoingFile] = ()
    ) -> VisitView:
        if not conclusion.strip():
            raise ClientError(LocalCode.INVALID_ARGUMENT, "the conclusion is empty")
        visit = await self.get(visit_id)
        if visit.clinician != self._user_id:
            raise ClientError(
                LocalCode.INVALID_ARGUMENT,
                f"only the visit's clinician ({visit.clinician}) closes visit {visit_id}",
            )
        if not visit.is_open:
            return visit  # closed already (a retry whose answer was lost)
        visit_id = visit.visit_id
        message_id = await self._sent_conclusion(visit)
        if message_id is None:
            sent = await self._messenger.send_to(
                (visit.patient,), conclusion, files, kind=KIND_CONCLUSION, thread_id=visit.thread_id
            )
            message_id = sent.message_id
        answer = await self._connector.request(
            lambda rid: VisitClose(rid=rid, visit=visit_id, conclusion=message_id)
        )
        closed = [v for v in visits_view(expect(answer, Visits)).visits if v.visit_id == visit_id]
        if not closed:
            raise ClientError(LocalCode.BAD_SERVER_ANSWER, "the server did not return the visit")
        return closed[0]

    async def _sent_conclusion(self, visit: VisitView) -> bytes | None:
        """The conclusion this account already sent in the visit's thread (an earlier attempt
        that failed before `visit_close`), once the relay has it; None if there is none."""
        own = self._user_id
        for stored in reversed(await self._thread(visit.thread_id)):
            if not stored.outgoing or stored.sender_user != own or stored.status == STATUS_FAILED:
                continue
            content = SignedContent.decode(stored.signed_content).content
            if content.kind != KIND_CONCLUSION or content.sent_at_ms < visit.opened_ms:
                continue
            if stored.status == STATUS_SENDING:
                await self._messenger.wait_sent(stored.message_id)
            return stored.message_id
        return None

    async def _thread(self, thread_id: bytes) -> list[StoredMessage]:
        return await self._profile.db.run_interaction(
            "thread_messages", list_thread_messages_txn, self._profile.sealer, thread_id
        )

    # -- the medical record -----------------------------------------------------------------

    async def save_record(
        self,
        *,
        visit: str | None = None,
        with_user: str | None = None,
        from_ms: int | None = None,
        to_ms: int | None = None,
        records_user: str = RECORDS_USER,
    ) -> RecordSent:
        _check_user(records_user, "records account")
        if (visit is None) == (with_user is None):
            raise ClientError(
                LocalCode.INVALID_ARGUMENT, "save either a visit or a thread with a patient"
            )
        if visit is not None:
            record, explicit = await self._visit_record(visit)
        else:
            assert with_user is not None  # noqa: S101 (checked above)
            record, explicit = await self._export_record(with_user, from_ms, to_ms), False
        thread_id, header = record
        return await self._send_record(header, thread_id, explicit, records_user)

    async def _visit_record(self, visit_id: str) -> tuple[tuple[bytes, RecordVisit], bool]:
        visit = await self.get(visit_id)
        if visit.clinician != self._user_id:
            raise _refused(f"only the visit's clinician ({visit.clinician}) saves visit {visit_id}")
        if visit.is_open:
            raise _refused(
                f"visit {visit_id} is still open: close it first "
                f"(medrelay visit close {visit_id} --conclusion TEXT)"
            )
        header = RecordVisit(
            visit_id=visit.visit_id,
            indication_code=visit.indication,
            opened_ms=visit.opened_ms,
            closed_ms=visit.closed_ms,
            patient=visit.patient,
            clinician=visit.clinician,
            conclusion_message_id=visit.conclusion,
        )
        return (visit.thread_id, header), visit.consent == CONSENT_EXPLICIT

    async def _export_record(
        self, patient: str, from_ms: int | None, to_ms: int | None
    ) -> tuple[bytes, RecordVisit]:
        _check_user(patient, "patient")
        if from_ms is None or to_ms is None or not 0 <= from_ms <= to_ms:
            raise ClientError(
                LocalCode.INVALID_ARGUMENT, "a thread export needs a time range, from before to"
            )
        if self._profile.info.user_certificate.role not in CLINICIAN_ROLES:
            raise _refused("only doctors and nurses save a thread in a patient's record")
        peer = await self._directory.user(patient)
        if peer.certificate.role is not Role.PATIENT:
            raise _refused(f"{patient} is not a patient; only a thread with a patient is saved")
        thread_id = await self._profile.db.run_interaction(
            "conversation", get_conversation_txn, patient
        )
        if thread_id is None:
            raise _refused(f"no conversation with {patient} on this device")
        header = RecordVisit(
            visit_id=export_visit_id(thread_id, from_ms),
            indication_code=INDICATION_UNSPECIFIED,
            opened_ms=from_ms,
            closed_ms=to_ms,
            patient=patient,
            clinician=self._user_id,
        )
        return thread_id, header

    def _chosen(self, stored: Sequence[StoredMessage], header: RecordVisit) -> list[SignedContent]:
        """The thread's conversation as the record carries it: the visit's kinds, between the
        patient and the clinician, within the visit's time; each message once."""
        other = {header.patient: header.clinician, header.clinician: header.patient}
        chosen: list[SignedContent] = []
        seen: set[bytes] = set()
        for message in stored:
            if message.status in (STATUS_SENDING, STATUS_FAILED):
                continue  # the relay never took it: nobody else has it
            signed = SignedContent.decode(message.signed_content)
            content = signed.content
            sender = content.sender_user_id
            if (
                content.kind not in THREAD_KINDS
                or sender not in other
                or not content.is_addressed_to(other[sender])
                or not header.contains(content.sent_at_ms)
                or content.message_id in seen
            ):
                continue
            seen.add(content.message_id)
            chosen.append(signed)
        return chosen

    async def _send_record(
        self, header: RecordVisit, thread_id: bytes, explicit: bool, records_user: str
    ) -> RecordSent:
        name = header.visit_id
        chosen = self._chosen(await self._thread(thread_id), header)
        if not chosen:
            raise _refused(f"no messages of {name} on this device; nothing to save")
        if len(chosen) > MAX_MESSAGES:
            raise _refused(f"{name} has more than {MAX_MESSAGES} messages; save shorter ranges")
        if explicit and not any(
            s.content.kind == KIND_CONSENT and s.content.sender_user_id == header.patient
            for s in chosen
        ):
            raise _refused(
                f"{header.patient} has not agreed to saving visit {name} (this clinic asks "
                f"for explicit consent: the patient runs `medrelay visit consent {name}`)"
            )
        patient, clinician = await self._evidence(header.patient, header.clinician)
        keys: dict[bytes, ClinicKeyCertificate] = {}
        for cert in (*patient.clinic_keys, *clinician.clinic_keys):
            keys.setdefault(cert.encode(), cert)
        info = self._profile.info
        try:
            bundle = build_record_bundle(
                visit=header,
                thread_id=thread_id,
                checkpoint_note=patient.note,
                clinic_keys=list(keys.values())[:MAX_CLINIC_KEYS],
                evidence={header.patient: patient.events, header.clinician: clinician.events},
                messages=chosen,
            )
            verify_record_bundle(bundle, clinic_id=info.clinic_id, root_key=info.root_key)
            encoded = bundle.encode()
        except (ProofError, CryptoError, ValueError) as exc:
            raise _refused(
                f"the record of {name} does not verify on this device, so nothing was sent: "
                f"{exc} (is a message of it missing from this device?)"
            ) from None
        if len(encoded) > MAX_BUNDLE_BYTES:
            raise _refused(f"the record of {name} is larger than 25 MiB; save shorter ranges")
        sent = await self._messenger.send_to(
            (records_user,),
            RecordRequest(name).encode(),
            [OutgoingFile(f"{name}.mrb", RECORD_BUNDLE_MEDIA_TYPE, encoded)],
            kind=KIND_RECORD_BUNDLE,
            thread_id=new_thread_id(self._rng),
        )
        return RecordSent(
            visit_id=name,
            thread_id=thread_id,
            messages=len(chosen),
            bundle_sha256=hashlib.sha256(encoded).hexdigest(),
            bundle_bytes=len(encoded),
            sent=sent,
        )

    async def _evidence(self, patient: str, clinician: str) -> tuple[UserEvidence, UserEvidence]:
        """Both users' log evidence against one and the same checkpoint."""
        for _ in range(EVIDENCE_ATTEMPTS):
            first = await self._log.evidence(patient)
            second = await self._log.evidence(clinician)
            a, b = first.checkpoint, second.checkpoint
            if (a.size, a.root_hash) == (b.size, b.root_hash):
                return first, second
        raise ClientError(
            LocalCode.TIMEOUT,
            "the identity log kept growing while the record's proofs were fetched; try again",
        )

    def now_ms(self) -> int:
        return now_ms(self._clock)


def _check_user(user_id: str, what: str) -> None:
    try:
        check_id(user_id, what)
    except (TypeError, ValueError) as exc:
        raise ClientError(LocalCode.INVALID_ARGUMENT, str(exc)) from None
