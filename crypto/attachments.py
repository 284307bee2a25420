"""Attachments: a file encrypted with secretstream under a random per-file key (notes/crypto.md
§9.7).

The descriptor travels inside the signed content, so the sender's signature covers the key, the
sizes and both hashes. The encrypted blob itself travels separately (uploaded to the relay).

Construction: libsodium `crypto_secretstream_xchacha20poly1305` under a random 32-byte key with a
random 24-byte header (both from the injected rng; the header is kept in the descriptor, not in the
blob). The plaintext is cut into 64 KiB chunks; every chunk but the last is pushed with
TAG_MESSAGE, the last (1 to 64 KiB, or empty for an empty file) with TAG_FINAL. The blob is the
concatenation of the encrypted chunks, each 17 bytes longer than its plaintext, so a receiver cuts
it into 65,553-byte pieces and a shorter last piece; no associated data. (A receiver also accepts
an empty FINAL chunk after full ones: the signed hashes and size pin the content either way.)

Receiving (`decrypt_attachment`) checks, in order, and names the first that fails
(`AttachmentCheckFailed.check`): the ciphertext's SHA-256 against the descriptor (constant-time),
that every chunk authenticates (which also catches reordering, truncation inside a chunk and a
wrong key or header), that no chunk carries another tag than MESSAGE/FINAL, that nothing follows
the FINAL chunk, that a FINAL chunk exists, then the plaintext size and SHA-256. The streaming
`AttachmentDecryptor` runs the same checks, except that it can only compare the ciphertext hash in
`finish`, after the full chunks were authenticated on arrival; the short last chunk is opened, and
its plaintext released, only in `finish`, after the hash check.

Header from the rng: libsodium's `init_push` draws the header from its own RNG, which would make
encryption unreproducible and bypass the injected `Rng`. `init_pull` derives exactly the state
`init_push` leaves (HChaCha20 subkey, counter 1, nonce suffix, zero padding) from a given header,
so the encrypting state is built with `init_pull`; a test pins this equivalence against
`init_push`.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Final

from nacl import bindings
from nacl.exceptions import CryptoError as NaclCryptoError

from medrelay.crypto.encoding import Reader, Writer
from medrelay.crypto.errors import AttachmentError, MalformedEncoding
from medrelay.crypto.kdf import constant_time_equal
from medrelay.crypto.rng import Rng

DESCRIPTOR_VERSION: Final = 1
KEY_SIZE: Final = 32
HEADER_SIZE: Final = 24
HASH_SIZE: Final = 32
MAX_BLOB_ID_BYTES: Final = 128
MAX_MEDIA_TYPE_BYTES: Final = 255
MAX_FILE_NAME_BYTES: Final = 255
MAX_ATTACHMENT_SIZE: Final = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AttachmentDescriptor:
    """Everything a recipient needs to fetch, check and decrypt one attachment."""

    blob_id: str
    key: bytes = field(repr=False)
    header: bytes
    size: int
    media_type: str
    file_name: str
    plaintext_sha256: bytes
    ciphertext_sha256: bytes

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise ValueError("attachment key must be 32 bytes")
        if len(self.header) != HEADER_SIZE:
            raise ValueError("secretstream header must be 24 bytes")
        if not 0 <= self.size <= MAX_ATTACHMENT_SIZE:
            raise ValueError("attachment size out of range")
        if len(self.plaintext_sha256) != HASH_SIZE or len(self.ciphertext_sha256) != HASH_SIZE:
            raise ValueError("attachment hashes must be 32 bytes")
        for value, limit, what in (
            (self.blob_id, MAX_BLOB_ID_BYTES, "blob id"),
            (self.media_type, MAX_MEDIA_TYPE_BYTES, "media type"),
            (self.file_name, MAX_FILE_NAME_BYTES, "file name"),
        ):
            if len(value.encode("utf-8")) > limit:
                raise ValueError(f"attachment {what} longer than {limit} bytes")

    def encode(self) -> bytes:
        return (
            Writer()
            .u8(DESCRIPTOR_VERSION)
            .text(self.blob_id, MAX_BLOB_ID_BYTES)
            .fixed(self.key, KEY_SIZE)
            .fixed(self.header, HEADER_SIZE)
            .u64(self.size)
            .text(self.media_type, MAX_MEDIA_TYPE_BYTES)
            .text(self.file_name, MAX_FILE_NAME_BYTES)
            .fixed(self.plaintext_sha256, HASH_SIZE)
            .fixed(self.ciphertext_sha256, HASH_SIZE)
            .to_bytes()
        )

    @classmethod
    def read(cls, reader: Reader) -> AttachmentDescriptor:
        """Read one descriptor from inside a larger structure."""
        reader.version(DESCRIPTOR_VERSION)
        fields = (
            reader.text(MAX_BLOB_ID_BYTES),
            reader.fixed(KEY_SIZE),
            reader.fixed(HEADER_SIZE),
            reader.u64(),
            reader.text(MAX_MEDIA_TYPE_BYTES),
            reader.text(MAX_FILE_NAME_BYTES),
            reader.fixed(HASH_SIZE),
            reader.fixed(HASH_SIZE),
        )
        try:
            return cls(*fields)
        except ValueError as exc:
            raise MalformedEncoding(f"attachment descriptor: {exc}") from None

    @classmethod
    def decode(cls, data: bytes) -> AttachmentDescriptor:
        reader = Reader(data, "attachment descriptor")
        descriptor = cls.read(reader)
        reader.finish()
        return descriptor


# --- encryption and decryption ------------------------------------------------------------------

CHUNK_SIZE: Final = 64 * 1024
CHUNK_OVERHEAD: Final = bindings.crypto_secretstream_xchacha20poly1305_ABYTES  # 17
ENCRYPTED_CHUNK_SIZE: Final = CHUNK_SIZE + CHUNK_OVERHEAD

_TAG_MESSAGE: Final = bindings.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: Final = bindings.crypto_secretstream_xchacha20poly1305_TAG_FINAL


def encrypted_size(size: int) -> int:
    """The length of the blob that a `size`-byte file encrypts to."""
    chunks = max(1, -(-size // CHUNK_SIZE))
    return size + chunks * CHUNK_OVERHEAD


class AttachmentCheck(enum.Enum):
    """The check on a received attachment that failed."""

    CIPHERTEXT_HASH = "ciphertext_hash"
    CHUNK_AUTHENTICATION = "chunk_authentication"
    UNEXPECTED_TAG = "unexpected_tag"
    DATA_AFTER_FINAL_CHUNK = "data_after_final_chunk"
    FINAL_CHUNK_MISSING = "final_chunk_missing"
    SIZE = "size"
    PLAINTEXT_HASH = "plaintext_hash"


class AttachmentCheckFailed(AttachmentError):
    """A received attachment that does not match its descriptor; `check` says which check."""

    code = "attachment_invalid"

    def __init__(self, check: AttachmentCheck, detail: str = "") -> None:
        self.check = check
        message = f"attachment check failed: {check.value}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)


def _check_text_fields(blob_id: str, media_type: str, file_name: str) -> None:
    # Fail before encrypting anything, through the descriptor's own validation.
    try:
        AttachmentDescriptor(
            blob_id, bytes(KEY_SIZE), bytes(HEADER_SIZE), 0, media_type, file_name,
            bytes(HASH_SIZE), bytes(HASH_SIZE),
        )  # fmt: skip
    except ValueError as exc:
        raise AttachmentError(str(exc)) from None


def _encrypting_state(
    key: bytes, header: bytes
) -> bindings.crypto_secretstream_xchacha20poly1305_state:
    # init_pull yields the state init_push would have left with this header (module docstring).
    state = bindings.crypto_secretstream_xchacha20poly1305_state()
    bindings.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    return state


class AttachmentEncryptor:
    """Encrypts one file fed in pieces of any size; `update` returns the ciphertext ready so
    far, `finish` the last of it and the descriptor. Only one chunk is ever buffered."""

    __slots__ = (
        "_blob_id",
        "_ciphertext_hash",
        "_file_name",
        "_finished",
        "_header",
        "_key",
        "_media_type",
        "_pending",
        "_plaintext_hash",
        "_size",
        "_state",
    )

    def __init__(self, media_type: str, file_name: str, rng: Rng, blob_id: str = "") -> None:
        _check_text_fields(blob_id, media_type, file_name)
        self._blob_id = blob_id
        self._media_type = media_type
        self._file_name = file_name
        self._key = rng(KEY_SIZE)
        self._header = rng(HEADER_SIZE)
        self._state = _encrypting_state(self._key, self._header)
        self._pending = bytearray()
        self._size = 0
        self._plaintext_hash = hashlib.sha256()
        self._ciphertext_hash = hashlib.sha256()
        self._finished = False

    def update(self, data: bytes) -> bytes:
        """Feed the next piece of the file; returns the ciphertext of every chunk completed."""
        return b"".join(self._update_chunks(data))

    def finish(self) -> tuple[AttachmentDescriptor, bytes]:
        """The descriptor and the last ciphertext (the FINAL chunk)."""
        self._check_open()
        self._finished = True
        final = self._push(bytes(self._pending), _TAG_FINAL)
        self._pending.clear()
        descriptor = AttachmentDescriptor(
            blob_id=self._blob_id,
            key=self._key,
            header=self._header,
            size=self._size,
            media_type=self._media_type,
            file_name=self._file_name,
            plaintext_sha256=self._plaintext_hash.digest(),
            ciphertext_sha256=self._ciphertext_hash.digest(),
        )
        return descriptor, final

    def _update_chunks(self, data: bytes) -> list[bytes]:
        self._check_open()
        if self._size + len(data) > MAX_ATTACHMENT_SIZE:
            raise AttachmentError(f"attachment larger than {MAX_ATTACHMENT_SIZE} bytes")
        self._size += len(data)
        self._plaintext_hash.update(data)
        view = memoryview(data)
        chunks: list[bytes] = []
        position = 0
        while position < len(view):
            if len(self._pending) == CHUNK_SIZE:
                # More data follows this full chunk, so it is not the last one.
                chunks.append(self._push(bytes(self._pending), _TAG_MESSAGE))
                self._pending.clear()
            take = min(CHUNK_SIZE - len(self._pending), len(view) - position)
            self._pending += view[position : position + take]
            position += take
        return chunks

    def _push(self, chunk: bytes, tag: int) -> bytes:
        encrypted: bytes = bindings.crypto_secretstream_xchacha20poly1305_push(
            self._state, chunk, None, tag
        )
        self._ciphertext_hash.update(encrypted)
        return encrypted

    def _check_open(self) -> None:
        if self._finished:
            raise AttachmentError("attachment encryptor already finished")

    def __repr__(self) -> str:
        return f"AttachmentEncryptor(size={self._size}, finished={self._finished})"


def encrypt_attachment(
    data: bytes, media_type: str, file_name: str, rng: Rng, blob_id: str = ""
) -> tuple[AttachmentDescriptor, bytes]:
    """The descriptor and the encrypted blob of a whole file held in memory. The blob id is
    usually known only after upload: set it then with `dataclasses.replace`."""
    encryptor = AttachmentEncryptor(media_type, file_name, rng, blob_id)
    chunks = encryptor._update_chunks(data)
    descriptor, final = encryptor.finish()
    chunks.append(final)
    return descriptor, b"".join(chunks)


class _ChunkReader:
    """Cuts a blob into encrypted chunks and opens them: every check except the ciphertext hash."""

    __slots__ = ("_descriptor", "_failed", "_final_seen", "_index", "_pending", "_plaintext_hash",
                 "_size", "_state")  # fmt: skip

    def __init__(self, descriptor: AttachmentDescriptor) -> None:
        self._descriptor = descriptor
        self._state = bindings.crypto_secretstream_xchacha20poly1305_state()
        bindings.crypto_secretstream_xchacha20poly1305_init_pull(
            self._state, descriptor.header, descriptor.key
        )
        self._pending = bytearray()
        self._final_seen = False
        self._index = 0
        self._size = 0
        self._plaintext_hash = hashlib.sha256()
        self._failed: AttachmentCheck | None = None

    def fail(self, check: AttachmentCheck, detail: str) -> AttachmentCheckFailed:
        self._failed = check
        return AttachmentCheckFailed(check, detail)

    def check_usable(self) -> None:
        if self._failed is not None:
            raise AttachmentCheckFailed(self._failed, "an earlier check already failed")

    def update(self, data: bytes) -> list[bytes]:
        self.check_usable()
        view = memoryview(data)
        plaintexts: list[bytes] = []
        position = 0
        while position < len(view):
            if self._final_seen:
                raise self.fail(
                    AttachmentCheck.DATA_AFTER_FINAL_CHUNK, f"after chunk {self._index}"
                )
            take = min(ENCRYPTED_CHUNK_SIZE - len(self._pending), len(view) - position)
            self._pending += view[position : position + take]
            position += take
            if len(self._pending) == ENCRYPTED_CHUNK_SIZE:
                plaintexts.append(self._open(bytes(self._pending)))
                self._pending.clear()
        return plaintexts

    def finish(self) -> bytes:
        """Open the last, short chunk (if any) and run the end-of-stream checks; its plaintext is
        returned only when they all pass."""
        self.check_usable()
        last = b""
        if self._pending:
            last = self._open(bytes(self._pending))
            self._pending.clear()
        if not self._final_seen:
            raise self.fail(AttachmentCheck.FINAL_CHUNK_MISSING, "the stream is truncated")
        if self._size != self._descriptor.size:
            raise self.fail(
                AttachmentCheck.SIZE, f"{self._size} bytes, descriptor says {self._descriptor.size}"
            )
        if not constant_time_equal(
            self._plaintext_hash.digest(), self._descriptor.plaintext_sha256
        ):
            raise self.fail(AttachmentCheck.PLAINTEXT_HASH, "plaintext SHA-256 differs")
        return last

    def _open(self, chunk: bytes) -> bytes:
        index = self._index
        self._index += 1
        try:
            plaintext, tag = bindings.crypto_secretstream_xchacha20poly1305_pull(
                self._state, chunk, None
            )
        except NaclCryptoError:
            raise self.fail(
                AttachmentCheck.CHUNK_AUTHENTICATION, f"chunk {index} does not authenticate"
            ) from None
        if tag == _TAG_FINAL:
            self._final_seen = True
        elif tag != _TAG_MESSAGE:
            raise self.fail(AttachmentCheck.UNEXPECTED_TAG, f"chunk {index} has tag {tag}")
        self._size += len(plaintext)
        if self._size > self._descriptor.size:
            # Stop early rather than decrypt more than the sender declared.
            raise self.fail(
                AttachmentCheck.SIZE, f"more than the descriptor's {self._descriptor.size} bytes"
            )
        self._plaintext_hash.update(plaintext)
        result: bytes = plaintext
        return result


class AttachmentDecryptor:
    """Decrypts one blob fed in pieces of any size, against its descriptor.

    `update` returns plaintext as soon as whole 64 KiB chunks authenticate; `finish` returns the
    rest. Plaintext from `update` is genuine but possibly incomplete: the file is known whole and
    unaltered only when `finish` returns, so write it to a temporary place and discard it if any
    call raises. After a failed
    check every further call fails too.
    """

    __slots__ = ("_ciphertext_hash", "_descriptor", "_finished", "_reader")

    def __init__(self, descriptor: AttachmentDescriptor) -> None:
        self._descriptor = descriptor
        self._reader = _ChunkReader(descriptor)
        self._ciphertext_hash = hashlib.sha256()
        self._finished = False

    def update(self, ciphertext: bytes) -> bytes:
        """Feed the next piece of the blob; returns the plaintext of every chunk completed."""
        self._check_open()
        self._reader.check_usable()
        self._ciphertext_hash.update(ciphertext)
        return b"".join(self._reader.update(ciphertext))

    def finish(self) -> bytes:
        """Run the end-of-stream checks (ciphertext hash, FINAL chunk, size, plaintext hash) and
        return the rest of the plaintext (the last chunk, when it was shorter than 64 KiB)."""
        self._check_open()
        self._reader.check_usable()
        self._finished = True
        if not constant_time_equal(
            self._ciphertext_hash.digest(), self._descriptor.ciphertext_sha256
        ):
            raise self._reader.fail(AttachmentCheck.CIPHERTEXT_HASH, "ciphertext SHA-256 differs")
        return self._reader.finish()

    def _check_open(self) -> None:
        if self._finished:
            raise AttachmentError("attachment decryptor already finished")

    def __repr__(self) -> str:
        return f"AttachmentDecryptor(size={self._descriptor.size}, finished={self._finished})"


def decrypt_attachment(descriptor: AttachmentDescriptor, ciphertext: bytes) -> bytes:
    """The plaintext of `ciphertext`, after every check in the module docstring; the ciphertext
    hash is checked before anything is decrypted."""
    actual = hashlib.sha256(ciphertext).digest()
    if not constant_time_equal(actual, descriptor.ciphertext_sha256):
        raise AttachmentCheckFailed(AttachmentCheck.CIPHERTEXT_HASH, "ciphertext SHA-256 differs")
    reader = _ChunkReader(descriptor)
    plaintexts = reader.update(ciphertext)
    plaintexts.append(reader.finish())
    return b"".join(plaintexts)
