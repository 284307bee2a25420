"""The availability rules inside the group commit: which envelopes of a batch wait for a
clinician's hours, which carry flags, which notices the patients get, and the first-reply
bookkeeping (the rules themselves: `medrelay.server.availability.offhours`).

`AfterHoursView.load` reads, once per batch and only when patients are involved, the accounts,
schedules, holidays and on-call shifts the batch needs; `route` then decides one accepted send.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.crypto.certificates import Role
from medrelay.crypto.notices import NoticeKind
from medrelay.protocol.errors import ErrorCode
from medrelay.server import audit
from medrelay.server.availability.offhours import (
    FLAG_AFTER_HOURS,
    FLAG_URGENT,
    AfterHoursTally,
    OffHours,
    OffHoursPolicy,
)
from medrelay.server.availability.schedule import Availability, ScheduleError
from medrelay.server.policy import LinkSpan, Relationship, last_day, pair_state, utc_date
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.store import SendRequest
from medrelay.server.storage import availability as store
from medrelay.server.storage.schema import care_links

_PATIENT: Final = Role.PATIENT.value
_CLINICIANS: Final = frozenset({Role.DOCTOR.value, Role.NURSE.value})
ON_CALL_LINK_GRACE_MS: Final = 24 * 3600 * 1000
"""An urgent message links the patient to the on-call clinician until the shift ends plus this,
so that they can answer and the patient can reply."""


@dataclass(frozen=True, slots=True)
class Routing:
    """How one accepted send is stored."""

    flags: tuple[int, ...]
    """Per envelope, the flags of its queue row."""
    held: dict[int, int]
    """Envelope index -> the clinician's account pk, for envelopes that wait."""
    notices: tuple[tuple[str, bytes], ...] = ()
    """(clinician username, signed notice) for every device of the sender."""
    reads_at_ms: int | None = None
    on_call: str | None = None


def on_call_changed(clinician: str, on_call: str | None) -> RelayError:
    who = f"{on_call} is on call" if on_call else "nobody is on call"
    return RelayError(
        ErrorCode.ON_CALL_CHANGED,
        f"{clinician} is away and {who} now; ask for their availability again and resend",
    )


