"""The client against a malicious relay: every identity answer is checked against the
transparency log, so a forged key, an omitted event, a device the user never linked and two
different logs shown to two people are each detected (docs/protocol.md §13)."""

from __future__ import annotations

import pytest
from client_support import client_world, engine_pair, inbox
from twisted.internet.defer import Deferred

from medrelay.clients.engine.client import Engine
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.testing import FAR_FUTURE_MS, ClientWorld, FakeDevice
from medrelay.clients.engine.views import KIND_SECURITY, MessageView, NoticeView
from medrelay.crypto.certificates import (
    ClinicKeyPurpose,
    Role,
    UserCertificate,
    issue_clinic_key_certificate,
    issue_device_certificate,
    issue_user_certificate,
)
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.transparency import CLINIC_SUBJECT, EventKind, LogEvent, issue_revocation
from medrelay.protocol.messages import DirectoryEntry

world = client_world
pair = engine_pair


def security_notices(items: list[MessageView | NoticeView]) -> list[NoticeView]:
    return [i for i in items if isinstance(i, NoticeView) and i.kind == KIND_SECURITY]


def rogue_takeover(
    world: ClientWorld, user_id: str, *, logged: bool, keep_genuine: bool = True
) -> str:
    """What a server holding the issuing key can do: certify a new identity key for the user and
    add its own device under it. Returns the rogue device id."""
    relay, rng = world.relay, world.rng
    user = relay.users[user_id]
    assert user.certificate is not None
    previous = UserCertificate.decode(user.certificate)
    identity = SigningKey.generate(rng)
    certificate = issue_user_certificate(
        world.clinic.issuing,
        user_id=user_id,
        role=previous.role,
        display_name=previous.display_name,
        identity_key=identity.verify_key,
        not_before_ms=0,
        not_after_ms=FAR_FUTURE_MS,
        serial=99,
        previous_certificate_hash=previous.hash(),
    )
    signing = SigningKey.generate(rng)
    device = issue_device_certificate(
        identity,
        user_id=user_id,
        device_id="rogue",
        signing_key=signing.verify_key,
        dh_key=DHPrivateKey.generate(rng).public_key,
        created_at_ms=relay.now_ms(),
    )
    (genuine,) = user.devices.values()
    user.certificate = certificate.encode()
    # The genuine device stays listed (and can still log in): the victim notices nothing.
    user.devices["rogue"] = FakeDevice(
        user_id, "rogue", device.encode(), signing.verify_key, genuine.signed_prekey, []
    )
    if not keep_genuine:
        del user.devices[genuine.device_id]
    if logged:
        relay.log_event(EventKind.USER_CERTIFIED, user_id, certificate.encode())
        relay.log_event(EventKind.DEVICE_ADDED, user_id, device.encode())
    return "rogue"


# --- the honest path -------------------------------------------------------------------------


