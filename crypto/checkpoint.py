"""Signed notes and transparency-log checkpoints (C2SP signed-note and tlog-checkpoint).

Owns the text format in which the identity log's key signs its tree heads (notes/crypto.md §7.2),
and in which witnesses later add cosignatures.

Signed note (c2sp.org/signed-note, the format of golang.org/x/mod/sumdb/note):

    <text, ending in a newline>
    <blank line>
    — <key name> base64(key ID (4 bytes) || Ed25519 signature of the text)
    ...one line per signature

The separator is U+2014 EM DASH and a space; base64 is RFC 4648 §4 with padding. The key ID of an
Ed25519 key is SHA-256(name || 0x0A || 0x01 || 32-byte public key)[:4]. A verifier key is written
`<name>+<key ID, 8 lowercase hex digits>+base64(0x01 || public key)` (the sumdb/note vkey form).

Opening a note (`open_note`), as the spec requires: signatures by unknown keys (name and key ID
not both matching a known verifier) are ignored; a signature by a known key must verify, or the
whole note is refused; at least one known key must have signed. Beyond the spec, for a format
that only this log and its witnesses produce: a note is at most 64 KiB and 16 signatures, its
base64 must be canonical, and two signature lines by the same key are refused (Go's opener
skips the repeat; nothing legitimate writes one).

Checkpoint (c2sp.org/tlog-checkpoint): the note text is

    <origin>\\n<tree size, decimal, no leading zeros>\\n<base64(root hash)>\\n[<extension line>\\n]*

Every refusal is a `MalformedEncoding` (the text does not parse) or a `ProofError` (it parses but
is not signed by the key it must be, or is not the checkpoint it must be); nothing else escapes.

Interop: the sumdb/note test key `PeterNeumann` reproduces its published signature byte for byte,
and a real sum.golang.org checkpoint with three cosignatures opens (tests).
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from medrelay.crypto import merkle
from medrelay.crypto.errors import BadSignature, MalformedEncoding, ProofError
from medrelay.crypto.kdf import sha256
from medrelay.crypto.keys import KEY_SIZE, SigningKey, VerifyKey

SIGNATURE_PREFIX: Final = "\u2014 "
"""EM DASH and a space: how every signature line starts."""

SIGNATURE_TYPE_ED25519: Final = 0x01
KEY_ID_SIZE: Final = 4

MAX_NOTE_BYTES: Final = 64 * 1024
MAX_SIGNATURES: Final = 16
"""The spec's floor ("MUST accept at least up to 16") is also our ceiling."""
MAX_KEY_NAME_BYTES: Final = 256

MAX_ORIGIN_BYTES: Final = 256
MAX_EXTENSION_LINES: Final = 16
MAX_EXTENSION_LINE_BYTES: Final = 1024

_NOTE_CONTROL_CHARS: Final = re.compile("[\x00-\x09\x0b-\x1f]")
_KEY_ID_HEX: Final = re.compile("[0-9a-f]{8}")
_TREE_SIZE: Final = re.compile("0|[1-9][0-9]{0,19}")


# --------------------------------------------------------------------------------------------
# Small strict codecs.


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    """Standard padded base64, and only its canonical spelling (no stray bits or characters)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedEncoding(f"{what} is not base64") from None
    if _b64encode(raw) != text:
        raise MalformedEncoding(f"{what} is not canonical base64")
    return raw


def _utf8_length(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise MalformedEncoding(f"{what} is not valid Unicode text") from None


def _has_control_chars(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def _check_key_name(name: object) -> str:
    """Non-empty, no Unicode spaces and no '+' (c2sp.org/signed-note), no control characters."""
    if not isinstance(name, str) or not name:
        raise MalformedEncoding("a key name must be a non-empty string")
    if _utf8_length(name, "key name") > MAX_KEY_NAME_BYTES:
        raise MalformedEncoding(f"a key name is at most {MAX_KEY_NAME_BYTES} bytes")
    if "+" in name or any(char.isspace() for char in name) or _has_control_chars(name):
        raise MalformedEncoding("a key name must not contain spaces, '+' or control characters")
    return name


def _check_note_text(text: str, what: str) -> None:
    """Valid UTF-8 within the size bound, with no control character but newline."""
    if len(text) > MAX_NOTE_BYTES or _utf8_length(text, what) > MAX_NOTE_BYTES:
        raise MalformedEncoding(f"{what} is larger than {MAX_NOTE_BYTES} bytes")
    if _NOTE_CONTROL_CHARS.search(text):
        raise MalformedEncoding(f"{what} contains a control character other than newline")


# --------------------------------------------------------------------------------------------
# Keys.


def note_key_id(name: str, key: VerifyKey) -> bytes:
    """The Ed25519 key ID of c2sp.org/signed-note: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    name = _check_key_name(name)
    material = name.encode("utf-8") + b"\n" + bytes((SIGNATURE_TYPE_ED25519,)) + key.raw
    return sha256(material)[:KEY_ID_SIZE]


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """A trusted note key: the name it signs under and its Ed25519 public key."""

    name: str
    key: VerifyKey

    def __post_init__(self) -> None:
        _check_key_name(self.name)

    @property
    def key_id(self) -> bytes:
        return note_key_id(self.name, self.key)

    def to_text(self) -> str:
        """`name+keyid+base64(0x01 || public key)`, e.g. for a client's configuration."""
        encoded = _b64encode(bytes((SIGNATURE_TYPE_ED25519,)) + self.key.raw)
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def from_text(cls, text: str) -> NoteVerifier:
        """Parse the verifier-key form; the key ID must match the name and key it names.

        Raises `MalformedEncoding`, or `InvalidKey` for a public key that is not a valid point.
        """
        if not isinstance(text, str) or len(text) > MAX_KEY_NAME_BYTES + 64:
            raise MalformedEncoding("verifier key: not a string of plausible length")
        # The name cannot hold '+', but the base64 key can: split at the first two only.
        name, sep1, rest = text.partition("+")
        key_id_hex, sep2, key_text = rest.partition("+")
        if not sep1 or not sep2:
            raise MalformedEncoding("verifier key: expected name+keyid+key")
        _check_key_name(name)
        if not _KEY_ID_HEX.fullmatch(key_id_hex):
            raise MalformedEncoding("verifier key: the key ID must be 8 lowercase hex digits")
        raw = _b64decode(key_text, "verifier key")
        if len(raw) != 1 + KEY_SIZE or raw[0] != SIGNATURE_TYPE_ED25519:
            raise MalformedEncoding("verifier key: not an Ed25519 (type 0x01) key")
        verifier = cls(name, VerifyKey(raw[1:]))
        if verifier.key_id.hex() != key_id_hex:
            raise MalformedEncoding("verifier key: the key ID does not match the name and key")
        return verifier


