"""The error types of medrelay.crypto.

Every failure inside the crypto package surfaces as a `CryptoError` subclass, so callers never
catch `nacl.exceptions.*`, `argon2.exceptions.*` or a bare `RuntimeError`/`ValueError` from a
binding. Each class carries a stable `code` that upper layers can put on the wire or in a log
without leaking anything secret.
"""

from __future__ import annotations

import enum


class CryptoError(Exception):
    """Base class: something cryptographic did not hold."""

    code = "crypto_error"


class MalformedEncoding(CryptoError):
    """Bytes that do not parse as the canonical encoding they claim to be."""

    code = "malformed_encoding"


class InvalidKey(CryptoError):
    """A key that is the wrong size, of the wrong type, or cryptographically unusable
    (a low-order X25519 point, an Ed25519 point outside the main subgroup)."""

    code = "invalid_key"


class BadSignature(CryptoError):
    """An Ed25519 signature that does not verify."""

    code = "bad_signature"


class DecryptionFailed(CryptoError):
    """An AEAD or secretstream ciphertext that does not authenticate."""

    code = "decryption_failed"


class CertificateFailure(enum.Enum):
    """Exactly what failed when a certificate chain was checked."""

    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_ROLE = "wrong_role"
    WRONG_SUBJECT = "wrong_subject"
    MALFORMED = "malformed"


class CertificateError(CryptoError):
    """A certificate or chain that does not verify; `failure` names the reason and `subject`
    which certificate of the chain it was (e.g. "issuer", "user", "device")."""

    code = "certificate_invalid"

    def __init__(self, failure: CertificateFailure, subject: str, detail: str = "") -> None:
        self.failure = failure
        self.subject = subject
        self.detail = detail
        message = f"{subject} certificate: {failure.value}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)


class SessionError(CryptoError):
    """A ratchet or X3DH message that cannot be accepted; the session is left unchanged."""

    code = "session_error"


class DuplicateMessage(SessionError):
    """A ratchet message that was already decrypted (a replay)."""

    code = "duplicate_message"


class SkipLimitExceeded(SessionError):
    """A ratchet message too far ahead of its chain (more than the per-chain skip limit)."""

    code = "skip_limit_exceeded"


class UnknownPrekey(SessionError):
    """An X3DH initial message naming a signed or one-time prekey this device does not hold
    (already used, rotated away, or never issued)."""

    code = "unknown_prekey"


class WrongPassphrase(CryptoError):
    """A sealed blob that does not open with the given passphrase."""

    code = "wrong_passphrase"


class ProofError(CryptoError):
    """A Merkle inclusion or consistency proof, or a checkpoint, that does not verify."""

    code = "proof_invalid"


class AttachmentError(CryptoError):
    """An attachment whose ciphertext, stream or plaintext does not match its descriptor."""

    code = "attachment_invalid"
