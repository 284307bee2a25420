"""Signed content: the canonical encoding, the sender signature over it, and verification against
the sender's verified device identity."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medrelay.crypto.attachments import AttachmentDescriptor
from medrelay.crypto.certificates import (
    Role,
    issue_device_certificate,
    issue_user_certificate,
    verify_device,
)
from medrelay.crypto.content import (
    KIND_TEXT,
    MAX_SIGNED_CONTENT_BYTES,
    MAX_TEXT_BYTES,
    SIGNATURE_CONTEXT,
    Content,
    LogView,
    SignedContent,
    canonical_recipients,
    content_hash,
    new_message_id,
    new_thread_id,
    sign_content,
    verify_signed_content,
)
from medrelay.crypto.errors import BadSignature, CryptoError, MalformedEncoding
from medrelay.crypto.identity import DeviceIdentity, DeviceKeys
from medrelay.crypto.kdf import sha256, sha512
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.rng import Rng, seeded_rng

T0 = 1_800_000_000_000


def make_device(rng: Rng, user_id: str, device_id: str) -> DeviceKeys:
    """A device whose identity comes out of a real certificate chain."""
    issuing, identity = SigningKey.generate(rng), SigningKey.generate(rng)
    signing, dh = SigningKey.generate(rng), DHPrivateKey.generate(rng)
    user_cert = issue_user_certificate(
        issuing,
        user_id=user_id,
        role=Role.DOCTOR,
        display_name=user_id,
        identity_key=identity.verify_key,
        not_before_ms=T0,
        not_after_ms=T0 + 1,
        serial=1,
    )
    device_cert = issue_device_certificate(
        identity,
        user_id=user_id,
        device_id=device_id,
        signing_key=signing.verify_key,
        dh_key=dh.public_key,
        created_at_ms=T0,
    )
    return DeviceKeys(verify_device(user_cert, device_cert), signing, dh)


def make_attachment(rng: Rng, name: str = "ecg.pdf") -> AttachmentDescriptor:
    return AttachmentDescriptor(
        blob_id="blob-" + rng(8).hex(),
        key=rng(32),
        header=rng(24),
        size=123_456,
        media_type="application/pdf",
        file_name=name,
        plaintext_sha256=rng(32),
        ciphertext_sha256=rng(32),
    )


@dataclass(frozen=True)
class Setup:
    doctor: DeviceKeys
    doctor_phone: DeviceKeys
    patient: DeviceKeys
    content: Content
    signed: SignedContent


def make_content(device: DeviceKeys, rng: Rng, **changes: object) -> Content:
    identity = device.identity
    content = Content(
        thread_id=new_thread_id(rng),
        message_id=new_message_id(rng),
        sender_user_id=identity.user_id,
        sender_device_id=identity.device_id,
        sender_certificate_hash=identity.certificate_hash,
        recipients=canonical_recipients(["patient.42", identity.user_id]),
        sent_at_ms=T0 + 5_000,
        previous_hash=None,
        log_view=LogView(1234, rng(32)),
        kind=KIND_TEXT,
        text="Результаты анализов в норме; продолжайте приём как назначено.",
        attachments=(make_attachment(rng),),
        reply_to=rng(16),
    )
    return dataclasses.replace(content, **changes)  # type: ignore[arg-type]


def build_setup(rng: Rng) -> Setup:
    doctor = make_device(rng, "dr.ivanova", "laptop")
    doctor_phone = make_device(rng, "dr.ivanova", "phone")
    patient = make_device(rng, "patient.42", "phone")
    content = make_content(doctor, rng)
    return Setup(doctor, doctor_phone, patient, content, sign_content(content, doctor))


@pytest.fixture
def setup(rng: Rng) -> Setup:
    return build_setup(rng)


# --- signing and verifying ------------------------------------------------------------------


def test_signed_content_round_trips_through_bytes_and_verifies(setup: Setup) -> None:
    data = setup.signed.encode()
    decoded = SignedContent.decode(data)
    assert decoded == setup.signed
    assert decoded.encode() == data
    assert verify_signed_content(decoded, setup.doctor.identity) == setup.content


def test_wire_form_is_canonical_content_followed_by_the_64_byte_signature(setup: Setup) -> None:
    data = setup.signed.encode()
    assert data == setup.content.encode() + setup.signed.signature
    assert len(setup.signed.signature) == 64


def test_signature_is_ed25519_over_the_context_and_sha512_of_the_canonical_content(
    setup: Setup,
) -> None:
    expected_input = b"MEDRELAY/v1/msg\x00" + sha512(setup.content.encode())
    assert SIGNATURE_CONTEXT + sha512(setup.content.encode()) == expected_input
    setup.doctor.identity.signing_key.verify(expected_input, setup.signed.signature)
    with pytest.raises(BadSignature):
        setup.doctor.identity.signing_key.verify(setup.content.encode(), setup.signed.signature)


def test_signing_is_deterministic_so_every_recipient_gets_identical_bytes(setup: Setup) -> None:
    again = sign_content(setup.content, setup.doctor)
    assert again.encode() == setup.signed.encode()


@pytest.mark.parametrize(
    "field",
    [
        "recipients",
        "thread_id",
        "message_id",
        "text",
        "kind",
        "attachments",
        "sent_at_ms",
        "previous_hash",
        "log_view",
        "reply_to",
    ],
)
def test_changing_any_signed_field_fails_verification(setup: Setup, rng: Rng, field: str) -> None:
    """Re-addressing, moving to another thread, editing the body or swapping an attachment keeps
    the old signature, which no longer verifies."""
    replacement: object = {
        "recipients": canonical_recipients(["dr.ivanova", "patient.43"]),
        "thread_id": new_thread_id(rng),
        "message_id": new_message_id(rng),
        "text": setup.content.text + ".",
        "kind": "notice",
        "attachments": (make_attachment(rng, "other.pdf"),),
        "sent_at_ms": setup.content.sent_at_ms + 1,
        "previous_hash": rng(32),
        "log_view": LogView(1235, setup.content.log_view.root_hash),  # type: ignore[union-attr]
        "reply_to": None,
    }[field]
    changed = dataclasses.replace(setup.content, **{field: replacement})  # type: ignore[arg-type]
    forged = SignedContent(changed, setup.signed.signature)
    with pytest.raises(BadSignature):
        verify_signed_content(forged, setup.doctor.identity)


def test_one_changed_attachment_byte_fails_verification(setup: Setup) -> None:
    attachment = setup.content.attachments[0]
    changed_key = bytes([attachment.key[0] ^ 1]) + attachment.key[1:]
    changed = dataclasses.replace(
        setup.content, attachments=(dataclasses.replace(attachment, key=changed_key),)
    )
    with pytest.raises(BadSignature):
        verify_signed_content(SignedContent(changed, setup.signed.signature), setup.doctor.identity)


def test_another_devices_identity_fails_verification(setup: Setup) -> None:
    """The same user's other device, and another user's device, are both refused."""
    for other in (setup.doctor_phone.identity, setup.patient.identity):
        with pytest.raises(BadSignature):
            verify_signed_content(setup.signed, other)


def test_same_device_names_with_a_different_certificate_hash_fail_verification(
    setup: Setup,
) -> None:
    """A signature is bound to one device certificate, not just to a device name."""
    other_certificate = dataclasses.replace(setup.doctor.identity, certificate_hash=bytes(32))
    with pytest.raises(BadSignature):
        verify_signed_content(setup.signed, other_certificate)


def test_matching_names_but_another_signing_key_fail_verification(setup: Setup, rng: Rng) -> None:
    impostor = DeviceIdentity(
        user_id="dr.ivanova",
        device_id="laptop",
        signing_key=SigningKey.generate(rng).verify_key,
        dh_key=setup.doctor.identity.dh_key,
        certificate_hash=setup.doctor.identity.certificate_hash,
    )
    with pytest.raises(BadSignature):
        verify_signed_content(setup.signed, impostor)


def test_a_signature_by_another_device_over_the_same_content_fails(setup: Setup) -> None:
    """Another device signing content that names the doctor's laptop as its sender."""
    signature = setup.patient.signing_key.sign(SIGNATURE_CONTEXT + sha512(setup.content.encode()))
    stolen_names = SignedContent(setup.content, signature)
    with pytest.raises(BadSignature):
        verify_signed_content(stolen_names, setup.doctor.identity)


