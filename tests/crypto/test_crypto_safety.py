"""Safety numbers: libsignal's numeric fingerprint vector (displayable and scannable v2), symmetry
between the two sides, and medrelay's use over Ed25519 identity keys and user ids."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from medrelay.crypto.errors import MalformedEncoding
from medrelay.crypto.keys import SigningKey, VerifyKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.safety import (
    ITERATIONS,
    SCANNABLE_SIZE,
    FingerprintVersionMismatch,
    fingerprint_hash,
    format_safety_number,
    numeric_fingerprint,
    safety_fingerprint,
    safety_number,
    safety_number_groups,
)


def vector(known_answers: dict[str, Any]) -> dict[str, str]:
    entry: dict[str, str] = known_answers["signal_numeric_fingerprint_v2"]
    return entry


def vector_inputs(known_answers: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes]:
    v = vector(known_answers)
    return (
        bytes.fromhex(v["local_key"]),
        v["local_id"].encode(),
        bytes.fromhex(v["remote_key"]),
        v["remote_id"].encode(),
    )


def test_libsignal_vector_displayable_digits(known_answers: dict[str, Any]) -> None:
    fingerprint = numeric_fingerprint(*vector_inputs(known_answers))
    assert fingerprint.displayable == vector(known_answers)["displayable"]


def test_libsignal_vector_scannable_v2_protobuf(known_answers: dict[str, Any]) -> None:
    fingerprint = numeric_fingerprint(*vector_inputs(known_answers))
    assert fingerprint.scannable.hex() == vector(known_answers)["scannable_v2_protobuf"]
    assert len(fingerprint.scannable) == SCANNABLE_SIZE == 74


def test_both_sides_of_the_libsignal_vector_show_the_same_digits_and_match_scans(
    known_answers: dict[str, Any],
) -> None:
    local_key, local_id, remote_key, remote_id = vector_inputs(known_answers)
    alice = numeric_fingerprint(local_key, local_id, remote_key, remote_id)
    bob = numeric_fingerprint(remote_key, remote_id, local_key, local_id)
    assert alice.displayable == bob.displayable
    assert alice.scannable != bob.scannable  # each side puts itself first
    assert alice.matches_scanned(bob.scannable)
    assert bob.matches_scanned(alice.scannable)


def test_fingerprint_hash_is_the_documented_iteration() -> None:
    """h0 = SHA-512(0x0000 ‖ key ‖ id ‖ key), then h_i = SHA-512(h_{i-1} ‖ key), 5200 in all."""
    key, stable_id = b"\x05" + bytes(range(32)), b"+15550001111"
    digest = hashlib.sha512(b"\x00\x00" + key + stable_id + key).digest()
    assert fingerprint_hash(key, stable_id, iterations=1) == digest
    for _ in range(ITERATIONS - 1):
        digest = hashlib.sha512(digest + key).digest()
    assert ITERATIONS == 5200
    assert fingerprint_hash(key, stable_id) == digest


@pytest.fixture
def keys(rng: Rng) -> tuple[VerifyKey, VerifyKey]:
    return SigningKey.generate(rng).verify_key, SigningKey.generate(rng).verify_key


def test_medrelay_safety_number_is_the_same_on_both_sides(
    keys: tuple[VerifyKey, VerifyKey],
) -> None:
    doctor, patient = keys
    number = safety_number(doctor, "dr.ivanova", patient, "patient.42")
    assert number == safety_number(patient, "patient.42", doctor, "dr.ivanova")
    assert len(number) == 60
    assert number.isdigit()


def test_medrelay_safety_number_uses_the_33_byte_key_encoding_and_utf8_user_id(
    keys: tuple[VerifyKey, VerifyKey],
) -> None:
    doctor, patient = keys
    generic = numeric_fingerprint(
        doctor.encode(), "dr.иванова".encode(), patient.encode(), b"patient.42"
    )
    ours = safety_fingerprint(doctor, "dr.иванова", patient, "patient.42")
    assert ours == generic
    assert safety_number(doctor, "dr.иванова", patient, "patient.42") == generic.displayable
    raw_key_variant = numeric_fingerprint(
        doctor.raw, "dr.иванова".encode(), patient.raw, b"patient.42"
    )
    assert raw_key_variant.displayable != ours.displayable


def test_a_substituted_key_changes_the_safety_number_and_fails_the_scan(
    keys: tuple[VerifyKey, VerifyKey], rng: Rng
) -> None:
    """A server showing the patient a fake key for the doctor is caught by comparing numbers."""
    doctor, patient = keys
    fake_doctor = SigningKey.generate(rng).verify_key
    patients_view = safety_fingerprint(patient, "patient.42", fake_doctor, "dr.ivanova")
    doctors_view = safety_fingerprint(doctor, "dr.ivanova", patient, "patient.42")
    assert patients_view.displayable != doctors_view.displayable
    assert not doctors_view.matches_scanned(patients_view.scannable)
    assert not patients_view.matches_scanned(doctors_view.scannable)


def test_the_user_id_is_bound_into_the_number(keys: tuple[VerifyKey, VerifyKey]) -> None:
    doctor, patient = keys
    assert safety_number(doctor, "dr.ivanova", patient, "patient.42") != safety_number(
        doctor, "dr.ivanova", patient, "patient.43"
    )


def test_scanning_your_own_code_does_not_match(keys: tuple[VerifyKey, VerifyKey]) -> None:
    """Swapped roles matter: the scanned code's local must be our remote."""
    doctor, patient = keys
    mine = safety_fingerprint(doctor, "dr.ivanova", patient, "patient.42")
    assert not mine.matches_scanned(mine.scannable)


