"""A clinic's keys and identity log for the crypto tests: a root key, issuing and log keys it
certified, and the log's leaves and per-subject heads (crypto.transparency), all in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from medrelay.crypto.certificates import (
    ClinicKeyCertificate,
    ClinicKeyPurpose,
    issue_clinic_key_certificate,
)
from medrelay.crypto.keys import SigningKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.transparency import (
    CLINIC_SUBJECT,
    ClinicTrust,
    EventKind,
    LogEvent,
    next_event,
)

YEAR_MS = 365 * 24 * 3600 * 1000


@dataclass
class ClinicLog:
    """`t0` is the first event's time (each later one a millisecond on); clinic keys are valid
    from `keys_from` for five years after `t0`."""

    rng: Rng
    clinic_id: str
    t0: int
    keys_from: int
    root: SigningKey = field(init=False)
    issuing: SigningKey = field(init=False)
    log: SigningKey = field(init=False)
    certificates: list[ClinicKeyCertificate] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)
    heads: dict[str, LogEvent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = SigningKey.generate(self.rng)
        self.issuing = self.new_key(ClinicKeyPurpose.ISSUING)
        self.log = self.new_key(ClinicKeyPurpose.LOG)

    def new_key(self, purpose: ClinicKeyPurpose) -> SigningKey:
        """A clinic key certified by the root, its certificate logged."""
        key = SigningKey.generate(self.rng)
        cert = issue_clinic_key_certificate(
            self.root,
            clinic_id=self.clinic_id,
            purpose=purpose,
            key=key.verify_key,
            not_before_ms=self.keys_from,
            not_after_ms=self.t0 + 5 * YEAR_MS,
            serial=len(self.certificates),
        )
        self.certificates.append(cert)
        self.append(EventKind.CLINIC_KEY_CERTIFIED, CLINIC_SUBJECT, cert.encode())
        return key

    def trust(self) -> ClinicTrust:
        return ClinicTrust.build(self.clinic_id, self.root.verify_key, self.certificates)

    def append(self, kind: EventKind, subject: str, payload: bytes) -> LogEvent:
        event = next_event(
            self.heads.get(subject), kind, subject, self.t0 + len(self.leaves), payload
        )
        self.heads[subject] = event
        self.leaves.append(event.encode())
        return event
