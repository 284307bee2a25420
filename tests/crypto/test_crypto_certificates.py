"""The clinic's chain of trust: issuing, encoding and verifying clinic-key, user and device
certificates, with every failure reason produced exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medrelay.crypto.certificates import (
    CLINIC_KEY_CONTEXT,
    DEVICE_CONTEXT,
    MAX_DEVICE_CERTIFICATE_BYTES,
    MAX_USER_CERTIFICATE_BYTES,
    USER_CONTEXT,
    ClinicKeyCertificate,
    ClinicKeyPurpose,
    DeviceCertificate,
    MalformedCertificate,
    Role,
    UserCertificate,
    issue_clinic_key_certificate,
    issue_device_certificate,
    issue_user_certificate,
    key_hash,
    verify_clinic_key,
    verify_device,
    verify_device_chain,
    verify_user,
)
from medrelay.crypto.errors import (
    BadSignature,
    CertificateError,
    CertificateFailure,
    MalformedEncoding,
)
from medrelay.crypto.kdf import sha256
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.rng import Rng, seeded_rng

DAY_MS = 86_400_000
T0 = 1_800_000_000_000
NOW = T0 + 10 * DAY_MS
CLINIC_KEY_END = T0 + 400 * DAY_MS
USER_END = T0 + 365 * DAY_MS


@dataclass(frozen=True)
class Pki:
    """A clinic with an issuing and a log key, one doctor and one of her devices."""

    root: SigningKey
    issuing: SigningKey
    log: SigningKey
    issuing_cert: ClinicKeyCertificate
    log_cert: ClinicKeyCertificate
    identity: SigningKey
    user_cert: UserCertificate
    device_signing: SigningKey
    device_dh: DHPrivateKey
    device_cert: DeviceCertificate


def make_clinic_key(
    root: SigningKey, key: SigningKey, purpose: ClinicKeyPurpose, serial: int = 1
) -> ClinicKeyCertificate:
    return issue_clinic_key_certificate(
        root,
        clinic_id="clinic-7",
        purpose=purpose,
        key=key.verify_key,
        not_before_ms=T0,
        not_after_ms=CLINIC_KEY_END,
        serial=serial,
    )


def make_user(
    issuing: SigningKey,
    identity: SigningKey,
    user_id: str = "dr.ivanova",
    role: Role = Role.DOCTOR,
    previous: bytes | None = None,
) -> UserCertificate:
    return issue_user_certificate(
        issuing,
        user_id=user_id,
        role=role,
        display_name="Анна Иванова",
        specialty="cardiology",
        department="Outpatient 2",
        identity_key=identity.verify_key,
        not_before_ms=T0,
        not_after_ms=USER_END,
        serial=42,
        previous_certificate_hash=previous,
    )


def make_device(
    identity: SigningKey,
    signing: SigningKey,
    dh: DHPrivateKey,
    user_id: str = "dr.ivanova",
    device_id: str = "laptop",
) -> DeviceCertificate:
    return issue_device_certificate(
        identity,
        user_id=user_id,
        device_id=device_id,
        signing_key=signing.verify_key,
        dh_key=dh.public_key,
        created_at_ms=T0 + DAY_MS,
    )


def build_pki(rng: Rng) -> Pki:
    root, issuing, log, identity = (SigningKey.generate(rng) for _ in range(4))
    device_signing = SigningKey.generate(rng)
    device_dh = DHPrivateKey.generate(rng)
    return Pki(
        root=root,
        issuing=issuing,
        log=log,
        issuing_cert=make_clinic_key(root, issuing, ClinicKeyPurpose.ISSUING),
        log_cert=make_clinic_key(root, log, ClinicKeyPurpose.LOG, serial=2),
        identity=identity,
        user_cert=make_user(issuing, identity),
        device_signing=device_signing,
        device_dh=device_dh,
        device_cert=make_device(identity, device_signing, device_dh),
    )


@pytest.fixture
def pki(rng: Rng) -> Pki:
    return build_pki(rng)


def expect_failure(
    failure: CertificateFailure, subject: str, call: Callable[[], object]
) -> CertificateError:
    with pytest.raises(CertificateError) as info:
        call()
    assert info.value.failure is failure, info.value
    assert info.value.subject == subject
    return info.value


def expect_malformed(
    decode: Callable[[bytes], object], data: bytes, subject: str
) -> CertificateError:
    return expect_failure(CertificateFailure.MALFORMED, subject, lambda: decode(data))


def verify_chain(pki: Pki, **changes: object) -> object:
    args: dict[str, object] = {
        "root_key": pki.root.verify_key,
        "clinic_key_cert": pki.issuing_cert,
        "user_cert": pki.user_cert,
        "device_cert": pki.device_cert,
        "now_ms": NOW,
    }
    args.update(changes)
    return verify_device_chain(**args)  # type: ignore[arg-type]


# --- valid chains ---------------------------------------------------------------------------


def test_valid_chain_yields_the_device_identity_and_the_users_directory_fields(pki: Pki) -> None:
    verified = verify_device_chain(
        pki.root.verify_key, pki.issuing_cert, pki.user_cert, pki.device_cert, NOW
    )
    assert verified.device.user_id == "dr.ivanova" == verified.user_id
    assert verified.device.device_id == "laptop"
    assert verified.device.signing_key == pki.device_signing.verify_key
    assert verified.device.dh_key == pki.device_dh.public_key
    assert verified.role is Role.DOCTOR
    assert verified.display_name == "Анна Иванова"
    assert verified.specialty == "cardiology"
    assert verified.department == "Outpatient 2"
    assert verified.user_certificate == pki.user_cert


def test_device_identity_certificate_hash_is_sha256_of_the_encoded_device_certificate(
    pki: Pki,
) -> None:
    identity = verify_device(pki.user_cert, pki.device_cert)
    assert identity.certificate_hash == pki.device_cert.hash()
    assert identity.certificate_hash == sha256(pki.device_cert.encode())


def test_each_hash_is_sha256_of_the_whole_encoding_signature_included(pki: Pki) -> None:
    for cert in (pki.issuing_cert, pki.user_cert, pki.device_cert):
        assert cert.hash() == sha256(cert.encode())
        assert cert.encode() == cert.tbs_bytes() + cert.signature
        assert len(cert.signature) == 64


def test_signatures_cover_the_type_context_followed_by_the_tbs_bytes(pki: Pki) -> None:
    """Pins the construction: Ed25519(context ‖ tbs); the bare tbs bytes do not verify."""
    cases = (
        (pki.root, pki.issuing_cert, CLINIC_KEY_CONTEXT),
        (pki.issuing, pki.user_cert, USER_CONTEXT),
        (pki.identity, pki.device_cert, DEVICE_CONTEXT),
    )
    for signer, cert, context in cases:
        signer.verify_key.verify(context + cert.tbs_bytes(), cert.signature)
        with pytest.raises(BadSignature):
            signer.verify_key.verify(cert.tbs_bytes(), cert.signature)


def test_a_signature_made_for_one_certificate_type_does_not_verify_as_another(pki: Pki) -> None:
    """A user certificate's tbs bytes signed under the device context are refused as a user
    certificate: the context strings separate the types."""
    wrong_context = pki.issuing.sign(DEVICE_CONTEXT + pki.user_cert.tbs_bytes())
    forged = dataclasses.replace(pki.user_cert, signature=wrong_context)
    expect_failure(
        CertificateFailure.BAD_SIGNATURE, "user", lambda: verify_user(pki.issuing_cert, forged, NOW)
    )


def test_log_key_certificate_verifies_for_the_log_purpose(pki: Pki) -> None:
    verify_clinic_key(pki.root.verify_key, pki.log_cert, ClinicKeyPurpose.LOG, NOW)


def test_device_tbs_layout_is_the_documented_field_order(pki: Pki) -> None:
    """version 1, u32-prefixed user id and device id, the two 33-byte keys, u64 created_at,
    the 32-byte identity key hash."""
    cert = pki.device_cert
    expected = (
        b"\x01"
        + struct.pack(">I", 10)
        + b"dr.ivanova"
        + struct.pack(">I", 6)
        + b"laptop"
        + b"\x01"
        + pki.device_signing.verify_key.raw
        + b"\x02"
        + pki.device_dh.public_key.raw
        + struct.pack(">Q", T0 + DAY_MS)
        + sha256(b"\x01" + pki.identity.verify_key.raw)
    )
    assert cert.tbs_bytes() == expected


def test_clinic_key_tbs_layout_is_the_documented_field_order(pki: Pki) -> None:
    """version 1, clinic id, purpose code (1 issuing, 2 log), key, not_before, not_after,
    serial."""
    expected = (
        b"\x01"
        + struct.pack(">I", 8)
        + b"clinic-7"
        + b"\x02"
        + pki.log.verify_key.encode()
        + struct.pack(">QQQ", T0, CLINIC_KEY_END, 2)
    )
    assert pki.log_cert.tbs_bytes() == expected


# --- forged signatures at each level --------------------------------------------------------


def test_clinic_key_certified_by_another_root_fails_with_bad_signature(pki: Pki, rng: Rng) -> None:
    other_root = SigningKey.generate(rng)
    forged = make_clinic_key(other_root, pki.issuing, ClinicKeyPurpose.ISSUING)
    expect_failure(
        CertificateFailure.BAD_SIGNATURE,
        "clinic-key",
        lambda: verify_chain(pki, clinic_key_cert=forged),
    )


def test_clinic_key_with_a_tampered_field_fails_with_bad_signature(pki: Pki, rng: Rng) -> None:
    swapped = dataclasses.replace(pki.issuing_cert, key=SigningKey.generate(rng).verify_key)
    expect_failure(
        CertificateFailure.BAD_SIGNATURE,
        "clinic-key",
        lambda: verify_clinic_key(pki.root.verify_key, swapped, ClinicKeyPurpose.ISSUING, NOW),
    )


def test_user_certificate_signed_by_a_key_it_does_not_name_fails_with_bad_signature(
    pki: Pki, rng: Rng
) -> None:
    """The certificate names the real issuing key, but an attacker's key made the signature."""
    attacker = SigningKey.generate(rng)
    forged_signature = attacker.sign(USER_CONTEXT + pki.user_cert.tbs_bytes())
    forged = dataclasses.replace(pki.user_cert, signature=forged_signature)
    expect_failure(
        CertificateFailure.BAD_SIGNATURE, "user", lambda: verify_chain(pki, user_cert=forged)
    )


