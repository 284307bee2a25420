"""The engine end to end against the in-memory fake relay: sending, receiving, the outbox,
deduplication, acknowledgement after storage, stale device sets, refusals, peer verification,
failure and expiry notices, prekey top-up and attachments. No network, no threads, fake time."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from client_support import client_world, engine_pair, inbox

from medrelay.clients.engine import messaging
from medrelay.clients.engine.client import Engine
from medrelay.clients.engine.errors import ClientError, LocalCode, RemoteError
from medrelay.clients.engine.messaging import Receiver
from medrelay.clients.engine.store import STATUS_FAILED, database_path, list_messages_txn
from medrelay.clients.engine.testing import ClientWorld
from medrelay.clients.engine.views import (
    Event,
    MessageView,
    NoticeView,
    OutgoingFile,
)
from medrelay.crypto import content as content_module
from medrelay.crypto.certificates import (
    ClinicKeyPurpose,
    Role,
    UserCertificate,
    issue_clinic_key_certificate,
    issue_user_certificate,
)
from medrelay.crypto.content import Content, SignedContent, content_hash
from medrelay.crypto.identity import DeviceKeys
from medrelay.crypto.keys import SigningKey
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.messages import DeliveredItem, ItemKind, Send

world = client_world
pair = engine_pair


def texts(items: list[MessageView | NoticeView]) -> list[str]:
    return [i.text for i in items if isinstance(i, MessageView)]


def sends(world: ClientWorld, user: str) -> list[Send]:
    return [m for m in world.relay.client_frames(user) if isinstance(m, Send)]


def test_a_message_reaches_the_recipient_and_a_reply_stays_in_the_thread(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    sent = world.run(alice.send_message("bob", "blood test results are fine"))
    assert sent.recipient == "bob" and sent.devices == 1
    (received,) = inbox(world, bob)
    assert isinstance(received, MessageView)
    assert received.text == "blood test results are fine"
    assert (received.sender_user, received.peer_user, received.outgoing) == (
        "alice",
        "alice",
        False,
    )
    assert received.message_id == sent.message_id

    world.run(bob.send_message("alice", "thank you"))
    (reply,) = inbox(world, alice)
    assert isinstance(reply, MessageView)
    assert reply.thread_id == received.thread_id


def test_previous_hash_chains_our_messages_in_a_thread(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    world.run(alice.send_message("bob", "first"))
    world.run(alice.send_message("bob", "second"))
    world.run(bob.sync())
    stored = world.run(bob.history())
    assert [m.text for m in stored] == ["first", "second"]
    rows = world.run(
        bob.profile.db.run_interaction(
            "all", list_messages_txn, bob.profile.sealer, unread_only=False
        )
    )
    first, second = (SignedContent.decode(m.signed_content).content for m in rows)
    assert first.previous_hash is None
    assert second.previous_hash == content_hash(first)


def test_a_lost_confirmation_is_resent_with_identical_envelopes_and_stored_once(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    """The relay stores the send but the connection breaks before `sent`: the outbox resends
    the same message id and envelopes after reconnecting, and the recipient sees one message."""
    alice, bob = pair
    world.run(alice.connect())
    world.relay.drop_after_send = True
    sent = world.run(alice.send_message("bob", "are you on call tonight?"))
    frames = sends(world, "alice")
    assert len(frames) == 2
    assert frames[0].message_id == frames[1].message_id == sent.message_id
    assert frames[0].envelopes == frames[1].envelopes
    assert texts(inbox(world, bob)) == ["are you on call tonight?"]
    assert world.relay.dials >= 2


def test_an_outbox_entry_survives_closing_the_engine_and_goes_out_on_the_next_run(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    """The send frame is lost with the connection and the relay stays down: the message waits
    in the profile's outbox, across a restart, until the next connection sends it."""
    alice, bob = pair
    world.run(alice.connect())
    world.relay.lose_sends = True
    d = alice.send_message("bob", "queued while offline")
    for _ in range(20):
        world.relay.pump()
        world.clock.advance(1)
    assert not d.called
    failures: list[object] = []
    d.addErrback(failures.append)
    world.run(alice.close())
    assert len(failures) == 1
    world.relay.down = False
    world.relay.lose_sends = False
    again = world.open("alice")
    world.run(again.sync())
    assert texts(inbox(world, bob)) == ["queued while offline"]
    world.run(again.close())


