"""Signed clinic notices: encoding, validation, and verification against the clinic's trust."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field, fields, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.crypto.certificates import (
    CLINIC_KEY_CONTEXT,
    DEVICE_CONTEXT,
    USER_CONTEXT,
    ClinicKeyCertificate,
    ClinicKeyPurpose,
    issue_clinic_key_certificate,
    key_hash,
)
from medrelay.crypto.content import SIGNATURE_CONTEXT
from medrelay.crypto.errors import MalformedEncoding, ProofError
from medrelay.crypto.keys import SIGNATURE_SIZE, SigningKey
from medrelay.crypto.notices import (
    MAX_EMERGENCY_NUMBERS,
    MAX_NOTICE_BYTES,
    MAX_NUMBER_CHARS,
    MAX_TEXT_BYTES,
    MAX_TIME_ZONE_BYTES,
    NOTICE_CONTEXT,
    NOTICE_VERSION,
    ClinicNotice,
    NoticeKind,
    issue_notice,
)
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.transparency import REVOCATION_CONTEXT, ClinicTrust

CLINIC = "clinic-a"
PATIENT = "patient-1"
CLINICIAN = "dr-house"
ON_CALL = "dr-oncall"
MESSAGE_ID = bytes(range(16))
T0 = 1_800_000_000_000
HOUR = 3600 * 1000
YEAR = 365 * 24 * HOUR
ISSUED = T0 + 100 * HOUR
TEXTS = {
    NoticeKind.AUTO_REPLY: "Dr. House is away.\nYour message will be read on Monday at 08:00.",
    NoticeKind.URGENT_ROUTED: "Your urgent message reached the clinician on call.",
    NoticeKind.URGENT_UNROUTED: "Nobody is on call right now.\nIn an emergency call 112.",
}


@dataclass
class Clinic:
    """A clinic root key with one certified issuing key and one certified log key (the pattern of
    test_crypto_transparency's Clinic, without the log)."""

    rng: Rng
    clinic_id: str = CLINIC
    root: SigningKey = field(init=False)
    issuing: SigningKey = field(init=False)
    log: SigningKey = field(init=False)
    certificates: list[ClinicKeyCertificate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = SigningKey.generate(self.rng)
        self.issuing = self.new_key(ClinicKeyPurpose.ISSUING)
        self.log = self.new_key(ClinicKeyPurpose.LOG)

    def new_key(self, purpose: ClinicKeyPurpose) -> SigningKey:
        key = SigningKey.generate(self.rng)
        self.certificates.append(
            issue_clinic_key_certificate(
                self.root,
                clinic_id=self.clinic_id,
                purpose=purpose,
                key=key.verify_key,
                not_before_ms=T0,
                not_after_ms=T0 + 5 * YEAR,
                serial=len(self.certificates),
            )
        )
        return key

    def trust(self) -> ClinicTrust:
        return ClinicTrust.build(self.clinic_id, self.root.verify_key, self.certificates)


@pytest.fixture
def clinic(rng: Rng) -> Clinic:
    return Clinic(rng)


# Hypothesis tests cannot take function-scoped fixtures: one clinic for them, built once.
FIXED = Clinic(seeded_rng(b"medrelay notices"))


def make(
    key: SigningKey,
    kind: NoticeKind = NoticeKind.AUTO_REPLY,
    *,
    clinic_id: str = CLINIC,
    recipient: str = PATIENT,
    issued_at_ms: int = ISSUED,
) -> ClinicNotice:
    """A typical notice of `kind`, signed by `key`."""
    return issue_notice(
        key,
        kind=kind,
        clinic_id=clinic_id,
        recipient=recipient,
        clinician=CLINICIAN,
        in_reply_to=MESSAGE_ID,
        issued_at_ms=issued_at_ms,
        reads_at_ms=issued_at_ms + 14 * HOUR if kind is NoticeKind.AUTO_REPLY else None,
        time_zone="Europe/Berlin",
        text=TEXTS[kind],
        emergency_numbers=("112", "+49 30 1234-5678")
        if kind is NoticeKind.URGENT_UNROUTED
        else ("112",),
        on_call=ON_CALL if kind is NoticeKind.URGENT_ROUTED else None,
    )


# --- encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_every_kind_round_trips_exactly_and_verifies(clinic: Clinic, kind: NoticeKind) -> None:
    notice = make(clinic.issuing, kind)
    data = notice.encode()
    decoded = ClinicNotice.decode(data)
    assert decoded == notice
    assert decoded.encode() == data
    assert len(data) <= MAX_NOTICE_BYTES
    decoded.verify(clinic.trust(), recipient=PATIENT)


def test_the_wire_layout_is_pinned(clinic: Clinic) -> None:
    notice = make(clinic.issuing, NoticeKind.URGENT_ROUTED)

    def text(value: str) -> bytes:
        raw = value.encode("utf-8")
        return struct.pack(">I", len(raw)) + raw

    expected_tbs = (
        bytes([NOTICE_VERSION, 2])
        + text(CLINIC)
        + text(PATIENT)
        + text(CLINICIAN)
        + MESSAGE_ID
        + struct.pack(">Q", ISSUED)
        + b"\x00"  # no reads_at_ms
        + text("Europe/Berlin")
        + text(TEXTS[NoticeKind.URGENT_ROUTED])
        + b"\x01"
        + text("112")
        + b"\x01"
        + text(ON_CALL)
        + key_hash(clinic.issuing.verify_key)
    )
    assert notice.tbs_bytes() == expected_tbs
    assert notice.encode() == expected_tbs + notice.signature
    assert notice.issuer_key_hash == key_hash(clinic.issuing.verify_key)
    clinic.issuing.verify_key.verify(NOTICE_CONTEXT + expected_tbs, notice.signature)


def test_the_context_separates_notices_from_every_other_signature() -> None:
    assert NOTICE_CONTEXT == b"MEDRELAY/v1/clinic-notice\x00"
    others = {CLINIC_KEY_CONTEXT, USER_CONTEXT, DEVICE_CONTEXT, REVOCATION_CONTEXT}
    others.add(SIGNATURE_CONTEXT)
    assert NOTICE_CONTEXT not in others
    # No context is a prefix of another: a signed message cannot be read under two contexts.
    assert not any(o.startswith(NOTICE_CONTEXT) or NOTICE_CONTEXT.startswith(o) for o in others)


def test_a_maximal_notice_fits_the_limit_exactly() -> None:
    notice = issue_notice(
        FIXED.issuing,
        kind=NoticeKind.URGENT_ROUTED,
        clinic_id="c" * 64,
        recipient="p" * 64,
        clinician="d" * 64,
        in_reply_to=MESSAGE_ID,
        issued_at_ms=2**64 - 1,
        reads_at_ms=2**64 - 1,
        time_zone="z" * MAX_TIME_ZONE_BYTES,
        text="é" * (MAX_TEXT_BYTES // 2),
        emergency_numbers=("1" * MAX_NUMBER_CHARS,) * MAX_EMERGENCY_NUMBERS,
        on_call="o" * 64,
    )
    data = notice.encode()
    assert len(data) == MAX_NOTICE_BYTES <= 4096
    assert ClinicNotice.decode(data) == notice
    with pytest.raises(MalformedEncoding, match="longer than"):
        ClinicNotice.decode(data + b"\x00")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b + b"\x00",
        lambda b: b[:-1],
        lambda b: b[:1] + b"\x00" + b[2:],
        lambda b: b[:1] + b"\x04" + b[2:],
        lambda b: b[:1] + b"\xff" + b[2:],
        lambda b: b"\x00" + b[1:],
        lambda b: b"\x02" + b[1:],
        lambda b: b"",
    ],
    ids=[
        "trailing",
        "truncated",
        "kind-0",
        "unknown-kind",
        "kind-255",
        "version-0",
        "version-2",
        "empty",
    ],
)
@pytest.mark.parametrize("kind", list(NoticeKind))
def test_malformed_notice_bytes_are_refused_cleanly(
    clinic: Clinic, kind: NoticeKind, mutate: Any
) -> None:
    data = make(clinic.issuing, kind).encode()
    with pytest.raises(MalformedEncoding):
        ClinicNotice.decode(mutate(data))


def test_every_truncation_is_refused(clinic: Clinic) -> None:
    data = make(clinic.issuing, NoticeKind.URGENT_UNROUTED).encode()
    for end in range(len(data)):
        with pytest.raises(MalformedEncoding):
            ClinicNotice.decode(data[:end])


def test_structural_corruptions_are_malformed_encodings(clinic: Clinic) -> None:
    notice = make(clinic.issuing, NoticeKind.URGENT_UNROUTED)
    data = notice.encode()
    # The reads_at flag is the byte after version, kind, three ids, the message id and a u64.
    flag = 2 + sum(4 + len(v) for v in (CLINIC, PATIENT, CLINICIAN)) + 16 + 8
    assert data[flag] == 0
    with pytest.raises(MalformedEncoding, match="boolean"):
        ClinicNotice.decode(data[:flag] + b"\x02" + data[flag + 1 :])
    # Too many emergency numbers, announced by the count byte.
    count = flag + 1 + (4 + len("Europe/Berlin")) + (4 + len(TEXTS[notice.kind].encode()))
    assert data[count] == 2
    with pytest.raises(MalformedEncoding, match="emergency numbers"):
        ClinicNotice.decode(data[:count] + bytes([MAX_EMERGENCY_NUMBERS + 1]) + data[count + 1 :])
    # A decoded value that breaks a field rule (an urgent_unrouted notice naming an on-call).
    routed = make(clinic.issuing, NoticeKind.URGENT_ROUTED).encode()
    with pytest.raises(MalformedEncoding, match="on-call"):
        ClinicNotice.decode(routed[:1] + b"\x03" + routed[2:])
    with pytest.raises(MalformedEncoding, match="bytes"):
        ClinicNotice.decode(bytearray(data))  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_decode_or_fail_only_as_malformed(data: bytes) -> None:
    try:
        notice = ClinicNotice.decode(data)
    except MalformedEncoding:
        return
    assert notice.encode() == data


_VALID = [make(FIXED.issuing, kind).encode() for kind in NoticeKind]


@settings(max_examples=300, deadline=None)
@given(
    which=st.integers(0, len(_VALID) - 1),
    position=st.integers(0, 10_000),
    value=st.integers(0, 255),
    action=st.sampled_from(["replace", "insert", "delete"]),
)
def test_mutations_of_a_valid_notice_decode_or_fail_only_as_malformed(
    which: int, position: int, value: int, action: str
) -> None:
    mutated = bytearray(_VALID[which])
    at = position % len(mutated)
    if action == "replace":
        mutated[at] = value
    elif action == "insert":
        mutated.insert(at, value)
    else:
        del mutated[at]
    try:
        notice = ClinicNotice.decode(bytes(mutated))
    except MalformedEncoding:
        return
    assert notice.encode() == bytes(mutated)
    if bytes(mutated) != _VALID[which]:
        with pytest.raises(ProofError):
            notice.verify(FIXED.trust(), recipient=notice.recipient)


# --- validation -----------------------------------------------------------------------------

_ROUTED = make(FIXED.issuing, NoticeKind.URGENT_ROUTED)
_AUTO = make(FIXED.issuing, NoticeKind.AUTO_REPLY)
_UNROUTED = make(FIXED.issuing, NoticeKind.URGENT_UNROUTED)


@pytest.mark.parametrize(
    ("base", "changes", "message"),
    [
        (_AUTO, {"kind": "auto_reply"}, "kind must be a NoticeKind"),
        (_AUTO, {"clinic_id": ""}, "clinic id must not be empty"),
        (_AUTO, {"clinic_id": "c" * 65}, "clinic id is longer"),
        (_AUTO, {"recipient": "pat\x00ient"}, "recipient user id contains control"),
        (_AUTO, {"recipient": ""}, "recipient user id must not be empty"),
        (_AUTO, {"clinician": "dr\u0085x"}, "clinician user id contains control"),
        (_AUTO, {"clinician": "d" * 65}, "clinician user id is longer"),
        (_AUTO, {"in_reply_to": bytes(15)}, "in_reply_to message id must be 16 bytes"),
        (_AUTO, {"in_reply_to": bytes(17)}, "in_reply_to message id must be 16 bytes"),
        (_AUTO, {"in_reply_to": bytearray(16)}, "in_reply_to message id must be 16 bytes"),
        (_AUTO, {"issued_at_ms": -1}, "issued_at_ms must fit"),
        (_AUTO, {"issued_at_ms": 2**64}, "issued_at_ms must fit"),
        (_AUTO, {"issued_at_ms": 1.5}, "issued_at_ms must fit"),
        (_AUTO, {"reads_at_ms": -1}, "reads_at_ms must fit"),
        (_AUTO, {"reads_at_ms": 2**64}, "reads_at_ms must fit"),
        (_AUTO, {"time_zone": ""}, "time zone must be a non-empty"),
        (_AUTO, {"time_zone": b"Europe/Berlin"}, "time zone must be a non-empty"),
        (_AUTO, {"time_zone": "Europe/\nBerlin"}, "time zone contains control"),
        (_AUTO, {"time_zone": "Europe/Berlin\x7f"}, "time zone contains control"),
        (_AUTO, {"time_zone": "Europe/Berlin\u200e"}, "time zone contains control"),
        (_AUTO, {"time_zone": "Etc/\ud800"}, "time zone contains control"),
        (_AUTO, {"time_zone": "z" * 65}, "time zone is longer"),
        (_AUTO, {"text": "tab\there"}, "notice text contains control"),
        (_AUTO, {"text": "line\r\nline"}, "notice text contains control"),
        (_AUTO, {"text": "bell\x07"}, "notice text contains control"),
        (_AUTO, {"text": "c1\x9b31m"}, "notice text contains control"),
        (_AUTO, {"text": "lone \udc00"}, "notice text contains control"),
        (_AUTO, {"text": "x" * 1001}, "notice text is longer than 1000 bytes"),
        (_AUTO, {"text": "é" * 501}, "notice text is longer than 1000 bytes"),
        (_AUTO, {"text": None}, "notice text must be a str"),
        (_AUTO, {"emergency_numbers": ["112"]}, "emergency numbers must be a tuple"),
        (_AUTO, {"emergency_numbers": "112"}, "emergency numbers must be a tuple"),
        (_AUTO, {"emergency_numbers": ("112",) * 9}, "at most 8 emergency numbers"),
        (_AUTO, {"emergency_numbers": ("",)}, "emergency number '' must be"),
        (_AUTO, {"emergency_numbers": ("1" * 17,)}, f"emergency number '{'1' * 17}' must be"),
        (_AUTO, {"emergency_numbers": ("112a",)}, "emergency number '112a' must be"),
        (_AUTO, {"emergency_numbers": ("112\n",)}, "emergency number"),
        (_AUTO, {"emergency_numbers": ("١١٢",)}, "emergency number"),  # Arabic-Indic digits
        (_AUTO, {"emergency_numbers": ("+ -",)}, "at least one digit"),
        (_AUTO, {"emergency_numbers": (112,)}, "emergency number 112 must be"),
        (_ROUTED, {"on_call": None}, "must name the on-call clinician"),
        (_ROUTED, {"on_call": ""}, "on-call user id must not be empty"),
        (_ROUTED, {"on_call": "o\x1b"}, "on-call user id contains control"),
        (_AUTO, {"on_call": ON_CALL}, "auto_reply notice must not name an on-call"),
        (_UNROUTED, {"on_call": ON_CALL}, "urgent_unrouted notice must not name an on-call"),
        (_AUTO, {"issuer_key_hash": bytes(31)}, "issuer key hash must be 32 bytes"),
        (_AUTO, {"issuer_key_hash": None}, "issuer key hash must be 32 bytes"),
        (_AUTO, {"signature": bytes(63)}, "signature must be 64 bytes"),
        (_AUTO, {"signature": bytes(65)}, "signature must be 64 bytes"),
    ],
)
def test_every_field_rule_is_checked_on_construction(
    base: ClinicNotice, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(base, **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"reads_at_ms": None},
        {"reads_at_ms": 0},
        {"issued_at_ms": 0},
        {"issued_at_ms": 2**64 - 1, "reads_at_ms": 2**64 - 1},
        {"time_zone": "America/Argentina/Buenos_Aires"},
        {"time_zone": "Etc/GMT+5"},
        {"time_zone": "z" * MAX_TIME_ZONE_BYTES},
        {"text": ""},
        {"text": "x" * MAX_TEXT_BYTES},
        {"text": "Ärztin Müller liest am Montag.\n\u0628\u064a\u0627\u0646 \u2014 \u65e5\u672c"},
        {"emergency_numbers": ()},
        {"emergency_numbers": ("1" * MAX_NUMBER_CHARS,) * MAX_EMERGENCY_NUMBERS},
        {"emergency_numbers": ("+1 800-555 0199",)},
        {"emergency_numbers": ("+49-30 1234", "112", "112")},
    ],
)
def test_boundary_values_are_accepted_and_round_trip(changes: dict[str, Any]) -> None:
    notice = replace(_AUTO, **changes)
    assert ClinicNotice.decode(notice.encode()) == notice


