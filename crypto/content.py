"""Signed message content: what a device says, signed so that authorship is provable in the record
(notes/crypto.md §9.5, non-repudiation).

    sig           = Ed25519_DSK(b"MEDRELAY/v1/msg\\x00" ‖ SHA-512(canonical(Content)))
    SignedContent = canonical(Content) ‖ sig

The identical `SignedContent` bytes are the Double Ratchet plaintext for every recipient device
and for the sender's other devices, so every copy carries the same signature and any copy can be
mirrored into the medical record. The signature covers the thread and the recipient list, so a
signed message cannot be re-addressed to someone else (surreptitious forwarding); a receiving
client must still check that it is among `recipients` (`Content.is_addressed_to`).

`previous_hash` chains a sender's messages within a thread (`content_hash` of the previous one), so
a record can show that nothing in between was left out. `log_view` carries the sender's view of
the transparency log for split-view gossip (notes §7.2, item 4).

Canonical encoding of `Content` (version 1), through `medrelay.crypto.encoding`:

    u8 version | thread_id[16] | message_id[16] | text sender_user_id | text sender_device_id
    | sender_certificate_hash[32] | u8 n, then n recipients as text (sorted, unique, 1..64)
    | u64 sent_at_ms | bool, previous_hash[32]? | bool, (u64 tree_size, root_hash[32])?
    | text kind | text body | u8 m, then m AttachmentDescriptor (0..16) | bool, reply_to[16]?
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from medrelay.crypto.attachments import AttachmentDescriptor
from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import BadSignature, MalformedEncoding
from medrelay.crypto.identity import MAX_ID_BYTES, DeviceIdentity, DeviceKeys, check_id
from medrelay.crypto.kdf import sha256, sha512
from medrelay.crypto.keys import SIGNATURE_SIZE
from medrelay.crypto.rng import Rng

SIGNATURE_CONTEXT: Final = b"MEDRELAY/v1/msg\x00"
CONTENT_VERSION: Final = 1

ID_SIZE: Final = 16
HASH_SIZE: Final = 32
MAX_RECIPIENTS: Final = 64
MAX_ATTACHMENTS: Final = 16
MAX_TEXT_BYTES: Final = 64 * 1024
MAX_KIND_BYTES: Final = 32
MAX_SIGNED_CONTENT_BYTES: Final = 1024 * 1024
_U64_MAX: Final = 2**64 - 1

KIND_TEXT: Final = "text"
# Lower-case ASCII words: kinds are protocol names ("text", later "notice", "receipt"), not prose.
_KIND_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]*")


def canonical_recipients(user_ids: Iterable[str]) -> tuple[str, ...]:
    """The canonical form of a recipient list: unique user ids, sorted (code point order, which
    is also UTF-8 byte order)."""
    return tuple(sorted(set(user_ids)))


@dataclass(frozen=True, slots=True)
class LogView:
    """A transparency-log checkpoint as the sender saw it: tree size and root hash."""

    tree_size: int
    root_hash: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.tree_size <= _U64_MAX:
            raise ValueError("log tree size must fit in 64 unsigned bits")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise ValueError("log root hash must be 32 bytes")


def _check_fixed(value: bytes | None, size: int, what: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{what} must be {size} bytes")


@dataclass(frozen=True, slots=True)
class Content:
    """One message as its sender signs it. `recipients` must already be canonical (see
    `canonical_recipients`); a non-canonical list is refused rather than silently reordered, so a
    decoded value always re-encodes to the bytes that were signed."""

    thread_id: bytes
    message_id: bytes
    sender_user_id: str
    sender_device_id: str
    sender_certificate_hash: bytes
    recipients: tuple[str, ...]
    sent_at_ms: int
    previous_hash: bytes | None
    log_view: LogView | None
    kind: str
    # Health data and attachment keys: kept out of repr so a log line cannot carry them.
    text: str = field(repr=False)
    attachments: tuple[AttachmentDescriptor, ...] = field(default=(), repr=False)
    reply_to: bytes | None = None

    def __post_init__(self) -> None:
        _check_fixed(self.thread_id, ID_SIZE, "thread id")
        _check_fixed(self.message_id, ID_SIZE, "message id")
        check_id(self.sender_user_id, "sender user id")
        check_id(self.sender_device_id, "sender device id")
        _check_fixed(self.sender_certificate_hash, HASH_SIZE, "sender certificate hash")
        if not isinstance(self.recipients, tuple):
            raise ValueError("recipients must be a tuple")
        if not 1 <= len(self.recipients) <= MAX_RECIPIENTS:
            raise ValueError(f"a message has 1 to {MAX_RECIPIENTS} recipients")
        for recipient in self.recipients:
            check_id(recipient, "recipient user id")
        if self.recipients != canonical_recipients(self.recipients):
            raise ValueError("recipients must be sorted and unique")
        if not 0 <= self.sent_at_ms <= _U64_MAX:
            raise ValueError("sent_at_ms must fit in 64 unsigned bits")
        _check_fixed(self.previous_hash, HASH_SIZE, "previous hash", optional=True)
        if self.log_view is not None and not isinstance(self.log_view, LogView):
            raise ValueError("log_view must be a LogView")
        if len(self.kind) > MAX_KIND_BYTES or not _KIND_PATTERN.fullmatch(self.kind):
            raise ValueError("kind must be a short lower-case ASCII word")
        if len(self.text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise ValueError(f"text is longer than {MAX_TEXT_BYTES} bytes")
        if not isinstance(self.attachments, tuple) or len(self.attachments) > MAX_ATTACHMENTS:
            raise ValueError(f"a message has at most {MAX_ATTACHMENTS} attachments (a tuple)")
        if not all(isinstance(a, AttachmentDescriptor) for a in self.attachments):
            raise ValueError("attachments must be AttachmentDescriptor values")
        _check_fixed(self.reply_to, ID_SIZE, "reply_to", optional=True)

    def is_addressed_to(self, user_id: str) -> bool:
        """Whether `user_id` is among the signed recipients; a receiver must check this."""
        return user_id in self.recipients

    def encode(self) -> bytes:
        """The canonical encoding: the exact bytes that are hashed and signed."""
        writer = (
            Writer()
            .u8(CONTENT_VERSION)
            .fixed(self.thread_id, ID_SIZE)
            .fixed(self.message_id, ID_SIZE)
            .text(self.sender_user_id, MAX_ID_BYTES)
            .text(self.sender_device_id, MAX_ID_BYTES)
            .fixed(self.sender_certificate_hash, HASH_SIZE)
            .u8(len(self.recipients))
        )
        for recipient in self.recipients:
            writer.text(recipient, MAX_ID_BYTES)
        writer.u64(self.sent_at_ms)
        writer.boolean(self.previous_hash is not None)
        if self.previous_hash is not None:
            writer.fixed(self.previous_hash, HASH_SIZE)
        writer.boolean(self.log_view is not None)
        if self.log_view is not None:
            writer.u64(self.log_view.tree_size).fixed(self.log_view.root_hash, HASH_SIZE)
        writer.text(self.kind, MAX_KIND_BYTES).text(self.text, MAX_TEXT_BYTES)
        writer.u8(len(self.attachments))
        for attachment in self.attachments:
            writer.raw(attachment.encode())
        writer.boolean(self.reply_to is not None)
        if self.reply_to is not None:
            writer.fixed(self.reply_to, ID_SIZE)
        return writer.to_bytes()

    @classmethod
    def decode(cls, data: bytes) -> Content:
        """Parse a canonical encoding strictly (bounded; non-canonical recipients refused)."""
        if len(data) > MAX_SIGNED_CONTENT_BYTES:
            raise MalformedEncoding(f"content: longer than {MAX_SIGNED_CONTENT_BYTES} bytes")
        reader = Reader(data, "content")
        reader.version(CONTENT_VERSION)
        thread_id = reader.fixed(ID_SIZE)
        message_id = reader.fixed(ID_SIZE)
        sender_user_id = reader.text(MAX_ID_BYTES)
        sender_device_id = reader.text(MAX_ID_BYTES)
        sender_certificate_hash = reader.fixed(HASH_SIZE)
        recipient_count = reader.u8()
        if not 1 <= recipient_count <= MAX_RECIPIENTS:
            raise MalformedEncoding(f"content: {recipient_count} recipients")
        recipients = tuple(reader.text(MAX_ID_BYTES) for _ in range(recipient_count))
        sent_at_ms = reader.u64()
        previous_hash = reader.fixed(HASH_SIZE) if reader.boolean() else None
        log_view = _read_log_view(reader) if reader.boolean() else None
        kind = reader.text(MAX_KIND_BYTES)
        text = reader.text(MAX_TEXT_BYTES)
        attachment_count = reader.u8()
        if attachment_count > MAX_ATTACHMENTS:
            raise MalformedEncoding(f"content: {attachment_count} attachments")
        attachments = tuple(AttachmentDescriptor.read(reader) for _ in range(attachment_count))
        reply_to = reader.fixed(ID_SIZE) if reader.boolean() else None
        reader.finish()
        try:
            return cls(
                thread_id=thread_id,
                message_id=message_id,
                sender_user_id=sender_user_id,
                sender_device_id=sender_device_id,
                sender_certificate_hash=sender_certificate_hash,
                recipients=recipients,
                sent_at_ms=sent_at_ms,
                previous_hash=previous_hash,
                log_view=log_view,
                kind=kind,
                text=text,
                attachments=attachments,
                reply_to=reply_to,
            )
        except ValueError as exc:
            raise MalformedEncoding(f"content: {exc}") from None


def _read_log_view(reader: Reader) -> LogView:
    tree_size = reader.u64()
    return LogView(tree_size, reader.fixed(HASH_SIZE))


def content_hash(content: Content) -> bytes:
    """SHA-256 of the canonical encoding: what the sender's next message puts in previous_hash."""
    return sha256(content.encode())


