"""The life cycle of one client connection, as an explicit transition table.

Rules of this file:
- Everything that moves a connection from one state to another is a row of `TRANSITIONS`; the
  handler (`medrelay.server.relay.connection`) asks `next_state` and never assigns a state itself.
- Inputs are frame types received from the client and a few internal events (named in
  `EVENTS`). An input with no row in the current state is refused with `REFUSALS`' code.
- docs/connection-states.md is generated from this table (`render_mermaid`); a test keeps the
  two in step.
"""

from __future__ import annotations

import enum
from typing import Final

from medrelay.protocol.errors import ErrorCode


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    AWAITING_AUTH = "awaiting_auth"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


EVENTS: Final = frozenset(
    {
        "login_succeeded",
        "auth_timeout",
        "fatal_error",
        "replaced",
        "revoked",
        "connection_lost",
    }
)
"""Inputs that are not frames."""

REQUESTS: Final = (
    "send",
    "ack",
    "bundle_get",
    "devices_get",
    "log_get",
    "prekeys_put",
    "directory_search",
    "account_create",
    "link_create",
    "link_end",
    "availability_get",
    "schedule_set",
    "roster_add",
    "roster_remove",
    "roster_get",
    "visit_open",
    "visit_close",
    "visit_list",
)

TRANSITIONS: Final[dict[tuple[State, str], State]] = {
    (State.AWAITING_HELLO, "hello"): State.AWAITING_AUTH,
    (State.AWAITING_AUTH, "auth"): State.AUTHENTICATING,
    (State.AWAITING_AUTH, "resume"): State.AUTHENTICATING,
    (State.AUTHENTICATING, "login_succeeded"): State.READY,
    **{(State.READY, request): State.READY for request in REQUESTS},
    **{
        (state, event): State.CLOSED
        for state in (
            State.AWAITING_HELLO,
            State.AWAITING_AUTH,
            State.AUTHENTICATING,
            State.READY,
        )
        for event in ("fatal_error", "connection_lost")
    },
    **{
        (state, "auth_timeout"): State.CLOSED
        for state in (State.AWAITING_HELLO, State.AWAITING_AUTH, State.AUTHENTICATING)
    },
    (State.READY, "replaced"): State.CLOSED,
    (State.READY, "revoked"): State.CLOSED,
}

REFUSALS: Final[dict[State, tuple[ErrorCode, bool]]] = {
    # The first frame must be hello; anything else means the peer does not speak this protocol.
    State.AWAITING_HELLO: (ErrorCode.UNEXPECTED_MESSAGE, True),
    State.AWAITING_AUTH: (ErrorCode.NOT_AUTHENTICATED, False),
    State.AUTHENTICATING: (ErrorCode.NOT_AUTHENTICATED, False),
    State.READY: (ErrorCode.UNEXPECTED_MESSAGE, False),
    State.CLOSED: (ErrorCode.UNEXPECTED_MESSAGE, True),
}
"""(error code, fatal) for an input that has no transition in a state."""


def next_state(state: State, event: str) -> State | None:
    """The state after `event`, or None when the event is not allowed in `state`."""
    return TRANSITIONS.get((state, event))


def render_mermaid() -> str:
    """The state diagram for docs/connection-states.md."""
    lines = ["stateDiagram-v2", "    [*] --> awaiting_hello"]
    grouped: dict[tuple[State, State], list[str]] = {}
    for (source, event), target in TRANSITIONS.items():
        grouped.setdefault((source, target), []).append(event)
    for (source, target), events in sorted(
        grouped.items(), key=lambda kv: (kv[0][0].value, kv[0][1].value)
    ):
        label = ", ".join(sorted(events))
        lines.append(f"    {source.value} --> {target.value}: {label}")
    lines.append("    closed --> [*]")
    return "\n".join(lines) + "\n"