def test_issue_refuses_a_single_string_as_the_number_list(clinic: Clinic) -> None:
    with pytest.raises(ValueError, match="not one str"):
        issue_notice(
            clinic.issuing,
            kind=NoticeKind.URGENT_UNROUTED,
            clinic_id=CLINIC,
            recipient=PATIENT,
            clinician=CLINICIAN,
            in_reply_to=MESSAGE_ID,
            issued_at_ms=ISSUED,
            reads_at_ms=None,
            time_zone="Europe/Berlin",
            text="Call 112.",
            emergency_numbers="112",
        )


def test_issue_accepts_any_sequence_of_numbers(clinic: Clinic) -> None:
    notice = issue_notice(
        clinic.issuing,
        kind=NoticeKind.URGENT_UNROUTED,
        clinic_id=CLINIC,
        recipient=PATIENT,
        clinician=CLINICIAN,
        in_reply_to=MESSAGE_ID,
        issued_at_ms=ISSUED,
        reads_at_ms=None,
        time_zone="Europe/Berlin",
        text="Call 112.",
        emergency_numbers=["112", "110"],
    )
    assert notice.emergency_numbers == ("112", "110")
    notice.verify(clinic.trust(), recipient=PATIENT)


# --- verification ---------------------------------------------------------------------------


