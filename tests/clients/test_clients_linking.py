"""Linking a device for real (clients/engine/linking.py) against the fake relay: both screens show
the same digits, the new device becomes a full device (it receives, sends, and can link further
devices) and both count each other as their own; a no on either side, a relay in the middle, a
broken commitment or a tampered payload leave nothing added; codes that are unknown, expired or
malformed fail with one clear error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from medrelay.clients.engine.client import Engine
from medrelay.clients.engine.enrollment import b64url
from medrelay.clients.engine.errors import ClientError, LocalCode, RemoteError
from medrelay.clients.engine.linking import LinkCheck, LinkCode, LinkResult, join_link
from medrelay.clients.engine.store import ProfileInfo, inline_runner, profile_exists
from medrelay.clients.engine.testing import (
    TEST_PASSPHRASE,
    TEST_SERVER_URL,
    ClientWorld,
    FakeLinkSession,
    LinkOutcome,
    ScriptedLinkUi,
)
from medrelay.clients.engine.views import KIND_SECURITY, MessageView, NoticeView
from medrelay.crypto.keys import DHPrivateKey
from medrelay.crypto.linking import normalize_link_code
from medrelay.protocol.errors import ErrorCode


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ClientWorld]:
    w = ClientWorld(tmp_path)
    w.enroll("alice")
    w.enroll("bob")
    yield w


def inbox(world: ClientWorld, engine: Engine) -> list[MessageView | NoticeView]:
    world.run(engine.sync())
    return world.run(engine.unread())


def texts(items: list[MessageView | NoticeView]) -> list[str]:
    return [i.text for i in items if isinstance(i, MessageView)]


def warnings(items: list[MessageView | NoticeView]) -> list[str]:
    return [i.reason for i in items if isinstance(i, NoticeView) and i.kind == KIND_SECURITY]


def linked(outcome: LinkOutcome) -> tuple[LinkResult, ProfileInfo]:
    assert isinstance(outcome.existing, LinkResult), outcome.existing
    assert isinstance(outcome.new, ProfileInfo), outcome.new
    return outcome.existing, outcome.new


def refused(outcome: object, code: LocalCode | ErrorCode = LocalCode.LINK_REFUSED) -> str:
    assert isinstance(outcome, ClientError), outcome
    assert outcome.code is code, outcome
    return outcome.message


def assert_nothing_added(world: ClientWorld, user: str, name: str, leaves: int) -> None:
    assert list(world.relay.users[user].devices) == [world.relay.only_device(user).device_id]
    assert len(world.relay.log_leaves) == leaves
    assert not profile_exists(world.profile_dir(user, name))


class Person:
    """The user holding both devices: answers only once both screens show digits, and yes only
    when they are the same."""

    def __init__(self) -> None:
        self.shown: dict[str, str] = {}
        self.waiting: list[Deferred[bool]] = []

    def screen(self, side: str) -> ScriptedLinkUi:
        person = self

        class Screen(ScriptedLinkUi):
            def confirm(self, check: LinkCheck) -> Deferred[bool]:
                self.checks.append(check)
                person.shown[side] = check.sas
                d: Deferred[bool] = Deferred()
                person.waiting.append(d)
                if len(person.shown) == 2:
                    same = len(set(person.shown.values())) == 1
                    for waiter in person.waiting:
                        waiter.callback(same)
                return d

        return Screen()


# --- a working link -----------------------------------------------------------------------------


def test_both_screens_agree_and_the_new_device_is_a_full_device(world: ClientWorld) -> None:
    outcome = world.link("alice", "laptop")
    result, info = linked(outcome)
    (on_existing,) = outcome.existing_ui.checks
    (on_new,) = outcome.new_ui.checks
    assert on_existing == on_new
    assert on_existing.device_id == result.device_id == info.device_id
    assert (on_existing.username, result.sas) == ("alice", on_existing.sas)
    (code,) = outcome.existing_ui.codes
    assert code.command == f"medrelay link {TEST_SERVER_URL} {code.code}"
    assert outcome.new_ui.statuses[0] == "joined the link of alice; waiting for the existing device"
    assert len(world.relay.users["alice"].devices) == 2

    main, laptop, bob = world.open("alice"), world.open("alice", "laptop"), world.open("bob")
    # Both count both devices as their own: no warning anywhere.
    for engine in (main, laptop):
        assert all(d.added_by_you for d in world.run(engine.devices()))
        assert warnings(inbox(world, engine)) == []
    world.run(bob.send_message("alice", "results are in"))
    assert texts(inbox(world, laptop)) == ["results are in"]
    assert texts(inbox(world, main)) == ["results are in"]
    world.run(laptop.send_message("bob", "thanks, from my laptop"))
    assert texts(inbox(world, bob)) == ["thanks, from my laptop"]
    assert texts(inbox(world, main)) == ["thanks, from my laptop"]  # our own copy
    # The same identity key: one safety number for the account, whichever device asks.
    assert world.run(laptop.safety_number("bob")) == world.run(main.safety_number("bob"))
    for engine in (main, laptop, bob):
        world.run(engine.close())


def test_a_linked_device_can_link_a_further_device(world: ClientWorld) -> None:
    linked(world.link("alice", "laptop"))
    linked(world.link("alice", "tablet", from_name="laptop"))
    tablet = world.open("alice", "tablet")
    listed = world.run(tablet.devices())
    assert len(listed) == 3 and all(d.added_by_you for d in listed)
    world.run(tablet.close())


def test_a_token_the_relay_forgot_is_replaced_by_a_new_login(world: ClientWorld) -> None:
    main = world.open("alice")
    world.run(main.connect())  # a token is stored
    world.run(main.close())
    world.relay.tokens.clear()
    linked(world.link("alice", "laptop"))


# --- refusals leave nothing added ---------------------------------------------------------------


def test_a_no_on_the_existing_device_adds_nothing(world: ClientWorld) -> None:
    leaves = len(world.relay.log_leaves)
    outcome = world.link("alice", "laptop", existing_ui=ScriptedLinkUi(answer=False))
    assert "refused on this device" in refused(outcome.existing)
    assert "cancelled on the other device" in refused(outcome.new)
    assert_nothing_added(world, "alice", "laptop", leaves)


def test_a_no_on_the_new_device_adds_nothing(world: ClientWorld) -> None:
    leaves = len(world.relay.log_leaves)
    outcome = world.link("alice", "laptop", new_ui=ScriptedLinkUi(answer=False))
    assert "refused on this device" in refused(outcome.new)
    assert "cancelled on the other device" in refused(outcome.existing)
    assert_nothing_added(world, "alice", "laptop", leaves)
    main = world.open("alice")
    assert len(world.run(main.devices())) == 1
    world.run(main.close())


def test_a_relay_in_the_middle_shows_two_different_numbers_and_a_no_adds_nothing(
    world: ClientWorld,
) -> None:
    """The relay swaps both ephemeral keys (committing to its own towards the new device): each
    side's digits come from a key agreement with the relay, so the screens differ, and the user
    who compares them answers no."""
    world.relay.link_mitm = True
    leaves = len(world.relay.log_leaves)
    person = Person()
    outcome = world.link(
        "alice", "laptop", existing_ui=person.screen("existing"), new_ui=person.screen("new")
    )
    (on_existing,) = outcome.existing_ui.checks
    (on_new,) = outcome.new_ui.checks
    assert on_existing.sas != on_new.sas
    assert "refused on this device" in refused(outcome.existing)
    assert "refused on this device" in refused(outcome.new)
    assert_nothing_added(world, "alice", "laptop", leaves)


def test_the_person_comparing_both_screens_says_yes_to_an_honest_relay(
    world: ClientWorld,
) -> None:
    person = Person()
    linked(
        world.link(
            "alice", "laptop", existing_ui=person.screen("existing"), new_ui=person.screen("new")
        )
    )


def test_a_key_that_breaks_the_commitment_is_a_security_warning(world: ClientWorld) -> None:
    """A relay that shows the new device another key than the one the existing device committed
    to is caught before any digits are shown."""
    leaves = len(world.relay.log_leaves)

    def swap_key(code: LinkCode) -> None:
        session: FakeLinkSession = world.relay.link_sessions[normalize_link_code(code.code)]
        session.shown_to_new = DHPrivateKey.generate(world.rng)

    outcome = world.link("alice", "laptop", existing_ui=ScriptedLinkUi(on_code=swap_key))
    message = refused(outcome.new, LocalCode.PEER_UNVERIFIED)
    assert message.startswith("SECURITY WARNING") and "commitment" in message
    assert outcome.new_ui.checks == []
    refused(outcome.existing)
    assert_nothing_added(world, "alice", "laptop", leaves)


def test_a_tampered_payload_is_refused_by_the_new_device(
    world: ClientWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = world.relay
    original = relay._complete_link

    def tamper(session: FakeLinkSession, body: dict[str, object]) -> tuple[int, object]:
        answer = original(session, body)
        session.payload = b64url(bytes(200))
        return answer

    monkeypatch.setattr(relay, "_complete_link", tamper)
    outcome = world.link("alice", "laptop")
    assert isinstance(outcome.existing, LinkResult)
    message = refused(outcome.new, LocalCode.PEER_UNVERIFIED)
    assert "do not decrypt" in message and "revoke it" in message
    assert not profile_exists(world.profile_dir("alice", "laptop"))


# --- codes --------------------------------------------------------------------------------------


def join(world: ClientWorld, code: str, name: str = "laptop") -> ProfileInfo:
    return world.run(
        join_link(
            profile_dir=world.profile_dir("alice", name),
            passphrase=TEST_PASSPHRASE,
            server_url=TEST_SERVER_URL,
            code=code,
            http=world.relay.http,
            clock=world.clock,
            rng=world.rng,
            runner=inline_runner,
            ui=ScriptedLinkUi(),
            seal_params=world.seal_params,
        )
    )


def test_an_unknown_code_is_a_clear_error(world: ClientWorld) -> None:
    with pytest.raises(RemoteError) as caught:
        join(world, "0000-0000")
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert not profile_exists(world.profile_dir("alice", "laptop"))


def test_an_expired_link_fails_on_both_sides(world: ClientWorld) -> None:
    world.relay.link_ttl_ms = 0
    outcome = world.link("alice", "laptop")
    refused(outcome.existing, ErrorCode.NOT_FOUND)
    refused(outcome.new, ErrorCode.NOT_FOUND)


def test_a_malformed_code_never_reaches_the_relay(world: ClientWorld) -> None:
    before = len(world.relay.http.requests)
    with pytest.raises(ClientError) as caught:
        join(world, "7K2M-Q9")
    assert caught.value.code is LocalCode.INVALID_ARGUMENT
    assert "8 characters" in caught.value.message
    assert len(world.relay.http.requests) == before


def test_an_existing_profile_is_refused_before_the_code_is_used(world: ClientWorld) -> None:
    codes: list[LinkCode] = []
    ui = ScriptedLinkUi(on_code=codes.append)
    main = world.open("alice")
    pending = main.link_device(ui)
    while not codes:
        world.relay.pump()
        world.clock.advance(0.1)
    with pytest.raises(ClientError) as caught:
        join(world, codes[0].code, name="main")  # alice's existing profile
    assert caught.value.code is LocalCode.ALREADY_ENROLLED
    session = world.relay.link_sessions[normalize_link_code(codes[0].code)]
    assert session.state == "waiting"
    linked_info = join(world, codes[0].code)  # the code still works
    result = world.run(pending)
    assert result.device_id == linked_info.device_id
    world.run(main.close())


def test_an_unreachable_relay_is_a_clear_error(world: ClientWorld) -> None:
    world.relay.down = True
    with pytest.raises(ClientError) as caught:
        join(world, "7K2M-Q9XW")
    assert caught.value.code is LocalCode.SERVER_UNREACHABLE
