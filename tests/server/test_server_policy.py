"""The authorisation matrix: every role x every request type x every relationship state (none,
active, ended, revoked) x every target role, on one's own account or another's, checked against
the policy table (`medrelay.server.policy.POLICY`). The expected outcomes are written out here
independently, as a small table of rules in plain strings; a request type added to the enum
without a row in the policy table, or without a rule here, fails."""

from __future__ import annotations

import itertools
from typing import Final

import pytest

from medrelay.crypto.certificates import Role
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.messages import MESSAGE_TYPES, Direction
from medrelay.server import policy
from medrelay.server.policy import (
    CLIENT_REQUESTS,
    POLICY,
    REQUESTS_OF_MESSAGE,
    Decision,
    LinkSpan,
    PairState,
    Relationship,
    RequestType,
    authorize,
    decide,
    pair_state,
    relationship_of,
)

# --- the expected rules, written independently of the code ----------------------------------

FREE: Final = "free"
ACTIVE_LINK: Final = "active link"
ANY_LINK: Final = "active or ended link"

WRITE: Final = {"send", "bundle_get", "availability_get"}
VERIFY: Final = {"devices_get", "log_get"}
CLINICIANS: Final = {"doctor", "nurse"}
STAFF: Final = {"doctor", "nurse", "registrar", "admin"}

RULES: Final = [
    # (request types, requester roles, target roles, what it needs)
    (WRITE | VERIFY, STAFF, STAFF, FREE),
    (WRITE | VERIFY, CLINICIANS, {"records"}, FREE),
    (WRITE | VERIFY, {"records"}, CLINICIANS, FREE),
    # The records gateway posts receipts into visit threads; patients verify them, and the
    # gateway checks a record's patient against the live log.
    ({"send", "bundle_get"}, {"records"}, {"patient"}, FREE),
    (VERIFY, {"patient"}, {"records"}, FREE),
    (VERIFY, {"records"}, {"patient"}, FREE),
    (WRITE, CLINICIANS, {"patient"}, ACTIVE_LINK),
    (WRITE, {"patient"}, CLINICIANS, ACTIVE_LINK),
    (VERIFY, CLINICIANS, {"patient"}, ANY_LINK),
    (VERIFY, {"patient"}, CLINICIANS, ANY_LINK),
    ({"link_create", "link_end"}, {"registrar", "doctor", "admin"}, {"patient"}, FREE),
    (
        {"directory_search"},
        {"admin"},
        {"doctor", "nurse", "registrar", "admin", "records", "patient"},
        FREE,
    ),
    ({"directory_search"}, {"registrar"}, STAFF | {"patient"}, FREE),
    ({"directory_search"}, CLINICIANS, STAFF | {"records"}, FREE),
    ({"directory_search"}, CLINICIANS, {"patient"}, ANY_LINK),
    ({"directory_search"}, {"patient"}, CLINICIANS, ACTIVE_LINK),
    ({"directory_search"}, {"records"}, CLINICIANS, FREE),
    ({"account_create_patient"}, {"registrar", "admin"}, {"patient"}, FREE),
    ({"schedule_set"}, {"admin"}, CLINICIANS, FREE),
    ({"roster_edit"}, {"registrar", "admin"}, CLINICIANS, FREE),
    # Visits are about their patient: opened with an active link by doctors only; closed by
    # the visit's doctor whatever the link (the service checks it is theirs); read by id by
    # the records gateway.
    ({"visit_open"}, {"doctor"}, {"patient"}, ACTIVE_LINK),
    ({"visit_close"}, {"doctor"}, {"patient"}, FREE),
    ({"visit_list"}, {"records"}, {"patient"}, FREE),
    (
        {"account_create_staff"},
        {"admin"},
        {"doctor", "nurse", "registrar", "admin", "records"},
        FREE,
    ),
]
OWN_ACCOUNT: Final = {
    "send", "bundle_get", "devices_get", "log_get", "prekeys_put", "ack", "directory_search",
    "availability_get", "schedule_set", "visit_list",
}  # fmt: skip
"""Requests anyone may make about their own account."""
OWN_ACCOUNT_STAFF: Final = {"roster_get"}
"""Requests only staff may make (about nobody else: the roster is the clinic's)."""
KNOWN_REQUESTS: Final = {
    "send", "bundle_get", "devices_get", "log_get", "prekeys_put", "ack", "directory_search",
    "link_create", "link_end", "account_create_patient", "account_create_staff",
    "availability_get", "schedule_set", "roster_get", "roster_edit", "visit_open",
    "visit_close", "visit_list",
}  # fmt: skip
NOT_REQUESTS: Final = {"hello", "auth", "resume"}
"""Client frames that come before login: not decided by the table."""


def expected(
    request: RequestType,
    requester: Role,
    target: Role,
    relationship: Relationship,
    own: bool,
) -> Decision:
    if relationship is Relationship.REVOKED:
        return Decision.ACCOUNT_CLOSED
    if own:
        allowed = request.value in OWN_ACCOUNT or (
            request.value in OWN_ACCOUNT_STAFF and requester.value in STAFF
        )
        return Decision.ALLOWED if allowed else Decision.FORBIDDEN
    needs = [
        need
        for requests, who, whom, need in RULES
        if request.value in requests and requester.value in who and target.value in whom
    ]
    assert len(needs) <= 1, "the test's rules overlap"
    if not needs:
        return Decision.FORBIDDEN
    if needs[0] == FREE:
        return Decision.ALLOWED
    if relationship is Relationship.ACTIVE:
        return Decision.ALLOWED
    if relationship is Relationship.ENDED:
        return Decision.ALLOWED if needs[0] == ANY_LINK else Decision.CARE_LINK_ENDED
    return Decision.NO_CARE_LINK