def test_a_notice_from_a_rotated_issuing_key_still_verifies(clinic: Clinic) -> None:
    old = make(clinic.issuing, NoticeKind.URGENT_ROUTED)
    clinic.issuing = clinic.new_key(ClinicKeyPurpose.ISSUING)
    new = make(clinic.issuing, NoticeKind.URGENT_ROUTED)
    trust = clinic.trust()
    old.verify(trust, recipient=PATIENT)
    new.verify(trust, recipient=PATIENT)
    assert old.issuer_key_hash != new.issuer_key_hash


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_a_notice_for_someone_else_is_refused(clinic: Clinic, kind: NoticeKind) -> None:
    notice = make(clinic.issuing, kind, recipient="patient-2")
    with pytest.raises(ProofError, match="another user"):
        notice.verify(clinic.trust(), recipient=PATIENT)


def test_a_notice_of_another_clinic_is_refused(clinic: Clinic) -> None:
    other = Clinic(clinic.rng, clinic_id="clinic-b")
    # Clinic b's genuine notice, shown by a client of clinic a.
    with pytest.raises(ProofError, match="another clinic"):
        make(other.issuing, clinic_id="clinic-b").verify(clinic.trust(), recipient=PATIENT)
    # Clinic a's key claiming to speak for clinic b.
    forged = make(clinic.issuing, clinic_id="clinic-b")
    with pytest.raises(ProofError, match="never certified"):
        forged.verify(other.trust(), recipient=PATIENT)


