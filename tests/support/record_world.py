"""A clinic for record-bundle tests: clinic keys and an identity log in memory (clinic_log), a
doctor (phone, and a laptop revoked at REVOKED_AT), a patient and a nurse, signed messages of
one thread, and record bundles with their log evidence. Shared by the crypto tests of
`medrelay.crypto.records` and the records gateway's tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from clinic_log import ClinicLog

from medrelay.crypto.attachments import AttachmentDescriptor
from medrelay.crypto.certificates import (
    Role,
    UserCertificate,
    issue_device_certificate,
    issue_user_certificate,
    verify_device,
)
from medrelay.crypto.checkpoint import Checkpoint, sign_checkpoint
from medrelay.crypto.content import (
    KIND_TEXT,
    Content,
    SignedContent,
    canonical_recipients,
    content_hash,
    new_message_id,
    new_thread_id,
    sign_content,
)
from medrelay.crypto.identity import DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.merkle import MerkleTree, leaf_hash
from medrelay.crypto.records import (
    RecordBundle,
    RecordVisit,
    build_record_bundle,
    verify_record_bundle,
)
from medrelay.crypto.rng import Rng
from medrelay.crypto.transparency import EventKind, LogEvent, issue_revocation, log_origin

CLINIC = "clinic-a"
DOCTOR = "dr.ivanova"
PATIENT = "petrov"
NURSE = "nurse.orlova"
T0 = 1_800_000_000_000
MINUTE = 60_000
YEAR = 365 * 24 * 3600 * 1000
REVOKED_AT = T0 + 30 * MINUTE
"""When the doctor's laptop is revoked."""
SECRET_TEXT = "Blood pressure 150/95 since Monday"


@dataclass
class World(ClinicLog):
    """A clinic with a root, issuing and log key, an identity log holding a doctor (phone and a
    laptop that gets revoked), a patient and a nurse, and a thread between doctor and patient."""

    clinic_id: str = CLINIC
    t0: int = T0
    keys_from: int = T0 - YEAR
    devices: dict[tuple[str, str], DeviceKeys] = field(default_factory=dict)
    user_certs: dict[str, UserCertificate] = field(default_factory=dict)
    last_hash: dict[str, bytes] = field(default_factory=dict)
    thread_id: bytes = b""
    revocation_leaf: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.enroll(DOCTOR, Role.DOCTOR, "phone", "laptop")
        self.enroll(PATIENT, Role.PATIENT, "phone")
        self.enroll(NURSE, Role.NURSE, "tablet")
        revocation = issue_revocation(
            self.issuing, user_id=DOCTOR, device_id="laptop", revoked_at_ms=REVOKED_AT
        )
        self.revocation_leaf = len(self.leaves)
        self.append(EventKind.DEVICE_REVOKED, DOCTOR, revocation.encode())
        self.thread_id = new_thread_id(self.rng)

    def enroll(self, user_id: str, role: Role, *device_ids: str) -> None:
        identity = SigningKey.generate(self.rng)
        user_cert = issue_user_certificate(
            self.issuing,
            user_id=user_id,
            role=role,
            display_name=user_id,
            identity_key=identity.verify_key,
            not_before_ms=T0 - YEAR,
            not_after_ms=T0 + YEAR,
            serial=len(self.user_certs),
        )
        self.user_certs[user_id] = user_cert
        self.append(EventKind.USER_CERTIFIED, user_id, user_cert.encode())
        for device_id in device_ids:
            signing, dh = SigningKey.generate(self.rng), DHPrivateKey.generate(self.rng)
            device_cert = issue_device_certificate(
                identity,
                user_id=user_id,
                device_id=device_id,
                signing_key=signing.verify_key,
                dh_key=dh.public_key,
                created_at_ms=T0,
            )
            self.append(EventKind.DEVICE_ADDED, user_id, device_cert.encode())
            self.devices[user_id, device_id] = DeviceKeys(
                verify_device(user_cert, device_cert), signing, dh
            )

    def send(
        self,
        user_id: str,
        to: str,
        minute: int,
        *,
        device_id: str = "phone",
        attachments: tuple[AttachmentDescriptor, ...] = (),
        **changes: object,
    ) -> SignedContent:
        """A message signed by the sender's device, chained to that sender's previous one."""
        device = self.devices[user_id, device_id]
        content = Content(
            thread_id=self.thread_id,
            message_id=new_message_id(self.rng),
            sender_user_id=user_id,
            sender_device_id=device_id,
            sender_certificate_hash=device.identity.certificate_hash,
            recipients=canonical_recipients([to]),
            sent_at_ms=T0 + minute * MINUTE,
            previous_hash=self.last_hash.get(user_id),
            log_view=None,
            kind=KIND_TEXT,
            text=f"{SECRET_TEXT} (minute {minute})",
            attachments=attachments,
        )
        content = dataclasses.replace(content, **changes)  # type: ignore[arg-type]
        self.last_hash[user_id] = content_hash(content)
        return sign_content(content, device)

    def checkpoint_note(self, key: SigningKey | None = None) -> str:
        tree = MerkleTree.from_leaf_hashes(leaf_hash(leaf) for leaf in self.leaves)
        checkpoint = Checkpoint(log_origin(CLINIC), tree.size, tree.root())
        return sign_checkpoint(checkpoint, log_origin(CLINIC), key or self.log)

    def evidence(self, *users: str) -> dict[str, list[tuple[int, LogEvent | bytes, list[bytes]]]]:
        tree = MerkleTree.from_leaf_hashes(leaf_hash(leaf) for leaf in self.leaves)
        out: dict[str, list[tuple[int, LogEvent | bytes, list[bytes]]]] = {}
        for index, leaf in enumerate(self.leaves):
            event = LogEvent.decode(leaf)
            if event.subject in users:
                proof = list(tree.inclusion_proof(index))
                out.setdefault(event.subject, []).append((index, event, proof))
        return out

    def visit(self, **changes: object) -> RecordVisit:
        visit = RecordVisit(
            visit_id="V-2027-000123",
            indication_code="I10",
            opened_ms=T0,
            closed_ms=T0 + 120 * MINUTE,
            patient=PATIENT,
            clinician=DOCTOR,
        )
        return dataclasses.replace(visit, **changes)  # type: ignore[arg-type]

    def bundle(
        self,
        messages: Sequence[SignedContent],
        *,
        visit: RecordVisit | None = None,
        users: Sequence[str] = (DOCTOR, PATIENT),
    ) -> RecordBundle:
        return build_record_bundle(
            visit=visit or self.visit(),
            thread_id=self.thread_id,
            checkpoint_note=self.checkpoint_note(),
            clinic_keys=self.certificates,
            evidence=self.evidence(*users),
            messages=messages,
        )

    def verify(self, bundle: RecordBundle) -> object:
        return verify_record_bundle(bundle, clinic_id=CLINIC, root_key=self.root.verify_key)


def attachment(rng: Rng) -> AttachmentDescriptor:
    return AttachmentDescriptor(
        blob_id="blob-" + rng(8).hex(),
        key=rng(32),
        header=rng(24),
        size=48_213,
        media_type="application/pdf",
        file_name="ecg.pdf",
        plaintext_sha256=rng(32),
        ciphertext_sha256=rng(32),
    )