def _signature_input(encoded_content: bytes) -> bytes:
    return SIGNATURE_CONTEXT + sha512(encoded_content)


@dataclass(frozen=True, slots=True)
class SignedContent:
    """Content with its sender device's signature; `encode()` is the ratchet plaintext."""

    content: Content
    signature: bytes
    # The canonical encoding of `content`, kept from signing or decoding so it is not rebuilt
    # for every verification. The grammar is prefix-coded (fixed-width integers, length
    # prefixes, strict UTF-8, booleans 0/1), so bytes that decode are exactly the canonical
    # encoding of what they decode to.
    _content_bytes: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_fixed(self.signature, SIGNATURE_SIZE, "signature")

    @property
    def content_bytes(self) -> bytes:
        return self._content_bytes or self.content.encode()

    def encode(self) -> bytes:
        return self.content_bytes + self.signature

    @classmethod
    def decode(cls, data: bytes) -> SignedContent:
        """Parse (not verify) signed content; see `verify_signed_content`."""
        if len(data) > MAX_SIGNED_CONTENT_BYTES:
            raise MalformedEncoding(f"signed content: longer than {MAX_SIGNED_CONTENT_BYTES} bytes")
        if len(data) < SIGNATURE_SIZE:
            raise MalformedEncoding("signed content: truncated")
        data = bytes(data)
        content_bytes = data[:-SIGNATURE_SIZE]
        return cls(Content.decode(content_bytes), data[-SIGNATURE_SIZE:], content_bytes)