# --- the matrix -----------------------------------------------------------------------------


def test_the_table_has_a_row_for_every_request_type_and_role() -> None:
    """The whole product of the enums: a new request type (or role) without rows fails here."""
    assert set(POLICY) == set(RequestType)
    for request in RequestType:
        assert set(POLICY[request]) == set(Role), request


def test_every_request_type_has_an_expected_rule_in_this_test() -> None:
    assert {r.value for r in RequestType} == KNOWN_REQUESTS


def test_the_client_requests_are_exactly_the_protocols_authenticated_requests() -> None:
    """A new client message type must get a request type (and so rows) before it can ship."""
    client_types = {
        name for name, cls in MESSAGE_TYPES.items() if cls.DIRECTION is Direction.CLIENT_TO_SERVER
    }
    assert set(REQUESTS_OF_MESSAGE) == client_types - NOT_REQUESTS
    assert set(RequestType) == CLIENT_REQUESTS  # every request type is reachable from the wire


@pytest.mark.parametrize("request_type", list(RequestType), ids=lambda r: r.value)
def test_matrix(request_type: RequestType) -> None:
    """Every requester role x target role x relationship, on another's account and on one's
    own, decides as the rules above say."""
    wrong = []
    for requester, target, relationship in itertools.product(Role, Role, Relationship):
        cases = [(target, False)] + ([(target, True)] if target is requester else [])
        for target_role, own in cases:
            got = decide(request_type, requester, target_role, relationship, own_account=own)
            want = expected(request_type, requester, target_role, relationship, own)
            if got is not want:
                wrong.append((requester.value, target_role.value, relationship.value, own, got))
    assert wrong == []


def test_a_row_missing_from_the_table_is_an_error_not_a_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = {role: rule for role, rule in POLICY[RequestType.SEND].items() if role is not Role.NURSE}
    monkeypatch.setattr(policy, "POLICY", {**POLICY, RequestType.SEND: rows})
    with pytest.raises(KeyError):
        decide(RequestType.SEND, Role.NURSE, Role.DOCTOR, Relationship.NONE)


# --- the answers ----------------------------------------------------------------------------


def test_an_ended_link_says_with_whom_when_and_what_to_do() -> None:
    error = authorize(
        RequestType.SEND,
        Role.PATIENT,
        Role.DOCTOR,
        Relationship.ENDED,
        target_name="dr.ivanova",
        ended_ms=1_767_225_600_000,  # 2026-01-01T00:00Z: the link's last day was 2025-12-31
    )
    assert error is not None and error.code is ErrorCode.FORBIDDEN
    assert error.message == (
        "your care link with dr.ivanova ended on 2025-12-31; ask the clinic's front desk to "
        "renew it"
    )


def test_no_link_role_refusals_and_closed_accounts_have_clear_errors() -> None:
    no_link = authorize(
        RequestType.SEND, Role.PATIENT, Role.NURSE, Relationship.NONE, target_name="n.petrova"
    )
    assert no_link is not None and no_link.code is ErrorCode.FORBIDDEN
    assert no_link.message.startswith("you have no care link with n.petrova;")
    by_role = authorize(
        RequestType.SEND, Role.PATIENT, Role.PATIENT, Relationship.NONE, target_name="other"
    )
    assert by_role is not None and by_role.code is ErrorCode.FORBIDDEN
    assert by_role.message == "not allowed: patient accounts cannot write to patient accounts"
    closed = authorize(
        RequestType.DEVICES_GET, Role.DOCTOR, Role.DOCTOR, Relationship.REVOKED, target_name="dr.x"
    )
    assert closed is not None and closed.code is ErrorCode.UNKNOWN_USER
    assert "dr.x" in closed.message and "closed" in closed.message
    assert (
        authorize(RequestType.SEND, Role.DOCTOR, Role.NURSE, Relationship.NONE, target_name="n")
        is None
    )


# --- relationships from links ---------------------------------------------------------------

DAY = 86_400_000
NOW = 1_800_000_000_000


def test_a_link_is_active_from_its_start_until_its_end() -> None:
    span = LinkSpan(NOW - DAY, NOW + DAY)
    assert relationship_of([span], NOW) == PairState(Relationship.ACTIVE)
    assert relationship_of([span], NOW - DAY) == PairState(Relationship.ACTIVE)
    assert relationship_of([span], NOW + DAY) == PairState(Relationship.ENDED, NOW + DAY)
    assert relationship_of([span], NOW - 2 * DAY) == PairState(Relationship.NONE)
    assert relationship_of([], NOW) == PairState(Relationship.NONE)


def test_a_renewed_link_is_active_and_of_ended_links_the_latest_end_counts() -> None:
    old, renewed = LinkSpan(NOW - 9 * DAY, NOW - 5 * DAY), LinkSpan(NOW - DAY, NOW + DAY)
    assert relationship_of([old, renewed], NOW).relationship is Relationship.ACTIVE
    later = LinkSpan(NOW - 4 * DAY, NOW - 2 * DAY)
    assert relationship_of([later, old], NOW) == PairState(Relationship.ENDED, NOW - 2 * DAY)


def test_pair_state_finds_the_links_whichever_side_is_the_patient() -> None:
    spans = {("pat", "dr"): [LinkSpan(NOW - DAY, NOW + DAY)]}
    assert pair_state(spans, "pat", "dr", NOW).relationship is Relationship.ACTIVE
    assert pair_state(spans, "dr", "pat", NOW).relationship is Relationship.ACTIVE
    assert pair_state(spans, "dr", "other", NOW).relationship is Relationship.NONE
