"""A verified record bundle as a FHIR R4 transaction Bundle (pure: no I/O, no clock).

`build_transaction(MirrorInput(...))` returns the Bundle as a JSON-ready dict, validated with
the `fhir.resources.R4B` models (wire-identical to R4 for the resources used here). The same
input always gives the same dict, byte for byte once serialised with `canonical_json`: every
`fullUrl` is a UUIDv5 of the clinic and the resource's business identifier, and every time
comes from the bundle itself, so a replayed mirror builds the identical Bundle.

The mapping (docs/records.md has the table):

- Encounter: identifier `urn:medrelay:<clinic>:visit|<visit id>`, status `finished` (a closed
  visit; `in-progress` otherwise), class v3-ActCode `VR` "virtual", period, reasonCode from the
  indication (system `urn:medrelay:<clinic>:indication`), subject the patient, participant the
  clinician;
- one Communication per message: identifier `urn:medrelay:<clinic>:message|<message id hex>`,
  status `completed`, category the message kind (system `urn:medrelay:message-kind`), sent,
  sender, recipients, subject, encounter, payload (the text as contentString, one
  contentAttachment per attachment: media type, size, file name, the file itself as `data`
  with R4's SHA-1 `hash`, and its SHA-256 in the extension `ATTACHMENT_SHA256_URL` (the hash
  the sender signed)), inResponseTo for a reply whose original is in the bundle;
- the conclusion as a Composition: identifier `urn:medrelay:<clinic>:composition|<visit id>`,
  LOINC 11488-4 "Consult note", the conclusion text as section narrative, section entry the
  conclusion Communication;
- a Provenance targeting every other resource: recorded, agent the gateway's account, and one
  `signature` per message carrying the message's original signed content (`SignedContent`
  bytes, base64) with sigFormat `SIGNED_CONTENT_FORMAT`, who the sender, when the sent time;
  and a `SOURCE_SIGNATURE` carrying the clinician's signed `record_bundle` message, whose
  attachment descriptor holds the record bundle's SHA-256.

People are referenced by identifier only (`urn:medrelay:<clinic>:user|<user id>`), never by name.
Encounter, Communication and Composition are conditional creates (`ifNoneExist` on their
identifier); Provenance has no identifier in R4, so it is `PUT Provenance/<id>` with an id
derived from the mirror id (update-as-create: a replay rewrites the same resource).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from medrelay.clients.engine.record_messages import KIND_CONCLUSION
from medrelay.crypto.records import VerifiedRecord

FHIR_JSON: Final = "application/fhir+json"
SIGNED_CONTENT_FORMAT: Final = "application/vnd.medrelay.signed-content"
ATTACHMENT_SHA256_URL: Final = "urn:medrelay:fhir:attachment-sha256"
"""Extension on Attachment: the hex SHA-256 of the attachment's plaintext, as signed."""
MESSAGE_KIND_SYSTEM: Final = "urn:medrelay:message-kind"
ACT_CODE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
LOINC: Final = "http://loinc.org"
CONSULT_NOTE: Final = "11488-4"
SIGNATURE_TYPE_SYSTEM: Final = "urn:iso-astm:E1762-95:2013"
AUTHOR_SIGNATURE: Final = "1.2.840.10065.1.12.1.1"
SOURCE_SIGNATURE: Final = "1.2.840.10065.1.12.1.14"
"""The clinician's signature over the record request (ASTM E1762 "Source Signature")."""
PARTICIPANT_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_NAMESPACE: Final = uuid.UUID("6f1b1d3e-3a43-5c1e-9a8e-6d656472656c")
"""The UUIDv5 namespace of medrelay's fullUrls (fixed forever: replays depend on it)."""


class MappingError(Exception):
    """The Bundle could not be built or does not validate; the message is one line without
    any content."""


@dataclass(frozen=True, slots=True)
class MirrorInput:
    """Everything a mirror is built from.

    `signed_messages[i]` is the encoded `SignedContent` of `record.messages[i]` (exactly the
    bytes in the record bundle); `recorded_ms` is when the record was requested (the signed
    sent time of the `record_bundle` message), so it is the same on every replay."""

    clinic_id: str
    mirror_id: str
    record: VerifiedRecord
    signed_messages: Sequence[bytes]
    gateway_user: str
    recorded_ms: int
    indication_name: str | None = None
    attachment_data: Mapping[tuple[int, int], bytes] = field(default_factory=dict)
    """(message index, attachment index) -> the file's bytes, embedded as `Attachment.data`
    (with R4's SHA-1 `hash`); an attachment without bytes here is described only."""
    request_signed: bytes = b""
    """The `record_bundle` message as the clinician's device signed it: its attachment
    descriptor holds the record bundle's SHA-256, so this signature vouches for the visit
    header too (empty when unknown)."""


def clinic_system(clinic_id: str, what: str) -> str:
    """A clinic-owned identifier system: `urn:medrelay:<clinic>:<what>`."""
    return f"urn:medrelay:{quote(clinic_id, safe='-._~')}:{what}"


