"""Linking a further device to an account: the link code, the commitment, the short
authentication string (SAS), the transfer key and the encrypted transfer payload
(docs/protocol.md §16, notes/crypto.md §8).

Two devices of one user take part: E, the existing device (it holds the identity key), and N,
the new one. Each makes an ephemeral X25519 key; the relay carries everything, and may lie.

    commitment = SHA-256("MEDRELAY/v1/link-commit\\0" ‖ Enc(EK_E))
    device     = SHA-256("MEDRELAY/v1/link-device\\0" ‖ text(N's device id) ‖ Enc(N's signing
                 key) ‖ Enc(N's DH key))
    transcript = text(code) ‖ text(username) ‖ Enc(EK_E) ‖ Enc(EK_N) ‖ device
    shared     = X25519(own ephemeral, peer ephemeral)
    sas        = HKDF-SHA256(IKM = shared, salt = ∅, info = "MEDRELAY/v1/link-sas" ‖ transcript,
                 L = 8), read as a big-endian integer mod 10^6: six digits shown as "123 456"
    transfer   = HKDF-SHA256(shared, ∅, "MEDRELAY/v1/link-transfer" ‖ transcript, 32)
    sealed     = nonce (24) ‖ XChaCha20-Poly1305(transfer, nonce, payload,
                 AD = "MEDRELAY/v1/link-payload\\0" ‖ transcript)

`text` is a u32 length prefix and UTF-8; `Enc` the 33-byte key encoding (`keys.py`).

Order matters (Matrix SAS's commitment): E commits to EK_E before anything else, N receives the
commitment BEFORE it sends EK_N, and E reveals EK_E only after EK_N arrived. So a relay in the
middle must fix the key it shows N (its commitment) before it knows EK_N, and the key it shows E
before EK_E is revealed: each side's digits depend on a fresh value the relay could not know when
it chose, and it matches both screens with probability 10^-6 per attempt instead of grinding a
collision. Six digits suffice because an attempt costs a visible failed link.

The transcript binds the code, the account and N's device keys, so a relay that shows E other
device keys (to have E certify a device of the relay's) changes E's digits too.

The payload (`LinkPayload`) carries what N needs to become a full device: the identity private
key (Signal-style multi-device: a linked device can link further devices), the user, issuing and
N's device certificates, the clinic id and root key, the server URL and the account's devices E
knows as its own. Only a device whose user compared the digits ever receives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from medrelay.crypto import aead
from medrelay.crypto.certificates import (
    MAX_CLINIC_KEY_CERTIFICATE_BYTES,
    MAX_DEVICE_CERTIFICATE_BYTES,
    MAX_USER_CERTIFICATE_BYTES,
    ClinicKeyCertificate,
    DeviceCertificate,
    UserCertificate,
)
from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import CryptoError, MalformedEncoding
from medrelay.crypto.identity import MAX_ID_BYTES, check_id
from medrelay.crypto.kdf import constant_time_equal, hkdf_sha256, sha256
from medrelay.crypto.keys import (
    ENCODED_KEY_SIZE,
    DHPrivateKey,
    DHPublicKey,
    SigningKey,
    VerifyKey,
)
from medrelay.crypto.rng import Rng

COMMIT_CONTEXT: Final = b"MEDRELAY/v1/link-commit\x00"
DEVICE_CONTEXT: Final = b"MEDRELAY/v1/link-device\x00"
SAS_INFO: Final = b"MEDRELAY/v1/link-sas"
TRANSFER_INFO: Final = b"MEDRELAY/v1/link-transfer"
PAYLOAD_AD: Final = b"MEDRELAY/v1/link-payload\x00"

CODE_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
CODE_CHARS: Final = 8
"""40 random bits, shown as XXXX-XXXX."""
CODE_GROUP: Final = 4
COMMITMENT_SIZE: Final = 32
SAS_DIGITS: Final = 6
_SAS_BYTES: Final = 8
"""64 bits reduced mod 10^6: the bias is below 2^-44."""
TRANSFER_KEY_SIZE: Final = aead.KEY_SIZE

PAYLOAD_VERSION: Final = 1
MAX_SERVER_URL_BYTES: Final = 512
MAX_OWN_DEVICES: Final = 64
MAX_SEALED_PAYLOAD: Final = 16 * 1024
"""A payload is a few KiB; the bound keeps it well inside a link message (32 KiB)."""


# --- the link code -------------------------------------------------------------------------------


def new_link_code(rng: Rng) -> str:
    """A fresh code in its normalised form (8 characters; `display_code` adds the dash)."""
    bits = int.from_bytes(rng(5), "big")
    return "".join(CODE_ALPHABET[(bits >> (5 * i)) & 31] for i in reversed(range(CODE_CHARS)))


def normalize_link_code(text: str) -> str:
    """The canonical code: upper case, without the dashes and spaces people type (ValueError
    unless 8 characters of the alphabet remain)."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("a link code is 8 characters like 7K2M-Q9XW")
    code = "".join(c for c in text.upper() if c not in "- \t")
    if len(code) != CODE_CHARS or any(c not in CODE_ALPHABET for c in code):
        raise ValueError("a link code is 8 characters like 7K2M-Q9XW")
    return code