def sign_content(content: Content, device: DeviceKeys) -> SignedContent:
    """Sign `content` with this device's signing key. The content must name this device as its
    sender (user, device and certificate hash): a device never signs in someone else's name."""
    identity = device.identity
    if (
        content.sender_user_id != identity.user_id
        or content.sender_device_id != identity.device_id
        or content.sender_certificate_hash != identity.certificate_hash
    ):
        raise ValueError("content's sender fields do not name this device")
    encoded = content.encode()
    signature = device.signing_key.sign(_signature_input(encoded))
    return SignedContent(content, signature, encoded)


def verify_signed_content(signed: SignedContent, sender: DeviceIdentity) -> Content:
    """Return the content if `sender` (a device whose certificate chain was verified) signed it
    and the content names exactly that device and certificate as its sender; else BadSignature."""
    content = signed.content
    if (
        content.sender_user_id != sender.user_id
        or content.sender_device_id != sender.device_id
        or content.sender_certificate_hash != sender.certificate_hash
    ):
        raise BadSignature("content names another sender device or certificate")
    sender.signing_key.verify(_signature_input(signed.content_bytes), signed.signature)
    return content


def _new_id(rng: Rng) -> bytes:
    value = rng(ID_SIZE)
    if len(value) != ID_SIZE:
        raise ValueError("random source returned the wrong number of bytes")
    return value


def new_message_id(rng: Rng) -> bytes:
    """A fresh random 128-bit message id."""
    return _new_id(rng)


def new_thread_id(rng: Rng) -> bytes:
    """A fresh random 128-bit thread id."""
    return _new_id(rng)