class AfterHoursView:
    def __init__(
        self,
        conn: Connection,
        offhours: OffHours,
        now_ms: int,
        accounts: dict[str, store.AccountInfo],
        records: dict[int, store.ScheduleRecord],
    ) -> None:
        self._conn = conn
        self.offhours = offhours
        self.now_ms = now_ms
        self.accounts = accounts
        self.records = records
        self.tally = AfterHoursTally()
        self._holidays: frozenset[datetime.date] | None = None
        self._availability: dict[str, Availability] = {}
        self._on_call: dict[str, store.Shift | None] = {}

    @classmethod
    def load(
        cls,
        conn: Connection,
        sends: Sequence[SendRequest],
        roles: dict[str, str],
        offhours: OffHours,
        now_ms: int,
    ) -> AfterHoursView | None:
        """None when no send of the batch is between a patient and a clinician."""
        if _PATIENT not in roles.values():
            return None  # the common case among staff: nothing to read
        names: set[str] = set()
        for send in sends:
            sender_role = send.sender.role
            others = {e.username for e in send.envelopes} - {send.sender.username}
            if sender_role == _PATIENT:
                found = {u for u in others if roles.get(u) in _CLINICIANS}
            elif sender_role in _CLINICIANS:
                found = {u for u in others if roles.get(u) == _PATIENT}
            else:
                continue
            if found:
                names |= found | {send.sender.username}
        if not names:
            return None
        accounts = store.accounts_txn(conn, names)
        records = store.schedules_txn(conn, [a.pk for a in accounts.values()])
        return cls(conn, offhours, now_ms, accounts, records)

    # -- reads, cached for the batch -------------------------------------------------------

    def availability(self, clinician: str) -> Availability:
        known = self._availability.get(clinician)
        if known is not None:
            return known
        account = self.accounts[clinician]
        record = self.records.get(account.pk)
        if record is not None and record.hours is not None and self._holidays is None:
            self._holidays = frozenset(store.holidays_txn(self._conn))
        try:
            schedule = store.to_schedule(
                record, self.offhours.config.time_zone, self._holidays or frozenset()
            )
        except ScheduleError:
            schedule = None  # a zone the zone database no longer knows: never hold
        known = self.offhours.availability(schedule, self.now_ms)
        self._availability[clinician] = known
        return known

    def on_call(self, clinician: str) -> store.Shift | None:
        department = self.accounts[clinician].department or ""
        if department not in self._on_call:
            found = store.on_call_txn(self._conn, department, self.now_ms) if department else None
            self._on_call[department] = found
        return self._on_call[department]

    def zone_of(self, username: str) -> str:
        record = self.records.get(self.accounts[username].pk)
        return (record.time_zone if record else None) or self.offhours.config.time_zone

    # -- judging ---------------------------------------------------------------------------

    def away_clinicians(self, send: SendRequest, roles: dict[str, str]) -> list[str]:
        """The clinicians a patient's send addresses who are outside their hours."""
        if send.sender.role != _PATIENT:
            return []
        users = sorted({e.username for e in send.envelopes} - {send.sender.username})
        return [
            u
            for u in users
            if roles.get(u) in _CLINICIANS
            and u in self.accounts
            and not self.availability(u).open_now
        ]

    def urgent_extras(
        self, send: SendRequest, roles: dict[str, str]
    ) -> tuple[set[str], RelayError | None]:
        """For an urgent send: the on-call clinicians it may address without a care link, or
        the refusal when it does not address the ones now on call."""
        if not send.urgent:
            return set(), None
        addressed = {e.username for e in send.envelopes}
        shifts = self._on_call_shifts(send, roles)
        # Addressed clinicians that are neither linked nor on call now are left to the policy
        # table (it names the missing link); on-call clinicians not addressed are an error.
        for clinician, shift in shifts.items():
            if shift.clinician not in addressed:
                return set(), on_call_changed(clinician, shift.clinician)
        return {shift.clinician for shift in shifts.values()}, None

    def _on_call_shifts(self, send: SendRequest, roles: dict[str, str]) -> dict[str, store.Shift]:
        """Each away clinician the send addresses -> the shift of whoever else answers urgent
        messages for their department now."""
        found: dict[str, store.Shift] = {}
        for clinician in self.away_clinicians(send, roles):
            shift = self.on_call(clinician)
            if shift is not None and shift.clinician != clinician:
                found[clinician] = shift
        return found

    # -- routing an accepted send ----------------------------------------------------------

    def route(
        self,
        send: SendRequest,
        targets: Sequence[int],
        roles: dict[str, str],
        links: Mapping[tuple[str, str], Sequence[LinkSpan]],
    ) -> Routing:
        sender = send.sender.username
        flags = [FLAG_URGENT if send.urgent else 0 for _ in targets]
        if send.sender.role in _CLINICIANS:
            self._note_replies(send, roles)
            return Routing(tuple(flags), {})
        if send.sender.role != _PATIENT or sender not in self.accounts:
            return Routing(tuple(flags), {})
        patient = self.accounts[sender]
        away = self.away_clinicians(send, roles)
        shifts = self._on_call_shifts(send, roles) if send.urgent else {}
        on_call_users = {shift.clinician: shift for shift in shifts.values()}
        for username in sorted({e.username for e in send.envelopes} - {sender}):
            if roles.get(username) in _CLINICIANS and username not in on_call_users:
                store.awaiting_reply_txn(
                    self._conn, patient.pk, self.accounts[username].pk, self.now_ms
                )
        held: dict[int, int] = {}
        notices: list[tuple[str, bytes]] = []
        reads_at: int | None = None
        policy = self.offhours.config.policy
        zone = self.zone_of(sender)
        for clinician in away:
            account = self.accounts[clinician]
            availability = self.availability(clinician)
            reads_at = availability.changes_at_ms
            self.tally.after_hours += 1
            for index, envelope in enumerate(send.envelopes):
                if envelope.username != clinician:
                    continue
                flags[index] |= FLAG_AFTER_HOURS
                if policy is OffHoursPolicy.HOLD:
                    held[index] = account.pk
            if send.urgent:
                shift = shifts.get(clinician)
                routed = shift is not None
                kind = NoticeKind.URGENT_ROUTED if routed else NoticeKind.URGENT_UNROUTED
                if routed:
                    self.tally.urgent_routed += 1
                else:
                    self.tally.urgent_unrouted += 1
                notices.append(
                    (
                        clinician,
                        self.offhours.notice(
                            kind,
                            patient=sender,
                            clinician=clinician,
                            in_reply_to=send.message_id,
                            now_ms=self.now_ms,
                            reads_at_ms=reads_at,
                            patient_zone=zone,
                            template=None,
                            on_call=shift.clinician if shift is not None else None,
                        ),
                    )
                )
                continue
            window = reads_at if reads_at is not None else 0
            if store.first_auto_reply_txn(self._conn, patient.pk, account.pk, window, self.now_ms):
                self.tally.auto_replies += 1
                record = self.records.get(account.pk)
                notices.append(
                    (
                        clinician,
                        self.offhours.notice(
                            NoticeKind.AUTO_REPLY,
                            patient=sender,
                            clinician=clinician,
                            in_reply_to=send.message_id,
                            now_ms=self.now_ms,
                            reads_at_ms=reads_at,
                            patient_zone=zone,
                            template=record.autoreply if record else None,
                        ),
                    )
                )
        for username, shift in on_call_users.items():
            self._link_on_call(sender, patient.pk, username, shift, links)
        self.tally.held += len(held)
        on_call = next(iter(sorted(on_call_users)), None)
        return Routing(tuple(flags), held, tuple(notices), reads_at, on_call)

    def _note_replies(self, send: SendRequest, roles: dict[str, str]) -> None:
        clinician = self.accounts.get(send.sender.username)
        if clinician is None:
            return
        for username in sorted({e.username for e in send.envelopes}):
            if roles.get(username) != _PATIENT or username not in self.accounts:
                continue
            since = store.replied_txn(self._conn, self.accounts[username].pk, clinician.pk)
            if since is not None:
                self.tally.first_reply_s.append(max(0, self.now_ms - since) / 1000)

    def _link_on_call(
        self,
        patient: str,
        patient_pk: int,
        clinician: str,
        shift: store.Shift,
        links: Mapping[tuple[str, str], Sequence[LinkSpan]],
    ) -> None:
        """A care link patient -> on-call clinician, so that the clinician can answer (and the
        patient reply) after the urgent message; audited under the patient."""
        state = pair_state(links, patient, clinician, self.now_ms)
        if state.relationship is Relationship.ACTIVE:
            return
        ends = shift.ends_ms + ON_CALL_LINK_GRACE_MS
        self._conn.execute(
            sa.insert(care_links).values(
                patient_pk=patient_pk,
                clinician_pk=shift.clinician_pk,
                visit_date=utc_date(self.now_ms),
                created_at=self.now_ms,
                created_by=patient,
                ends_at=ends,
                ended_at=None,
                ended_by=None,
            )
        )
        audit.append_audit_txn(
            self._conn,
            actor=patient,
            action=audit.AuditAction.LINK_CREATE,
            target=patient,
            result=audit.AuditResult.OK,
            now_ms=self.now_ms,
            detail=f"clinician={clinician}; urgent message to the on-call clinician; "
            f"until={last_day(ends)}",
        )