@pytest.mark.parametrize(
    "change",
    [
        {"role": Role.ADMIN},
        {"display_name": "Mallory"},
        {"specialty": "surgery"},
        {"department": ""},
        {"not_after_ms": USER_END + DAY_MS},
        {"serial": 43},
        {"previous_certificate_hash": bytes(32)},
    ],
)
def test_user_certificate_with_a_tampered_field_fails_with_bad_signature(
    pki: Pki, change: dict[str, object]
) -> None:
    tampered = dataclasses.replace(pki.user_cert, **change)  # type: ignore[arg-type]
    expect_failure(
        CertificateFailure.BAD_SIGNATURE, "user", lambda: verify_chain(pki, user_cert=tampered)
    )


def test_user_certificate_with_a_swapped_identity_key_fails_with_bad_signature(
    pki: Pki, rng: Rng
) -> None:
    tampered = dataclasses.replace(pki.user_cert, identity_key=SigningKey.generate(rng).verify_key)
    expect_failure(
        CertificateFailure.BAD_SIGNATURE,
        "user",
        lambda: verify_user(pki.issuing_cert, tampered, NOW),
    )


def test_device_certificate_signed_by_a_key_it_does_not_name_fails_with_bad_signature(
    pki: Pki, rng: Rng
) -> None:
    attacker = SigningKey.generate(rng)
    forged_signature = attacker.sign(DEVICE_CONTEXT + pki.device_cert.tbs_bytes())
    forged = dataclasses.replace(pki.device_cert, signature=forged_signature)
    expect_failure(
        CertificateFailure.BAD_SIGNATURE, "device", lambda: verify_chain(pki, device_cert=forged)
    )


