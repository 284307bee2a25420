"""Device linking's cryptography (medrelay.crypto.linking): both sides derive the same digits and
transfer key; changing any key, the code, the account or the new device's keys changes the
digits; a relay that swaps the ephemeral keys makes the two screens differ; the commitment binds
the existing device's key; the payload round-trips and refuses tampering; and the construction
recomputed from its specification with the bare primitives gives the same bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from typing import Any

import pytest
from nacl import bindings

from medrelay.crypto.certificates import (
    ClinicKeyPurpose,
    Role,
    issue_clinic_key_certificate,
    issue_device_certificate,
    issue_user_certificate,
)
from medrelay.crypto.errors import DecryptionFailed, MalformedEncoding
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.linking import (
    CODE_ALPHABET,
    LinkPayload,
    LinkTranscript,
    check_commitment,
    commitment,
    derive_link_secrets,
    display_code,
    format_sas,
    new_link_code,
    normalize_link_code,
    normalize_sas,
    open_payload,
    same_sas,
    seal_payload,
)
from medrelay.crypto.rng import Rng, seeded_rng


@dataclasses.dataclass
class Sides:
    existing: DHPrivateKey
    new: DHPrivateKey
    signing: SigningKey
    dh: DHPrivateKey
    transcript: LinkTranscript


def sides(rng: Rng, code: str = "7K2MQ9XW", username: str = "dr.ivanova") -> Sides:
    existing, new = DHPrivateKey.generate(rng), DHPrivateKey.generate(rng)
    signing, dh = SigningKey.generate(rng), DHPrivateKey.generate(rng)
    transcript = LinkTranscript(
        code,
        username,
        existing.public_key,
        new.public_key,
        "k3v9x2ab",
        signing.verify_key,
        dh.public_key,
    )
    return Sides(existing, new, signing, dh, transcript)


def payload(rng: Rng, s: Sides) -> LinkPayload:
    root, issuing, identity = (SigningKey.generate(rng) for _ in range(3))
    issuing_cert = issue_clinic_key_certificate(
        root,
        clinic_id="clinic.test",
        purpose=ClinicKeyPurpose.ISSUING,
        key=issuing.verify_key,
        not_before_ms=0,
        not_after_ms=10**13,
        serial=1,
    )
    user_cert = issue_user_certificate(
        issuing,
        user_id="dr.ivanova",
        role=Role.DOCTOR,
        display_name="Dr. Ivanova",
        identity_key=identity.verify_key,
        not_before_ms=0,
        not_after_ms=10**13,
        serial=2,
    )
    device_cert = issue_device_certificate(
        identity,
        user_id="dr.ivanova",
        device_id="k3v9x2ab",
        signing_key=s.signing.verify_key,
        dh_key=s.dh.public_key,
        created_at_ms=1_763_884_800_000,
    )
    return LinkPayload(
        identity_key=identity,
        user_certificate=user_cert,
        issuing_certificate=issuing_cert,
        device_certificate=device_cert,
        clinic_id="clinic.test",
        root_key=root.verify_key,
        server_url="https://relay.clinic.example:8448",
        own_devices=("phone001", "k3v9x2ab"),
    )


# --- agreement ----------------------------------------------------------------------------------


def test_both_devices_derive_the_same_digits_and_transfer_key(rng: Rng) -> None:
    s = sides(rng)
    on_existing = derive_link_secrets(s.existing, s.transcript)
    on_new = derive_link_secrets(s.new, s.transcript)
    assert on_existing == on_new
    assert len(on_existing.sas) == 6 and on_existing.sas.isdigit()
    assert len(on_existing.transfer_key) == 32
    assert on_existing.transfer_key.hex() not in repr(on_existing)


def test_an_ephemeral_key_outside_the_transcript_is_refused(rng: Rng) -> None:
    s = sides(rng)
    with pytest.raises(ValueError, match="not part of this transcript"):
        derive_link_secrets(DHPrivateKey.generate(rng), s.transcript)


@pytest.mark.parametrize(
    "field", ["code", "username", "existing_key", "new_key", "device_id", "signing_key", "dh_key"]
)
def test_changing_any_part_of_the_transcript_changes_the_digits(rng: Rng, field: str) -> None:
    s = sides(rng)
    other: Any = {
        "code": "7K2MQ9XX",
        "username": "dr.petrova",
        "existing_key": DHPrivateKey.generate(rng).public_key,
        "new_key": DHPrivateKey.generate(rng).public_key,
        "device_id": "k3v9x2ac",
        "signing_key": SigningKey.generate(rng).verify_key,
        "dh_key": DHPrivateKey.generate(rng).public_key,
    }[field]
    changed = dataclasses.replace(s.transcript, **{field: other})
    # The new device computes with its own key: keep it in the changed transcript.
    own = s.existing if field == "new_key" else s.new
    before = derive_link_secrets(own, s.transcript)
    after = derive_link_secrets(own, changed)
    assert after.sas != before.sas
    assert after.transfer_key != before.transfer_key


def test_a_relay_that_swaps_the_ephemeral_keys_shows_the_two_screens_different_digits(
    rng: Rng,
) -> None:
    s = sides(rng)
    relay_to_new, relay_to_existing = DHPrivateKey.generate(rng), DHPrivateKey.generate(rng)
    # E sees the relay's key where N's should be, N sees the relay's where E's should be.
    seen_by_existing = dataclasses.replace(s.transcript, new_key=relay_to_existing.public_key)
    seen_by_new = dataclasses.replace(s.transcript, existing_key=relay_to_new.public_key)
    on_existing = derive_link_secrets(s.existing, seen_by_existing)
    on_new = derive_link_secrets(s.new, seen_by_new)
    assert on_existing.sas != on_new.sas
    # ... and the relay, which can talk to each side, cannot make one payload open on the other.
    sealed = seal_payload(on_existing, seen_by_existing, payload(rng, s), rng)
    with pytest.raises(DecryptionFailed):
        open_payload(on_new, seen_by_new, sealed)


def test_the_commitment_binds_the_existing_devices_key(rng: Rng) -> None:
    key = DHPrivateKey.generate(rng).public_key
    committed = commitment(key)
    assert len(committed) == 32
    assert check_commitment(committed, key)
    assert not check_commitment(committed, DHPrivateKey.generate(rng).public_key)
    assert not check_commitment(committed[:-1] + bytes([committed[-1] ^ 1]), key)


# --- the payload --------------------------------------------------------------------------------


def test_the_payload_round_trips_under_the_transfer_key(rng: Rng) -> None:
    s = sides(rng)
    secrets = derive_link_secrets(s.existing, s.transcript)
    sent = payload(rng, s)
    sealed = seal_payload(secrets, s.transcript, sent, rng)
    received = open_payload(derive_link_secrets(s.new, s.transcript), s.transcript, sealed)
    assert received.encode() == sent.encode()
    assert received.identity_key.seed == sent.identity_key.seed
    assert received.own_devices == ("phone001", "k3v9x2ab")
    assert sent.identity_key.seed.hex() not in repr(received)
    assert LinkPayload.decode(sent.encode()).encode() == sent.encode()


def test_every_tampered_byte_of_the_sealed_payload_is_refused(rng: Rng) -> None:
    s = sides(rng)
    secrets = derive_link_secrets(s.existing, s.transcript)
    sealed = seal_payload(secrets, s.transcript, payload(rng, s), rng)
    for index in range(0, len(sealed), 7):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptionFailed):
            open_payload(secrets, s.transcript, bytes(tampered))
    with pytest.raises(DecryptionFailed):
        open_payload(secrets, s.transcript, sealed[:-1])
    with pytest.raises(MalformedEncoding):
        open_payload(secrets, s.transcript, sealed[:10])


def test_a_payload_sealed_for_another_transcript_does_not_open(rng: Rng) -> None:
    s = sides(rng)
    secrets = derive_link_secrets(s.existing, s.transcript)
    sealed = seal_payload(secrets, s.transcript, payload(rng, s), rng)
    other = dataclasses.replace(s.transcript, device_id="someone1")
    with pytest.raises(DecryptionFailed):
        open_payload(secrets, other, sealed)  # same key, other associated data


def test_payload_decoding_is_strict(rng: Rng) -> None:
    encoded = payload(rng, sides(rng)).encode()
    with pytest.raises(MalformedEncoding, match="trailing"):
        LinkPayload.decode(encoded + b"\x00")
    with pytest.raises(MalformedEncoding):
        LinkPayload.decode(encoded[:-1])
    with pytest.raises(MalformedEncoding, match="version"):
        LinkPayload.decode(b"\x02" + encoded[1:])


# --- codes and digits ---------------------------------------------------------------------------


def test_link_codes_are_forty_random_bits_in_crockford_base32() -> None:
    rng = seeded_rng(b"link codes")
    codes = {new_link_code(rng) for _ in range(200)}
    assert len(codes) == 200
    for code in codes:
        assert len(code) == 8 and set(code) <= set(CODE_ALPHABET)
        assert normalize_link_code(display_code(code)) == code
        assert normalize_link_code(display_code(code).lower().replace("-", " ")) == code


@pytest.mark.parametrize(
    "text", ["", "7K2M-Q9X", "7K2M-Q9XWZ", "7K2M-Q9XU", "7K2M_Q9XW", "x" * 100]
)
def test_malformed_link_codes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="8 characters"):
        normalize_link_code(text)


def test_digits_are_shown_in_two_groups_and_typed_any_way() -> None:
    assert format_sas("123456") == "123 456"
    assert normalize_sas(" 123 456") == normalize_sas("123-456") == "123456"
    assert same_sas("123456", "123456") and not same_sas("123456", "123457")
    for bad in ("12345", "1234567", "12a456", "\uff11\uff12\uff13\uff14\uff15\uff16"):
        with pytest.raises(ValueError, match="six digits"):
            normalize_sas(bad)


# --- the construction from its specification ----------------------------------------------------


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">I", len(data)) + data


def test_the_digits_and_key_match_the_documented_construction(rng: Rng) -> None:
    s = sides(rng)
    t = s.transcript
    device = hashlib.sha256(
        b"MEDRELAY/v1/link-device\x00"
        + _text(t.device_id)
        + b"\x01"
        + t.signing_key.raw
        + b"\x02"
        + t.dh_key.raw
    ).digest()
    transcript = (
        _text(t.code)
        + _text(t.username)
        + b"\x02"
        + t.existing_key.raw
        + b"\x02"
        + t.new_key.raw
        + device
    )
    shared = bindings.crypto_scalarmult(s.existing.raw, t.new_key.raw)
    number = int.from_bytes(_hkdf(shared, b"MEDRELAY/v1/link-sas" + transcript, 8), "big")
    secrets = derive_link_secrets(s.existing, t)
    assert secrets.sas == f"{number % 1_000_000:06d}"
    assert secrets.transfer_key == _hkdf(shared, b"MEDRELAY/v1/link-transfer" + transcript, 32)
    assert (
        commitment(t.existing_key)
        == hashlib.sha256(b"MEDRELAY/v1/link-commit\x00\x02" + t.existing_key.raw).digest()
    )
    sealed = seal_payload(secrets, t, payload(rng, s), rng)
    plain = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        sealed[24:], b"MEDRELAY/v1/link-payload\x00" + transcript, sealed[:24], secrets.transfer_key
    )
    assert plain[0] == 1  # the payload's version byte