_TAMPERED: dict[str, Any] = {
    "kind": NoticeKind.URGENT_UNROUTED,
    "clinic_id": "clinic-b",
    "recipient": "patient-2",
    "clinician": "dr-other",
    "in_reply_to": bytes(16),
    "issued_at_ms": ISSUED + 1,
    "reads_at_ms": ISSUED + 15 * HOUR,
    "time_zone": "Europe/London",
    "text": "Your urgent message reached nobody.",
    "emergency_numbers": ("999",),
    "on_call": "dr-mallory",
    "issuer_key_hash": bytes(32),
    "signature": bytes(SIGNATURE_SIZE),
}


def test_the_tampering_table_covers_every_field() -> None:
    assert set(_TAMPERED) == {f.name for f in fields(ClinicNotice)}


@pytest.mark.parametrize("name", sorted(_TAMPERED))
def test_every_tampered_field_is_refused(clinic: Clinic, name: str) -> None:
    notice = make(clinic.issuing, NoticeKind.URGENT_ROUTED)
    changes = {name: _TAMPERED[name]}
    if name == "kind":
        changes["on_call"] = None  # an urgent_unrouted notice names no on-call clinician
    tampered = replace(notice, **changes)
    assert tampered.tbs_bytes() != notice.tbs_bytes() or name == "signature"
    # Checked as the tampered notice's own recipient: the signature must catch a re-addressing.
    with pytest.raises(ProofError):
        tampered.verify(clinic.trust(), recipient=tampered.recipient)