def test_a_device_refuses_to_sign_content_naming_another_sender(setup: Setup) -> None:
    with pytest.raises(ValueError, match="sender"):
        sign_content(setup.content, setup.doctor_phone)
    with pytest.raises(ValueError, match="sender"):
        sign_content(
            dataclasses.replace(setup.content, sender_certificate_hash=bytes(32)), setup.doctor
        )


def test_repr_shows_neither_the_body_nor_attachment_keys(setup: Setup) -> None:
    """Message text is health data and attachment keys are secrets: no log line may carry them."""
    attachment = setup.content.attachments[0]
    for shown in (repr(setup.content), repr(setup.signed), str(setup.signed)):
        assert "анализов" not in shown
        assert attachment.key.hex() not in shown
        assert repr(attachment.key) not in shown
        assert "dr.ivanova" in shown


def test_receiver_checks_it_is_addressed(setup: Setup) -> None:
    assert setup.content.is_addressed_to("patient.42")
    assert setup.content.is_addressed_to("dr.ivanova")
    assert not setup.content.is_addressed_to("patient.43")


def test_previous_hash_chains_a_senders_messages_with_content_hash(setup: Setup, rng: Rng) -> None:
    assert content_hash(setup.content) == sha256(setup.content.encode())
    second = make_content(
        setup.doctor,
        rng,
        thread_id=setup.content.thread_id,
        previous_hash=content_hash(setup.content),
    )
    assert second.previous_hash == content_hash(setup.content)
    assert content_hash(second) != content_hash(setup.content)


