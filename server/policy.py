"""Who may do what to whom: the one policy table that decides every request.

Every authenticated client request (send, bundle_get, devices_get, log_get, prekeys_put, ack,
the directory, availability and visit requests) and every staff action (creating and ending
care links, creating accounts) is decided here, by
`decide(request, requester role, target role, relationship)`, from `POLICY`: one row per request
type and requester role, saying which target roles are allowed freely, which only with a care
link in given states, and whether the request may concern the requester's own account. The
relay store applies it to each recipient of a send inside the group-commit transaction;
`RelayService` applies it to the other requests; `storage.care` to care-link actions.

Rules of this file (docs/protocol.md, "Who may write to whom"):
- Clinicians (doctor, nurse), registrars and admins write to each other freely.
- A patient writes only to a doctor or nurse with whom an ACTIVE care link exists, never to a
  patient, registrar, admin or the records gateway; a clinician writes to a patient only with an
  ACTIVE link too. After the link ends, new sends are refused with a message naming the clinician
  and the end date; what was already queued is still delivered (the queue is not touched).
- bundle_get (it consumes one-time prekeys, so it is needed only to start sending) follows the
  send rule. devices_get and log_get (needed to verify the senders of messages already received)
  are allowed with an ACTIVE or an ENDED link, refused with none.
- The records gateway (`records`) receives from clinicians only. It writes to clinicians and,
  freely, to patients: it posts signed receipts into visit threads, which doctor and patient
  read. A patient never writes to it, but may look up its devices and key history
  (devices_get, log_get) to verify those receipts.
- Teleconsultation visits (about the visit's patient): only a doctor opens one, and only with an
  ACTIVE care link; only the visit's doctor closes it (whatever the link is by then); everyone
  lists their own visits, and the records gateway may read any visit by its id.
- Anything addressed to a revoked (closed) account is refused, whatever the roles.
- A request about one's own account (a send's copies for the sender's other devices, one's own
  bundles and devices, prekeys_put, ack) is allowed for every role.
- Staff actions: link_create and link_end by registrars, doctors and admins (the target is the
  patient); creating patient accounts by registrars and admins; staff accounts by admins only.

A pair's relationship comes from its care links (`relationship_of`): ACTIVE while a link has
started and neither reached its end date nor was ended early; ENDED once every link has ended
(an early end counts as ended); NONE without links; REVOKED when the target account is closed.
Refusals are `RelayError`s with stable codes: `forbidden` for a role or link refusal,
`unknown_user` for a closed account. Messages name usernames only, never display names.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from medrelay.crypto.certificates import Role
from medrelay.protocol.errors import ErrorCode
from medrelay.server.relay.errors import RelayError


class RequestType(enum.Enum):
    """Everything someone can ask of the server that the policy decides."""

    # The relay's authenticated client requests: the values are the protocol's message types.
    SEND = "send"
    BUNDLE_GET = "bundle_get"
    DEVICES_GET = "devices_get"
    LOG_GET = "log_get"
    PREKEYS_PUT = "prekeys_put"
    ACK = "ack"
    DIRECTORY_SEARCH = "directory_search"
    AVAILABILITY_GET = "availability_get"
    SCHEDULE_SET = "schedule_set"
    ROSTER_GET = "roster_get"
    VISIT_OPEN = "visit_open"
    VISIT_CLOSE = "visit_close"
    VISIT_LIST = "visit_list"
    # Staff actions (admin commands and protocol requests).
    LINK_CREATE = "link_create"
    LINK_END = "link_end"
    ACCOUNT_CREATE_PATIENT = "account_create_patient"
    ACCOUNT_CREATE_STAFF = "account_create_staff"
    ROSTER_EDIT = "roster_edit"


STAFF_ACTIONS: Final = frozenset(
    {
        RequestType.LINK_CREATE,
        RequestType.LINK_END,
        RequestType.ACCOUNT_CREATE_PATIENT,
        RequestType.ACCOUNT_CREATE_STAFF,
        RequestType.ROSTER_EDIT,
    }
)
REQUESTS_OF_MESSAGE: Final[Mapping[str, frozenset[RequestType]]] = {
    "send": frozenset({RequestType.SEND}),
    "bundle_get": frozenset({RequestType.BUNDLE_GET}),
    "devices_get": frozenset({RequestType.DEVICES_GET}),
    "log_get": frozenset({RequestType.LOG_GET}),
    "prekeys_put": frozenset({RequestType.PREKEYS_PUT}),
    "ack": frozenset({RequestType.ACK}),
    "directory_search": frozenset({RequestType.DIRECTORY_SEARCH}),
    "availability_get": frozenset({RequestType.AVAILABILITY_GET}),
    "schedule_set": frozenset({RequestType.SCHEDULE_SET}),
    "roster_add": frozenset({RequestType.ROSTER_EDIT}),
    "roster_remove": frozenset({RequestType.ROSTER_EDIT}),
    "roster_get": frozenset({RequestType.ROSTER_GET}),
    "visit_open": frozenset({RequestType.VISIT_OPEN}),
    "visit_close": frozenset({RequestType.VISIT_CLOSE}),
    "visit_list": frozenset({RequestType.VISIT_LIST}),
    "link_create": frozenset({RequestType.LINK_CREATE}),
    "link_end": frozenset({RequestType.LINK_END}),
    # Which of the two depends on the role of the account to create.
    "account_create": frozenset(
        {RequestType.ACCOUNT_CREATE_PATIENT, RequestType.ACCOUNT_CREATE_STAFF}
    ),
}
"""Each authenticated protocol request -> the request types that decide it (a test checks the
keys against the protocol's client-to-server types)."""
CLIENT_REQUESTS: Final = frozenset().union(*REQUESTS_OF_MESSAGE.values())
"""The request types that protocol messages make."""


class Relationship(enum.Enum):
    """The state between a requester and the target user."""

    NONE = "none"
    ACTIVE = "active"
    ENDED = "ended"
    REVOKED = "revoked"
    """The target account is closed."""


class Decision(enum.Enum):
    ALLOWED = "allowed"
    FORBIDDEN = "forbidden"
    """These roles never may (or not on one's own account)."""
    NO_CARE_LINK = "no_care_link"
    """These roles may only with a care link, and there is none."""
    CARE_LINK_ENDED = "care_link_ended"
    """These roles may only with an active care link, and it ended."""
    ACCOUNT_CLOSED = "account_closed"


@dataclass(frozen=True, slots=True)
class Rule:
    """What a requester of one role may do with one request type."""

    free: frozenset[Role] = frozenset()
    """Target roles allowed whatever the care link."""
    linked: frozenset[Role] = frozenset()
    """Target roles allowed only while the pair's relationship is in `link_states`."""
    link_states: frozenset[Relationship] = frozenset({Relationship.ACTIVE})
    own: bool = False
    """Allowed on the requester's own account."""


NOTHING: Final = Rule()
_CLINICIANS: Final = frozenset({Role.DOCTOR, Role.NURSE})
_STAFF: Final = frozenset({Role.ADMIN, Role.REGISTRAR, Role.DOCTOR, Role.NURSE})
_ALL_ROLES: Final = frozenset(Role)
_PATIENTS: Final = frozenset({Role.PATIENT})
_ACTIVE_OR_ENDED: Final = frozenset({Relationship.ACTIVE, Relationship.ENDED})

# Writing (and starting to write): send and bundle_get.
_WRITE: Final[Mapping[Role, Rule]] = {
    Role.ADMIN: Rule(free=_STAFF, own=True),
    Role.REGISTRAR: Rule(free=_STAFF, own=True),
    Role.DOCTOR: Rule(free=_STAFF | {Role.RECORDS}, linked=_PATIENTS, own=True),
    Role.NURSE: Rule(free=_STAFF | {Role.RECORDS}, linked=_PATIENTS, own=True),
    Role.PATIENT: Rule(linked=_CLINICIANS, own=True),
    Role.RECORDS: Rule(free=_CLINICIANS, own=True),
}
# Sending itself: the records gateway also posts its signed receipts into visit threads, which
# the visit's patient reads too (availability_get keeps `_WRITE`: patients keep no hours).
_SEND: Final[Mapping[Role, Rule]] = {
    **_WRITE,
    Role.RECORDS: Rule(free=_CLINICIANS | _PATIENTS, own=True),
}
# Verifying senders of what was received: devices_get and log_get; an ended link still counts.
# A patient verifies the records gateway's receipts, so may look its devices and log up; the
# gateway checks a record's senders (the visit's patient too) against the live log.
_VERIFY: Final[Mapping[Role, Rule]] = {
    **{
        role: Rule(rule.free, rule.linked, _ACTIVE_OR_ENDED, rule.own)
        for role, rule in _WRITE.items()
    },
    Role.PATIENT: Rule(
        free=frozenset({Role.RECORDS}), linked=_CLINICIANS, link_states=_ACTIVE_OR_ENDED, own=True
    ),
    Role.RECORDS: Rule(free=_CLINICIANS | _PATIENTS, own=True),
}
_OWN_ONLY: Final[Mapping[Role, Rule]] = {role: Rule(own=True) for role in Role}
_LINKING: Final[Mapping[Role, Rule]] = {
    Role.ADMIN: Rule(free=_PATIENTS),
    Role.REGISTRAR: Rule(free=_PATIENTS),
    Role.DOCTOR: Rule(free=_PATIENTS),
    Role.NURSE: NOTHING,
    Role.PATIENT: NOTHING,
    Role.RECORDS: NOTHING,
}

# The directory: whom one may find. A patient finds only their current care team.
_DIRECTORY: Final[Mapping[Role, Rule]] = {
    Role.ADMIN: Rule(free=_ALL_ROLES, own=True),
    Role.REGISTRAR: Rule(free=_STAFF | _PATIENTS, own=True),
    Role.DOCTOR: Rule(
        free=_STAFF | {Role.RECORDS}, linked=_PATIENTS, link_states=_ACTIVE_OR_ENDED, own=True
    ),
    Role.NURSE: Rule(
        free=_STAFF | {Role.RECORDS}, linked=_PATIENTS, link_states=_ACTIVE_OR_ENDED, own=True
    ),
    Role.PATIENT: Rule(linked=_CLINICIANS, own=True),
    Role.RECORDS: Rule(free=_CLINICIANS, own=True),
}

# Availability: whoever may write to a clinician may ask when they are available; a clinician
# keeps their own schedule, an admin anyone's; registrars and admins keep the on-call roster.
_SCHEDULE: Final[Mapping[Role, Rule]] = {
    Role.ADMIN: Rule(free=_CLINICIANS, own=True),
    **{role: Rule(own=True) for role in Role if role is not Role.ADMIN},
}
_ROSTER_EDIT: Final[Mapping[Role, Rule]] = {
    Role.ADMIN: Rule(free=_CLINICIANS),
    Role.REGISTRAR: Rule(free=_CLINICIANS),
    Role.DOCTOR: NOTHING,
    Role.NURSE: NOTHING,
    Role.PATIENT: NOTHING,
    Role.RECORDS: NOTHING,
}
_ROSTER_GET: Final[Mapping[Role, Rule]] = {role: Rule(own=role in _STAFF) for role in Role}

# Teleconsultation visits (docs/protocol.md §18); the target is the visit's patient. A doctor
# opens one only with an ACTIVE link; closing is the visit's own doctor's (checked by
# `medrelay.server.visits`), whatever the link or the patient's account became meanwhile, so the
# record can be completed. Everyone lists their own visits; the records gateway reads any visit,
# one id at a time.
_VISIT_OPEN: Final[Mapping[Role, Rule]] = {
    role: Rule(linked=_PATIENTS) if role is Role.DOCTOR else NOTHING for role in Role
}
_VISIT_CLOSE: Final[Mapping[Role, Rule]] = {
    role: Rule(free=_PATIENTS) if role is Role.DOCTOR else NOTHING for role in Role
}
_VISIT_LIST: Final[Mapping[Role, Rule]] = {
    role: Rule(free=_PATIENTS if role is Role.RECORDS else frozenset(), own=True) for role in Role
}

POLICY: Final[Mapping[RequestType, Mapping[Role, Rule]]] = {
    RequestType.AVAILABILITY_GET: _WRITE,
    RequestType.SCHEDULE_SET: _SCHEDULE,
    RequestType.ROSTER_EDIT: _ROSTER_EDIT,
    RequestType.ROSTER_GET: _ROSTER_GET,
    RequestType.DIRECTORY_SEARCH: _DIRECTORY,
    RequestType.VISIT_OPEN: _VISIT_OPEN,
    RequestType.VISIT_CLOSE: _VISIT_CLOSE,
    RequestType.VISIT_LIST: _VISIT_LIST,
    RequestType.SEND: _SEND,
    RequestType.BUNDLE_GET: _SEND,
    RequestType.DEVICES_GET: _VERIFY,
    RequestType.LOG_GET: _VERIFY,
    RequestType.PREKEYS_PUT: _OWN_ONLY,
    RequestType.ACK: _OWN_ONLY,
    RequestType.LINK_CREATE: _LINKING,
    RequestType.LINK_END: _LINKING,
    RequestType.ACCOUNT_CREATE_PATIENT: {
        Role.ADMIN: Rule(free=_PATIENTS),
        Role.REGISTRAR: Rule(free=_PATIENTS),
        Role.DOCTOR: NOTHING,
        Role.NURSE: NOTHING,
        Role.PATIENT: NOTHING,
        Role.RECORDS: NOTHING,
    },
    RequestType.ACCOUNT_CREATE_STAFF: {
        Role.ADMIN: Rule(free=_ALL_ROLES - _PATIENTS),
        Role.REGISTRAR: NOTHING,
        Role.DOCTOR: NOTHING,
        Role.NURSE: NOTHING,
        Role.PATIENT: NOTHING,
        Role.RECORDS: NOTHING,
    },
}
"""request type -> requester role -> rule. Every request type has a row for every role (a
test checks the whole product), so `decide` never has to guess."""


def decide(
    request: RequestType,
    requester: Role,
    target: Role,
    relationship: Relationship,
    *,
    own_account: bool = False,
) -> Decision:
    """The table's answer for `requester` doing `request` to a user of role `target`.
    `own_account`: the target is the requester's own account (its role is then `requester`)."""
    rule = POLICY[request][requester]  # a missing row is a KeyError, never a default
    if relationship is Relationship.REVOKED:
        return Decision.ACCOUNT_CLOSED
    if own_account:
        return Decision.ALLOWED if rule.own else Decision.FORBIDDEN
    if target in rule.free:
        return Decision.ALLOWED
    if target in rule.linked:
        if relationship in rule.link_states:
            return Decision.ALLOWED
        if relationship is Relationship.ENDED:
            return Decision.CARE_LINK_ENDED
        return Decision.NO_CARE_LINK
    return Decision.FORBIDDEN


_VERBS: Final = {
    RequestType.SEND: "write to",
    RequestType.BUNDLE_GET: "start a conversation with",
    RequestType.DEVICES_GET: "look up the devices of",
    RequestType.LOG_GET: "look up the key history of",
    RequestType.PREKEYS_PUT: "upload prekeys for",
    RequestType.ACK: "acknowledge messages for",
    RequestType.DIRECTORY_SEARCH: "look up",
    RequestType.AVAILABILITY_GET: "ask about the hours of",
    RequestType.SCHEDULE_SET: "change the schedule of",
    RequestType.ROSTER_GET: "read the on-call roster as",
    RequestType.ROSTER_EDIT: "put on call",
    RequestType.VISIT_OPEN: "open teleconsultation visits with",
    RequestType.VISIT_CLOSE: "close teleconsultation visits of",
    RequestType.VISIT_LIST: "read the teleconsultation visits of",
    RequestType.LINK_CREATE: "create care links for",
    RequestType.LINK_END: "end care links of",
    RequestType.ACCOUNT_CREATE_PATIENT: "create",
    RequestType.ACCOUNT_CREATE_STAFF: "create",
}


def utc_date(ms: int) -> str:
    """The UTC calendar date (YYYY-MM-DD) of a time in milliseconds."""
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).date().isoformat()