def test_every_flipped_bit_of_the_encoding_is_refused(clinic: Clinic) -> None:
    data = make(clinic.issuing, NoticeKind.AUTO_REPLY).encode()
    trust = clinic.trust()
    refused_by_verify = 0
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        try:
            notice = ClinicNotice.decode(bytes(flipped))
        except MalformedEncoding:
            continue
        with pytest.raises(ProofError):
            notice.verify(trust, recipient=notice.recipient)
        refused_by_verify += 1
    assert refused_by_verify > len(data) // 2  # most flips still decode: verify is what catches


def test_an_issuer_the_root_never_certified_is_refused(clinic: Clinic) -> None:
    rogue = SigningKey.generate(clinic.rng)
    with pytest.raises(ProofError, match="never certified"):
        make(rogue).verify(clinic.trust(), recipient=PATIENT)


def test_an_issuing_certificate_the_root_did_not_sign_is_refused(clinic: Clinic) -> None:
    """A trust assembled by hand (not through `ClinicTrust.build`) is still checked."""
    impostor = Clinic(clinic.rng)
    trust = ClinicTrust(CLINIC, clinic.root.verify_key, (impostor.certificates[0],), ())
    with pytest.raises(ProofError, match="not valid when it was issued"):
        make(impostor.issuing).verify(trust, recipient=PATIENT)


