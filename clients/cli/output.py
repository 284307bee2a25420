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

from medrelay.clients.engine.linking import LinkCheck, LinkCode, LinkResult
from medrelay.clients.engine.staff import CareLinkView, NewAccountView, PersonView
from medrelay.clients.engine.store import ProfileInfo
from medrelay.clients.engine.views import (
    KIND_SECURITY,
    DeviceView,
    MessageView,
    NoticeView,
    SavedAttachment,
    SentMessage,
    Whoami,
)
from medrelay.crypto.safety import format_safety_number, safety_number_groups

_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def iso_time(ms: int | None) -> str | None:
    """ISO 8601 in UTC with milliseconds and a Z (`2025-11-23T08:00:00.000Z`)."""
    if ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    }


def item_json(view: MessageView | NoticeView) -> dict[str, Any]:
    return message_json(view) if isinstance(view, MessageView) else notice_json(view)


def message_line(view: MessageView) -> str:
    when = iso_time(view.server_ms if view.server_ms is not None else view.sent_at_ms)
    who = f"you -> {view.peer_user}" if view.outgoing else view.sender_user
    lines = [f"[{when}] {who}: {safe(view.text)}"]
    for a in view.attachments:
        lines.append(f"    attachment {a.index}: {safe(a.file_name)} ({_size(a.size)})")
    if view.attachments:
        lines.append(f"    (save with: medrelay attachment save {view.message_id.hex()})")
    return "\n".join(lines)


def notice_line(view: NoticeView) -> str:
    when = iso_time(view.server_ms)
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


def item_line(view: MessageView | NoticeView) -> str:
    return message_line(view) if isinstance(view, MessageView) else notice_line(view)


# --- other results ----------------------------------------------------------------------------


def sent_json(sent: SentMessage) -> dict[str, Any]:
    return {
        "id": sent.message_id.hex(),
        "to": sent.recipient,
        "server_time": iso_time(sent.server_ms),
        "devices": sent.devices,
    }


def sent_line(sent: SentMessage) -> str:
    devices = "device" if sent.devices == 1 else "devices"
    return (
        f"sent to {sent.recipient} ({sent.devices} {devices}) at {iso_time(sent.server_ms)}, "
        f"id {sent.message_id.hex()}"
    )


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
