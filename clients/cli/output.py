"""How the CLI shows things: JSON objects for `--json`, lines for people.

Everything a peer controls (message text, file names) is printed with control characters made
visible, so a message cannot carry terminal escape sequences that rewrite the screen. JSON output
escapes them by construction.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from medrelay.clients.engine.availability import AvailabilityView, ShiftView
from medrelay.clients.engine.linking import LinkCheck, LinkCode, LinkResult
from medrelay.clients.engine.record_messages import (
    KIND_CONCLUSION,
    KIND_CONSENT,
    KIND_RECORD_BUNDLE,
    KIND_RECORD_RECEIPT,
    KIND_VISIT_OPENED,
    RecordRequest,
)
from medrelay.clients.engine.staff import CareLinkView, NewAccountView, PersonView
from medrelay.clients.engine.store import ProfileInfo
from medrelay.clients.engine.views import (
    CLINIC_NOTICE_KINDS,
    KIND_SECURITY,
    KIND_URGENT_ROUTED,
    KIND_URGENT_UNROUTED,
    DeviceView,
    MessageView,
    NoticeView,
    RecordSent,
    SavedAttachment,
    SentMessage,
    VisitsView,
    VisitView,
    Whoami,
)
from medrelay.crypto.content import KIND_TEXT
from medrelay.crypto.safety import format_safety_number, safety_number_groups
from medrelay.protocol.hours import format_hours

_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def iso_time(ms: int | None) -> str | None:
    """ISO 8601 in UTC with milliseconds and a Z (`2025-11-23T08:00:00.000Z`)."""
    if ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def zone_or_utc(name: str) -> datetime.tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return datetime.UTC


def local_time(ms: int, zone: str | None = None) -> str:
    """A moment for people, in the zone they live in: "Tue 24 Nov 2026 09:00 (Europe/Moscow)";
    without a zone, in this computer's."""
    if zone is None:
        moment = datetime.datetime.fromtimestamp(ms / 1000).astimezone()
        return f"{moment:%a %d %b %Y %H:%M} ({moment.tzname()})"
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=zone_or_utc(zone))
    return f"{moment:%a %d %b %Y %H:%M} ({zone})"