def last_day(end_ms: int) -> str:
    """The last UTC date something in force until `end_ms` (exclusive) covered: a link "until
    2026-12-31" ends at 2027-01-01T00:00Z, and "ended on 2026-12-31"."""
    return utc_date(end_ms - 1)


def refusal(
    decision: Decision,
    request: RequestType,
    requester: Role,
    target: Role,
    *,
    target_name: str,
    ended_ms: int | None = None,
    own_account: bool = False,
) -> RelayError:
    """The error a refused decision is answered with (one line, usernames only)."""
    verb = _VERBS[request]
    if decision is Decision.ACCOUNT_CLOSED:
        return RelayError(
            ErrorCode.UNKNOWN_USER, f"the account {target_name} is closed; it cannot be reached"
        )
    if decision is Decision.CARE_LINK_ENDED:
        when = f" on {last_day(ended_ms)}" if ended_ms is not None else ""
        return RelayError(
            ErrorCode.FORBIDDEN,
            f"your care link with {target_name} ended{when}; "
            "ask the clinic's front desk to renew it",
        )
    if decision is Decision.NO_CARE_LINK:
        return RelayError(
            ErrorCode.FORBIDDEN,
            f"you have no care link with {target_name}; the clinic links a patient and a "
            "clinician after an in-person visit",
        )
    if decision is Decision.ALLOWED:  # pragma: no cover - a caller bug
        raise ValueError("an allowed decision is not a refusal")
    if own_account:
        return RelayError(ErrorCode.FORBIDDEN, f"not allowed: you cannot {verb} your own account")
    return RelayError(
        ErrorCode.FORBIDDEN,
        f"not allowed: {requester.value} accounts cannot {verb} {target.value} accounts",
    )