@pytest.mark.parametrize("field", ["dh_key", "signing_key", "device_id", "created_at_ms"])
def test_device_certificate_with_a_tampered_field_fails_with_bad_signature(
    pki: Pki, rng: Rng, field: str
) -> None:
    """A server substituting its own DH or signing key for the device's is caught."""
    replacement: object = {
        "dh_key": DHPrivateKey.generate(rng).public_key,
        "signing_key": SigningKey.generate(rng).verify_key,
        "device_id": "phone",
        "created_at_ms": T0,
    }[field]
    tampered = dataclasses.replace(pki.device_cert, **{field: replacement})  # type: ignore[arg-type]
    expect_failure(
        CertificateFailure.BAD_SIGNATURE, "device", lambda: verify_device(pki.user_cert, tampered)
    )


# --- validity windows -----------------------------------------------------------------------


def test_clinic_key_is_valid_from_not_before_inclusive_to_not_after_exclusive(pki: Pki) -> None:
    root = pki.root.verify_key
    verify_clinic_key(root, pki.issuing_cert, ClinicKeyPurpose.ISSUING, T0)
    verify_clinic_key(root, pki.issuing_cert, ClinicKeyPurpose.ISSUING, CLINIC_KEY_END - 1)
    expect_failure(
        CertificateFailure.NOT_YET_VALID,
        "clinic-key",
        lambda: verify_clinic_key(root, pki.issuing_cert, ClinicKeyPurpose.ISSUING, T0 - 1),
    )
    expect_failure(
        CertificateFailure.EXPIRED,
        "clinic-key",
        lambda: verify_clinic_key(root, pki.issuing_cert, ClinicKeyPurpose.ISSUING, CLINIC_KEY_END),
    )