def test_message_and_thread_ids_are_16_fresh_bytes_from_the_given_rng() -> None:
    first, second = seeded_rng(b"ids"), seeded_rng(b"ids")
    ids = [new_message_id(first), new_thread_id(first)]
    assert ids == [new_message_id(second), new_thread_id(second)]
    assert all(len(i) == 16 for i in ids)
    assert ids[0] != ids[1]
    with pytest.raises(ValueError):
        new_message_id(lambda n: bytes(n - 1))


# --- canonical encoding ---------------------------------------------------------------------


def test_minimal_content_encodes_to_the_documented_layout() -> None:
    content = Content(
        thread_id=bytes(range(16)),
        message_id=bytes(range(16, 32)),
        sender_user_id="a",
        sender_device_id="d",
        sender_certificate_hash=b"\xcc" * 32,
        recipients=("b", "c"),
        sent_at_ms=7,
        previous_hash=None,
        log_view=None,
        kind="text",
        text="hi",
    )
    expected = (
        b"\x01"
        + bytes(range(32))
        + struct.pack(">I", 1)
        + b"a"
        + struct.pack(">I", 1)
        + b"d"
        + b"\xcc" * 32
        + b"\x02"
        + struct.pack(">I", 1)
        + b"b"
        + struct.pack(">I", 1)
        + b"c"
        + struct.pack(">Q", 7)
        + b"\x00"  # no previous hash
        + b"\x00"  # no log view
        + struct.pack(">I", 4)
        + b"text"
        + struct.pack(">I", 2)
        + b"hi"
        + b"\x00"  # no attachments
        + b"\x00"  # no reply_to
    )
    assert content.encode() == expected
    assert Content.decode(expected) == content


def test_canonical_recipients_are_sorted_and_unique_in_utf8_byte_order() -> None:
    ids = ["Ярослава", "zoe", "anna", "zoe", "Émile"]
    canonical = canonical_recipients(ids)
    assert canonical == ("anna", "zoe", "Émile", "Ярослава")
    assert [r.encode() for r in canonical] == sorted(r.encode() for r in set(ids))


@pytest.mark.parametrize(
    "recipients", [("b", "a"), ("a", "a"), (), tuple(f"u{i:03}" for i in range(65))]
)
def test_non_canonical_or_out_of_range_recipient_lists_are_refused(
    setup: Setup, recipients: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(setup.content, recipients=recipients)


def test_sixty_four_recipients_are_accepted(setup: Setup) -> None:
    many = tuple(f"u{i:03}" for i in range(64))
    content = dataclasses.replace(setup.content, recipients=many)
    assert Content.decode(content.encode()) == content


def with_recipients_swapped(content: Content) -> bytes:
    """The encoding of `content` (recipients "aa", "bb") with the two entries exchanged."""
    data = content.encode()
    first = struct.pack(">I", 2) + b"aa"
    second = struct.pack(">I", 2) + b"bb"
    assert data.count(first + second) == 1
    return data.replace(first + second, second + first)


def test_decoding_refuses_unsorted_or_duplicate_recipients(setup: Setup) -> None:
    content = dataclasses.replace(setup.content, recipients=("aa", "bb"))
    with pytest.raises(MalformedEncoding, match="recipients"):
        Content.decode(with_recipients_swapped(content))
    duplicate = content.encode().replace(struct.pack(">I", 2) + b"bb", struct.pack(">I", 2) + b"aa")
    with pytest.raises(MalformedEncoding, match="recipients"):
        Content.decode(duplicate)


def test_decoding_refuses_zero_recipients(setup: Setup) -> None:
    content = dataclasses.replace(setup.content, recipients=("aa",))
    data = content.encode()
    count_at = 1 + 32 + 4 + len("dr.ivanova") + 4 + len("laptop") + 32
    assert data[count_at] == 1
    zero = data[:count_at] + b"\x00" + data[count_at + 1 + 4 + 2 :]
    with pytest.raises(MalformedEncoding):
        Content.decode(zero)


def test_text_of_exactly_64_kib_is_accepted_and_one_byte_more_refused(setup: Setup) -> None:
    content = dataclasses.replace(setup.content, text="x" * MAX_TEXT_BYTES)
    assert Content.decode(content.encode()) == content
    with pytest.raises(ValueError):
        dataclasses.replace(setup.content, text="x" * (MAX_TEXT_BYTES + 1))


def test_sixteen_attachments_are_accepted_and_seventeen_refused(setup: Setup, rng: Rng) -> None:
    sixteen = tuple(make_attachment(rng, f"f{i}") for i in range(16))
    content = dataclasses.replace(setup.content, attachments=sixteen)
    assert Content.decode(content.encode()) == content
    with pytest.raises(ValueError):
        dataclasses.replace(setup.content, attachments=(*sixteen, sixteen[0]))


def test_seventeen_attachments_in_the_bytes_are_refused_on_decode(setup: Setup, rng: Rng) -> None:
    one = dataclasses.replace(setup.content, attachments=(), reply_to=None)
    data = one.encode()
    assert data.endswith(b"\x00\x00")
    extra = b"".join(make_attachment(rng).encode() for _ in range(17))
    with pytest.raises(MalformedEncoding, match="attachments"):
        Content.decode(data[:-2] + b"\x11" + extra + b"\x00")


@pytest.mark.parametrize("kind", ["", "Text", "a b", "ünicode", "x" * 33, "-lead"])
def test_kind_must_be_a_short_lower_case_ascii_word(setup: Setup, kind: str) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(setup.content, kind=kind)


def test_signed_content_over_one_mebibyte_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedEncoding, match="longer"):
        SignedContent.decode(bytes(MAX_SIGNED_CONTENT_BYTES + 1))