def test_scanned_code_of_another_version_is_reported_as_a_version_mismatch(
    known_answers: dict[str, Any],
) -> None:
    local_key, local_id, remote_key, remote_id = vector_inputs(known_answers)
    alice = numeric_fingerprint(local_key, local_id, remote_key, remote_id)
    bob = numeric_fingerprint(remote_key, remote_id, local_key, local_id)
    version_1 = bob.scannable[:1] + b"\x01" + bob.scannable[2:]
    with pytest.raises(FingerprintVersionMismatch):
        alice.matches_scanned(version_1)


@pytest.mark.parametrize("cut", [0, 1, 10, 73])
def test_truncated_or_garbled_scans_are_malformed(known_answers: dict[str, Any], cut: int) -> None:
    local_key, local_id, remote_key, remote_id = vector_inputs(known_answers)
    alice = numeric_fingerprint(local_key, local_id, remote_key, remote_id)
    bob = numeric_fingerprint(remote_key, remote_id, local_key, local_id)
    with pytest.raises(MalformedEncoding):
        alice.matches_scanned(bob.scannable[:cut])
    with pytest.raises(MalformedEncoding):
        alice.matches_scanned(bob.scannable + b"\x00")
    garbled = bytearray(bob.scannable)
    garbled[2] = 0x1A  # remote tag where local belongs
    with pytest.raises(MalformedEncoding):
        alice.matches_scanned(bytes(garbled))


def test_every_flipped_content_byte_of_a_scan_fails_to_match(known_answers: dict[str, Any]) -> None:
    local_key, local_id, remote_key, remote_id = vector_inputs(known_answers)
    alice = numeric_fingerprint(local_key, local_id, remote_key, remote_id)
    bob = numeric_fingerprint(remote_key, remote_id, local_key, local_id)
    content_positions = [*range(6, 38), *range(42, 74)]
    for index in content_positions:
        flipped = bytearray(bob.scannable)
        flipped[index] ^= 0x01
        assert not alice.matches_scanned(bytes(flipped))


def test_display_groups_the_sixty_digits_in_twelve_fives(known_answers: dict[str, Any]) -> None:
    number = vector(known_answers)["displayable"]
    groups = safety_number_groups(number)
    assert len(groups) == 12
    assert all(len(g) == 5 for g in groups)
    assert "".join(groups) == number
    assert format_safety_number(number) == " ".join(groups)
    assert format_safety_number(number, groups_per_line=4) == "\n".join(
        " ".join(groups[i : i + 4]) for i in (0, 4, 8)
    )
    assert format_safety_number(number).startswith("30035 44776 92869")


@pytest.mark.parametrize("bad", ["", "1" * 59, "1" * 61, "1" * 59 + "a", "\u0661" * 60])
def test_display_refuses_anything_but_sixty_ascii_digits(bad: str) -> None:
    with pytest.raises(ValueError):
        format_safety_number(bad)