def test_user_certificate_is_valid_from_not_before_inclusive_to_not_after_exclusive(
    pki: Pki,
) -> None:
    verify_user(pki.issuing_cert, pki.user_cert, T0)
    verify_user(pki.issuing_cert, pki.user_cert, USER_END - 1)
    expect_failure(
        CertificateFailure.NOT_YET_VALID,
        "user",
        lambda: verify_user(pki.issuing_cert, pki.user_cert, T0 - 1),
    )
    expect_failure(
        CertificateFailure.EXPIRED,
        "user",
        lambda: verify_user(pki.issuing_cert, pki.user_cert, USER_END),
    )


def test_chain_reports_the_expired_user_when_only_the_user_certificate_expired(pki: Pki) -> None:
    """USER_END < CLINIC_KEY_END: between them the clinic key is still valid."""
    expect_failure(CertificateFailure.EXPIRED, "user", lambda: verify_chain(pki, now_ms=USER_END))
    expect_failure(
        CertificateFailure.EXPIRED, "clinic-key", lambda: verify_chain(pki, now_ms=CLINIC_KEY_END)
    )


def test_chain_verifies_as_of_a_past_time_after_the_certificates_expired(pki: Pki) -> None:
    """A record written last year verifies against the time it was written."""
    expect_failure(
        CertificateFailure.EXPIRED,
        "clinic-key",
        lambda: verify_chain(pki, now_ms=T0 + 500 * DAY_MS),
    )
    verify_chain(pki, now_ms=T0 + 100 * DAY_MS)


def test_device_certificates_do_not_expire(pki: Pki) -> None:
    """verify_device has no clock: a device stays valid until revoked through the log."""
    identity = verify_device(pki.user_cert, pki.device_cert)
    assert identity.device_id == "laptop"


# --- issuers, purposes, roles, subjects -----------------------------------------------------


def test_user_certificate_from_another_valid_issuing_key_fails_with_wrong_issuer(
    pki: Pki, rng: Rng
) -> None:
    """Two issuing keys both certified by the root: a user certificate names exactly one."""
    second = SigningKey.generate(rng)
    second_cert = make_clinic_key(pki.root, second, ClinicKeyPurpose.ISSUING, serial=3)
    verify_clinic_key(pki.root.verify_key, second_cert, ClinicKeyPurpose.ISSUING, NOW)
    expect_failure(
        CertificateFailure.WRONG_ISSUER,
        "user",
        lambda: verify_chain(pki, clinic_key_cert=second_cert),
    )


def test_user_certificate_naming_another_issuer_fails_with_wrong_issuer_before_the_signature(
    pki: Pki, rng: Rng
) -> None:
    attacker = SigningKey.generate(rng)
    forged = make_user(attacker, pki.identity)
    assert forged.issuer_key_hash == key_hash(attacker.verify_key)
    expect_failure(
        CertificateFailure.WRONG_ISSUER, "user", lambda: verify_user(pki.issuing_cert, forged, NOW)
    )