def test_every_truncation_of_signed_content_is_refused(setup: Setup) -> None:
    data = setup.signed.encode()
    for end in range(len(data)):
        with pytest.raises(CryptoError):
            verify_signed_content(SignedContent.decode(data[:end]), setup.doctor.identity)


def test_every_single_byte_mutation_of_signed_content_is_refused(setup: Setup) -> None:
    """Each byte flipped three ways: decoding fails (MalformedEncoding), or the value decodes
    canonically back to the mutated bytes and the signature check fails (BadSignature)."""
    data = setup.signed.encode()
    outcomes = {"malformed": 0, "bad_signature": 0}
    for index in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            mutated = bytearray(data)
            mutated[index] ^= mask
            try:
                decoded = SignedContent.decode(bytes(mutated))
            except MalformedEncoding:
                outcomes["malformed"] += 1
                continue
            assert decoded.encode() == bytes(mutated)
            with pytest.raises(BadSignature):
                verify_signed_content(decoded, setup.doctor.identity)
            outcomes["bad_signature"] += 1
    assert all(outcomes.values())


FIXED = build_setup(seeded_rng(b"content properties"))


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 100_000), value=st.integers(0, 255))
def test_any_byte_replaced_by_any_value_is_refused(position: int, value: int) -> None:
    data = FIXED.signed.encode()
    mutated = bytearray(data)
    mutated[position % len(data)] = value
    if bytes(mutated) == data:
        return
    with pytest.raises((MalformedEncoding, BadSignature)):
        verify_signed_content(SignedContent.decode(bytes(mutated)), FIXED.doctor.identity)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_fail_to_decode_only_with_malformed_encoding(data: bytes) -> None:
    with contextlib.suppress(MalformedEncoding):
        SignedContent.decode(data)


ids = st.text(
    st.characters(min_codepoint=0x20, blacklist_categories=("Cs", "Cc")), min_size=1, max_size=16
)


# Generating unicode ids and texts is slow on a loaded shared CPU; the property is not timing.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recipients=st.sets(ids, min_size=1, max_size=8),
    text=st.text(max_size=200),
    kind=st.from_regex(r"[a-z0-9][a-z0-9._-]{0,31}", fullmatch=True),
    sent_at_ms=st.integers(0, 2**64 - 1),
    previous_hash=st.none() | st.binary(min_size=32, max_size=32),
    log_view=st.none()
    | st.builds(LogView, st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32)),
    reply_to=st.none() | st.binary(min_size=16, max_size=16),
    attachment_count=st.integers(0, 3),
)
def test_any_content_round_trips_signs_and_verifies(
    *,
    recipients: set[str],
    text: str,
    kind: str,
    sent_at_ms: int,
    previous_hash: bytes | None,
    log_view: LogView | None,
    reply_to: bytes | None,
    attachment_count: int,
) -> None:
    rng = seeded_rng(b"property")
    content = make_content(
        FIXED.doctor,
        rng,
        recipients=canonical_recipients(recipients),
        text=text,
        kind=kind,
        sent_at_ms=sent_at_ms,
        previous_hash=previous_hash,
        log_view=log_view,
        reply_to=reply_to,
        attachments=tuple(make_attachment(rng) for _ in range(attachment_count)),
    )
    data = sign_content(content, FIXED.doctor).encode()
    decoded = SignedContent.decode(data)
    assert decoded.encode() == data
    assert verify_signed_content(decoded, FIXED.doctor.identity) == content