def test_a_redelivered_item_is_stored_once_and_acknowledged_again(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    """At-least-once delivery: the same item delivered on a new connection (its ack lost) is
    deduplicated by (sender, message id) and acknowledged."""
    alice, bob = pair
    world.run(alice.send_message("bob", "once"))
    device = world.relay.only_device("bob")
    (item,) = device.queue
    world.run(bob.sync())
    assert item.seq in device.acked
    device.queue.append(item)  # the relay lost the ack and delivers again
    world.relay.drop()
    world.run(bob.sync())
    assert device.acked.count(item.seq) == 2
    assert len(world.run(bob.history())) == 1


def test_an_item_is_acknowledged_only_after_it_is_stored(
    world: ClientWorld, pair: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = pair
    world.run(alice.send_message("bob", "store me first"))
    device = world.relay.only_device("bob")
    (item,) = device.queue

    def busy(*args: object, **kwargs: object) -> None:
        raise ClientError(LocalCode.PROFILE_LOCKED, "busy")

    monkeypatch.setattr(Receiver, "_receive_txn", busy)
    world.run(bob.connect())
    world.relay.pump()
    assert item.seq not in device.acked
    assert world.run(bob.history()) == []
    monkeypatch.undo()
    world.run(bob.sync())  # the connection was dropped; the relay delivers again
    assert item.seq in device.acked
    assert texts(world.run(bob.unread())) == ["store me first"]


def test_stale_devices_refreshes_and_reencrypts_under_the_same_message_id(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    world.run(alice.send_message("bob", "hello"))  # alice now caches bob's single device
    world.link_device("bob", "tablet")
    sent = world.run(alice.send_message("bob", "to both of your devices"))
    assert sent.devices == 2
    frames = sends(world, "alice")
    assert frames[-1].message_id == frames[-2].message_id == sent.message_id
    assert len(frames[-2].envelopes) == 1 and len(frames[-1].envelopes) == 2
    # the envelope for the device that was already current is kept as it was
    assert frames[-2].envelopes[0] in frames[-1].envelopes
    tablet = world.open("bob", "tablet")
    assert texts(inbox(world, tablet)) == ["to both of your devices"]
    assert texts(inbox(world, bob)) == ["hello", "to both of your devices"]
    world.run(tablet.close())


def test_our_other_devices_receive_a_copy_of_what_we_send(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    world.link_device("alice", "laptop")
    world.run(alice.send_message("bob", "copied to my laptop"))
    laptop = world.open("alice", "laptop")
    (copy,) = inbox(world, laptop)
    assert isinstance(copy, MessageView)
    assert copy.outgoing and copy.peer_user == "bob" and copy.text == "copied to my laptop"
    # the laptop's reply continues the same thread and chains to alice's content
    world.run(laptop.send_message("bob", "from the laptop"))
    first, second = [m for m in inbox(world, bob) if isinstance(m, MessageView)]
    assert first.thread_id == second.thread_id
    world.run(laptop.close())


@pytest.mark.parametrize("code", [ErrorCode.FORBIDDEN, ErrorCode.QUEUE_FULL, ErrorCode.ID_CONFLICT])
def test_a_refused_send_fails_clearly_and_is_marked_failed(
    world: ClientWorld, pair: tuple[Engine, Engine], code: ErrorCode
) -> None:
    alice, _ = pair
    world.run(alice.connect())
    world.relay.refuse_next_send = code
    with pytest.raises(RemoteError) as caught:
        world.run(alice.send_message("bob", "refused"))
    assert caught.value.code is code
    (stored,) = world.run(alice.history())
    assert stored.status == STATUS_FAILED
    # nothing stays in the outbox to be resent later
    world.run(alice.sync())
    assert len(sends(world, "alice")) == 1


def test_sending_to_an_unknown_user_fails_with_unknown_user(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    with pytest.raises(RemoteError) as caught:
        world.run(alice.send_message("mallory", "hi"))
    assert caught.value.code is ErrorCode.UNKNOWN_USER


def test_sending_to_oneself_or_an_invalid_name_is_refused_locally(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    for user in ("alice", "bad\x00name", ""):
        with pytest.raises(ClientError) as caught:
            world.run(alice.send_message(user, "hi"))
        assert caught.value.code is LocalCode.INVALID_ARGUMENT


def _forge_user_certificate(world: ClientWorld, user: str, *, rogue_root: bool) -> bytes:
    """A certificate for `user` on a key the clinic never certified (or via a rogue issuer)."""
    rogue = SigningKey.generate(world.rng)
    fake_identity = SigningKey.generate(world.rng)
    issuer = rogue if rogue_root else world.clinic.issuing
    cert: UserCertificate = issue_user_certificate(
        issuer,
        user_id=user,
        role=Role.DOCTOR,
        display_name=user,
        identity_key=fake_identity.verify_key,
        not_before_ms=0,
        not_after_ms=4_102_444_800_000,
        serial=99,
    )
    return cert.encode()


@pytest.mark.parametrize("rogue_root", [True, False])
def test_a_peer_whose_certificates_do_not_verify_is_refused_before_any_key_is_used(
    world: ClientWorld, pair: tuple[Engine, Engine], rogue_root: bool
) -> None:
    """A relay that swaps bob's user certificate (signed by a rogue issuer, or certifying
    another identity key than the one his device certificate names) cannot get alice to
    encrypt to it: nothing is sent."""
    alice, _ = pair
    world.relay.users["bob"].certificate = _forge_user_certificate(
        world, "bob", rogue_root=rogue_root
    )
    with pytest.raises(ClientError) as caught:
        world.run(alice.send_message("bob", "secret"))
    assert caught.value.code is LocalCode.PEER_UNVERIFIED
    assert sends(world, "alice") == []
    assert world.run(alice.history()) == []


def test_an_issuing_certificate_not_signed_by_the_pinned_root_is_refused(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    rogue_root = SigningKey.generate(world.rng)
    alice_info = alice.profile.info
    forged = issue_clinic_key_certificate(
        rogue_root,
        clinic_id="clinic.test",
        purpose=ClinicKeyPurpose.ISSUING,
        key=world.clinic.issuing.verify_key,
        not_before_ms=0,
        not_after_ms=4_102_444_800_000,
        serial=7,
    )
    object.__setattr__(
        alice.profile, "info", dataclasses.replace(alice_info, issuing_certificate=forged)
    )
    with pytest.raises(ClientError) as caught:
        world.run(alice.send_message("bob", "secret"))
    assert caught.value.code is LocalCode.PEER_UNVERIFIED


def test_an_undecryptable_item_is_recorded_as_a_failure_and_acknowledged(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    world.run(alice.send_message("bob", "real"))
    device = world.relay.only_device("bob")
    (real,) = device.queue
    garbage = DeliveredItem(
        seq=world.relay._seq(),
        kind=ItemKind.MESSAGE,
        message_id=b"\x01" * 16,
        time_ms=real.time_ms,
        user="alice",
        device=real.device,
        ciphertext=b"\x02" + b"\x00" * 40,
    )
    device.queue.append(garbage)
    events: list[Event] = []
    bob.subscribe(events.append)
    items = inbox(world, bob)
    assert texts(items) == ["real"]
    (notice,) = [i for i in items if isinstance(i, NoticeView)]
    assert notice.kind == "failed" and notice.user_id == "alice"
    assert "cannot decrypt" in notice.reason
    assert garbage.seq in device.acked
    assert any(isinstance(e, NoticeView) for e in events)
    assert len(world.run(bob.history())) == 1


def test_an_item_from_an_uncertified_device_is_a_failure_not_a_message(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    _, bob = pair
    device = world.relay.only_device("bob")
    device.queue.append(
        DeliveredItem(
            seq=world.relay._seq(),
            kind=ItemKind.MESSAGE,
            message_id=b"\x03" * 16,
            time_ms=1,
            user="alice",
            device="ghost",
            ciphertext=b"\x02" + b"\x00" * 40,
        )
    )
    (notice,) = inbox(world, bob)
    assert isinstance(notice, NoticeView)
    assert "could not be verified" in notice.reason


def test_an_expiry_notice_is_recorded_and_shown_once(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    sent = world.run(alice.send_message("bob", "never fetched"))
    alice_device = world.relay.only_device("alice")
    world.relay.expire(("alice", alice_device.device_id), sent.message_id, ("bob", "phone"))
    (notice,) = inbox(world, alice)
    assert isinstance(notice, NoticeView)
    assert (notice.kind, notice.message_id, notice.user_id) == ("expired", sent.message_id, "bob")
    assert inbox(world, alice) == []


def test_prekeys_low_is_answered_with_fresh_one_time_prekeys_that_work(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    device = world.relay.only_device("bob")
    device.one_time_prekeys = device.one_time_prekeys[:3]
    world.run(bob.sync())
    assert len(device.one_time_prekeys) == 100
    # a new session consumes one of the uploaded prekeys, which bob holds privately
    device.one_time_prekeys = device.one_time_prekeys[3:]
    world.run(alice.send_message("bob", "uses a new prekey"))
    assert texts(inbox(world, bob)) == ["uses a new prekey"]


def test_an_attachment_travels_encrypted_and_is_checked_on_download(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    report = b"%PDF-1.7 discharge summary" * 100
    sent = world.run(
        alice.send_message(
            "bob", "the report", [OutgoingFile("report.pdf", "application/pdf", report)]
        )
    )
    ((blob_id, blob),) = world.relay.blobs.items()
    assert report not in blob
    (received,) = inbox(world, bob)
    assert isinstance(received, MessageView)
    assert [(a.file_name, a.size) for a in received.attachments] == [("report.pdf", len(report))]
    (saved,) = world.run(bob.attachments(sent.message_id))
    assert saved.data == report and saved.file_name == "report.pdf"
    world.relay.blobs[blob_id] = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(ClientError) as caught:
        world.run(bob.attachments(sent.message_id))
    assert caught.value.code is LocalCode.ATTACHMENT_INVALID


def test_message_text_and_keys_are_not_stored_in_clear(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    secret = "HIV test positive, call me"
    world.run(alice.send_message("bob", secret))
    world.run(bob.sync())
    for engine in (alice, bob):
        raw = database_path(engine.profile.path).read_bytes()
        wal = Path(f"{database_path(engine.profile.path)}-wal")
        if wal.exists():
            raw += wal.read_bytes()
        assert secret.encode() not in raw
        assert engine.profile.secrets.identity_key.seed not in raw
        assert engine.profile.secrets.device.signing_key.seed not in raw
        assert engine.profile.secrets.device.dh_key.raw not in raw


def test_a_refused_token_falls_back_to_auth_on_a_new_connection(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    world.run(alice.connect())
    world.relay.drop()
    world.relay.invalidate_tokens = True
    world.run(alice.connect())
    kinds = [m.TYPE for m in world.relay.client_frames("alice") if m.TYPE in ("auth", "resume")]
    assert kinds == ["auth", "resume", "auth"]


def test_safety_numbers_agree_and_devices_mark_this_one(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, bob = pair
    number = world.run(alice.safety_number("bob"))
    assert number == world.run(bob.safety_number("alice"))
    assert len(number) == 60 and number.isdigit()
    world.link_device("alice", "laptop")
    listed = world.run(alice.devices())
    assert len(listed) == 2
    assert [d.device_id for d in listed if d.this_device] == [alice.device_id]


def test_a_server_that_is_down_fails_fast_for_one_shot_commands(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    world.relay.down = True
    with pytest.raises(ClientError) as caught:
        world.run(alice.send_message("bob", "hello"))
    assert caught.value.code is LocalCode.SERVER_UNREACHABLE


def test_the_raw_database_keeps_plain_metadata_for_routing_only(
    world: ClientWorld, pair: tuple[Engine, Engine]
) -> None:
    alice, _ = pair
    conn = sqlite3.connect(database_path(alice.profile.path))
    names = {row[0] for row in conn.execute("SELECT name FROM secrets")}
    conn.close()
    assert names == {"identity_key", "device_signing_key", "device_dh_key", "prekeys"}


def test_content_signed_for_other_recipients_is_refused_as_forwarded(
    world: ClientWorld, pair: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Surreptitious forwarding: a message alice signed for carol, re-encrypted to bob, is a
    failure on bob's side, not a message."""
    alice, bob = pair
    real_sign = content_module.sign_content

    def sign_for_carol(content: Content, device: DeviceKeys) -> SignedContent:
        return real_sign(dataclasses.replace(content, recipients=("carol",)), device)

    monkeypatch.setattr(messaging, "sign_content", sign_for_carol)
    world.run(alice.send_message("bob", "meant for carol"))
    monkeypatch.undo()
    (notice,) = inbox(world, bob)
    assert isinstance(notice, NoticeView)
    assert "other recipients" in notice.reason
    assert world.run(bob.history()) == []


def test_content_whose_signature_does_not_verify_is_a_failure(
    world: ClientWorld, pair: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = pair
    real_sign = content_module.sign_content

    def sign_badly(content: Content, device: DeviceKeys) -> SignedContent:
        signed = real_sign(content, device)
        return SignedContent(
            signed.content, bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
        )

    monkeypatch.setattr(messaging, "sign_content", sign_badly)
    world.run(alice.send_message("bob", "tampered"))
    monkeypatch.undo()
    (notice,) = inbox(world, bob)
    assert isinstance(notice, NoticeView)
    assert "signature" in notice.reason