def display_code(code: str) -> str:
    """`XXXX-XXXX` for a normalised code."""
    return f"{code[:CODE_GROUP]}-{code[CODE_GROUP:]}"


# --- commitment, transcript, SAS -----------------------------------------------------------------


def commitment(ephemeral: DHPublicKey) -> bytes:
    """E's commitment to its ephemeral key."""
    return sha256(COMMIT_CONTEXT + ephemeral.encode())


def check_commitment(expected: bytes, ephemeral: DHPublicKey) -> bool:
    """Whether `ephemeral` is the key `expected` committed to."""
    return constant_time_equal(expected, commitment(ephemeral))


def device_keys_hash(device_id: str, signing_key: VerifyKey, dh_key: DHPublicKey) -> bytes:
    """The hash of N's device keys that both sides put in the transcript."""
    check_id(device_id, "device id")
    return sha256(
        Writer()
        .raw(DEVICE_CONTEXT)
        .text(device_id, MAX_ID_BYTES)
        .fixed(signing_key.encode(), ENCODED_KEY_SIZE)
        .fixed(dh_key.encode(), ENCODED_KEY_SIZE)
        .to_bytes()
    )


@dataclass(frozen=True, slots=True)
class LinkTranscript:
    """Everything the digits and the transfer key bind, as one side saw it."""

    code: str
    """Normalised (see `normalize_link_code`)."""
    username: str
    existing_key: DHPublicKey
    """EK_E."""
    new_key: DHPublicKey
    """EK_N."""
    device_id: str
    """N's device id, signing key and DH key."""
    signing_key: VerifyKey
    dh_key: DHPublicKey

    def __post_init__(self) -> None:
        if normalize_link_code(self.code) != self.code:
            raise ValueError("the transcript needs the normalised link code")
        check_id(self.username, "username")
        check_id(self.device_id, "device id")
        for value, kind in (
            (self.existing_key, DHPublicKey),
            (self.new_key, DHPublicKey),
            (self.signing_key, VerifyKey),
            (self.dh_key, DHPublicKey),
        ):
            if not isinstance(value, kind):
                raise TypeError(f"a transcript key must be a {kind.__name__}")

    def encode(self) -> bytes:
        return (
            Writer()
            .text(self.code, CODE_CHARS)
            .text(self.username, MAX_ID_BYTES)
            .fixed(self.existing_key.encode(), ENCODED_KEY_SIZE)
            .fixed(self.new_key.encode(), ENCODED_KEY_SIZE)
            .fixed(device_keys_hash(self.device_id, self.signing_key, self.dh_key), 32)
            .to_bytes()
        )


@dataclass(frozen=True, slots=True)
class LinkSecrets:
    """The digits to compare and the key the payload travels under."""

    sas: str
    """Six decimal digits, no space (`format_sas` for display)."""
    transfer_key: bytes = field(repr=False)


def derive_link_secrets(own: DHPrivateKey, transcript: LinkTranscript) -> LinkSecrets:
    """The SAS and transfer key as the holder of `own` (E's or N's ephemeral key) computes them.
    `own` must be one of the transcript's two keys (ValueError otherwise)."""
    if own.public_key == transcript.existing_key:
        peer = transcript.new_key
    elif own.public_key == transcript.new_key:
        peer = transcript.existing_key
    else:
        raise ValueError("the ephemeral key is not part of this transcript")
    shared = own.exchange(peer)
    encoded = transcript.encode()
    digits = hkdf_sha256(shared, b"", SAS_INFO + encoded, _SAS_BYTES)
    number = int.from_bytes(digits, "big") % 10**SAS_DIGITS
    key = hkdf_sha256(shared, b"", TRANSFER_INFO + encoded, TRANSFER_KEY_SIZE)
    return LinkSecrets(f"{number:0{SAS_DIGITS}d}", key)


def format_sas(sas: str) -> str:
    """`123 456` for the digits `123456`."""
    return f"{sas[:3]} {sas[3:]}"


def normalize_sas(text: str) -> str:
    """Digits a person typed (`123 456`, `123-456`), without the separators (ValueError unless
    six digits remain)."""
    digits = "".join(c for c in text if c not in " -\t")
    if len(digits) != SAS_DIGITS or not digits.isascii() or not digits.isdigit():
        raise ValueError("the short authentication string is six digits like 123 456")
    return digits


