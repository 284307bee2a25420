"""The records gateway's work: intake of `record_bundle` messages, verification, the outbox's
delivery with retries, and receipts (docs/records.md).

`RecordsGateway(engine, outbox, sink, clock=..., jitter=...)`; `start()` drains the outbox and
the messages received since the last run, then `poll()` (called on every new message or on a
timer by the runner) takes new ones. All waiting is `clock.callLater`: tests drive it with
`twisted.internet.task.Clock`.

Logs carry mirror ids, states and error classes; never content, names, visit headers or tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from medrelay.clients.engine.record_messages import (
    INDICATION_UNSPECIFIED,
    KIND_CONSENT,
    KIND_RECORD_BUNDLE,
    KIND_RECORD_RECEIPT,
    RECEIPT_FAILED,
    RECEIPT_SAVED,
    RECORD_BUNDLE_MEDIA_TYPE,
    THREAD_EXPORT_PREFIX,
    RecordReceipt,
    RecordRequest,
)
from medrelay.clients.records.api import (
    AttachmentUnavailable,
    LiveRevocations,
    ReceivedMessage,
    RecordsEngine,
    ServerVisit,
)
from medrelay.clients.records.fhir_mapping import (
    MappingError,
    MirrorInput,
    build_transaction,
    canonical_json,
)
from medrelay.clients.records.outbox import (
    FAILED,
    PENDING,
    Mirror,
    NewReceipt,
    Outbox,
    PendingReceipt,
)
from medrelay.clients.records.sinks import DeliveryError, Sink
from medrelay.crypto.errors import CryptoError, MalformedEncoding
from medrelay.crypto.records import RecordBundle, VerifiedRecord, verify_record_bundle

_log = Logger()

BATCH: Final = 50
MAX_INTAKE_TRIES: Final = 8
"""A message whose checks keep failing for a temporary reason (the server's visit lookup, the
live log, the attachment download) is refused after this many tries."""
MAX_RECEIPT_BYTES: Final = 12 * 1024
"""Receipts stay well under the 16 KiB a RecordReceipt may have: long id lists are cut."""
UNKNOWN_VISIT: Final = "unknown"
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n (1-based) waits base·2^(n-1), capped, times a
    factor in [1 - jitter, 1]."""

    base_s: float = 5.0
    cap_s: float = 3600.0
    jitter: float = 0.5

    def delay_s(self, attempts: int, draw: float) -> float:
        raw = min(self.cap_s, self.base_s * 2.0 ** max(0, attempts - 1))
        return float(raw * (1.0 - self.jitter * draw))


class Refused(Exception):
    """The record is refused for good; the message is the receipt's reason (one line)."""


class Temporary(Exception):
    """The check could not be made now; the message will be tried again."""


MAX_ATTACHMENT_BYTES: Final = 50 * 1024 * 1024
"""The most a record's attachments may weigh together (they travel inside the FHIR Bundle)."""


def mirror_id_for(visit_id: str, bundle_sha256: str) -> str:
    return hashlib.sha256(f"{visit_id}\n{bundle_sha256}".encode()).hexdigest()[:32]


def receipt_text(
    visit_id: str, bundle_sha256: str, *, records: Sequence[str] = (), reason: str | None = None
) -> str:
    """The receipt's text; the record id list is cut to keep it small."""
    kept: list[str] = []
    size = 256
    for record in records:
        size += len(record) + 4
        if size > MAX_RECEIPT_BYTES:
            break
        kept.append(record)
    status = RECEIPT_FAILED if reason is not None else RECEIPT_SAVED
    return RecordReceipt(visit_id, status, bundle_sha256, tuple(kept), reason).encode()


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class _Accepted:
    record: VerifiedRecord
    bundle_sha256: str
    signed_messages: tuple[bytes, ...]
    indication_name: str | None
    attachments: Mapping[tuple[int, int], bytes]
    """(message index, attachment index) -> the file, checked against its signed hashes."""


