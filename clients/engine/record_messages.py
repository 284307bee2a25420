"""The end-to-end message kinds of teleconsultation visits and record mirroring.

These messages are ordinary signed contents (`medrelay.crypto.content`): the relay never sees
their kind or text. Doctor, patient and the records gateway agree on them here:

- `visit_opened` (doctor -> patient, first message of the visit's thread): a plain-text notice
  that the consultation will be saved in the patient's record (and, in `explicit` consent mode,
  how to agree to it);
- `consent` (patient -> doctor, in the thread): the patient agrees that the thread is saved;
- `conclusion` (doctor -> patient, in the thread): the visit's conclusion, text and optional
  attachments; the server keeps its message id when the visit closes;
- `record_bundle` (doctor -> records): a `RecordRequest` as text and exactly one attachment, the
  encoded `medrelay.crypto.records.RecordBundle`; the doctor's signature over the message covers
  the attachment's hash, so it vouches for the whole bundle, visit header included;
- `record_receipt` (records -> doctor and patient, in the visit's thread): a `RecordReceipt`
  as text, saying the record was saved (with the record ids) or why it failed.

Bodies of the two machine kinds are small JSON objects, bounded and checked on decoding, so a
malformed one is a clean `ValueError`, never a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from medrelay.crypto.content import KIND_TEXT

KIND_VISIT_OPENED: Final = "visit_opened"
KIND_CONSENT: Final = "consent"
KIND_CONCLUSION: Final = "conclusion"
KIND_RECORD_BUNDLE: Final = "record_bundle"
KIND_RECORD_RECEIPT: Final = "record_receipt"

THREAD_KINDS: Final = frozenset({KIND_TEXT, KIND_VISIT_OPENED, KIND_CONSENT, KIND_CONCLUSION})
"""The kinds of a visit's conversation: what a record bundle carries (receipts and the bundle
messages themselves are about the record, not part of it)."""

RECORD_BUNDLE_MEDIA_TYPE: Final = "application/vnd.medrelay.record-bundle"
RECORDS_USER: Final = "records"
"""The username of the clinic's records gateway account, unless configured otherwise."""

THREAD_EXPORT_PREFIX: Final = "thread-"
"""Visit ids of bundles that export a thread's time range rather than a server visit
(`thread-<first 16 hex digits of the thread id>-<from ms>`): there is no server visit to compare
them with, and their indication is `INDICATION_UNSPECIFIED`."""
INDICATION_UNSPECIFIED: Final = "unspecified"

RECEIPT_SAVED: Final = "saved"
RECEIPT_FAILED: Final = "failed"
_RECEIPT_STATUSES: Final = frozenset({RECEIPT_SAVED, RECEIPT_FAILED})

MAX_BODY_BYTES: Final = 16 * 1024
MAX_RECORD_IDS: Final = 2100
"""An Encounter, a Composition and one Communication per message (at most 2,000)."""
MAX_REASON_CHARS: Final = 500
_VISIT_ID: Final = re.compile(r"[A-Za-z0-9:._-]{1,128}")
_RECORD_ID: Final = re.compile(r"[A-Za-z]{1,64}/[A-Za-z0-9.-]{1,64}")
_HEX_HASH: Final = re.compile(r"[0-9a-f]{64}")


def _load(text: str, what: str) -> dict[str, object]:
    if len(text.encode("utf-8")) > MAX_BODY_BYTES:
        raise ValueError(f"the {what} is larger than {MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"the {what} is not a JSON object")
    return value


def _visit_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _VISIT_ID.fullmatch(value):
        raise ValueError(f"the {what} has no valid visit id")
    return value


@dataclass(frozen=True, slots=True)
class RecordRequest:
    """The text of a `record_bundle` message: which visit (or thread export) it documents."""

    visit_id: str

    def encode(self) -> str:
        _visit_id(self.visit_id, "record request")
        return json.dumps({"visit": self.visit_id}, sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> RecordRequest:
        body = _load(text, "record request")
        return cls(_visit_id(body.get("visit"), "record request"))


@dataclass(frozen=True, slots=True)
class RecordReceipt:
    """The text of a `record_receipt` message.

    `bundle_sha256` names the exact bundle (hex SHA-256 of its encoding) the receipt is about;
    `records` are the ids the clinic's record system gave (`Encounter/…`), empty on failure;
    `reason` says why it failed (never message content)."""

    visit_id: str
    status: str
    bundle_sha256: str
    records: tuple[str, ...] = ()
    reason: str | None = None

    def __post_init__(self) -> None:
        _visit_id(self.visit_id, "receipt")
        if self.status not in _RECEIPT_STATUSES:
            raise ValueError("the receipt's status must be saved or failed")
        if not _HEX_HASH.fullmatch(self.bundle_sha256):
            raise ValueError("the receipt's bundle hash must be 64 lower-case hex digits")
        if len(self.records) > MAX_RECORD_IDS or not all(
            isinstance(r, str) and _RECORD_ID.fullmatch(r) for r in self.records
        ):
            raise ValueError("the receipt's record ids are not Type/id references")
        if self.reason is not None and (
            not isinstance(self.reason, str)
            or len(self.reason) > MAX_REASON_CHARS
            or not self.reason.isprintable()
        ):
            raise ValueError(f"the receipt's reason must be printable text ≤ {MAX_REASON_CHARS}")
        if (self.status == RECEIPT_FAILED) != (self.reason is not None):
            raise ValueError("a failed receipt, and only a failed one, carries a reason")

    @property
    def saved(self) -> bool:
        return self.status == RECEIPT_SAVED

    def encode(self) -> str:
        body: dict[str, object] = {
            "visit": self.visit_id,
            "status": self.status,
            "bundle": self.bundle_sha256,
            "records": list(self.records),
        }
        if self.reason is not None:
            body["reason"] = self.reason
        return json.dumps(body, sort_keys=True, ensure_ascii=False)

    @classmethod
    def decode(cls, text: str) -> RecordReceipt:
        body = _load(text, "receipt")
        records = body.get("records", [])
        reason = body.get("reason")
        status = body.get("status")
        bundle = body.get("bundle")
        if not isinstance(records, list) or not isinstance(status, str):
            raise ValueError("the receipt has no status or record list")
        if not isinstance(bundle, str) or (reason is not None and not isinstance(reason, str)):
            raise ValueError("the receipt's bundle hash or reason is not text")
        return cls(
            visit_id=_visit_id(body.get("visit"), "receipt"),
            status=status,
            bundle_sha256=bundle,
            records=tuple(records),
            reason=reason,
        )

    def summary(self) -> str:
        """One line for people: what happened to the record."""
        if self.saved:
            shown = ", ".join(self.records[:3]) + (" …" if len(self.records) > 3 else "")
            return f"visit {self.visit_id} saved in the medical record ({shown})"
        return f"visit {self.visit_id} NOT saved in the medical record: {self.reason}"