def safe(text: str) -> str:
    """Peer-controlled text for a terminal: control characters shown as escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


# --- messages and notices ---------------------------------------------------------------------


def message_json(view: MessageView) -> dict[str, Any]:
    return {
        "type": "message",
        "id": view.message_id.hex(),
        "from": view.sender_user,
        "from_device": view.sender_device,
        "to": view.peer_user if view.outgoing else None,
        "outgoing": view.outgoing,
        "sent_at": iso_time(view.sent_at_ms),
        "server_time": iso_time(view.server_ms),
        "thread": view.thread_id.hex(),
        "status": view.status,
        "text": view.text,
        "attachments": [
            {"index": a.index, "name": a.file_name, "media_type": a.media_type, "size": a.size}
            for a in view.attachments
        ],
        "flags": list(view.flags),
        "kind": view.kind,
        **_receipt_json(view),
    }


def _receipt_json(view: MessageView) -> dict[str, Any]:
    if view.kind != KIND_RECORD_RECEIPT:
        return {}
    receipt = view.receipt
    if receipt is None:
        return {"receipt": None, "receipt_error": view.receipt_error or "unreadable"}
    return {
        "receipt": {
            "visit": receipt.visit_id,
            "status": "saved" if receipt.saved else "failed",
            "records": list(receipt.records),
            "reason": receipt.reason,
            "bundle_sha256": receipt.bundle_sha256,
        },
        "receipt_error": None,
    }


def notice_json(view: NoticeView) -> dict[str, Any]:
    """A notice in the same shape as a message (so a reader of the list never meets a missing
    key), with `type` saying what it is, `text` null and `reason` set."""
    return {
        "type": view.kind,
        "id": view.message_id.hex(),
        "from": view.user_id,
        "from_device": view.device_id,
        "to": None,
        "outgoing": False,
        "sent_at": iso_time(view.server_ms),
        "server_time": iso_time(view.server_ms),
        "thread": None,
        "status": view.kind,
        "text": None,
        "attachments": [],
        "reason": view.reason,
        **({} if view.clinic is None else _clinic_json(view)),
    }


def _clinic_json(view: NoticeView) -> dict[str, Any]:
    clinic = view.clinic
    assert clinic is not None  # noqa: S101 (checked by the caller)
    return {
        "clinic_notice": True,
        "about": view.message_id.hex(),
        "clinician": clinic.clinician,
        "on_call": clinic.on_call,
        "reads_at": iso_time(clinic.reads_at_ms),
        "time_zone": clinic.time_zone,
        "emergency": list(clinic.emergency_numbers),
        "text": clinic.text,
    }


def item_json(view: MessageView | NoticeView) -> dict[str, Any]:
    return message_json(view) if isinstance(view, MessageView) else notice_json(view)


_FLAG_LABELS: Final = {
    "urgent": "URGENT",
    "after_hours": "after hours",
    "held": "held until your hours",
}


_KIND_LABELS: Final = {
    KIND_VISIT_OPENED: "visit opened",
    KIND_CONSENT: "consent to saving the visit",
    KIND_CONCLUSION: "visit conclusion",
}


def _record_request(text: str) -> str:
    try:
        return f"visit {RecordRequest.decode(text).visit_id}"
    except ValueError:
        return "an unreadable request"


def message_line(view: MessageView) -> str:
    when = iso_time(view.server_ms if view.server_ms is not None else view.sent_at_ms)
    who = f"you -> {view.peer_user}" if view.outgoing else view.sender_user
    marks = "".join(f" [{_FLAG_LABELS.get(f, f)}]" for f in view.flags)
    if view.kind == KIND_RECORD_RECEIPT:
        if view.receipt is None:
            return (
                f"[{when}] ! a record receipt from {view.sender_user} cannot be trusted and was "
                f"not shown: {safe(view.receipt_error or 'unreadable')}"
            )
        return f"[{when}] {who} (record receipt): {safe(view.receipt.summary)}"
    if view.kind == KIND_RECORD_BUNDLE:
        about = safe(_record_request(view.text))
        lines = [f"[{when}]{marks} {who} (record of {about} for the medical record)"]
    else:
        label = _KIND_LABELS.get(view.kind, safe(view.kind)) if view.kind != KIND_TEXT else ""
        kind = f" ({label})" if label else ""
        lines = [f"[{when}]{marks} {who}{kind}: {safe(view.text)}"]
    for a in view.attachments:
        lines.append(f"    attachment {a.index}: {safe(a.file_name)} ({_size(a.size)})")
    if view.attachments:
        lines.append(f"    (save with: medrelay attachment save {view.message_id.hex()})")
    return "\n".join(lines)


def notice_line(view: NoticeView) -> str:
    when = iso_time(view.server_ms)
    if view.kind in CLINIC_NOTICE_KINDS:
        if view.clinic is None:  # verified on arrival, but its stored copy no longer decodes
            return (
                f"[{when}] automatic clinic notice about your message to {view.user_id}: "
                f"{safe(view.reason)}"
            )
        return _clinic_line(when, view)
    if view.kind == KIND_SECURITY:
        return f"[{when}] !!! {safe(view.reason)}"
    if view.kind == "expired":
        return (
            f"[{when}] ! your message {view.message_id.hex()} expired before "
            f"{view.user_id}/{view.device_id} fetched it"
        )
    return (
        f"[{when}] ! a message from {view.user_id}/{view.device_id} could not be read and "
        f"was discarded: {view.reason}"
    )


def _clinic_line(when: str | None, view: NoticeView) -> str:
    clinic = view.clinic
    assert clinic is not None  # noqa: S101 (checked by the caller)
    if view.kind == KIND_URGENT_ROUTED:
        about = (
            f"your urgent message to {clinic.clinician} reached {clinic.on_call}, "
            "the clinician on call"
        )
    elif view.kind == KIND_URGENT_UNROUTED:
        about = f"your urgent message to {clinic.clinician}: NOBODY IS ON CALL"
    else:
        about = f"about your message to {clinic.clinician}"
    lines = [f"[{when}] automatic clinic notice (signed by the clinic), {about}:"]
    lines.extend(f"    {safe(line)}" for line in clinic.text.splitlines() or [""])
    if clinic.reads_at_ms is not None:
        reads_at = local_time(clinic.reads_at_ms, clinic.time_zone)
        lines.append(f"    {clinic.clinician} reads it from {reads_at}")
    if clinic.emergency_numbers:
        lines.append(f"    emergency: {', '.join(clinic.emergency_numbers)}")
    return "\n".join(lines)


def item_line(view: MessageView | NoticeView) -> str:
    return message_line(view) if isinstance(view, MessageView) else notice_line(view)


# --- other results ----------------------------------------------------------------------------


def sent_json(sent: SentMessage) -> dict[str, Any]:
    return {
        "id": sent.message_id.hex(),
        "to": sent.recipient,
        "server_time": iso_time(sent.server_ms),
        "devices": sent.devices,
        "held": sent.held,
        "reads_at": iso_time(sent.reads_at_ms),
        "on_call": sent.on_call,
    }


def sent_line(sent: SentMessage) -> str:
    devices = "device" if sent.devices == 1 else "devices"
    lines = [
        f"sent to {sent.recipient} ({sent.devices} {devices}) at {iso_time(sent.server_ms)}, "
        f"id {sent.message_id.hex()}"
    ]
    if sent.on_call is not None:
        lines.append(f"urgent: {sent.on_call}, the clinician on call, received it now")
    if sent.held or sent.reads_at_ms is not None:
        when = "later" if sent.reads_at_ms is None else f"from {local_time(sent.reads_at_ms)}"
        lines.append(f"{sent.recipient} is outside their hours and will read it {when}")
    return "\n".join(lines)


def devices_json(devices: list[DeviceView]) -> list[dict[str, Any]]:
    return [
        {
            "device": d.device_id,
            "created_at": iso_time(d.created_at_ms),
            "this_device": d.this_device,
            "added_by_you": d.added_by_you,
        }
        for d in devices
    ]


def devices_lines(devices: list[DeviceView]) -> str:
    return "\n".join(
        f"{d.device_id}  enrolled {iso_time(d.created_at_ms)}"
        + ("  (this device)" if d.this_device else "")
        + ("" if d.added_by_you else "  !!! NOT ADDED FROM YOUR DEVICES: tell clinic IT")
        for d in devices
    )


def safety_json(user: str, number: str) -> dict[str, Any]:
    return {"user": user, "safety_number": number, "groups": list(safety_number_groups(number))}


def safety_lines(user: str, number: str) -> str:
    return (
        f"safety number with {user}:\n{format_safety_number(number)}\n"
        "Compare it with theirs in person or over a channel you trust."
    )


def whoami_json(who: Whoami) -> dict[str, Any]:
    return {
        "user": who.user_id,
        "device": who.device_id,
        "display_name": who.display_name,
        "role": who.role,
        "clinic": who.clinic_id,
        "server": who.server_url,
        "enrolled_at": iso_time(who.enrolled_at_ms),
    }


def whoami_lines(who: Whoami) -> str:
    return (
        f"{who.user_id} ({safe(who.display_name)}, {who.role}) on device {who.device_id}\n"
        f"clinic {who.clinic_id} at {who.server_url}, enrolled {iso_time(who.enrolled_at_ms)}"
    )


def saved_json(saved: list[tuple[SavedAttachment, str]]) -> list[dict[str, Any]]:
    return [
        {"name": a.file_name, "path": path, "media_type": a.media_type, "size": len(a.data)}
        for a, path in saved
    ]


def saved_lines(saved: list[tuple[SavedAttachment, str]]) -> str:
    return "\n".join(f"saved {safe(path)} ({_size(len(a.data))})" for a, path in saved)


# --- device links -----------------------------------------------------------------------------
# With --json, each step of a link is one JSON object per line with an "event" key, so a script
# can follow along (and answer the prompt on standard input).


def link_code_json(code: LinkCode) -> dict[str, Any]:
    return {
        "event": "code",
        "code": code.code,
        "expires": iso_time(code.expires_ms),
        "command": code.command,
    }


def link_code_lines(code: LinkCode) -> str:
    return (
        "To link a new device to this account, run this on the new device:\n\n"
        f"    {code.command}\n\n"
        f"The code works once, until {iso_time(code.expires_ms)}."
    )


def link_check_json(check: LinkCheck) -> dict[str, Any]:
    return {
        "event": "sas",
        "sas": check.sas,
        "display": check.display,
        "user": check.username,
        "device": check.device_id,
    }


def link_check_lines(check: LinkCheck) -> str:
    return (
        f"Linking device {check.device_id} to {check.username}.\n"
        f"Both screens must show the same digits: {check.display}"
    )


def linked_json(result: LinkResult) -> dict[str, Any]:
    return {"event": "linked", "user": result.username, "device": result.device_id}


def linked_line(result: LinkResult) -> str:
    return f"linked device {result.device_id} to {result.username}"


def joined_json(info: ProfileInfo, profile: str, devices: list[DeviceView]) -> dict[str, Any]:
    return {
        "event": "linked",
        "user": info.user_id,
        "device": info.device_id,
        "clinic": info.clinic_id,
        "server": info.server_url,
        "profile": profile,
        "devices": devices_json(devices),
    }


def joined_lines(info: ProfileInfo, profile: str, devices: list[DeviceView]) -> str:
    return (
        f"this device is now {info.device_id} of {info.user_id} at clinic {info.clinic_id}\n"
        f"profile: {profile}\n{devices_lines(devices)}"
    )


# --- the directory and staff requests -------------------------------------------------------


def people_json(people: list[PersonView]) -> list[dict[str, Any]]:
    return [
        {
            "user": p.user_id,
            "display_name": p.display_name,
            "role": p.role,
            "specialty": p.specialty or None,
            "department": p.department or None,
            "identity_key": p.identity_key,
            "verified": True,
        }
        for p in people
    ]


def people_lines(people: list[PersonView]) -> str:
    if not people:
        return "nobody found"
    lines = []
    for p in people:
        where = " / ".join(safe(x) for x in (p.specialty, p.department) if x)
        lines.append(
            f"{p.user_id}  {safe(p.display_name)}  ({p.role}{', ' + where if where else ''})"
            "  verified: certified by the clinic, in its identity log"
        )
    return "\n".join(lines)


def new_account_json(created: NewAccountView) -> dict[str, Any]:
    return {
        "username": created.user_id,
        "role": created.role,
        "enrollment_code": created.code,
        "expires_at": iso_time(created.expires_ms),
    }


def new_account_lines(created: NewAccountView) -> str:
    return (
        f"created {created.role} account {created.user_id}\n"
        f"enrollment code: {created.code}\n"
        f"valid once, until {iso_time(created.expires_ms)}; hand it to the person in person"
    )


def care_link_json(link: CareLinkView) -> dict[str, Any]:
    return {
        "patient": link.patient,
        "clinician": link.clinician,
        "visit_date": link.visit_date,
        "ends_at": iso_time(link.ends_ms),
        "ended_at": iso_time(link.ended_ms),
    }


def care_link_lines(link: CareLinkView) -> str:
    if link.ended_ms is not None:
        return f"ended the care link of {link.patient} and {link.clinician}"
    # A link ends at midnight UTC after its last day: show that day, as it was entered.
    last_day = datetime.datetime.fromtimestamp((link.ends_ms - 1) / 1000, tz=datetime.UTC)
    return (
        f"linked {link.patient} with {link.clinician} (visit {link.visit_date}); "
        f"they may write to each other through {last_day.date().isoformat()} (UTC)"
    )


# --- hours and the on-call roster -------------------------------------------------------------


def availability_json(view: AvailabilityView) -> dict[str, Any]:
    return {
        "user": view.user_id,
        "time_zone": view.time_zone,
        "hours": [{"day": h.day, "start": h.start, "end": h.end} for h in view.hours],
        "hours_text": format_hours(view.hours),
        "scheduled": view.scheduled,
        "available_now": view.open_now,
        "changes_at": iso_time(view.changes_at_ms),
        "available_until": iso_time(view.available_until_ms),
        "absences": [{"from": a.first, "to": a.last, "reason": a.reason} for a in view.absences],
        "department": view.department,
        "on_call": view.on_call,
        "policy": view.policy,
        "emergency": list(view.emergency_numbers),
        "autoreply": view.autoreply,
    }


def availability_lines(view: AvailabilityView) -> str:
    zone = view.viewer_time_zone
    if not view.scheduled:
        state = "available (no hours set: messages always reach them)"
    elif view.open_now:
        state = "available now"
        if view.changes_at_ms is not None:
            state += f", until {local_time(view.changes_at_ms, zone)}"
    else:
        state = "away now"
        if view.changes_at_ms is not None:
            state += f"; back {local_time(view.changes_at_ms, zone)}"
    lines = [f"{view.user_id}: {state}"]
    if view.scheduled:
        lines.append(f"hours ({view.time_zone}): {format_hours(view.hours)}")
    if view.available_until_ms is not None:
        lines.append(f"declared available until {local_time(view.available_until_ms, zone)}")
    for a in view.absences:
        span = a.first if a.first == a.last else f"{a.first} to {a.last}"
        lines.append(f"away {span} ({a.reason})")
    if view.department:
        lines.append(f"department: {safe(view.department)}")
    if not view.open_now:
        lines.append(
            f"on call now: {view.on_call}"
            if view.on_call
            else "nobody is on call now for this department"
        )
    if view.autoreply is not None:
        lines.append("automatic reply: " + safe(view.autoreply).replace("\n", "\n    "))
    lines.append(
        "outside hours, patients' messages "
        + ("wait for the hours" if view.policy == "hold" else "arrive silently")
        + f"; emergency numbers: {', '.join(view.emergency_numbers) or 'none set'}"
    )
    return "\n".join(lines)


def shifts_json(shifts: list[ShiftView]) -> list[dict[str, Any]]:
    return [
        {
            "id": s.shift_id,
            "clinician": s.clinician,
            "department": s.department,
            "from": iso_time(s.starts_ms),
            "to": iso_time(s.ends_ms),
        }
        for s in shifts
    ]


def shifts_lines(shifts: list[ShiftView], zone: str | None = None) -> str:
    if not shifts:
        return "no on-call shifts"
    return "\n".join(
        f"#{s.shift_id} {s.clinician} on call for {safe(s.department)}: "
        f"{local_time(s.starts_ms, zone)} to {local_time(s.ends_ms, zone)}"
        for s in shifts
    )


# --- visits and the medical record ------------------------------------------------------------


def visit_json(visit: VisitView) -> dict[str, Any]:
    return {
        "visit": visit.visit_id,
        "thread": visit.thread_id.hex(),
        "patient": visit.patient,
        "clinician": visit.clinician,
        "indication": visit.indication,
        "indication_name": visit.indication_name,
        "consent": visit.consent,
        "open": visit.is_open,
        "opened": iso_time(visit.opened_ms),
        "closed": iso_time(visit.closed_ms),
        "conclusion": None if visit.conclusion is None else visit.conclusion.hex(),
    }


def visit_line(visit: VisitView) -> str:
    why = visit.indication + (f" ({visit.indication_name})" if visit.indication_name else "")
    state = "open" if visit.is_open else f"closed {local_time(visit.closed_ms or 0)}"
    return (
        f"{visit.visit_id}  {visit.patient} with {visit.clinician}: {safe(why)}; "
        f"opened {local_time(visit.opened_ms)}, {state}; consent: {visit.consent}"
    )


def visit_opened_lines(visit: VisitView) -> str:
    lines = [
        f"opened visit {visit.visit_id} with {visit.patient}: "
        f"{safe(visit.indication_name or visit.indication)}",
        f"{visit.patient} was told, in the visit's thread, that it will be saved in their "
        "medical record",
    ]
    if visit.consent == "explicit":
        lines.append(f"nothing is saved until they agree (medrelay visit consent {visit.visit_id})")
    lines.append(f"when done: medrelay visit close {visit.visit_id} --conclusion TEXT")
    return "\n".join(lines)


def visit_closed_lines(visit: VisitView) -> str:
    return (
        f"closed visit {visit.visit_id} with {visit.patient}; conclusion "
        f"{'' if visit.conclusion is None else visit.conclusion.hex()}\n"
        f"to save it in the medical record: medrelay record save --visit {visit.visit_id}"
    )


def visits_json(listed: VisitsView) -> dict[str, Any]:
    return {
        "visits": [visit_json(v) for v in listed.visits],
        "indications": [{"code": i.code, "name": i.name} for i in listed.indications],
        "consent": listed.consent,
    }


def visits_lines(listed: VisitsView) -> str:
    lines = [visit_line(v) for v in listed.visits] or ["no visits"]
    if listed.indications:
        lines.append("indications: " + ", ".join(safe(i.code) for i in listed.indications))
    return "\n".join(lines)


def consent_json(visit: str, sent: SentMessage) -> dict[str, Any]:
    return {"visit": visit, **sent_json(sent)}


def consent_line(visit: str, sent: SentMessage) -> str:
    return (
        f"you agreed that visit {visit} is saved in your medical record; {sent.recipient} was "
        "told in the visit's thread"
    )


def record_sent_json(saved: RecordSent) -> dict[str, Any]:
    return {
        "visit": saved.visit_id,
        "thread": saved.thread_id.hex(),
        "messages": saved.messages,
        "bundle_sha256": saved.bundle_sha256,
        "bundle_bytes": saved.bundle_bytes,
        "sent": sent_json(saved.sent),
    }


def record_sent_line(saved: RecordSent) -> str:
    return (
        f"record of {saved.visit_id} ({saved.messages} messages, {_size(saved.bundle_bytes)}, "
        f"sha256 {saved.bundle_sha256[:16]}…) sent to {saved.sent.recipient}; its receipt "
        "will arrive in the thread (medrelay inbox)"
    )