def same_sas(a: str, b: str) -> bool:
    return constant_time_equal(a.encode("ascii"), b.encode("ascii"))


# --- the transfer payload ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkPayload:
    """What E sends N, encrypted under the transfer key."""

    identity_key: SigningKey
    user_certificate: UserCertificate
    issuing_certificate: ClinicKeyCertificate
    device_certificate: DeviceCertificate
    """N's device certificate, signed by the identity key."""
    clinic_id: str
    root_key: VerifyKey
    server_url: str
    own_devices: tuple[str, ...]
    """The account's devices E enrolled or linked itself (N records them as its own)."""

    def __post_init__(self) -> None:
        check_id(self.clinic_id, "clinic id")
        if len(self.server_url.encode("utf-8")) > MAX_SERVER_URL_BYTES:
            raise ValueError("server URL is too long")
        if len(self.own_devices) > MAX_OWN_DEVICES:
            raise ValueError(f"more than {MAX_OWN_DEVICES} own devices")
        for device_id in self.own_devices:
            check_id(device_id, "device id")

    def __repr__(self) -> str:
        return f"LinkPayload({self.user_certificate.user_id}/{self.device_certificate.device_id})"

    def encode(self) -> bytes:
        writer = (
            Writer()
            .u8(PAYLOAD_VERSION)
            .fixed(self.identity_key.encode(), ENCODED_KEY_SIZE)
            .blob(self.user_certificate.encode(), MAX_USER_CERTIFICATE_BYTES)
            .blob(self.issuing_certificate.encode(), MAX_CLINIC_KEY_CERTIFICATE_BYTES)
            .blob(self.device_certificate.encode(), MAX_DEVICE_CERTIFICATE_BYTES)
            .text(self.clinic_id, MAX_ID_BYTES)
            .fixed(self.root_key.encode(), ENCODED_KEY_SIZE)
            .text(self.server_url, MAX_SERVER_URL_BYTES)
            .u16(len(self.own_devices))
        )
        for device_id in self.own_devices:
            writer.text(device_id, MAX_ID_BYTES)
        return writer.to_bytes()

    @classmethod
    def decode(cls, data: bytes) -> LinkPayload:
        reader = Reader(data, "link payload")
        try:
            reader.version(PAYLOAD_VERSION)
            identity_key = SigningKey.decode(reader.fixed(ENCODED_KEY_SIZE))
            user = UserCertificate.decode(reader.blob(MAX_USER_CERTIFICATE_BYTES))
            issuing = ClinicKeyCertificate.decode(reader.blob(MAX_CLINIC_KEY_CERTIFICATE_BYTES))
            device = DeviceCertificate.decode(reader.blob(MAX_DEVICE_CERTIFICATE_BYTES))
            clinic_id = reader.text(MAX_ID_BYTES)
            root_key = VerifyKey.decode(reader.fixed(ENCODED_KEY_SIZE))
            server_url = reader.text(MAX_SERVER_URL_BYTES)
            count = reader.u16()
            if count > MAX_OWN_DEVICES:
                raise MalformedEncoding(f"link payload: more than {MAX_OWN_DEVICES} devices")
            own = tuple(reader.text(MAX_ID_BYTES) for _ in range(count))
            reader.finish()
            return cls(identity_key, user, issuing, device, clinic_id, root_key, server_url, own)
        except MalformedEncoding:
            raise
        except (CryptoError, ValueError) as exc:
            raise MalformedEncoding(f"link payload: {exc}") from None


def seal_payload(
    secrets: LinkSecrets, transcript: LinkTranscript, payload: LinkPayload, rng: Rng
) -> bytes:
    """The payload encrypted for N."""
    nonce = rng(aead.NONCE_SIZE)
    ad = PAYLOAD_AD + transcript.encode()
    return nonce + aead.encrypt(secrets.transfer_key, nonce, payload.encode(), ad)


def open_payload(secrets: LinkSecrets, transcript: LinkTranscript, sealed: bytes) -> LinkPayload:
    """The payload E sent; `DecryptionFailed` when it was not sealed under this transcript's
    key (another key agreement, a tampered byte), `MalformedEncoding` when it does not parse."""
    if len(sealed) > MAX_SEALED_PAYLOAD:
        raise MalformedEncoding(f"link payload is larger than {MAX_SEALED_PAYLOAD} bytes")
    nonce, ciphertext = sealed[: aead.NONCE_SIZE], sealed[aead.NONCE_SIZE :]
    if len(nonce) != aead.NONCE_SIZE:
        raise MalformedEncoding("link payload is truncated")
    ad = PAYLOAD_AD + transcript.encode()
    return LinkPayload.decode(aead.decrypt(secrets.transfer_key, nonce, ciphertext, ad))