@pytest.mark.parametrize(
    ("issued_at_ms", "valid"),
    [
        (T0 - 1, False),
        (T0, True),
        (T0 + 5 * YEAR - 1, True),
        (T0 + 5 * YEAR, False),
        (T0 + 10 * YEAR, False),
        (0, False),
    ],
)
def test_a_notice_issued_outside_the_issuing_keys_window_is_refused(
    clinic: Clinic, issued_at_ms: int, valid: bool
) -> None:
    notice = make(clinic.issuing, issued_at_ms=issued_at_ms)
    if valid:
        notice.verify(clinic.trust(), recipient=PATIENT)
    else:
        with pytest.raises(ProofError, match="not valid when it was issued"):
            notice.verify(clinic.trust(), recipient=PATIENT)


def test_a_notice_signed_by_the_log_key_is_refused(clinic: Clinic) -> None:
    # Naming itself: the log key is certified, but not as an issuing key.
    with pytest.raises(ProofError, match="never certified"):
        make(clinic.log).verify(clinic.trust(), recipient=PATIENT)
    # Naming the issuing key, signed by the log key.
    notice = make(clinic.issuing)
    forged = replace(notice, signature=clinic.log.sign(NOTICE_CONTEXT + notice.tbs_bytes()))
    with pytest.raises(ProofError, match="signature does not verify"):
        forged.verify(clinic.trust(), recipient=PATIENT)


def test_a_signature_under_another_context_is_refused(clinic: Clinic) -> None:
    notice = make(clinic.issuing)
    for context in (REVOCATION_CONTEXT, USER_CONTEXT, b""):
        forged = replace(notice, signature=clinic.issuing.sign(context + notice.tbs_bytes()))
        with pytest.raises(ProofError, match="signature does not verify"):
            forged.verify(clinic.trust(), recipient=PATIENT)


_ids = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=MAX_TIME_ZONE_BYTES
)
_texts = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), whitelist_characters="\n"),
    max_size=MAX_TEXT_BYTES // 4,
)
_numbers = st.text(st.sampled_from("0123456789+ -"), min_size=0, max_size=MAX_NUMBER_CHARS - 1).map(
    lambda n: n + "1"
)


@st.composite
def _notices(draw: st.DrawFn) -> ClinicNotice:
    kind = draw(st.sampled_from(NoticeKind))
    return issue_notice(
        FIXED.issuing,
        kind=kind,
        clinic_id=CLINIC,
        recipient=draw(_ids),
        clinician=draw(_ids),
        in_reply_to=draw(st.binary(min_size=16, max_size=16)),
        issued_at_ms=draw(st.integers(T0, T0 + 5 * YEAR - 1)),
        reads_at_ms=draw(st.none() | st.integers(0, 2**64 - 1)),
        time_zone=draw(_ids),
        text=draw(_texts),
        emergency_numbers=draw(st.lists(_numbers, max_size=MAX_EMERGENCY_NUMBERS)),
        on_call=draw(_ids) if kind is NoticeKind.URGENT_ROUTED else None,
    )


@settings(max_examples=60, deadline=None)
@given(notice=_notices())
def test_any_valid_notice_round_trips_and_verifies_only_for_its_recipient(
    notice: ClinicNotice,
) -> None:
    decoded = ClinicNotice.decode(notice.encode())
    assert decoded == notice
    decoded.verify(FIXED.trust(), recipient=notice.recipient)
    with pytest.raises(ProofError, match="another user"):
        decoded.verify(FIXED.trust(), recipient=notice.recipient + "x")