def authorize(
    request: RequestType,
    requester: Role,
    target: Role,
    relationship: Relationship,
    *,
    target_name: str,
    ended_ms: int | None = None,
    own_account: bool = False,
) -> RelayError | None:
    """None when the table allows the request, else the error to answer with."""
    decision = decide(request, requester, target, relationship, own_account=own_account)
    if decision is Decision.ALLOWED:
        return None
    return refusal(
        decision,
        request,
        requester,
        target,
        target_name=target_name,
        ended_ms=ended_ms,
        own_account=own_account,
    )


# --- care links -> relationship -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkSpan:
    """When one care link of a pair was in force: [start_ms, end_ms)."""

    start_ms: int
    end_ms: int
    """The earlier of its planned end and its early end."""


@dataclass(frozen=True, slots=True)
class PairState:
    relationship: Relationship
    ended_ms: int | None = None
    """For ENDED: when the most recent link ended."""


NO_LINK: Final = PairState(Relationship.NONE)


def relationship_of(spans: Iterable[LinkSpan], now_ms: int) -> PairState:
    """A pair's relationship at `now_ms` from its care links (never REVOKED: that is about the
    target account, which the caller knows)."""
    ended: int | None = None
    for span in spans:
        if span.start_ms <= now_ms < span.end_ms:
            return PairState(Relationship.ACTIVE)
        if span.end_ms <= now_ms and (ended is None or span.end_ms > ended):
            ended = span.end_ms
    if ended is None:
        return NO_LINK
    return PairState(Relationship.ENDED, ended)


def pair_state(
    spans: Mapping[tuple[str, str], Sequence[LinkSpan]], a: str, b: str, now_ms: int
) -> PairState:
    """The relationship of users `a` and `b` (either may be the patient) from their links'
    spans keyed (patient, clinician)."""
    found = spans.get((a, b)) or spans.get((b, a)) or ()
    return relationship_of(found, now_ms)


@dataclass(frozen=True, slots=True)
class Standing:
    """A target user as the policy sees it from one requester."""

    username: str
    role: Role
    state: PairState


def authorize_standing(
    request: RequestType, requester: Role, standing: Standing
) -> RelayError | None:
    """`authorize` for a looked-up target."""
    return authorize(
        request,
        requester,
        standing.role,
        standing.state.relationship,
        target_name=standing.username,
        ended_ms=standing.state.ended_ms,
    )