def test_log_purpose_key_cannot_issue_users(pki: Pki) -> None:
    """A user certificate signed by the LOG key: refused as a wrong issuer by verify_user, and as
    a wrongly purposed clinic key by the chain."""
    by_log_key = make_user(pki.log, pki.identity)
    expect_failure(
        CertificateFailure.WRONG_ISSUER,
        "user",
        lambda: verify_user(pki.log_cert, by_log_key, NOW),
    )
    expect_failure(
        CertificateFailure.WRONG_ROLE,
        "clinic-key",
        lambda: verify_chain(pki, clinic_key_cert=pki.log_cert, user_cert=by_log_key),
    )


def test_clinic_key_for_one_purpose_fails_with_wrong_role_for_the_other(pki: Pki) -> None:
    root = pki.root.verify_key
    expect_failure(
        CertificateFailure.WRONG_ROLE,
        "clinic-key",
        lambda: verify_clinic_key(root, pki.issuing_cert, ClinicKeyPurpose.LOG, NOW),
    )
    expect_failure(
        CertificateFailure.WRONG_ROLE,
        "clinic-key",
        lambda: verify_clinic_key(root, pki.log_cert, ClinicKeyPurpose.ISSUING, NOW),
    )


def test_role_outside_the_allow_list_fails_with_wrong_role(pki: Pki) -> None:
    clinicians = {Role.DOCTOR, Role.NURSE}
    verify_chain(pki, allowed_roles=clinicians)
    patient = make_user(pki.issuing, pki.identity, role=Role.PATIENT)
    patient_device = make_device(pki.identity, pki.device_signing, pki.device_dh)
    expect_failure(
        CertificateFailure.WRONG_ROLE,
        "user",
        lambda: verify_chain(
            pki, user_cert=patient, device_cert=patient_device, allowed_roles=clinicians
        ),
    )
    expect_failure(
        CertificateFailure.WRONG_ROLE,
        "user",
        lambda: verify_user(pki.issuing_cert, patient, NOW, allowed_roles=[Role.RECORDS]),
    )


def test_device_certificate_of_another_user_fails_with_wrong_subject(pki: Pki, rng: Rng) -> None:
    other_identity = SigningKey.generate(rng)
    other_user = make_user(pki.issuing, other_identity, user_id="nurse.petrova", role=Role.NURSE)
    other_device = make_device(
        other_identity, pki.device_signing, pki.device_dh, user_id="nurse.petrova"
    )
    verify_device(other_user, other_device)
    expect_failure(
        CertificateFailure.WRONG_SUBJECT,
        "device",
        lambda: verify_chain(pki, device_cert=other_device),
    )


def test_device_certificate_from_another_identity_key_of_the_same_user_fails_with_wrong_issuer(
    pki: Pki, rng: Rng
) -> None:
    """After a key rotation, devices certified by the old identity key do not pass under the new
    user certificate."""
    new_identity = SigningKey.generate(rng)
    rotated = make_user(pki.issuing, new_identity, previous=pki.user_cert.hash())
    assert rotated.previous_certificate_hash == pki.user_cert.hash()
    expect_failure(
        CertificateFailure.WRONG_ISSUER,
        "device",
        lambda: verify_chain(pki, user_cert=rotated),
    )
    new_device = make_device(new_identity, pki.device_signing, pki.device_dh)
    verify_chain(pki, user_cert=rotated, device_cert=new_device)


# --- construction limits --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("not_after_ms", T0),
        ("not_before_ms", -1),
        ("serial", 2**64),
        ("display_name", ""),
        ("display_name", "x" * 257),
        ("display_name", "Anna\u202eavonavI"),
        ("display_name", "Anna\nIvanova"),
        ("specialty", "s" * 129),
        ("user_id", ""),
        ("user_id", "u" * 65),
        ("issuer_key_hash", bytes(31)),
        ("previous_certificate_hash", bytes(33)),
        ("signature", bytes(63)),
    ],
)
def test_user_certificate_refuses_out_of_range_fields(pki: Pki, field: str, value: object) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(pki.user_cert, **{field: value})  # type: ignore[arg-type]


def test_display_name_of_256_utf8_bytes_is_accepted(pki: Pki) -> None:
    name = "Я" * 128  # two bytes each
    cert = make_user(pki.issuing, pki.identity)
    cert = dataclasses.replace(cert, display_name=name)
    assert UserCertificate.decode(cert.encode()).display_name == name


