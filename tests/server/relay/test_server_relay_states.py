"""The connection state table: its documented diagram is current, and its shape is what the
protocol promises."""

from __future__ import annotations

from pathlib import Path

from medrelay.protocol.messages import MESSAGE_TYPES, Direction
from medrelay.server.relay.states import (
    EVENTS,
    REFUSALS,
    REQUESTS,
    TRANSITIONS,
    State,
    next_state,
    render_mermaid,
)

DOC = Path(__file__).resolve().parents[3] / "docs" / "connection-states.md"


def test_the_documented_diagram_is_generated_from_the_table() -> None:
    assert render_mermaid() in DOC.read_text(encoding="utf-8")


def test_every_client_frame_type_has_a_transition_somewhere() -> None:
    client_types = {
        name for name, cls in MESSAGE_TYPES.items() if cls.DIRECTION is Direction.CLIENT_TO_SERVER
    }
    inputs = {event for _, event in TRANSITIONS}
    assert client_types <= inputs
    assert inputs <= client_types | EVENTS


def test_requests_are_only_accepted_when_ready() -> None:
    for request in REQUESTS:
        for state in State:
            allowed = next_state(state, request) is not None
            assert allowed == (state is State.READY), (state, request)


def test_every_live_state_can_be_closed_by_a_lost_connection() -> None:
    for state in State:
        if state is not State.CLOSED:
            assert next_state(state, "connection_lost") is State.CLOSED


def test_nothing_leaves_the_closed_state() -> None:
    assert not [key for key in TRANSITIONS if key[0] is State.CLOSED]
    assert set(REFUSALS) == set(State)
