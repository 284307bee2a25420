"""The identity log's events: encodings, per-user chain replay, clinic trust and the auditor."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from clinic_log import ClinicLog

from medrelay.crypto import merkle
from medrelay.crypto.certificates import (
    ClinicKeyPurpose,
    DeviceCertificate,
    Role,
    UserCertificate,
    issue_clinic_key_certificate,
    issue_device_certificate,
    issue_user_certificate,
)
from medrelay.crypto.checkpoint import Checkpoint, sign_checkpoint
from medrelay.crypto.errors import MalformedEncoding, ProofError
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.transparency import (
    CLINIC_SUBJECT,
    ClinicTrust,
    EventKind,
    LogEvent,
    Revocation,
    audit_log,
    issue_revocation,
    log_origin,
    replay_user_events,
)

CLINIC = "clinic-a"
T0 = 1_800_000_000_000
YEAR = 365 * 24 * 3600 * 1000


@dataclass
class Clinic(ClinicLog):
    clinic_id: str = CLINIC
    t0: int = T0
    keys_from: int = T0

    def certify(
        self, user_id: str, identity: SigningKey, previous: UserCertificate | None = None
    ) -> UserCertificate:
        return issue_user_certificate(
            self.issuing,
            user_id=user_id,
            role=Role.DOCTOR,
            display_name="Dr. Test",
            identity_key=identity.verify_key,
            not_before_ms=T0,
            not_after_ms=T0 + YEAR,
            serial=7,
            previous_certificate_hash=None if previous is None else previous.hash(),
        )

    def device(self, user_id: str, device_id: str, identity: SigningKey) -> DeviceCertificate:
        return issue_device_certificate(
            identity,
            user_id=user_id,
            device_id=device_id,
            signing_key=SigningKey.generate(self.rng).verify_key,
            dh_key=DHPrivateKey.generate(self.rng).public_key,
            created_at_ms=T0,
        )

    def events_of(self, subject: str) -> list[LogEvent]:
        decoded = [LogEvent.decode(leaf) for leaf in self.leaves]
        return [event for event in decoded if event.subject == subject]


@pytest.fixture
def clinic(rng: Rng) -> Clinic:
    return Clinic(rng)


def enroll(clinic: Clinic, user_id: str, *devices: str) -> SigningKey:
    identity = SigningKey.generate(clinic.rng)
    clinic.append(EventKind.USER_CERTIFIED, user_id, clinic.certify(user_id, identity).encode())
    for device_id in devices:
        cert = clinic.device(user_id, device_id, identity)
        clinic.append(EventKind.DEVICE_ADDED, user_id, cert.encode())
    return identity


def revoke(clinic: Clinic, user_id: str, device_id: str = "") -> None:
    revocation = issue_revocation(
        clinic.issuing, user_id=user_id, device_id=device_id, revoked_at_ms=T0
    )
    kind = EventKind.DEVICE_REVOKED if device_id else EventKind.USER_REVOKED
    clinic.append(kind, user_id, revocation.encode())


# --- encodings ------------------------------------------------------------------------------


def test_events_and_revocations_round_trip_exactly(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone")
    revoke(clinic, "alice", "phone")
    for leaf in clinic.leaves:
        assert LogEvent.decode(leaf).encode() == leaf
    revocation = Revocation.decode(clinic.events_of("alice")[-1].payload)
    assert (revocation.user_id, revocation.device_id) == ("alice", "phone")
    assert Revocation.decode(revocation.encode()) == revocation


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b + b"\x00",
        lambda b: b[:-1],
        lambda b: b[:1] + b"\x09" + b[2:],
        lambda b: b"\x02" + b[1:],
        lambda b: b"",
    ],
    ids=["trailing", "truncated", "unknown-kind", "unknown-version", "empty"],
)
def test_malformed_event_bytes_are_refused_cleanly(clinic: Clinic, mutate: object) -> None:
    enroll(clinic, "alice")
    leaf = clinic.leaves[-1]
    with pytest.raises(MalformedEncoding):
        LogEvent.decode(mutate(leaf))  # type: ignore[operator]


def test_event_invariants_are_checked_on_construction() -> None:
    with pytest.raises(ValueError, match="previous hash"):
        LogEvent(EventKind.DEVICE_ADDED, "alice", 1, None, T0, b"x")
    with pytest.raises(ValueError, match="previous hash"):
        LogEvent(EventKind.USER_CERTIFIED, "alice", 0, bytes(32), T0, b"x")
    with pytest.raises(ValueError, match="clinic"):
        LogEvent(EventKind.CLINIC_KEY_CERTIFIED, "alice", 0, None, T0, b"x")
    with pytest.raises(ValueError, match="clinic"):
        LogEvent(EventKind.USER_CERTIFIED, CLINIC_SUBJECT, 0, None, T0, b"x")


# --- replaying a user's chain -------------------------------------------------------------


def test_replay_gives_the_active_devices(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone", "laptop", "tablet")
    revoke(clinic, "alice", "laptop")
    state = replay_user_events("alice", clinic.events_of("alice"), clinic.trust())
    assert sorted(state.devices) == ["phone", "tablet"]
    assert not state.revoked
    assert state.events == 5
    assert state.head_hash == clinic.heads["alice"].hash()
    assert state.certificate.user_id == "alice"


def test_a_revoked_account_has_no_devices_and_no_later_events(clinic: Clinic) -> None:
    identity = enroll(clinic, "alice", "phone")
    revoke(clinic, "alice")
    state = replay_user_events("alice", clinic.events_of("alice"), clinic.trust())
    assert state.revoked and not state.devices
    clinic.append(
        EventKind.DEVICE_ADDED, "alice", clinic.device("alice", "again", identity).encode()
    )
    with pytest.raises(ProofError, match="follows the revocation"):
        replay_user_events("alice", clinic.events_of("alice"), clinic.trust())


def test_an_omitted_event_breaks_the_chain(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone", "rogue")
    events = clinic.events_of("alice")
    with pytest.raises(ProofError, match="seq"):
        replay_user_events("alice", [events[0], events[2]], clinic.trust())
    # Renumbered to hide the gap: then the hash chain does not link.
    renumbered = replace(events[2], seq=1)
    with pytest.raises(ProofError, match="does not chain"):
        replay_user_events("alice", [events[0], renumbered], clinic.trust())


def test_reordered_events_are_refused(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone", "laptop")
    events = clinic.events_of("alice")
    with pytest.raises(ProofError):
        replay_user_events("alice", [events[0], events[2], events[1]], clinic.trust())


def test_a_device_not_certified_by_the_users_identity_key_is_refused(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone")
    forged = clinic.device("alice", "rogue", SigningKey.generate(clinic.rng))
    clinic.append(EventKind.DEVICE_ADDED, "alice", forged.encode())
    with pytest.raises(ProofError, match="device_added"):
        replay_user_events("alice", clinic.events_of("alice"), clinic.trust())


def test_a_user_certificate_from_an_uncertified_issuing_key_is_refused(clinic: Clinic) -> None:
    rogue = SigningKey.generate(clinic.rng)
    cert = issue_user_certificate(
        rogue,
        user_id="mallory",
        role=Role.DOCTOR,
        display_name="Dr. Rogue",
        identity_key=rogue.verify_key,
        not_before_ms=T0,
        not_after_ms=T0 + YEAR,
        serial=1,
    )
    clinic.append(EventKind.USER_CERTIFIED, "mallory", cert.encode())
    with pytest.raises(ProofError, match="never certified"):
        replay_user_events("mallory", clinic.events_of("mallory"), clinic.trust())


def test_a_revocation_signed_by_another_key_is_refused(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone")
    forged = issue_revocation(
        SigningKey.generate(clinic.rng), user_id="alice", device_id="phone", revoked_at_ms=T0
    )
    clinic.append(EventKind.DEVICE_REVOKED, "alice", forged.encode())
    with pytest.raises(ProofError, match="never certified"):
        replay_user_events("alice", clinic.events_of("alice"), clinic.trust())


def test_chain_must_start_with_a_certificate_and_be_nonempty(clinic: Clinic) -> None:
    identity = SigningKey.generate(clinic.rng)
    clinic.append(EventKind.DEVICE_ADDED, "bob", clinic.device("bob", "phone", identity).encode())
    with pytest.raises(ProofError, match="start with a user certificate"):
        replay_user_events("bob", clinic.events_of("bob"), clinic.trust())
    with pytest.raises(ProofError, match="no events"):
        replay_user_events("bob", [], clinic.trust())


def test_a_new_identity_key_drops_devices_of_the_old_one(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone")
    first = UserCertificate.decode(clinic.events_of("alice")[0].payload)
    new_identity = SigningKey.generate(clinic.rng)
    renewed = clinic.certify("alice", new_identity, previous=first)
    clinic.append(EventKind.USER_CERTIFIED, "alice", renewed.encode())
    clinic.append(
        EventKind.DEVICE_ADDED, "alice", clinic.device("alice", "new", new_identity).encode()
    )
    state = replay_user_events("alice", clinic.events_of("alice"), clinic.trust())
    assert list(state.devices) == ["new"]
    assert state.certificate == renewed


# --- clinic trust and rotation --------------------------------------------------------------


def test_rotated_issuing_and_log_keys_stay_trusted(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone")
    clinic.issuing = clinic.new_key(ClinicKeyPurpose.ISSUING)
    old_log = clinic.log
    clinic.log = clinic.new_key(ClinicKeyPurpose.LOG)
    enroll(clinic, "bob", "phone")
    trust = clinic.trust()
    assert len(trust.issuing) == 2 and len(trust.log) == 2
    for user in ("alice", "bob"):
        assert replay_user_events(user, clinic.events_of(user), trust).devices
    checkpoint = Checkpoint(log_origin(CLINIC), 3, bytes(32))
    for key in (old_log, clinic.log):
        note = sign_checkpoint(checkpoint, log_origin(CLINIC), key)
        assert trust.open_checkpoint(note) == checkpoint


def test_trust_refuses_certificates_the_root_did_not_sign(clinic: Clinic) -> None:
    other_root = SigningKey.generate(clinic.rng)
    forged = issue_clinic_key_certificate(
        other_root,
        clinic_id=CLINIC,
        purpose=ClinicKeyPurpose.LOG,
        key=other_root.verify_key,
        not_before_ms=T0,
        not_after_ms=T0 + YEAR,
        serial=1,
    )
    with pytest.raises(ProofError, match="does not verify"):
        ClinicTrust.build(CLINIC, clinic.root.verify_key, [*clinic.certificates, forged])


def test_checkpoints_signed_by_an_unknown_key_or_for_another_log_are_refused(
    clinic: Clinic,
) -> None:
    trust = clinic.trust()
    rogue = SigningKey.generate(clinic.rng)
    ours = Checkpoint(log_origin(CLINIC), 1, bytes(32))
    with pytest.raises(ProofError):
        trust.open_checkpoint(sign_checkpoint(ours, log_origin(CLINIC), rogue))
    other = Checkpoint(log_origin("clinic-b"), 1, bytes(32))
    with pytest.raises(ProofError):
        trust.open_checkpoint(sign_checkpoint(other, log_origin(CLINIC), clinic.log))


# --- the auditor --------------------------------------------------------------------------


def test_audit_replays_the_whole_log(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone", "laptop")
    enroll(clinic, "bob", "phone")
    revoke(clinic, "alice", "laptop")
    revoke(clinic, "bob")
    result = audit_log(clinic.leaves, clinic.trust())
    assert result.size == len(clinic.leaves)
    leaf_hashes = [merkle.leaf_hash(leaf) for leaf in clinic.leaves]
    assert result.root_hash == merkle.root_from_leaf_hashes(leaf_hashes)
    assert (result.users, result.active_devices, result.revoked_users) == (2, 1, 1)


def test_audit_names_the_first_bad_leaf(clinic: Clinic) -> None:
    enroll(clinic, "alice", "phone", "laptop")
    leaves = list(clinic.leaves)
    with pytest.raises(ProofError, match="leaf 3"):
        audit_log([*leaves[:3], leaves[4]], clinic.trust())
    with pytest.raises(ProofError, match="leaf 1 is not a log event"):
        audit_log([leaves[0], b"junk", *leaves[2:]], clinic.trust())
    forged = clinic.device("alice", "rogue", SigningKey.generate(clinic.rng))
    clinic.append(EventKind.DEVICE_ADDED, "alice", forged.encode())
    with pytest.raises(ProofError, match="device_added"):
        audit_log(clinic.leaves, clinic.trust())