# --- encodings: round trips, malformed input, every mutation --------------------------------


def test_every_certificate_round_trips_to_equal_values_and_identical_bytes(pki: Pki) -> None:
    first = make_user(pki.issuing, pki.identity)
    with_previous = make_user(pki.issuing, pki.identity, previous=first.hash())
    no_directory = dataclasses.replace(first, specialty="", department="")
    for cert in (pki.issuing_cert, pki.log_cert):
        assert ClinicKeyCertificate.decode(cert.encode()) == cert
    for user in (first, with_previous, no_directory):
        decoded = UserCertificate.decode(user.encode())
        assert decoded == user
        assert decoded.encode() == user.encode()
    assert DeviceCertificate.decode(pki.device_cert.encode()) == pki.device_cert


def all_certificates(pki: Pki) -> list[tuple[bytes, Callable[[bytes], object], str]]:
    with_previous = make_user(pki.issuing, pki.identity, previous=bytes(range(32)))
    return [
        (pki.issuing_cert.encode(), ClinicKeyCertificate.decode, "clinic-key"),
        (pki.user_cert.encode(), UserCertificate.decode, "user"),
        (with_previous.encode(), UserCertificate.decode, "user"),
        (pki.device_cert.encode(), DeviceCertificate.decode, "device"),
    ]


def test_every_truncation_and_any_trailing_byte_is_malformed(pki: Pki) -> None:
    for data, decode, subject in all_certificates(pki):
        for end in range(len(data)):
            err = expect_malformed(decode, data[:end], subject)
            assert isinstance(err, MalformedEncoding)
        expect_malformed(decode, data + b"\x00", subject)


def test_unknown_version_role_purpose_and_key_types_are_malformed(pki: Pki) -> None:
    clinic = bytearray(pki.issuing_cert.encode())
    clinic[0] = 2
    expect_failure(
        CertificateFailure.MALFORMED,
        "clinic-key",
        lambda: ClinicKeyCertificate.decode(bytes(clinic)),
    )
    clinic = bytearray(pki.issuing_cert.encode())
    purpose_at = 1 + 4 + len("clinic-7")
    for bad_purpose in (0, 3, 255):
        clinic[purpose_at] = bad_purpose
        expect_failure(
            CertificateFailure.MALFORMED,
            "clinic-key",
            lambda: ClinicKeyCertificate.decode(bytes(clinic)),
        )
    user = bytearray(pki.user_cert.encode())
    role_at = 1 + 4 + len("dr.ivanova")
    for bad_role in (0, 7, 255):
        user[role_at] = bad_role
        expect_failure(
            CertificateFailure.MALFORMED, "user", lambda: UserCertificate.decode(bytes(user))
        )
    device = bytearray(pki.device_cert.encode())
    dh_type_at = 1 + 4 + len("dr.ivanova") + 4 + len("laptop") + 33
    device[dh_type_at] = 0x01  # an Ed25519 type byte where the X25519 key belongs
    expect_failure(
        CertificateFailure.MALFORMED, "device", lambda: DeviceCertificate.decode(bytes(device))
    )


def test_low_order_dh_key_in_a_device_certificate_is_malformed(pki: Pki) -> None:
    device = bytearray(pki.device_cert.encode())
    dh_at = 1 + 4 + len("dr.ivanova") + 4 + len("laptop") + 33 + 1
    device[dh_at : dh_at + 32] = bytes(32)
    expect_failure(
        CertificateFailure.MALFORMED, "device", lambda: DeviceCertificate.decode(bytes(device))
    )


def test_oversized_input_is_refused_before_parsing() -> None:
    expect_failure(
        CertificateFailure.MALFORMED,
        "user",
        lambda: UserCertificate.decode(bytes(MAX_USER_CERTIFICATE_BYTES + 1)),
    )
    expect_failure(
        CertificateFailure.MALFORMED,
        "device",
        lambda: DeviceCertificate.decode(bytes(MAX_DEVICE_CERTIFICATE_BYTES + 1)),
    )


def test_text_that_is_not_utf8_is_malformed(pki: Pki) -> None:
    device = bytearray(pki.device_cert.encode())
    device[5] = 0xFF  # first byte of the user id
    expect_failure(
        CertificateFailure.MALFORMED, "device", lambda: DeviceCertificate.decode(bytes(device))
    )