def test_keys_are_used_only_after_the_log_proves_them_and_the_checkpoint_is_kept(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    assert alice.log.view() is None
    world.run(alice.send_message("bob", "hello"))
    view = alice.log.view()
    assert view is not None and view.tree_size == len(world.relay.log_leaves)
    assert [m.text for m in inbox(world, bob) if isinstance(m, MessageView)] == ["hello"]
    world.run(alice.close())
    reopened = world.open("alice")
    world.run(Deferred.fromCoroutine(reopened.log.load()))
    assert reopened.log.view() == view
    world.run(reopened.close())


def test_a_linked_device_is_ours_and_raises_no_warning(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    _, bob = pair
    world.run(bob.close())
    world.link_device("bob", "laptop")
    bob = world.open("bob")
    assert security_notices(inbox(world, bob)) == []
    assert all(d.added_by_you for d in world.run(bob.devices()))
    world.run(bob.close())


# --- a malicious relay ------------------------------------------------------------------------


def test_a_forged_key_the_log_does_not_show_is_refused(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    rogue_takeover(world, "bob", logged=False, keep_genuine=False)
    with pytest.raises(ClientError) as caught:
        world.run(alice.send_message("bob", "for bob only"))
    assert caught.value.code is LocalCode.PEER_UNVERIFIED
    assert "differ from the transparency log" in caught.value.message
    assert "rogue" in caught.value.message


def test_an_omitted_event_is_detected(world: ClientWorld, pair: tuple[Engine, Engine]) -> None:
    alice, bob = pair
    world.run(bob.close())
    world.link_device("bob", "laptop")
    world.link_device("bob", "tablet")
    world.relay.hidden_events.add(("bob", 2))  # the laptop's device_added
    with pytest.raises(ClientError) as caught:
        world.run(alice.send_message("bob", "hi"))
    assert caught.value.code is LocalCode.PEER_UNVERIFIED
    assert "missing or repeated" in caught.value.message


def test_a_device_added_to_my_account_without_me_is_a_loud_warning(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    rogue_takeover(world, "bob", logged=True)
    # Bob's own device finds out at its next sync: loudly, and it stops trusting the list.
    with pytest.raises(ClientError) as caught:
        world.run(bob.sync())
    assert caught.value.code is LocalCode.PEER_UNVERIFIED
    reasons = [n.reason for n in security_notices(world.run(bob.unread()))]
    assert len(reasons) == 2
    assert any("identity key that is not yours" in r for r in reasons)
    assert any("device rogue was added to your account" in r for r in reasons)
    # And nobody encrypts to the genuine device the log no longer vouches for.
    with pytest.raises(ClientError) as refused:
        world.run(alice.send_message("bob", "hi"))
    assert refused.value.code is LocalCode.PEER_UNVERIFIED


def test_a_device_linked_from_another_of_my_devices_is_reported_once(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    _, bob = pair
    world.run(bob.close())
    world.link_device("bob", "laptop")
    world.link_device("bob", "tablet", from_name="laptop")  # the main device did not see this
    bob = world.open("bob")
    (notice,) = security_notices(inbox(world, bob))
    assert "if you did not link it yourself" in notice.reason
    assert security_notices(inbox(world, bob)) == []  # once
    listed = {d.device_id: d.added_by_you for d in world.run(bob.devices())}
    assert sorted(listed.values()) == [False, True, True]
    world.run(bob.close())


def test_a_log_that_forks_from_the_one_seen_before_is_an_attack(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    world.run(alice.send_message("bob", "first"))
    pinned = alice.log.view()
    # The relay now shows alice a history where bob's certificate was never the real one.
    real = world.relay.log_leaves
    forked = [*real[:-1], world.relay.log_leaves[2], *real[-1:]]
    world.relay.forks["alice"] = forked
    with pytest.raises(ClientError) as caught:
        world.run(alice.sync())
    assert caught.value.code is LocalCode.LOG_CONFLICT
    assert "not consistent" in caught.value.message
    assert alice.log.view() == pinned  # the old checkpoint is kept


def test_two_people_shown_different_logs_find_out_through_their_messages(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    relay = world.relay
    world.run(alice.send_message("bob", "hello"))
    assert [m.text for m in inbox(world, bob) if isinstance(m, MessageView)] == ["hello"]
    # The relay forks: from now on alice sees one more leaf than everyone, and the real log
    # grows by another leaf in the same place. Same size, different roots.
    shown_to_alice = LogEvent(EventKind.USER_CERTIFIED, "mallory", 0, None, 1, b"fake")
    relay.forks["alice"] = [*relay.log_leaves, shown_to_alice.encode()]
    relay.log_event(EventKind.USER_CERTIFIED, "zed", b"real")
    world.run(alice.sync())
    world.run(bob.sync())
    alice_view, bob_view = alice.log.view(), bob.log.view()
    assert alice_view is not None and bob_view is not None
    assert alice_view.tree_size == bob_view.tree_size
    assert alice_view.root_hash != bob_view.root_hash
    # Bob's message carries his view; alice checks it against hers.
    world.run(bob.send_message("alice", "how are you?"))
    items = inbox(world, alice)
    assert [m.text for m in items if isinstance(m, MessageView)] == ["how are you?"]
    (notice,) = security_notices(items)
    assert "saw a different identity log" in notice.reason


# --- key rotation -----------------------------------------------------------------------------


def test_clients_follow_a_rotation_of_the_issuing_and_log_keys(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    world.run(alice.send_message("bob", "before"))
    clinic, relay = world.clinic, world.relay
    for purpose in (ClinicKeyPurpose.ISSUING, ClinicKeyPurpose.LOG):
        key = SigningKey.generate(world.rng)
        certificate = issue_clinic_key_certificate(
            clinic.root,
            clinic_id=clinic.clinic_id,
            purpose=purpose,
            key=key.verify_key,
            not_before_ms=0,
            not_after_ms=FAR_FUTURE_MS,
            serial=10,
        )
        relay.log_event(EventKind.CLINIC_KEY_CERTIFIED, CLINIC_SUBJECT, certificate.encode())
        relay.clinic_keys.append(certificate.encode())
        if purpose is ClinicKeyPurpose.ISSUING:
            clinic.issuing, clinic.issuing_certificate = key, certificate
        else:
            clinic.log_key = key
    world.enroll("carol", role=Role.NURSE)  # certified by the new issuing key
    world.run(alice.send_message("carol", "after the rotation"))
    world.run(alice.send_message("bob", "still trusted"))
    assert len(alice.log.trust.issuing) == 2 and len(alice.log.trust.log) == 2


# --- revocation -------------------------------------------------------------------------------


def revoke(world: ClientWorld, user_id: str, device_id: str = "") -> None:
    """What the server does on revocation: the log gets the clinic-signed revocation and the
    device (or the whole account) stops being listed."""
    revocation = issue_revocation(
        world.clinic.issuing, user_id=user_id, device_id=device_id, revoked_at_ms=1
    )
    kind = EventKind.DEVICE_REVOKED if device_id else EventKind.USER_REVOKED
    world.relay.log_event(kind, user_id, revocation.encode())
    user = world.relay.users[user_id]
    if device_id:
        del user.devices[device_id]
    else:
        user.devices.clear()


def test_senders_stop_encrypting_to_a_revoked_device(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    world.run(bob.close())
    laptop = world.link_device("bob", "laptop").device_id
    world.run(alice.send_message("bob", "to both devices"))
    laptop_queue = world.relay.device("bob", laptop).queue
    assert len(laptop_queue) == 1
    revoke(world, "bob", laptop)
    sent = world.run(alice.send_message("bob", "to the phone only"))
    assert sent.devices == 1
    assert len(laptop_queue) == 1  # nothing more for the revoked laptop


def test_nobody_writes_to_a_revoked_account(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    world.run(alice.send_message("bob", "before"))
    revoke(world, "bob")
    with pytest.raises(ClientError) as caught:
        world.run(alice.send_message("bob", "after"))
    assert caught.value.code is LocalCode.PEER_UNVERIFIED
    assert "revoked" in caught.value.message


# --- the directory ----------------------------------------------------------------------------


def test_directory_entries_are_shown_only_as_the_log_certifies_them(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    (bob,) = world.run(alice.search_directory("bob"))
    assert (bob.user_id, bob.role, bob.display_name) == ("bob", "doctor", "bob")
    # A server that presents someone under another name (a certificate the log never saw).
    forged = issue_user_certificate(
        world.clinic.issuing,
        user_id="bob",
        role=Role.DOCTOR,
        display_name="Chief Physician",
        identity_key=SigningKey.generate(world.rng).verify_key,
        not_before_ms=0,
        not_after_ms=FAR_FUTURE_MS,
        serial=5,
    )
    world.relay.directory_override = [DirectoryEntry("bob", forged.encode())]
    with pytest.raises(ClientError) as caught:
        world.run(alice.search_directory("bob"))
    assert caught.value.code is LocalCode.PEER_UNVERIFIED
    assert "not the certificate in the clinic's identity log" in caught.value.message


def test_a_tampered_inclusion_proof_is_refused(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    world.relay.tamper_proofs = True
    with pytest.raises(ClientError) as caught:
        world.run(alice.send_message("bob", "hi"))
    assert caught.value.code is LocalCode.PEER_UNVERIFIED
    assert "does not prove the keys of bob" in caught.value.message


def test_an_unknown_user_is_a_clear_error(world: ClientWorld, pair: tuple[Engine, Engine]) -> None:
    alice, _ = pair
    with pytest.raises(ClientError) as caught:
        world.run(alice.send_message("nobody", "hi"))
    assert caught.value.code == "unknown_user"