def instant(time_ms: int) -> str:
    """A FHIR instant (UTC, milliseconds) for a time in ms since the epoch."""
    moment = datetime.datetime.fromtimestamp(time_ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def full_url(clinic_id: str, resource_type: str, key: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(_NAMESPACE, f"{clinic_id}\n{resource_type}\n{key}"))


def provenance_id(mirror_id: str) -> str:
    return f"medrelay-{mirror_id}"[:64]


def canonical_json(bundle: Mapping[str, Any]) -> bytes:
    """The serialisation written and sent: sorted keys, UTF-8, no whitespace."""
    return json.dumps(bundle, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def build_transaction(source: MirrorInput) -> dict[str, Any]:
    """The transaction Bundle for `source`, validated; `MappingError` if it does not validate."""
    bundle = _Builder(source).bundle()
    validate(bundle)
    return bundle


def validate(bundle: Mapping[str, Any]) -> None:
    """Structural validation with the R4B models: `MappingError` naming the first problem's
    location (never a value: values are health data)."""
    try:
        Bundle.model_validate(dict(bundle))
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(part) for part in errors[0]["loc"]) if errors else "?"
        kind = errors[0]["type"] if errors else "invalid"
        raise MappingError(f"the FHIR Bundle does not validate ({kind} at {where})") from None
    except KeyError as exc:
        # fhir.resources raises a bare KeyError for an unknown resourceType inside a Bundle.
        raise MappingError(f"the FHIR Bundle names an unknown resource type ({exc})") from None


class _Builder:
    def __init__(self, source: MirrorInput) -> None:
        self.source = source
        self.clinic = source.clinic_id
        self.visit = source.record.visit
        if len(source.signed_messages) != len(source.record.messages):
            raise MappingError("the signed contents do not match the verified messages")
        self.encounter_url = full_url(self.clinic, "Encounter", self.visit.visit_id)
        self.message_urls = {
            m.content.message_id: full_url(self.clinic, "Communication", m.content.message_id.hex())
            for m in source.record.messages
        }

    def person(self, user_id: str, resource_type: str | None = None) -> dict[str, Any]:
        if resource_type is None:
            resource_type = "Patient" if user_id == self.visit.patient else "Practitioner"
        return {
            "type": resource_type,
            "identifier": {"system": clinic_system(self.clinic, "user"), "value": user_id},
        }

    def identifier(self, what: str, value: str) -> list[dict[str, str]]:
        return [{"system": clinic_system(self.clinic, what), "value": value}]

    def conditional(self, resource_type: str, what: str, value: str) -> dict[str, str]:
        return {
            "method": "POST",
            "url": resource_type,
            "ifNoneExist": f"identifier={clinic_system(self.clinic, what)}|{value}",
        }

    def bundle(self) -> dict[str, Any]:
        entries = [self.encounter()]
        entries.extend(self.communication(i) for i in range(len(self.source.record.messages)))
        composition = self.composition()
        if composition is not None:
            entries.append(composition)
        entries.append(self.provenance([str(e["fullUrl"]) for e in entries]))
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "identifier": {
                "system": clinic_system(self.clinic, "mirror"),
                "value": self.source.mirror_id,
            },
            "entry": entries,
        }

    def encounter(self) -> dict[str, Any]:
        visit = self.visit
        period = {"start": instant(visit.opened_ms)}
        if visit.closed_ms is not None:
            period["end"] = instant(visit.closed_ms)
        reason: dict[str, Any] = {
            "coding": [
                {
                    "system": clinic_system(self.clinic, "indication"),
                    "code": visit.indication_code,
                }
            ]
        }
        if self.source.indication_name:
            reason["coding"][0]["display"] = self.source.indication_name
            reason["text"] = self.source.indication_name
        resource = {
            "resourceType": "Encounter",
            "identifier": self.identifier("visit", visit.visit_id),
            "status": "finished" if visit.closed_ms is not None else "in-progress",
            "class": {"system": ACT_CODE_SYSTEM, "code": "VR", "display": "virtual"},
            "subject": self.person(visit.patient, "Patient"),
            "participant": [{"individual": self.person(visit.clinician, "Practitioner")}],
            "period": period,
            "reasonCode": [reason],
        }
        return {
            "fullUrl": self.encounter_url,
            "resource": resource,
            "request": self.conditional("Encounter", "visit", visit.visit_id),
        }

    def communication(self, index: int) -> dict[str, Any]:
        message = self.source.record.messages[index]
        content = message.content
        key = content.message_id.hex()
        payload: list[dict[str, Any]] = []
        if content.text:
            payload.append({"contentString": content.text})
        for number, descriptor in enumerate(content.attachments):
            attachment: dict[str, Any] = {
                "extension": [
                    {"url": ATTACHMENT_SHA256_URL, "valueString": descriptor.plaintext_sha256.hex()}
                ],
                "contentType": descriptor.media_type or "application/octet-stream",
                "size": descriptor.size,
            }
            if descriptor.file_name:
                attachment["title"] = descriptor.file_name
            data = self.source.attachment_data.get((index, number))
            if data is not None:
                attachment["data"] = base64.b64encode(data).decode("ascii")
                # R4 defines Attachment.hash as the base64 SHA-1 of the data.
                sha1 = hashlib.sha1(data, usedforsecurity=False).digest()
                attachment["hash"] = base64.b64encode(sha1).decode("ascii")
            payload.append({"contentAttachment": attachment})
        resource: dict[str, Any] = {
            "resourceType": "Communication",
            "identifier": self.identifier("message", key),
            "status": "completed",
            "category": [{"coding": [{"system": MESSAGE_KIND_SYSTEM, "code": content.kind}]}],
            "subject": self.person(self.visit.patient, "Patient"),
            "encounter": {"reference": self.encounter_url},
            "sent": instant(content.sent_at_ms),
            "recipient": [self.person(user) for user in content.recipients],
            "sender": self.person(content.sender_user_id),
        }
        if content.reply_to is not None and content.reply_to in self.message_urls:
            resource["inResponseTo"] = [{"reference": self.message_urls[content.reply_to]}]
        if payload:
            resource["payload"] = payload
        return {
            "fullUrl": self.message_urls[content.message_id],
            "resource": resource,
            "request": self.conditional("Communication", "message", key),
        }

    def conclusion_index(self) -> int | None:
        messages = self.source.record.messages
        wanted = self.visit.conclusion_message_id
        for index, message in enumerate(messages):
            if wanted is not None and message.content.message_id == wanted:
                return index
        if wanted is None:
            for index in range(len(messages) - 1, -1, -1):
                if messages[index].content.kind == KIND_CONCLUSION:
                    return index
        return None

    def composition(self) -> dict[str, Any] | None:
        index = self.conclusion_index()
        if index is None:
            return None
        content = self.source.record.messages[index].content
        visit = self.visit
        text = html.escape(content.text or "(see the attached files)")
        div = f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{text}</p></div>'
        date = visit.closed_ms if visit.closed_ms is not None else content.sent_at_ms
        resource = {
            "resourceType": "Composition",
            "identifier": self.identifier("composition", visit.visit_id)[0],
            "status": "final",
            "type": {
                "coding": [{"system": LOINC, "code": CONSULT_NOTE, "display": "Consult note"}]
            },
            "subject": self.person(visit.patient, "Patient"),
            "encounter": {"reference": self.encounter_url},
            "date": instant(date),
            "author": [self.person(content.sender_user_id)],
            "title": "Teleconsultation conclusion",
            "section": [
                {
                    "title": "Conclusion",
                    "text": {"status": "generated", "div": div},
                    "entry": [{"reference": self.message_urls[content.message_id]}],
                }
            ],
        }
        return {
            "fullUrl": full_url(self.clinic, "Composition", visit.visit_id),
            "resource": resource,
            "request": self.conditional("Composition", "composition", visit.visit_id),
        }

    def provenance(self, targets: list[str]) -> dict[str, Any]:
        signatures = [
            {
                "type": [
                    {
                        "system": SIGNATURE_TYPE_SYSTEM,
                        "code": AUTHOR_SIGNATURE,
                        "display": "Author's Signature",
                    }
                ],
                "when": instant(message.content.sent_at_ms),
                "who": self.person(message.content.sender_user_id),
                "sigFormat": SIGNED_CONTENT_FORMAT,
                "data": base64.b64encode(signed).decode("ascii"),
            }
            for message, signed in zip(
                self.source.record.messages, self.source.signed_messages, strict=True
            )
        ]
        if self.source.request_signed:
            visit = self.source.record.visit
            signatures.append(
                {
                    "type": [
                        {
                            "system": SIGNATURE_TYPE_SYSTEM,
                            "code": SOURCE_SIGNATURE,
                            "display": "Source Signature",
                        }
                    ],
                    "when": instant(self.source.recorded_ms),
                    "who": self.person(visit.clinician),
                    "sigFormat": SIGNED_CONTENT_FORMAT,
                    "data": base64.b64encode(self.source.request_signed).decode("ascii"),
                }
            )
        identity = provenance_id(self.source.mirror_id)
        resource: dict[str, Any] = {
            "resourceType": "Provenance",
            "id": identity,
            "target": [{"reference": target} for target in targets],
            "recorded": instant(self.source.recorded_ms),
            "agent": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": PARTICIPANT_TYPE_SYSTEM,
                                "code": "assembler",
                                "display": "Assembler",
                            }
                        ]
                    },
                    "who": self.person(self.source.gateway_user, "Device"),
                }
            ],
        }
        if signatures:
            resource["signature"] = signatures
        return {
            "fullUrl": full_url(self.clinic, "Provenance", self.source.mirror_id),
            "resource": resource,
            "request": {"method": "PUT", "url": f"Provenance/{identity}"},
        }