def verifier_for(pki: Pki) -> Callable[[object], None]:
    def verify(cert: object) -> None:
        if isinstance(cert, ClinicKeyCertificate):
            verify_clinic_key(pki.root.verify_key, cert, ClinicKeyPurpose.ISSUING, NOW)
        elif isinstance(cert, UserCertificate):
            verify_user(pki.issuing_cert, cert, NOW)
        else:
            assert isinstance(cert, DeviceCertificate)
            verify_device(pki.user_cert, cert)

    return verify


def check_mutation_is_refused(
    pki: Pki, decode: Callable[[bytes], object], subject: str, mutated: bytes
) -> None:
    """A mutated certificate either fails to decode (MALFORMED) or decodes canonically (to the
    exact mutated bytes) and then fails verification; nothing else escapes."""
    try:
        cert = decode(mutated)
    except CertificateError as err:
        assert err.failure is CertificateFailure.MALFORMED
        assert err.subject == subject
        return
    assert cert.encode() == mutated  # type: ignore[attr-defined]
    with pytest.raises(CertificateError) as info:
        verifier_for(pki)(cert)
    assert info.value.failure is not CertificateFailure.MALFORMED


def test_every_single_byte_mutation_is_refused(pki: Pki) -> None:
    """Each byte of each certificate, flipped three ways (low bit, high bit, all bits)."""
    for data, decode, subject in all_certificates(pki):
        verifier_for(pki)(decode(data))  # the original verifies
        for index in range(len(data)):
            for mask in (0x01, 0x80, 0xFF):
                mutated = bytearray(data)
                mutated[index] ^= mask
                check_mutation_is_refused(pki, decode, subject, bytes(mutated))


FIXED_PKI = build_pki(seeded_rng(b"certificate mutations"))


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 3), position=st.integers(0, 10_000), value=st.integers(0, 255))
def test_any_byte_replaced_by_any_value_is_refused(which: int, position: int, value: int) -> None:
    data, decode, subject = all_certificates(FIXED_PKI)[which]
    mutated = bytearray(data)
    mutated[position % len(data)] = value
    if bytes(mutated) == data:
        return
    check_mutation_is_refused(FIXED_PKI, decode, subject, bytes(mutated))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=700))
def test_arbitrary_bytes_decode_or_fail_only_as_malformed_certificates(data: bytes) -> None:
    for decode in (
        ClinicKeyCertificate.decode,
        UserCertificate.decode,
        DeviceCertificate.decode,
    ):
        with contextlib.suppress(MalformedCertificate):
            decode(data)


ids = st.text(
    st.characters(min_codepoint=0x20, blacklist_categories=("Cs", "Cc")), min_size=1, max_size=16
)
names = st.text(st.characters(whitelist_categories=("L", "N", "P", "S", "Zs")), max_size=40)


# Generating unicode names is slow on a loaded shared CPU; the property is not about timing.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user_id=ids,
    role=st.sampled_from(Role),
    display_name=names.filter(bool),
    specialty=names,
    department=names,
    window=st.tuples(st.integers(0, 2**64 - 2), st.integers(1, 2**63)),
    serial=st.integers(0, 2**64 - 1),
    previous=st.none() | st.binary(min_size=32, max_size=32),
)
def test_user_certificates_with_any_fields_round_trip_and_verify(
    *,
    user_id: str,
    role: Role,
    display_name: str,
    specialty: str,
    department: str,
    window: tuple[int, int],
    serial: int,
    previous: bytes | None,
) -> None:
    not_before = window[0]
    not_after = min(not_before + window[1], 2**64 - 1)
    cert = issue_user_certificate(
        FIXED_PKI.issuing,
        user_id=user_id,
        role=role,
        display_name=display_name,
        specialty=specialty,
        department=department,
        identity_key=FIXED_PKI.identity.verify_key,
        not_before_ms=not_before,
        not_after_ms=not_after,
        serial=serial,
        previous_certificate_hash=previous,
    )
    decoded = UserCertificate.decode(cert.encode())
    assert decoded == cert
    verify_user(FIXED_PKI.issuing_cert, decoded, not_before)
