"""What happens to a patient's message that reaches a clinician outside their hours: the clinic's
policy, the automatic reply, and the clinic-signed notices (medrelay.crypto.notices).

The relay never reads a message, so everything here is decided from who writes to whom, when,
and the `urgent` flag the sender's client sets on the send. The group-commit transaction calls
these functions (`medrelay.server.storage.relay_store`); nothing here touches storage.

Rules (docs/protocol.md, "Availability"):
- Only a patient's message to a doctor or nurse is ever held or answered automatically;
  messages between staff and from clinicians to patients pass as always.
- A clinician with no hours set counts as always available.
- `hold` (default): the envelopes for the clinician's devices wait in `held_items` and reach them
  at the next opening, in order, once. `deliver-silently`: delivered at once, flagged
  after-hours (clients do not ring for them).
- One automatic reply per (patient, clinician, off-hours window); the window is named by the
  instant it ends. Replies are notices, not messages: nobody can answer one automatically, so
  two automatic repliers can never loop.
- Urgent, while the clinician is away: the send must also address the devices of the on-call
  clinician of the clinician's department (clients learn who from `availability`); they get it at
  once, and the patient gets a notice saying who. With nobody on call, the patient is told at
  once to call the emergency numbers.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final
from zoneinfo import ZoneInfo

from medrelay.crypto.keys import SigningKey
from medrelay.crypto.notices import NoticeKind, issue_notice
from medrelay.server.availability.schedule import Availability, Schedule, evaluate

DEFAULT_EMERGENCY_NUMBERS: Final = ("103", "112")
DEFAULT_AUTOREPLY: Final = (
    "{clinician} is not reading messages now and will read yours from {reads_at}. "
    "If it cannot wait, send it again marked urgent: the clinician on call gets it at once. "
    "In an emergency call {emergency}."
)
_NEVER: Final = "when their hours are next set"


class OffHoursPolicy(enum.StrEnum):
    HOLD = "hold"
    DELIVER_SILENTLY = "deliver-silently"


# queue_items.flags / held_items.flags bits (protocol ItemFlag names).
FLAG_URGENT: Final = 1
FLAG_AFTER_HOURS: Final = 2
FLAG_HELD: Final = 4
FLAG_NAMES: Final = (
    (FLAG_URGENT, "urgent"),
    (FLAG_AFTER_HOURS, "after_hours"),
    (FLAG_HELD, "held"),
)


def flag_names(flags: int) -> tuple[str, ...] | None:
    names = tuple(name for bit, name in FLAG_NAMES if flags & bit)
    return names or None


@dataclass
class AfterHoursTally:
    """What a batch did, for the metrics."""

    after_hours: int = 0
    held: int = 0
    auto_replies: int = 0
    urgent_routed: int = 0
    urgent_unrouted: int = 0
    first_reply_s: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AvailabilityConfig:
    """The clinic's availability settings (`[availability]` in the server configuration)."""

    time_zone: str = "Europe/Moscow"
    """The clinic's zone: hours, holidays and patients without a zone of their own use it."""
    policy: OffHoursPolicy = OffHoursPolicy.HOLD
    emergency_numbers: tuple[str, ...] = DEFAULT_EMERGENCY_NUMBERS
    autoreply: str = DEFAULT_AUTOREPLY
    """The clinic's automatic-reply template ({clinician}, {reads_at}, {emergency})."""
    release_check_s: float = 30.0
    """How often held messages are checked against the hours (besides each next opening)."""


@dataclass(frozen=True, slots=True)
class OffHours:
    """What the group commit needs to apply the rules: the settings and the clinic's current
    issuing key (read at each use: a key rotation takes effect without a restart)."""

    clinic_id: str
    config: AvailabilityConfig
    issuing_key: Callable[[], SigningKey]

    def availability(self, schedule: Schedule | None, now_ms: int) -> Availability:
        if schedule is None:
            return Availability(open_now=True, changes_at_ms=None)
        return evaluate(schedule, now_ms)

    def notice(
        self,
        kind: NoticeKind,
        *,
        patient: str,
        clinician: str,
        in_reply_to: bytes,
        now_ms: int,
        reads_at_ms: int | None,
        patient_zone: str,
        template: str | None,
        on_call: str | None = None,
    ) -> bytes:
        text = render(
            template if kind is NoticeKind.AUTO_REPLY and template else self._text_for(kind),
            clinician=clinician,
            reads_at_ms=reads_at_ms,
            zone=patient_zone,
            emergency=self.config.emergency_numbers,
            on_call=on_call,
        )
        return issue_notice(
            self.issuing_key(),
            kind=kind,
            clinic_id=self.clinic_id,
            recipient=patient,
            clinician=clinician,
            in_reply_to=in_reply_to,
            issued_at_ms=now_ms,
            reads_at_ms=reads_at_ms,
            time_zone=patient_zone,
            text=text,
            emergency_numbers=self.config.emergency_numbers,
            on_call=on_call,
        ).encode()

    def _text_for(self, kind: NoticeKind) -> str:
        if kind is NoticeKind.AUTO_REPLY:
            return self.config.autoreply
        if kind is NoticeKind.URGENT_ROUTED:
            return (
                "Your urgent message reached {on_call}, the clinician on call, now; "
                "{clinician} will read it from {reads_at}."
            )
        return (
            "Nobody is on call to read your urgent message now. If it is an emergency, "
            "call {emergency} now. {clinician} will read it from {reads_at}."
        )


def render(
    template: str,
    *,
    clinician: str,
    reads_at_ms: int | None,
    zone: str,
    emergency: tuple[str, ...],
    on_call: str | None = None,
) -> str:
    """Fill a template's placeholders; unknown or malformed ones are left as written (a
    clinician's template must never make a notice fail)."""
    values = {
        "clinician": clinician,
        "reads_at": _when(reads_at_ms, zone),
        "emergency": " or ".join(emergency) if emergency else "your local emergency number",
        "on_call": on_call or "",
    }
    out: list[str] = []
    rest = template
    while rest:
        start = rest.find("{")
        end = rest.find("}", start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            out.append(rest)
            break
        key = rest[start + 1 : end]
        out.append(rest[:start])
        out.append(values.get(key, rest[start : end + 1]))
        rest = rest[end + 1 :]
    return "".join(out)[:1000]


def _when(ms: int | None, zone: str) -> str:
    if ms is None:
        return _NEVER
    local = datetime.datetime.fromtimestamp(ms / 1000, ZoneInfo(zone))
    return f"{local:%a %d %b %H:%M} ({zone})"