class RecordsGateway:
    def __init__(
        self,
        engine: RecordsEngine,
        outbox: Outbox,
        sink: Sink,
        *,
        clock: IReactorTime,
        jitter: Callable[[], float],
        backoff: Backoff | None = None,
        receipt_backoff: Backoff | None = None,
        max_attachment_bytes: int = MAX_ATTACHMENT_BYTES,
    ) -> None:
        self.engine = engine
        self.max_attachment_bytes = max_attachment_bytes
        self.outbox = outbox
        self.sink = sink
        self.clock = clock
        self.jitter = jitter
        self.backoff = backoff or Backoff()
        self.receipt_backoff = receipt_backoff or Backoff(base_s=2.0, cap_s=600.0)
        self._intake_tries: dict[tuple[str, str, bytes], int] = {}
        self._pumping = False
        self._again = False
        self._polling: Deferred[None] | None = None
        self._poll_again = False
        self._timer: IDelayedCall | None = None
        self._intake_timer: IDelayedCall | None = None
        self._stopped = False
        self.idle: Deferred[None] | None = None

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Drain the outbox (everything pending is tried at once: the sink may be back), then
        take the messages received since the last run."""
        self.outbox.make_all_due(self.now_ms())
        self.pump()
        return self.poll()

    def stop(self) -> None:
        self._stopped = True
        for timer in (self._timer, self._intake_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._intake_timer = None

    # -- intake --------------------------------------------------------------------------------

    def poll(self) -> Deferred[None]:
        """Handle every received message after the cursor (one pass at a time; a call during a
        pass makes it run once more)."""
        if self._polling is not None:
            self._poll_again = True
            return self._polling
        polling = Deferred.fromCoroutine(self._poll())
        self._polling = polling

        def done(result: object) -> None:
            self._polling = None
            if isinstance(result, Failure):
                _log.failure("taking record requests failed; trying again later", result)
                self._schedule_intake()
            elif self._poll_again and not self._stopped:
                self._poll_again = False
                self.poll()

        polling.addBoth(done)
        return polling

    async def _poll(self) -> None:
        while not self._stopped:
            batch = await self.engine.received_after(self.outbox.cursor(), BATCH)
            if not batch:
                return
            for message in batch:
                if not await self._intake(message):
                    # A temporary failure: stop here (keep row order) and try again later.
                    self._schedule_intake()
                    return
            self.pump()

    def _schedule_intake(self) -> None:
        if self._stopped:
            return
        if self._intake_timer is not None and self._intake_timer.active():
            return
        delay = self.backoff.delay_s(1, self.jitter())
        self._intake_timer = self.clock.callLater(delay, self.poll)

    async def _intake(self, message: ReceivedMessage) -> bool:
        """Handle one message; False when it must be tried again later."""
        key = (message.sender_user, message.sender_device, message.message_id)
        now = self.now_ms()
        if message.kind != KIND_RECORD_BUNDLE:
            self.outbox.advance_cursor(message.row_id)
            return True
        if self.outbox.seen(*key):
            self.outbox.advance_cursor(message.row_id)
            return True
        try:
            request = RecordRequest.decode(message.text)
            visit_id = request.visit_id
        except ValueError:
            visit_id = UNKNOWN_VISIT
        bundle_sha = EMPTY_SHA256
        fail_thread = message.thread_id
        try:
            if visit_id == UNKNOWN_VISIT:
                raise Refused("the record request is not valid")
            data = await self._bundle_bytes(message)
            bundle_sha = hashlib.sha256(data).hexdigest()
            try:
                bundle = RecordBundle.decode(data)
            except MalformedEncoding as exc:
                raise Refused(f"the record bundle does not decode ({exc})") from None
            fail_thread = bundle.thread_id
            accepted = await self._check(message, request, bundle, bundle_sha)
        except Refused as exc:
            reason = one_line(str(exc))
            _log.info(
                "record request refused: {check}", check=type(exc).__name__, row=message.row_id
            )
            self._handled(
                message,
                now,
                outcome="refused",
                receipt=NewReceipt(
                    thread_id=fail_thread,
                    recipients=(message.sender_user,),
                    text=receipt_text(visit_id, bundle_sha, reason=reason),
                ),
            )
            self._intake_tries.pop(key, None)
            return True
        except Temporary as exc:
            tries = self._intake_tries.get(key, 0) + 1
            self._intake_tries[key] = tries
            _log.warn(
                "record request could not be checked now (try {tries}): {error}",
                tries=tries,
                error=type(exc.__cause__ or exc).__name__,
            )
            if tries < MAX_INTAKE_TRIES:
                return False
            self._intake_tries.pop(key, None)
            self._handled(
                message,
                now,
                outcome="gave up",
                receipt=NewReceipt(
                    thread_id=fail_thread,
                    recipients=(message.sender_user,),
                    text=receipt_text(
                        visit_id,
                        bundle_sha,
                        reason=f"the record could not be checked: {one_line(str(exc), 200)}",
                    ),
                ),
            )
            return True
        self._intake_tries.pop(key, None)
        self._accept(message, accepted, now)
        return True

    def _handled(
        self,
        message: ReceivedMessage,
        now: int,
        *,
        outcome: str,
        mirror: Mirror | None = None,
        receipt: NewReceipt | None = None,
        on_replay: Callable[[Mirror], NewReceipt | None] | None = None,
    ) -> str:
        """Record `message` as handled, with what it led to (`Outbox.record_intake`)."""
        return self.outbox.record_intake(
            sender_user=message.sender_user,
            sender_device=message.sender_device,
            message_id=message.message_id,
            row_id=message.row_id,
            now_ms=now,
            outcome=outcome,
            mirror=mirror,
            receipt=receipt,
            on_replay=on_replay,
        )

    def _accept(self, message: ReceivedMessage, accepted: _Accepted, now: int) -> None:
        visit = accepted.record.visit
        mirror_id = mirror_id_for(visit.visit_id, accepted.bundle_sha256)
        recipients = tuple(sorted({visit.clinician, visit.patient}))
        try:
            bundle = build_transaction(
                MirrorInput(
                    clinic_id=self.engine.clinic_id,
                    mirror_id=mirror_id,
                    record=accepted.record,
                    signed_messages=accepted.signed_messages,
                    gateway_user=self.engine.user_id,
                    recorded_ms=message.sent_at_ms,
                    indication_name=accepted.indication_name,
                    request_signed=message.signed_content,
                    attachment_data=accepted.attachments,
                )
            )
        except MappingError as exc:
            self._handled(
                message,
                now,
                outcome="unmappable",
                receipt=NewReceipt(
                    accepted.record.thread_id,
                    recipients,
                    receipt_text(visit.visit_id, accepted.bundle_sha256, reason=str(exc)),
                    mirror_id,
                ),
            )
            return

        def replay(existing: Mirror) -> NewReceipt | None:
            if existing.state == FAILED:
                reason = existing.last_error or "delivery failed"
                text = receipt_text(existing.visit_id, existing.bundle_sha256, reason=reason)
            elif existing.record_ids or existing.state != PENDING:
                text = receipt_text(
                    existing.visit_id, existing.bundle_sha256, records=existing.record_ids
                )
            else:
                return None  # still pending: its receipt comes with the delivery
            return NewReceipt(existing.thread_id, existing.recipients, text, existing.mirror_id)

        outcome = self._handled(
            message,
            now,
            outcome="accepted",
            mirror=Mirror(
                mirror_id=mirror_id,
                visit_id=visit.visit_id,
                bundle_sha256=accepted.bundle_sha256,
                thread_id=accepted.record.thread_id,
                recipients=recipients,
                bundle_json=canonical_json(bundle),
                state=PENDING,
                attempts=0,
                next_attempt_ms=now,
                last_error=None,
                record_ids=(),
            ),
            on_replay=replay,
        )
        _log.info("record request {outcome}: mirror {mirror}", outcome=outcome, mirror=mirror_id)

    async def _bundle_bytes(self, message: ReceivedMessage) -> bytes:
        if message.attachments != 1:
            raise Refused("a record request carries exactly one attachment, the record bundle")
        try:
            files = await self.engine.attachments(message.message_id)
        except Exception as exc:
            raise Temporary("the record bundle could not be downloaded") from exc
        if len(files) != 1 or files[0].media_type != RECORD_BUNDLE_MEDIA_TYPE:
            raise Refused(f"the attachment is not a record bundle ({RECORD_BUNDLE_MEDIA_TYPE})")
        return files[0].data

    async def _check(
        self,
        message: ReceivedMessage,
        request: RecordRequest,
        bundle: RecordBundle,
        bundle_sha: str,
    ) -> _Accepted:
        visit = bundle.visit
        if request.visit_id != visit.visit_id:
            raise Refused("the record request names another visit than its bundle")
        if message.sender_user != visit.clinician:
            raise Refused(
                "the record bundle was not sent by the visit's clinician; only they can save it"
            )
        try:
            record = verify_record_bundle(
                bundle, clinic_id=self.engine.clinic_id, root_key=self.engine.root_key
            )
        except CryptoError as exc:
            raise Refused(f"the record bundle does not verify: {exc}") from None
        indication_name: str | None = None
        if visit.visit_id.startswith(THREAD_EXPORT_PREFIX):
            self._check_thread_export(record)
            clinician_roles = {
                m.sender.role.value for m in record.messages if m.sender.user_id == visit.clinician
            }
            if not clinician_roles:
                raise Refused(
                    "a thread export must hold a message of the clinician (their role is "
                    "proven by it)"
                )
        else:
            try:
                lookup = await self.engine.visit(visit.visit_id)
            except Exception as exc:
                raise Temporary("the server's visit could not be read") from exc
            if lookup.visit is None:
                raise Refused("the server has no such visit")
            self._compare(record, lookup.visit)
            indication_name = lookup.indications.get(visit.indication_code)
        await self._check_live_log(record)
        attachments = await self._fetch_attachments(record)
        return _Accepted(record, bundle_sha, bundle.messages, indication_name, attachments)

    async def _fetch_attachments(self, record: VerifiedRecord) -> dict[tuple[int, int], bytes]:
        """Every file the record's messages carry, so the record holds them, not references to
        a relay that forgets them (their signed descriptors pin size and SHA-256)."""
        total = sum(a.size for m in record.messages for a in m.content.attachments)
        if total > self.max_attachment_bytes:
            raise Refused(
                f"the visit's attachments total {total // (1024 * 1024)} MiB, more than the "
                f"{self.max_attachment_bytes // (1024 * 1024)} MiB a record may carry"
            )
        files: dict[tuple[int, int], bytes] = {}
        for index, message in enumerate(record.messages):
            for number, descriptor in enumerate(message.content.attachments):
                short_id = message.content.message_id.hex()[:16]
                name = f"attachment {number} of message {index} ({short_id})"
                try:
                    files[index, number] = await self.engine.download(descriptor)
                except AttachmentUnavailable as exc:
                    raise Refused(f"{name} cannot be fetched: {exc}") from None
                except Exception as exc:
                    raise Temporary(f"{name} could not be fetched now") from exc
        return files

    def _check_thread_export(self, record: VerifiedRecord) -> None:
        visit = record.visit
        expected = f"{THREAD_EXPORT_PREFIX}{record.thread_id.hex()[:16]}-{visit.opened_ms}"
        if visit.visit_id != expected:
            raise Refused("the thread export's id does not match its thread and start")
        if visit.indication_code != INDICATION_UNSPECIFIED:
            raise Refused("a thread export has no indication")

    def _compare(self, record: VerifiedRecord, server: ServerVisit) -> None:
        visit = record.visit
        differences = [
            what
            for what, ours, theirs in (
                ("patient", visit.patient, server.patient),
                ("clinician", visit.clinician, server.clinician),
                ("thread", record.thread_id, server.thread_id),
                ("indication", visit.indication_code, server.indication),
                ("opening time", visit.opened_ms, server.opened_ms),
                ("closing time", visit.closed_ms, server.closed_ms),
                ("conclusion", visit.conclusion_message_id, server.conclusion),
            )
            if ours != theirs
        ]
        if server.closed_ms is None:
            raise Refused("the visit is not closed yet; close it before saving it")
        if differences:
            raise Refused(
                "the bundle's visit differs from the server's visit in: " + ", ".join(differences)
            )
        if server.consent == "explicit" and not any(
            m.content.kind == KIND_CONSENT and m.sender.user_id == visit.patient
            for m in record.messages
        ):
            raise Refused(
                "the clinic requires the patient's explicit consent, and the bundle holds no "
                "consent message from the patient"
            )

    async def _check_live_log(self, record: VerifiedRecord) -> None:
        senders = sorted({m.sender.user_id for m in record.messages})
        live: dict[str, LiveRevocations] = {}
        for user in senders:
            try:
                live[user] = await self.engine.revocations(user)
            except Exception as exc:
                raise Temporary("the live identity log could not be read") from exc
        for index, message in enumerate(record.messages):
            content = message.content
            state = live[content.sender_user_id]
            device = content.sender_device_id
            name = f"message {index} ({content.message_id.hex()[:16]})"
            account = state.account_revoked_at_ms
            if account is not None and account <= content.sent_at_ms:
                raise Refused(
                    f"{name}: its sender's account was revoked before it was sent (live log)"
                )
            revoked = state.devices.get(device)
            if revoked is not None and revoked <= content.sent_at_ms:
                raise Refused(f"{name}: its device was revoked before it was sent (live log)")
            if state.active_devices is not None and device not in state.active_devices:
                raise Refused(
                    f"{name}: its device is no longer active in the live log, and when it was "
                    "revoked cannot be told"
                )

    # -- delivery ------------------------------------------------------------------------------

    def pump(self) -> None:
        """Deliver what is due, send due receipts, and set a timer for the next due item."""
        if self._stopped:
            return
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        self.idle = Deferred.fromCoroutine(self._pump())

        def done(result: object) -> None:
            self._pumping = False
            if self._again:
                self._again = False
                self.pump()
            else:
                self._arm()
            if isinstance(result, Failure):
                _log.failure("the outbox pump failed", result)

        self.idle.addBoth(done)

    def _arm(self) -> None:
        if self._stopped:
            return
        due = self.outbox.next_due_ms()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if due is not None:
            self._timer = self.clock.callLater(max(0.0, (due - self.now_ms()) / 1000), self.pump)

    async def _pump(self) -> None:
        while not self._stopped:
            now = self.now_ms()
            mirrors = self.outbox.due_mirrors(now)
            receipts = self.outbox.due_receipts(now)
            if not mirrors and not receipts:
                return
            for mirror in mirrors:
                await self._deliver(mirror)
            for receipt in self.outbox.due_receipts(self.now_ms()):
                await self._send_receipt(receipt)

    async def _deliver(self, mirror: Mirror) -> None:
        try:
            records = await self.sink.deliver(mirror.mirror_id, mirror.bundle_json)
        except DeliveryError as exc:
            reason = one_line(str(exc))
            now = self.now_ms()
            if exc.permanent:
                _log.warn("mirror {mirror} refused by the sink", mirror=mirror.mirror_id)
                self.outbox.mirror_failed(
                    mirror.mirror_id,
                    reason,
                    now,
                    NewReceipt(
                        mirror.thread_id,
                        mirror.recipients,
                        receipt_text(mirror.visit_id, mirror.bundle_sha256, reason=reason),
                        mirror.mirror_id,
                    ),
                )
                return
            delay = self.backoff.delay_s(mirror.attempts + 1, self.jitter())
            attempts = self.outbox.mirror_retry(mirror.mirror_id, reason, now + int(delay * 1000))
            _log.info(
                "mirror {mirror} not delivered (attempt {attempts}); retry in {delay:.0f} s",
                mirror=mirror.mirror_id,
                attempts=attempts,
                delay=delay,
            )
            return
        except Exception:
            _log.failure("mirror {mirror}: the sink failed", mirror=mirror.mirror_id)
            delay = self.backoff.delay_s(mirror.attempts + 1, self.jitter())
            now = self.now_ms()
            self.outbox.mirror_retry(mirror.mirror_id, "internal error", now + int(delay * 1000))
            return
        _log.info("mirror {mirror} delivered", mirror=mirror.mirror_id)
        self.outbox.mirror_delivered(
            mirror.mirror_id,
            records,
            self.now_ms(),
            NewReceipt(
                mirror.thread_id,
                mirror.recipients,
                receipt_text(mirror.visit_id, mirror.bundle_sha256, records=records),
                mirror.mirror_id,
            ),
        )

    async def _send_receipt(self, receipt: PendingReceipt) -> None:
        try:
            await self.engine.send_in_thread(
                list(receipt.recipients), receipt.thread_id, KIND_RECORD_RECEIPT, receipt.text
            )
        except Exception as exc:
            delay = self.receipt_backoff.delay_s(receipt.attempts + 1, self.jitter())
            self.outbox.receipt_retry(
                receipt.receipt_id, type(exc).__name__, self.now_ms() + int(delay * 1000)
            )
            _log.info("a receipt could not be sent yet; retry in {delay:.0f} s", delay=delay)
            return
        self.outbox.receipt_sent(receipt.receipt_id, self.now_ms())


def counts_text(counts: dict[str, dict[str, int]]) -> str:
    return json.dumps(counts, sort_keys=True)