# --------------------------------------------------------------------------------------------
# Signed notes.


@dataclass(frozen=True, slots=True)
class _SignatureLine:
    name: str
    key_id: bytes
    signature: bytes
    line: str


def _signature_line(name: str, key_id: bytes, signature: bytes) -> str:
    return f"{SIGNATURE_PREFIX}{name} {_b64encode(key_id + signature)}\n"


def _parse_note(note: object) -> tuple[str, list[_SignatureLine]]:
    """Split a note into its text and signature lines, checking the grammar, not signatures."""
    if isinstance(note, bytes | bytearray):
        if len(note) > MAX_NOTE_BYTES:
            raise MalformedEncoding(f"note is larger than {MAX_NOTE_BYTES} bytes")
        try:
            note = bytes(note).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEncoding("note is not valid UTF-8") from None
    if not isinstance(note, str):
        raise MalformedEncoding("note must be text")
    _check_note_text(note, "note")
    # The text ends in a newline and signature lines are never empty, so the last blank line is
    # the separator even when the text has blank lines of its own.
    split = note.rfind("\n\n")
    if split < 0:
        raise MalformedEncoding("note has no blank line before its signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block:
        raise MalformedEncoding("note has no signatures")
    if not block.endswith("\n"):
        raise MalformedEncoding("note must end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedEncoding(f"note has more than {MAX_SIGNATURES} signatures")
    signatures: list[_SignatureLine] = []
    seen: set[tuple[str, bytes]] = set()
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise MalformedEncoding("note has a line after its text that is not a signature")
        name, sep, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
        if not sep:
            raise MalformedEncoding("signature line has no space between name and signature")
        _check_key_name(name)
        raw = _b64decode(encoded, "signature")
        if len(raw) <= KEY_ID_SIZE:
            raise MalformedEncoding("signature is too short to hold a key ID and a signature")
        key_id = raw[:KEY_ID_SIZE]
        if (name, key_id) in seen:
            raise MalformedEncoding(f"note has two signatures by the key {name}+{key_id.hex()}")
        seen.add((name, key_id))
        signatures.append(_SignatureLine(name, key_id, raw[KEY_ID_SIZE:], line + "\n"))
    return text, signatures


def sign_note(body: str, key_name: str, key: SigningKey) -> str:
    """The note `body` signed by `key` under `key_name`. `body` must end in a newline."""
    if not isinstance(body, str):
        raise MalformedEncoding("note text must be a string")
    _check_note_text(body, "note text")
    if not body.endswith("\n"):
        raise MalformedEncoding("note text must end in a newline")
    key_id = note_key_id(key_name, key.verify_key)
    note = body + "\n" + _signature_line(key_name, key_id, key.sign(body.encode("utf-8")))
    _check_note_text(note, "signed note")
    return note


def add_signature(note: str, key_name: str, key: SigningKey) -> str:
    """Add (a witness's) signature to an already signed note; replaces an earlier signature by the
    same key. Checks the note's grammar only: a cosigner must `open_note` it with the keys it
    trusts before vouching for it."""
    text, signatures = _parse_note(note)
    key_id = note_key_id(key_name, key.verify_key)
    kept = [s.line for s in signatures if (s.name, s.key_id) != (key_name, key_id)]
    if len(kept) >= MAX_SIGNATURES:
        raise MalformedEncoding(f"a note holds at most {MAX_SIGNATURES} signatures")
    new_line = _signature_line(key_name, key_id, key.sign(text.encode("utf-8")))
    result = text + "\n" + "".join(kept) + new_line
    _check_note_text(result, "signed note")
    return result


def open_note(note: str | bytes, verifiers: Iterable[NoteVerifier]) -> tuple[str, tuple[str, ...]]:
    """Check a signed note against trusted keys; returns its text and the names of the known keys
    whose signatures verified, in the note's order.

    Raises `MalformedEncoding` when the note does not parse and `ProofError` when a known key's
    signature does not verify or no known key signed.
    """
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for verifier in verifiers:
        slot = (verifier.name, verifier.key_id)
        if known.setdefault(slot, verifier) != verifier:
            raise ProofError(f"two different trusted keys share the name and ID {verifier.name}")
    text, signatures = _parse_note(note)
    message = text.encode("utf-8")
    verified: list[str] = []
    for signature in signatures:
        trusted = known.get((signature.name, signature.key_id))
        if trusted is None:
            continue
        try:
            trusted.key.verify(message, signature.signature)
        except BadSignature:
            raise ProofError(f"the signature by {signature.name} does not verify") from None
        verified.append(signature.name)
    if not verified:
        raise ProofError("note carries no signature by a trusted key")
    return text, tuple(verified)


# --------------------------------------------------------------------------------------------
# Checkpoints.


def _check_line(value: object, what: str, max_bytes: int) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedEncoding(f"{what} must be a non-empty string")
    if _utf8_length(value, what) > max_bytes:
        raise MalformedEncoding(f"{what} is longer than {max_bytes} bytes")
    if _has_control_chars(value):
        raise MalformedEncoding(f"{what} contains control characters")
    return value


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A log's tree head: `size` leaves hashing to `root_hash`, issued by the log `origin`.

    `extension_lines` are opaque, each non-empty; c2sp.org/tlog-checkpoint discourages them
    (monitors cannot audit them), so the identity log writes none.
    """

    origin: str
    size: int
    root_hash: bytes
    extension_lines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "checkpoint origin", MAX_ORIGIN_BYTES)
        if type(self.size) is not int or not 0 <= self.size <= merkle.MAX_TREE_SIZE:
            raise MalformedEncoding("checkpoint size must be an integer in [0, 2**64 - 1]")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != merkle.HASH_SIZE:
            raise MalformedEncoding(f"checkpoint root hash must be {merkle.HASH_SIZE} bytes")
        if not isinstance(self.extension_lines, tuple):
            raise MalformedEncoding("checkpoint extension lines must be a tuple of strings")
        if len(self.extension_lines) > MAX_EXTENSION_LINES:
            raise MalformedEncoding(f"a checkpoint has at most {MAX_EXTENSION_LINES} extensions")
        for line in self.extension_lines:
            _check_line(line, "checkpoint extension line", MAX_EXTENSION_LINE_BYTES)

    def to_body(self) -> str:
        """The note text: origin, size, base64 root, extension lines, each ending in newline."""
        lines = [self.origin, str(self.size), _b64encode(self.root_hash), *self.extension_lines]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_body(cls, body: str) -> Checkpoint:
        """Parse a checkpoint's note text strictly; the result re-encodes to exactly `body`."""
        if not isinstance(body, str):
            raise MalformedEncoding("checkpoint text must be a string")
        _check_note_text(body, "checkpoint text")
        if not body.endswith("\n"):
            raise MalformedEncoding("checkpoint text must end in a newline")
        lines = body[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedEncoding("checkpoint text needs origin, size and root hash lines")
        origin, size_text, root_text, *extensions = lines
        if not _TREE_SIZE.fullmatch(size_text):
            raise MalformedEncoding("checkpoint size must be decimal without leading zeros")
        root_hash = _b64decode(root_text, "checkpoint root hash")
        return cls(origin, int(size_text), root_hash, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, key_name: str, log_key: SigningKey) -> str:
    """The checkpoint as a note signed by the log key (c2sp.org/tlog-checkpoint)."""
    return sign_note(checkpoint.to_body(), key_name, log_key)


def verify_checkpoint(note: str | bytes, verifier: NoteVerifier, origin: str) -> Checkpoint:
    """Open a checkpoint note signed by the log key `verifier` and issued by the log `origin`.

    Signatures by other keys (witnesses) are ignored here.
    """
    text, _ = open_note(note, (verifier,))
    checkpoint = Checkpoint.from_body(text)
    if checkpoint.origin != origin:
        raise ProofError("checkpoint is for another log (its origin differs)")
    return checkpoint


def verify_checkpoint_update(
    old: Checkpoint, new: Checkpoint, consistency_proof: Sequence[bytes]
) -> None:
    """Check that `new` extends `old`: same log, no fewer leaves, and a consistency proof from
    old to new (equal sizes need equal roots). Raises `ProofError` otherwise."""
    if old.origin != new.origin:
        raise ProofError("checkpoints are from different logs (their origins differ)")
    if new.size < old.size:
        raise ProofError(f"the log shrank from {old.size} to {new.size} leaves")
    merkle.verify_consistency(old.size, new.size, old.root_hash, new.root_hash, consistency_proof)
