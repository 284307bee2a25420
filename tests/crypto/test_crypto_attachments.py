"""Attachment encryption (medrelay.crypto.attachments): secretstream in 64 KiB chunks, and every
check a receiver runs against the descriptor."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings

from medrelay.crypto.attachments import (
    CHUNK_OVERHEAD,
    CHUNK_SIZE,
    ENCRYPTED_CHUNK_SIZE,
    MAX_ATTACHMENT_SIZE,
    AttachmentCheck,
    AttachmentCheckFailed,
    AttachmentDecryptor,
    AttachmentDescriptor,
    AttachmentEncryptor,
    decrypt_attachment,
    encrypt_attachment,
    encrypted_size,
)
from medrelay.crypto.errors import AttachmentError
from medrelay.crypto.rng import Rng, seeded_rng

KIB = 1024
MIB = 1024 * KIB
SIZES = [0, 1, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, 3 * MIB + 5]
TAG_MESSAGE = bindings.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_PUSH = bindings.crypto_secretstream_xchacha20poly1305_TAG_PUSH
TAG_REKEY = bindings.crypto_secretstream_xchacha20poly1305_TAG_REKEY
TAG_FINAL = bindings.crypto_secretstream_xchacha20poly1305_TAG_FINAL


def content(size: int, seed: bytes = b"content") -> bytes:
    """Deterministic file content of any size (the seeded rng is too slow for megabytes)."""
    return hashlib.shake_256(seed).digest(size)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def encrypt(data: bytes, seed: bytes = b"attachment") -> tuple[AttachmentDescriptor, bytes]:
    return encrypt_attachment(data, "application/pdf", "result.pdf", seeded_rng(seed))


def chunks_of(blob: bytes) -> list[bytes]:
    return [blob[i : i + ENCRYPTED_CHUNK_SIZE] for i in range(0, len(blob), ENCRYPTED_CHUNK_SIZE)]


def rehashed(descriptor: AttachmentDescriptor, blob: bytes) -> AttachmentDescriptor:
    """The descriptor a (malicious or buggy) sender would sign for this altered blob, so the
    ciphertext hash passes and the deeper checks are reached."""
    return dataclasses.replace(descriptor, ciphertext_sha256=sha256(blob))


def craft(chunks: list[tuple[bytes, int]]) -> tuple[AttachmentDescriptor, bytes]:
    """A stream pushed chunk by chunk with the given tags through plain libsodium, with a
    descriptor whose size and both hashes match it: only the stream structure can fail."""
    key, header = bytes(range(32)), bytes(range(24))
    state = bindings.crypto_secretstream_xchacha20poly1305_state()
    bindings.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    blob = b"".join(
        bindings.crypto_secretstream_xchacha20poly1305_push(state, plaintext, None, tag)
        for plaintext, tag in chunks
    )
    plaintext = b"".join(p for p, _ in chunks)
    descriptor = AttachmentDescriptor(
        blob_id="",
        key=key,
        header=header,
        size=len(plaintext),
        media_type="text/plain",
        file_name="x.txt",
        plaintext_sha256=sha256(plaintext),
        ciphertext_sha256=sha256(blob),
    )
    return descriptor, blob


def one_shot_failure(descriptor: AttachmentDescriptor, blob: bytes) -> AttachmentCheck:
    with pytest.raises(AttachmentCheckFailed) as info:
        decrypt_attachment(descriptor, blob)
    assert isinstance(info.value, AttachmentError)
    return info.value.check


def streaming_failure(
    descriptor: AttachmentDescriptor, blob: bytes, piece: int = 1000
) -> AttachmentCheck:
    decryptor = AttachmentDecryptor(descriptor)
    with pytest.raises(AttachmentCheckFailed) as info:
        for start in range(0, len(blob), piece):
            decryptor.update(blob[start : start + piece])
        decryptor.finish()
    return info.value.check


def libsodium_open(descriptor: AttachmentDescriptor, blob: bytes) -> list[tuple[bytes, int]]:
    """Decrypt with raw libsodium calls, independently of the module's reader."""
    state = bindings.crypto_secretstream_xchacha20poly1305_state()
    bindings.crypto_secretstream_xchacha20poly1305_init_pull(
        state, descriptor.header, descriptor.key
    )
    return [
        bindings.crypto_secretstream_xchacha20poly1305_pull(state, chunk, None)
        for chunk in chunks_of(blob)
    ]


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_layout(size: int) -> None:
    """Sizes around the 64 KiB chunk boundary and a few MiB decrypt back; the blob is
    ceil(size / 64 KiB) chunks (one for an empty file), each 17 bytes over its plaintext, all
    MESSAGE but the last, which is FINAL."""
    data = content(size)
    descriptor, blob = encrypt(data)
    assert decrypt_attachment(descriptor, blob) == data
    assert len(blob) == encrypted_size(size)
    expected_chunks = max(1, -(-size // CHUNK_SIZE))
    assert len(blob) == size + expected_chunks * CHUNK_OVERHEAD
    opened = libsodium_open(descriptor, blob)
    assert len(opened) == expected_chunks
    assert [tag for _, tag in opened] == [TAG_MESSAGE] * (expected_chunks - 1) + [TAG_FINAL]
    assert all(len(p) == CHUNK_SIZE for p, _ in opened[:-1])
    assert b"".join(p for p, _ in opened) == data
    assert descriptor.size == size
    assert descriptor.plaintext_sha256 == sha256(data)
    assert descriptor.ciphertext_sha256 == sha256(blob)


def test_empty_file_is_one_empty_final_chunk() -> None:
    """An empty file encrypts to a single 17-byte chunk tagged FINAL."""
    descriptor, blob = encrypt(b"")
    assert len(blob) == CHUNK_OVERHEAD == 17
    assert libsodium_open(descriptor, blob) == [(b"", TAG_FINAL)]
    assert decrypt_attachment(descriptor, blob) == b""


def test_key_and_header_come_from_the_rng() -> None:
    """The per-file key is the rng's first 32 bytes and the header the next 24; the same seed
    gives the same blob, another seed another key."""
    source = seeded_rng(b"attachment")
    key, header = source(32), source(24)
    descriptor, blob = encrypt(b"hello")
    assert (descriptor.key, descriptor.header) == (key, header)
    assert encrypt(b"hello") == (descriptor, blob)
    other, other_blob = encrypt(b"hello", seed=b"other")
    assert other.key != descriptor.key
    assert other_blob != blob


def test_pull_initialised_state_encrypts_exactly_like_init_push() -> None:
    """The encrypting state built with init_pull(header) equals libsodium's init_push state for
    that header: the same chunks come out, so the module can take the header from its rng.
    (init_push draws its header from libsodium's RNG; the result does not depend on its value.)"""
    key = bytes(range(32, 64))
    for _ in range(3):
        pushed = bindings.crypto_secretstream_xchacha20poly1305_state()
        header = bindings.crypto_secretstream_xchacha20poly1305_init_push(pushed, key)
        pulled = bindings.crypto_secretstream_xchacha20poly1305_state()
        bindings.crypto_secretstream_xchacha20poly1305_init_pull(pulled, header, key)
        for message, tag in ((b"first", TAG_MESSAGE), (b"x" * 1000, TAG_MESSAGE), (b"", TAG_FINAL)):
            assert bindings.crypto_secretstream_xchacha20poly1305_push(
                pushed, message, None, tag
            ) == bindings.crypto_secretstream_xchacha20poly1305_push(pulled, message, None, tag)


def test_descriptor_fields_and_encoding_after_encryption() -> None:
    """The descriptor carries the media type, file name and blob id given; the blob id set later
    with dataclasses.replace survives encode/decode; repr never shows the key."""
    data = content(1000)
    descriptor, blob = encrypt_attachment(data, "image/png", "scan.png", seeded_rng(b"d"), "b-1")
    assert (descriptor.media_type, descriptor.file_name, descriptor.blob_id) == (
        "image/png",
        "scan.png",
        "b-1",
    )
    uploaded = dataclasses.replace(descriptor, blob_id="blob-42")
    decoded = AttachmentDescriptor.decode(uploaded.encode())
    assert decoded == uploaded
    assert decrypt_attachment(decoded, blob) == data
    assert descriptor.key.hex() not in repr(descriptor)
    assert repr(descriptor.key) not in repr(descriptor)


def test_over_long_names_are_refused_before_encrypting() -> None:
    """A file name, media type or blob id over its encoding limit is an AttachmentError."""
    with pytest.raises(AttachmentError, match="file name"):
        encrypt_attachment(b"x", "text/plain", "n" * 256, seeded_rng(b"n"))
    with pytest.raises(AttachmentError, match="media type"):
        AttachmentEncryptor("t" * 256, "x.txt", seeded_rng(b"n"))
    with pytest.raises(AttachmentError, match="blob id"):
        AttachmentEncryptor("text/plain", "x.txt", seeded_rng(b"n"), blob_id="b" * 129)


def test_files_over_the_size_limit_are_refused() -> None:
    """More than 100 MiB in total is refused, whether in one piece or over several."""
    with pytest.raises(AttachmentError, match="larger than"):
        encrypt(bytes(MAX_ATTACHMENT_SIZE + 1))
    encryptor = AttachmentEncryptor("text/plain", "x.txt", seeded_rng(b"big"))
    encryptor.update(bytes(CHUNK_SIZE))
    with pytest.raises(AttachmentError, match="larger than"):
        encryptor.update(bytes(MAX_ATTACHMENT_SIZE - CHUNK_SIZE + 1))


# --- streaming --------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=3 * CHUNK_SIZE + 10),
    cuts=st.lists(st.integers(min_value=0, max_value=3 * CHUNK_SIZE + 10), max_size=6),
)
def test_streaming_and_one_shot_agree(size: int, cuts: list[int]) -> None:
    """Feeding the file in arbitrary pieces gives byte-for-byte the one-shot blob and
    descriptor, and feeding the blob in arbitrary pieces gives back the file."""
    data = content(size, seed=size.to_bytes(4, "big"))
    bounds = sorted({0, size, *(c for c in cuts if c <= size)})
    encryptor = AttachmentEncryptor("application/pdf", "result.pdf", seeded_rng(b"attachment"))
    parts = [encryptor.update(data[a:b]) for a, b in itertools.pairwise(bounds)]
    descriptor, final = encryptor.finish()
    assert (descriptor, b"".join(parts) + final) == encrypt(data)

    blob = b"".join(parts) + final
    blob_bounds = sorted({0, len(blob), *(c for c in cuts if c <= len(blob))})
    decryptor = AttachmentDecryptor(descriptor)
    plaintext = b"".join(decryptor.update(blob[a:b]) for a, b in itertools.pairwise(blob_bounds))
    assert plaintext + decryptor.finish() == data


def test_streaming_encryptor_buffers_at_most_one_chunk() -> None:
    """A full chunk is only emitted once more data shows it is not the last; then exactly the
    completed chunks come out."""
    encryptor = AttachmentEncryptor("text/plain", "x.txt", seeded_rng(b"s"))
    assert encryptor.update(bytes(CHUNK_SIZE)) == b""
    assert len(encryptor.update(b"\x01")) == ENCRYPTED_CHUNK_SIZE
    assert len(encryptor.update(bytes(2 * CHUNK_SIZE))) == 2 * ENCRYPTED_CHUNK_SIZE
    descriptor, final = encryptor.finish()
    assert len(final) == 1 + CHUNK_OVERHEAD
    assert descriptor.size == 3 * CHUNK_SIZE + 1


def test_streaming_decryptor_releases_plaintext_chunk_by_chunk() -> None:
    """Plaintext comes out as soon as a whole encrypted chunk has arrived."""
    data = content(2 * CHUNK_SIZE + 3)
    descriptor, blob = encrypt(data)
    decryptor = AttachmentDecryptor(descriptor)
    assert decryptor.update(blob[: ENCRYPTED_CHUNK_SIZE - 1]) == b""
    assert (
        decryptor.update(blob[ENCRYPTED_CHUNK_SIZE - 1 : ENCRYPTED_CHUNK_SIZE]) == data[:CHUNK_SIZE]
    )
    assert decryptor.update(blob[ENCRYPTED_CHUNK_SIZE:]) == data[CHUNK_SIZE : 2 * CHUNK_SIZE]
    assert decryptor.finish() == data[2 * CHUNK_SIZE :]


def test_finished_encryptor_and_decryptor_refuse_more_calls() -> None:
    """update or finish after finish is an AttachmentError."""
    encryptor = AttachmentEncryptor("text/plain", "x.txt", seeded_rng(b"f"))
    descriptor, blob = encryptor.finish()
    with pytest.raises(AttachmentError):
        encryptor.update(b"more")
    with pytest.raises(AttachmentError):
        encryptor.finish()
    decryptor = AttachmentDecryptor(descriptor)
    decryptor.update(blob)
    decryptor.finish()
    with pytest.raises(AttachmentError):
        decryptor.update(b"")
    with pytest.raises(AttachmentError):
        decryptor.finish()


def test_failed_decryptor_keeps_failing() -> None:
    """After a failed check no further plaintext is released."""
    descriptor, blob = encrypt(content(2 * CHUNK_SIZE))
    damaged = bytearray(blob)
    damaged[10] ^= 1
    decryptor = AttachmentDecryptor(descriptor)
    with pytest.raises(AttachmentCheckFailed):
        decryptor.update(bytes(damaged))
    with pytest.raises(AttachmentCheckFailed) as info:
        decryptor.update(blob[ENCRYPTED_CHUNK_SIZE:])
    assert info.value.check is AttachmentCheck.CHUNK_AUTHENTICATION
    with pytest.raises(AttachmentCheckFailed):
        decryptor.finish()


# --- checks on receipt ------------------------------------------------------------------------


def test_ciphertext_hash_is_checked_before_decrypting() -> None:
    """A flipped bit, a truncation or an appended chunk under the original descriptor fails
    the ciphertext hash first (one-shot)."""
    descriptor, blob = encrypt(content(3 * CHUNK_SIZE + 7))
    flipped = bytearray(blob)
    flipped[-1] ^= 0x80
    for altered in (bytes(flipped), blob[:-1], blob[:ENCRYPTED_CHUNK_SIZE], blob + blob[:17], b""):
        assert one_shot_failure(descriptor, altered) is AttachmentCheck.CIPHERTEXT_HASH


def test_streaming_checks_the_ciphertext_hash_at_finish() -> None:
    """A blob whose chunks all authenticate but whose descriptor hash differs fails
    CIPHERTEXT_HASH in the streaming form too."""
    descriptor, blob = encrypt(content(100))
    wrong = dataclasses.replace(descriptor, ciphertext_sha256=bytes(32))
    assert streaming_failure(wrong, blob) is AttachmentCheck.CIPHERTEXT_HASH
    assert one_shot_failure(wrong, blob) is AttachmentCheck.CIPHERTEXT_HASH


@pytest.mark.parametrize("size", [1, 64 * KIB, 2 * 64 * KIB + 1])
def test_flipped_bits_fail_chunk_authentication(size: int) -> None:
    """A bit flipped anywhere in any chunk (ciphertext hash updated to match) fails
    authentication, in both forms. Under the original descriptor the streaming form fails
    authentication for a full chunk (opened on arrival) and the ciphertext hash for the short
    last chunk (opened in finish, after the hash check)."""
    descriptor, blob = encrypt(content(size))
    full_chunks_end = (size // CHUNK_SIZE) * ENCRYPTED_CHUNK_SIZE
    for index in range(0, len(blob), max(1, len(blob) // 11)):
        damaged = bytearray(blob)
        damaged[index] ^= 0x01
        altered = bytes(damaged)
        forged = rehashed(descriptor, altered)
        assert one_shot_failure(forged, altered) is AttachmentCheck.CHUNK_AUTHENTICATION
        assert streaming_failure(forged, altered) is AttachmentCheck.CHUNK_AUTHENTICATION
        expected = (
            AttachmentCheck.CHUNK_AUTHENTICATION
            if index < full_chunks_end
            else AttachmentCheck.CIPHERTEXT_HASH
        )
        assert streaming_failure(descriptor, altered) is expected


def test_missing_final_chunk_is_detected() -> None:
    """A stream cut at a chunk boundary (the FINAL chunk dropped), or empty, fails
    FINAL_CHUNK_MISSING."""
    descriptor, blob = encrypt(content(2 * CHUNK_SIZE + 5))
    for truncated in (blob[:ENCRYPTED_CHUNK_SIZE], blob[: 2 * ENCRYPTED_CHUNK_SIZE], b""):
        forged = rehashed(descriptor, truncated)
        assert one_shot_failure(forged, truncated) is AttachmentCheck.FINAL_CHUNK_MISSING
        assert streaming_failure(forged, truncated) is AttachmentCheck.FINAL_CHUNK_MISSING


def test_stream_without_any_final_tag_is_detected() -> None:
    """A stream whose every chunk is MESSAGE (sizes and hashes all consistent) fails
    FINAL_CHUNK_MISSING."""
    descriptor, blob = craft([(bytes(CHUNK_SIZE), TAG_MESSAGE), (b"tail", TAG_MESSAGE)])
    assert one_shot_failure(descriptor, blob) is AttachmentCheck.FINAL_CHUNK_MISSING
    assert streaming_failure(descriptor, blob) is AttachmentCheck.FINAL_CHUNK_MISSING


def test_truncation_inside_a_chunk_fails_authentication() -> None:
    """A stream cut inside a chunk, even leaving fewer than 17 bytes of it, fails
    CHUNK_AUTHENTICATION."""
    descriptor, blob = encrypt(content(CHUNK_SIZE + 100))
    for cut in (len(blob) - 1, ENCRYPTED_CHUNK_SIZE + 16, ENCRYPTED_CHUNK_SIZE + 1, 5):
        truncated = blob[:cut]
        forged = rehashed(descriptor, truncated)
        assert one_shot_failure(forged, truncated) is AttachmentCheck.CHUNK_AUTHENTICATION
        assert streaming_failure(forged, truncated) is AttachmentCheck.CHUNK_AUTHENTICATION


def test_chunk_appended_after_final_is_detected() -> None:
    """A validly encrypted chunk after the FINAL one fails DATA_AFTER_FINAL_CHUNK; so does a
    FINAL chunk that is not the last (the stream goes on after it)."""
    for chunks in (
        [(bytes(CHUNK_SIZE), TAG_FINAL), (b"appended", TAG_MESSAGE)],
        [(bytes(CHUNK_SIZE), TAG_MESSAGE), (bytes(CHUNK_SIZE), TAG_FINAL), (b"x", TAG_FINAL)],
        [(bytes(CHUNK_SIZE), TAG_FINAL), (bytes(CHUNK_SIZE), TAG_MESSAGE), (b"y", TAG_FINAL)],
    ):
        descriptor, blob = craft(chunks)
        assert one_shot_failure(descriptor, blob) is AttachmentCheck.DATA_AFTER_FINAL_CHUNK
        assert streaming_failure(descriptor, blob) is AttachmentCheck.DATA_AFTER_FINAL_CHUNK


def test_bytes_appended_after_a_full_final_chunk_are_detected() -> None:
    """Anything after a full-size FINAL chunk (a 64 KiB file) is DATA_AFTER_FINAL_CHUNK; after a
    short FINAL chunk the framing breaks and authentication fails."""
    descriptor, blob = encrypt(content(CHUNK_SIZE))
    for extra in (b"\x00", blob):
        appended = blob + extra
        forged = rehashed(descriptor, appended)
        assert one_shot_failure(forged, appended) is AttachmentCheck.DATA_AFTER_FINAL_CHUNK
        assert streaming_failure(forged, appended) is AttachmentCheck.DATA_AFTER_FINAL_CHUNK
    descriptor, blob = encrypt(content(CHUNK_SIZE + 1))
    appended = blob + blob[-18:]
    forged = rehashed(descriptor, appended)
    assert one_shot_failure(forged, appended) is AttachmentCheck.CHUNK_AUTHENTICATION


def test_reordered_chunks_fail_authentication() -> None:
    """Swapping two chunks (hash updated) fails authentication: each chunk is bound to its
    position."""
    descriptor, blob = encrypt(content(3 * CHUNK_SIZE + 1))
    chunks = chunks_of(blob)
    for order in ([1, 0, 2, 3], [0, 2, 1, 3], [0, 1, 3, 2]):
        reordered = b"".join(chunks[i] for i in order)
        forged = rehashed(descriptor, reordered)
        assert one_shot_failure(forged, reordered) is AttachmentCheck.CHUNK_AUTHENTICATION
        assert streaming_failure(forged, reordered) is AttachmentCheck.CHUNK_AUTHENTICATION


def test_wrong_key_or_header_fails_authentication() -> None:
    """A descriptor with another key or another header does not open the blob."""
    descriptor, blob = encrypt(content(5000))
    for wrong in (
        dataclasses.replace(descriptor, key=bytes(32)),
        dataclasses.replace(descriptor, header=bytes(24)),
    ):
        assert one_shot_failure(wrong, blob) is AttachmentCheck.CHUNK_AUTHENTICATION
        assert streaming_failure(wrong, blob) is AttachmentCheck.CHUNK_AUTHENTICATION


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE, CHUNK_SIZE + 3])
def test_wrong_size_in_the_descriptor_is_detected(size: int) -> None:
    """A descriptor declaring one byte more or less than the plaintext fails SIZE (less is
    caught as soon as the excess plaintext appears)."""
    descriptor, blob = encrypt(content(size))
    for declared in (size + 1, size - 1):
        if declared < 0:
            continue
        wrong = dataclasses.replace(descriptor, size=declared)
        assert one_shot_failure(wrong, blob) is AttachmentCheck.SIZE
        assert streaming_failure(wrong, blob) is AttachmentCheck.SIZE


def test_wrong_plaintext_hash_in_the_descriptor_is_detected() -> None:
    """A descriptor whose plaintext SHA-256 differs fails PLAINTEXT_HASH, the last check."""
    descriptor, blob = encrypt(content(CHUNK_SIZE + 9))
    hash_bytes = bytearray(descriptor.plaintext_sha256)
    hash_bytes[31] ^= 1
    wrong = dataclasses.replace(descriptor, plaintext_sha256=bytes(hash_bytes))
    assert one_shot_failure(wrong, blob) is AttachmentCheck.PLAINTEXT_HASH
    assert streaming_failure(wrong, blob) is AttachmentCheck.PLAINTEXT_HASH


@pytest.mark.parametrize("tag", [TAG_PUSH, TAG_REKEY])
def test_tags_other_than_message_and_final_are_refused(tag: int) -> None:
    """A chunk tagged PUSH or REKEY (never written by us) fails UNEXPECTED_TAG."""
    descriptor, blob = craft([(bytes(CHUNK_SIZE), tag), (b"end", TAG_FINAL)])
    assert one_shot_failure(descriptor, blob) is AttachmentCheck.UNEXPECTED_TAG
    assert streaming_failure(descriptor, blob) is AttachmentCheck.UNEXPECTED_TAG


def test_crafted_canonical_stream_is_accepted() -> None:
    """The crafting helper itself produces acceptable streams, so the failures above come from
    the tags alone."""
    descriptor, blob = craft([(bytes(CHUNK_SIZE), TAG_MESSAGE), (b"end", TAG_FINAL)])
    assert decrypt_attachment(descriptor, blob) == bytes(CHUNK_SIZE) + b"end"


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_alteration_is_an_attachment_check_failure(data: st.DataObject) -> None:
    """Random flips, cuts and insertions in a blob (with a matching ciphertext hash) always end
    in AttachmentCheckFailed, never another exception or a wrong plaintext."""
    plaintext = content(data.draw(st.integers(0, 2 * CHUNK_SIZE + 50), label="size"))
    descriptor, blob = encrypt(plaintext)
    position = data.draw(st.integers(0, len(blob)), label="position")
    action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]), label="action")
    if action == "flip" and position < len(blob):
        altered = blob[:position] + bytes([blob[position] ^ 0x40]) + blob[position + 1 :]
    elif action == "cut":
        altered = blob[:position]
    elif action == "insert":
        altered = blob[:position] + data.draw(st.binary(min_size=1, max_size=40)) + blob[position:]
    else:
        altered = blob[:position] + blob[position + 1 :]
    if altered == blob:
        return
    one_shot_failure(rehashed(descriptor, altered), altered)
    streaming_failure(rehashed(descriptor, altered), altered, piece=4099)


def test_encrypt_and_decrypt_use_the_injected_rng_only(rng: Rng) -> None:
    """Encryption draws exactly 56 bytes (key and header) from the rng, nothing else."""
    drawn: list[int] = []

    def counting(n: int) -> bytes:
        drawn.append(n)
        return rng(n)

    descriptor, blob = encrypt_attachment(content(3 * CHUNK_SIZE), "a/b", "f", counting)
    assert drawn == [32, 24]
    assert decrypt_attachment(descriptor, blob) == content(3 * CHUNK_SIZE)
