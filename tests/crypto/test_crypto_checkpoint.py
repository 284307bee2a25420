"""C2SP signed notes and tlog checkpoints: the Go sumdb/note vectors (key ID, verifier key,
signature byte for byte, its malformed-note list), a real sum.golang.org checkpoint with three
cosignatures, the C2SP spec examples, round trips, every refusal as MalformedEncoding or
ProofError, and checkpoint updates checked by consistency proofs."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.crypto.checkpoint import (
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    Checkpoint,
    NoteVerifier,
    add_signature,
    note_key_id,
    open_note,
    sign_checkpoint,
    sign_note,
    verify_checkpoint,
    verify_checkpoint_update,
)
from medrelay.crypto.errors import CryptoError, MalformedEncoding, ProofError
from medrelay.crypto.kdf import sha256
from medrelay.crypto.keys import SigningKey
from medrelay.crypto.merkle import EMPTY_ROOT, MerkleTree, leaf_hash
from medrelay.crypto.rng import Rng, seeded_rng

# golang.org/x/mod/sumdb/note, note_test.go (TestSign, TestOpen, TestNewVerifier).
PETER_SEED = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
    "ngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWL"
    "ox33WWd1RvMc+QQ=\n"
)

# transparency-dev/formats, log/note_test.go: a real sum.golang.org checkpoint (with the Go
# checksum database's published key) and three cosignatures over the same text.
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTE = (
    "go.sum database tree\n6476701\nmb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n\n"
    "\u2014 sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949rj4nPRY"
    "fvimWEPWL+o3GeoWwOoAw=\n"
)
COSIGNER_VKEYS = [
    "monkeys+db4d9f7e+AULaJMvTtDLHPUcUrjdDad9vDlh/PTfC2VV60JUtCfWT",
    "bananas+cf639f13+AaPjhFnPCQnid/Ql32KWhmh+uk72FVRfK+2DLmO3BI3M",
    "witness+f13a86db+AdYV1Ztajd9BvyjP2HgpwrqYL6TjOwIjGMOq8Bu42xbN",
]
COSIGNATURES = (
    "\u2014 monkeys 202ffh9ve46Mqbhuyb4wnC2Pwdan5EsXQym/tF1ggXJqhjGosU4T5intH4iKMRgDLxrnXuIjRaU2"
    "NbvAnaepM6Y+8ww=\n"
    "\u2014 bananas z2OfE+2bbsBZ7NLgfuslc0v7NFW2QyexJ7fhePpoL2N/P7N/COd5S+JNHbQEAlYzz2C5sg0E+x/M"
    "ggS1mDR6t3/9rQw=\n"
    "\u2014 witness 8TqG25yWGFLdT7WPf/WoyeG3LwqtkXP+8S3yykOVm6EMh4hPgCke6eSVPU4BdtXNMPJBXKF+UpDb"
    "GgCdcpR8SVSoqAU=\n"
)

# c2sp.org/signed-note and c2sp.org/tlog-checkpoint examples (their keys are not published).
C2SP_NOTE = (
    "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned è subito sera.\n\n"
    "\u2014 quasimodo.example/salvatore NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9oJKONr"
    "MouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
)
C2SP_CHECKPOINT_BODY = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)

ORIGIN = "clinic.example/identity-log"


def _key(label: str) -> SigningKey:
    return SigningKey.generate(seeded_rng(label.encode()))


LOG_KEY = _key("log")
LOG = NoteVerifier(ORIGIN, LOG_KEY.verify_key)


@pytest.fixture
def log_key(rng: Rng) -> SigningKey:
    return SigningKey.generate(rng)


# ------------------------------------------------------------------------------ Go vectors


def test_key_id_is_sha256_of_name_newline_type_and_key_truncated_to_4_bytes() -> None:
    peter = SigningKey(PETER_SEED).verify_key
    expected = sha256(b"PeterNeumann\n\x01" + peter.raw)[:4]
    assert note_key_id("PeterNeumann", peter) == expected == bytes.fromhex("c74f20a3")


def test_signature_matches_go_sumdb_note_byte_for_byte() -> None:
    assert sign_note(GO_TEXT, "PeterNeumann", SigningKey(PETER_SEED)) == (
        GO_TEXT + "\n" + PETER_SIG
    )


@pytest.mark.parametrize("vkey", [PETER_VKEY, ENOCH_VKEY, SUMDB_VKEY, *COSIGNER_VKEYS])
def test_go_verifier_keys_parse_and_format_identically(vkey: str) -> None:
    """Including sum.golang.org's, whose base64 key itself contains '+'."""
    assert NoteVerifier.from_text(vkey).to_text() == vkey


def test_verifier_key_names_the_signing_keys_public_key() -> None:
    verifier = NoteVerifier.from_text(PETER_VKEY)
    assert verifier == NoteVerifier("PeterNeumann", SigningKey(PETER_SEED).verify_key)
    assert verifier.key_id.hex() == "c74f20a3"


def test_every_truncation_and_mangling_of_a_verifier_key_is_refused() -> None:
    """As Go's TestNewVerifier: every proper substring and every single incremented character."""
    accepted: list[str] = []
    candidates = [
        PETER_VKEY[i:j]
        for i in range(len(PETER_VKEY) + 1)
        for j in range(i + 1, len(PETER_VKEY) + 1)
        if (i, j) != (0, len(PETER_VKEY))
    ]
    candidates += [
        PETER_VKEY[:i] + chr(ord(PETER_VKEY[i]) + 1) + PETER_VKEY[i + 1 :]
        for i in range(len(PETER_VKEY))
    ]
    # Go's own: a wrong-length key and an unknown algorithm, each with a matching key hash.
    candidates += [
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        PETER_VKEY.replace("c74f20a3", "C74F20A3"),
    ]
    for candidate in candidates:
        try:
            NoteVerifier.from_text(candidate)
        except CryptoError:
            continue
        accepted.append(candidate)
    assert accepted == []


def test_go_note_opens_with_the_one_known_key_and_ignores_the_other() -> None:
    note = GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(note, [NoteVerifier.from_text(PETER_VKEY)]) == (GO_TEXT, ("PeterNeumann",))
    both = [NoteVerifier.from_text(ENOCH_VKEY), NoteVerifier.from_text(PETER_VKEY)]
    assert open_note(note.encode(), both) == (GO_TEXT, ("PeterNeumann", "EnochRoot"))


def test_go_note_with_no_known_key_is_refused() -> None:
    with pytest.raises(ProofError, match="no signature by a trusted key"):
        open_note(GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG, [LOG])
    with pytest.raises(ProofError):
        open_note(GO_TEXT + "\n" + PETER_SIG, [])


def test_go_invalid_signature_by_a_known_key_refuses_the_whole_note() -> None:
    bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    peter = NoteVerifier.from_text(PETER_VKEY)
    enoch = NoteVerifier.from_text(ENOCH_VKEY)
    with pytest.raises(ProofError, match="PeterNeumann does not verify"):
        open_note(GO_TEXT + "\n" + bad, [peter])
    # ... even when another known key's signature verifies.
    with pytest.raises(ProofError, match="does not verify"):
        open_note(GO_TEXT + "\n" + ENOCH_SIG + bad, [peter, enoch])


@pytest.mark.parametrize(
    "note",
    [
        GO_TEXT,
        GO_TEXT + "\n",
        GO_TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + GO_TEXT + "\n" + PETER_SIG,
        b"\xff" + (GO_TEXT + "\n" + PETER_SIG).encode(),
        GO_TEXT + "\n" + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FF"
        "YC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        GO_TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    ],
    ids=[
        "no signatures",
        "blank line only",
        "no final newline",
        "control character",
        "not UTF-8",
        "name with a space",
        "stray line",
    ],
)
def test_go_malformed_notes_are_refused_as_malformed(note: str | bytes) -> None:
    with pytest.raises(MalformedEncoding):
        open_note(note, [NoteVerifier.from_text(PETER_VKEY)])


def test_repeated_signature_by_one_key_is_refused() -> None:
    """Go skips the repeat; a note from this log never has one, so it is refused."""
    with pytest.raises(MalformedEncoding, match="two signatures"):
        open_note(GO_TEXT + "\n" + PETER_SIG + PETER_SIG, [NoteVerifier.from_text(PETER_VKEY)])


# ------------------------------------------------------------------------------ real checkpoints


def test_real_sum_golang_org_checkpoint_verifies() -> None:
    checkpoint = verify_checkpoint(
        SUMDB_NOTE, NoteVerifier.from_text(SUMDB_VKEY), "go.sum database tree"
    )
    assert checkpoint == Checkpoint(
        "go.sum database tree",
        6476701,
        base64.b64decode("mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk="),
    )
    assert checkpoint.to_body() + "\n" == SUMDB_NOTE.split("\u2014", maxsplit=1)[0]


def test_real_checkpoint_for_another_origin_is_refused() -> None:
    with pytest.raises(ProofError, match="origin"):
        verify_checkpoint(SUMDB_NOTE, NoteVerifier.from_text(SUMDB_VKEY), ORIGIN)


def test_real_checkpoint_with_three_cosignatures_and_unknown_keys_opens() -> None:
    unknown = (
        "\u2014 random1 8TqG25yWGFLdT7WPf/WoyeG3LwqtkXP+8S3yykOVm6EMh4hPgCke6eSVPU4BdtXNMPJBXKF+Up"
        "DbGgCdcpR8SVSoqAU=\n"
    )
    note = SUMDB_NOTE + COSIGNATURES + unknown
    verifiers = [NoteVerifier.from_text(v) for v in (SUMDB_VKEY, *COSIGNER_VKEYS)]
    text, names = open_note(note, verifiers)
    assert names == ("sum.golang.org", "monkeys", "bananas", "witness")
    assert text == SUMDB_NOTE.split("\n\n", maxsplit=1)[0] + "\n"
    # The log's verifier alone still verifies the checkpoint; cosignatures are ignored.
    assert verify_checkpoint(note, verifiers[0], "go.sum database tree").size == 6476701


def test_c2sp_spec_examples_parse() -> None:
    """The signed-note example (a text with a blank line of its own) is well-formed, merely not
    signed by a key we know; the tlog-checkpoint example body parses and re-encodes."""
    with pytest.raises(ProofError, match="no signature by a trusted key"):
        open_note(C2SP_NOTE, [LOG])
    checkpoint = Checkpoint.from_body(C2SP_CHECKPOINT_BODY)
    assert (checkpoint.origin, checkpoint.size) == ("example.com/behind-the-sofa", 20852163)
    assert checkpoint.to_body() == C2SP_CHECKPOINT_BODY


# ------------------------------------------------------------------------------ round trips


def test_note_round_trip(log_key: SigningKey) -> None:
    body = "hello\n\nwith a blank line of its own\n"
    note = sign_note(body, ORIGIN, log_key)
    assert open_note(note, [NoteVerifier(ORIGIN, log_key.verify_key)]) == (body, (ORIGIN,))


def test_cosignature_is_added_and_both_keys_verify(log_key: SigningKey) -> None:
    witness_key = _key("witness")
    log = NoteVerifier(ORIGIN, log_key.verify_key)
    witness = NoteVerifier("witness.example/w1", witness_key.verify_key)
    note = add_signature(sign_note("body\n", ORIGIN, log_key), witness.name, witness_key)
    assert open_note(note, [log, witness]) == ("body\n", (ORIGIN, witness.name))
    assert open_note(note, [witness]) == ("body\n", (witness.name,))
    # Signing again with the same key replaces the earlier signature rather than repeating it.
    again = add_signature(note, witness.name, witness_key)
    assert again == note
    assert open_note(again, [log, witness])[1] == (ORIGIN, witness.name)


def test_sixteen_signatures_are_accepted_and_a_seventeenth_is_refused(log_key: SigningKey) -> None:
    note = sign_note("body\n", ORIGIN, log_key)
    for n in range(1, MAX_SIGNATURES):
        note = add_signature(note, f"w{n}", _key(f"w{n}"))
    assert open_note(note, [NoteVerifier(ORIGIN, log_key.verify_key)])[1] == (ORIGIN,)
    with pytest.raises(MalformedEncoding, match="at most 16"):
        add_signature(note, "w16", _key("w16"))
    extra = sign_note("body\n", "w16", _key("w16")).split("\n\n")[1]
    with pytest.raises(MalformedEncoding, match="more than 16"):
        open_note(note + extra, [NoteVerifier(ORIGIN, log_key.verify_key)])


def test_tampered_text_is_refused(log_key: SigningKey) -> None:
    note = sign_note("size 5\n", ORIGIN, log_key)
    with pytest.raises(ProofError, match="does not verify"):
        open_note(note.replace("size 5", "size 6"), [NoteVerifier(ORIGIN, log_key.verify_key)])


def test_wrong_key_under_the_right_name_is_an_unknown_key(log_key: SigningKey) -> None:
    """Another key under the log's name has another key ID: its signature is ignored, and with
    no trusted signature left the note is refused."""
    note = sign_note("body\n", ORIGIN, _key("impostor"))
    with pytest.raises(ProofError, match="no signature by a trusted key"):
        open_note(note, [NoteVerifier(ORIGIN, log_key.verify_key)])


def test_the_same_trusted_key_listed_twice_is_not_ambiguous(log_key: SigningKey) -> None:
    real = NoteVerifier(ORIGIN, log_key.verify_key)
    assert open_note(sign_note("b\n", ORIGIN, log_key), [real, real])[1] == (ORIGIN,)


def test_two_trusted_keys_with_one_name_and_key_id_are_refused(log_key: SigningKey) -> None:
    """Only a deliberate collision of the 4-byte ID gets here; neither key can be the one meant."""
    real = NoteVerifier(ORIGIN, log_key.verify_key)

    class Colliding(NoteVerifier):
        @property
        def key_id(self) -> bytes:
            return real.key_id

    impostor = Colliding(ORIGIN, _key("impostor").verify_key)
    with pytest.raises(ProofError, match="share the name and ID"):
        open_note(sign_note("b\n", ORIGIN, log_key), [real, impostor])


# ------------------------------------------------------------------------------ refusals


def _signed(body: str = "body\n") -> str:
    return sign_note(body, ORIGIN, LOG_KEY)


MALFORMED_NOTES: list[tuple[str, object]] = [
    ("bad base64", _signed()[:-5] + "!!!=\n"),
    ("base64 with a space inside", _signed()[:-10] + " " + _signed()[-10:]),
    ("non-canonical base64 padding bits", _signed()[:-3] + "N=\n"),
    ("signature of 4 bytes", "body\n\n\u2014 n AAAAAA==\n"),
    ("missing final newline", _signed()[:-1]),
    ("CRLF line ends", _signed().replace("\n", "\r\n")),
    ("control character in the text", "bo\x07dy\n\n" + _signed()[6:]),
    ("lone surrogate", "bo\udc80dy\n\n" + _signed()[6:]),
    ("oversized", "x" * MAX_NOTE_BYTES + "\n\n" + _signed()[6:]),
    ("oversized bytes", b"x" * (MAX_NOTE_BYTES + 1)),
    ("name with a plus", _signed().replace(ORIGIN, "a+b")),
    ("no separator between name and signature", "body\n\n\u2014 name\n"),
    ("not text at all", 12345),
    ("None", None),
    ("empty", ""),
]


@pytest.mark.parametrize(("name", "note"), MALFORMED_NOTES, ids=[n for n, _ in MALFORMED_NOTES])
def test_malformed_notes_are_refused_as_malformed(name: str, note: object) -> None:
    with pytest.raises(MalformedEncoding):
        open_note(note, [LOG])  # type: ignore[arg-type]


def test_the_unmodified_note_of_the_malformed_table_opens() -> None:
    """The table above mutates a note that does verify."""
    assert open_note(_signed(), [LOG]) == ("body\n", (ORIGIN,))


@pytest.mark.parametrize(
    ("body", "name"),
    [
        ("no final newline", ORIGIN),
        ("bell \x07\n", ORIGIN),
        ("x" * MAX_NOTE_BYTES + "\n", ORIGIN),
        ("body\n", ""),
        ("body\n", "has space"),
        ("body\n", "no\u00a0break"),
        ("body\n", "a+b"),
        ("body\n", "x" * 257),
    ],
)
def test_signing_refuses_malformed_text_and_key_names(body: str, name: str) -> None:
    with pytest.raises(MalformedEncoding):
        sign_note(body, name, LOG_KEY)


@settings(max_examples=200, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=10_000),
    operation=st.sampled_from(["replace", "insert", "delete"]),
    char=st.sampled_from(["\n", "\u2014", " ", "+", "/", "=", "A", "a", "0", "\u00e9", "\n\n"]),
)
def test_every_single_edit_of_a_signed_checkpoint_is_refused(
    position: int, operation: str, char: str
) -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 42, sha256(b"root")), ORIGIN, LOG_KEY)
    position %= len(note)
    if operation == "replace":
        edited = note[:position] + char + note[position + 1 :]
    elif operation == "insert":
        edited = note[:position] + char + note[position:]
    else:
        edited = note[:position] + note[position + 1 :]
    if edited == note:
        return
    with pytest.raises((ProofError, MalformedEncoding)):
        verify_checkpoint(edited, LOG, ORIGIN)


@settings(max_examples=200, deadline=None)
@given(note=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_arbitrary_input_is_refused_only_with_crypto_errors(note: str | bytes) -> None:
    with pytest.raises((ProofError, MalformedEncoding)):
        open_note(note, [LOG])
    with pytest.raises((ProofError, MalformedEncoding)):
        verify_checkpoint(note, LOG, ORIGIN)


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.text(max_size=80),
    name=st.text(min_size=1, max_size=20),
    encoded=st.text(alphabet="ABCDEFabcdef0123456789+/= ", max_size=100),
)
def test_arbitrary_signature_lines_are_refused_only_with_crypto_errors(
    prefix: str, name: str, encoded: str
) -> None:
    note = f"{prefix}\n\n\u2014 {name} {encoded}\n"
    with pytest.raises((ProofError, MalformedEncoding)):
        open_note(note, [LOG])


# ------------------------------------------------------------------------------ checkpoints

origins = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40).filter(
    lambda s: len(s.encode()) <= 256
)
checkpoints = st.builds(
    Checkpoint,
    origin=origins,
    size=st.integers(min_value=0, max_value=2**64 - 1),
    root_hash=st.binary(min_size=32, max_size=32),
    extension_lines=st.lists(origins, max_size=4).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(checkpoint=checkpoints)
def test_checkpoint_body_round_trips(checkpoint: Checkpoint) -> None:
    body = checkpoint.to_body()
    assert Checkpoint.from_body(body) == checkpoint
    assert Checkpoint.from_body(body).to_body() == body


@settings(max_examples=25, deadline=None)
@given(checkpoint=checkpoints)
def test_signed_checkpoint_round_trips(checkpoint: Checkpoint) -> None:
    note = sign_checkpoint(checkpoint, "log", LOG_KEY)
    assert verify_checkpoint(note, NoteVerifier("log", LOG_KEY.verify_key), checkpoint.origin) == (
        checkpoint
    )


near_sizes = st.one_of(
    st.integers(min_value=0, max_value=2**64 + 5).map(str),
    st.from_regex(r"[+ -]?0*[0-9]{1,21} ?", fullmatch=True),
)
near_roots = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode()),
    st.binary(min_size=30, max_size=34).map(lambda b: base64.b64encode(b).decode()),
    st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode().rstrip("=")),
    st.binary(min_size=32, max_size=32).map(lambda b: base64.urlsafe_b64encode(b).decode()),
)
near_text = st.one_of(origins, st.text(max_size=6))
near_bodies = st.builds(
    lambda lines, end: "\n".join(lines) + end,
    st.tuples(near_text, near_sizes, near_roots, st.lists(near_text, max_size=2)).map(
        lambda t: [t[0], t[1], t[2], *t[3]]
    ),
    st.sampled_from(["\n", "\n", "\n", "", "\r\n", "\n\n"]),
)


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(near_bodies, checkpoints.map(Checkpoint.to_body)))
def test_any_body_that_parses_re_encodes_exactly(body: str) -> None:
    """Strictness: there is one spelling of each checkpoint, so whatever parses re-encodes to the
    very same text (bodies are drawn near the grammar: sizes with signs, zeros and spaces, roots
    of other lengths, unpadded or URL-safe)."""
    try:
        checkpoint = Checkpoint.from_body(body)
    except MalformedEncoding:
        return
    assert checkpoint.to_body() == body


ROOT_B64 = base64.b64encode(sha256(b"root")).decode()
URLSAFE_ROOT_B64 = base64.urlsafe_b64encode(b"\xfb" * 32).decode()
MALFORMED_BODIES = [
    ("two lines", "Log\n9944\n"),
    ("empty origin", f"\n9944\n{ROOT_B64}\n"),
    ("no final newline", f"Log\n123\n{ROOT_B64}"),
    ("size not a number", f"Log\nbananas\n{ROOT_B64}\n"),
    ("negative size", f"Log\n-34\n{ROOT_B64}\n"),
    ("size with a plus", f"Log\n+34\n{ROOT_B64}\n"),
    ("leading zero", f"Log\n034\n{ROOT_B64}\n"),
    ("size with a space", f"Log\n34 \n{ROOT_B64}\n"),
    ("fullwidth digits", f"Log\n\uff13\uff14\n{ROOT_B64}\n"),
    ("size 2**64", f"Log\n{2**64}\n{ROOT_B64}\n"),
    ("huge size", f"Log\n3438945738945739845734895735\n{ROOT_B64}\n"),
    ("root not base64", "Log\n123\nThisIsn'tBase64\n"),
    ("root of 7 bytes (Go's test)", "Log\n123\nYmFuYW5hcw==\n"),
    ("root unpadded", f"Log\n123\n{ROOT_B64.rstrip('=')}\n"),
    ("root urlsafe", f"Log\n123\n{URLSAFE_ROOT_B64}\n"),
    ("trailing blank lines", f"Log\n9944\n{ROOT_B64}\n\n\n\n"),
    ("empty extension line", f"Log\n9944\n{ROOT_B64}\next\n\nmore\n"),
    ("control character in origin", f"L\x7fog\n9944\n{ROOT_B64}\n"),
    ("tab in origin", f"L\tog\n9944\n{ROOT_B64}\n"),
    ("CRLF", f"Log\r\n9944\r\n{ROOT_B64}\r\n"),
    ("seventeen extensions", f"Log\n9944\n{ROOT_B64}\n" + "e\n" * 17),
    ("origin too long", "o" * 257 + f"\n9944\n{ROOT_B64}\n"),
]


@pytest.mark.parametrize(("name", "body"), MALFORMED_BODIES, ids=[n for n, _ in MALFORMED_BODIES])
def test_malformed_checkpoint_bodies_are_refused(name: str, body: str) -> None:
    with pytest.raises(MalformedEncoding):
        Checkpoint.from_body(body)


def test_well_formed_bodies_with_extensions_and_size_zero_parse() -> None:
    body = f"Moon Log\n0\n{ROOT_B64}\n6086d1a9\nWaxing gibbous\n"
    checkpoint = Checkpoint.from_body(body)
    assert checkpoint.size == 0
    assert checkpoint.extension_lines == ("6086d1a9", "Waxing gibbous")
    assert checkpoint.to_body() == body
    assert Checkpoint.from_body(f"Log\n{2**64 - 1}\n{ROOT_B64}\n").size == 2**64 - 1


@pytest.mark.parametrize(
    "build",
    [
        lambda: Checkpoint("", 1, EMPTY_ROOT),
        lambda: Checkpoint("a\nb", 1, EMPTY_ROOT),
        lambda: Checkpoint(ORIGIN, -1, EMPTY_ROOT),
        lambda: Checkpoint(ORIGIN, 2**64, EMPTY_ROOT),
        lambda: Checkpoint(ORIGIN, True, EMPTY_ROOT),
        lambda: Checkpoint(ORIGIN, 1, EMPTY_ROOT[:31]),
        lambda: Checkpoint(ORIGIN, 1, "x" * 32),  # type: ignore[arg-type]
        lambda: Checkpoint(ORIGIN, 1, EMPTY_ROOT, ["ext"]),  # type: ignore[arg-type]
        lambda: Checkpoint(ORIGIN, 1, EMPTY_ROOT, ("",)),
        lambda: Checkpoint(ORIGIN, 1, EMPTY_ROOT, ("a\nb",)),
    ],
)
def test_checkpoint_construction_validates_every_field(build: Callable[[], Checkpoint]) -> None:
    with pytest.raises(MalformedEncoding):
        build()


def test_signed_note_that_is_not_a_checkpoint_is_malformed() -> None:
    """transparency-dev's "bad body good sigs": the signature verifies, the body does not parse."""
    with pytest.raises(MalformedEncoding):
        verify_checkpoint(_signed("if this is a checkpoint I'll eat my hat\n"), LOG, ORIGIN)


def test_checkpoint_signed_by_another_key_is_refused() -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 1, EMPTY_ROOT), "other", _key("other"))
    with pytest.raises(ProofError):
        verify_checkpoint(note, LOG, ORIGIN)


# ------------------------------------------------------------------------------ updates


@pytest.fixture(scope="module")
def tree() -> MerkleTree:
    return MerkleTree.from_leaf_hashes(leaf_hash(bytes((i,))) for i in range(20))


def _at(tree: MerkleTree, size: int, origin: str = ORIGIN) -> Checkpoint:
    return Checkpoint(origin, size, tree.root(size))


def test_checkpoint_update_with_a_consistency_proof_is_accepted(tree: MerkleTree) -> None:
    for old, new in [(0, 20), (1, 20), (7, 13), (13, 13), (16, 20)]:
        verify_checkpoint_update(_at(tree, old), _at(tree, new), tree.consistency_proof(old, new))


def test_checkpoint_update_with_a_wrong_proof_is_refused(tree: MerkleTree) -> None:
    with pytest.raises(ProofError):
        verify_checkpoint_update(_at(tree, 7), _at(tree, 13), tree.consistency_proof(6, 13))
    with pytest.raises(ProofError):
        verify_checkpoint_update(_at(tree, 7), _at(tree, 13), ())


def test_checkpoint_update_that_shrinks_is_refused(tree: MerkleTree) -> None:
    with pytest.raises(ProofError, match="shrank"):
        verify_checkpoint_update(_at(tree, 13), _at(tree, 7), ())


def test_checkpoint_update_with_another_root_at_the_same_size_is_refused(tree: MerkleTree) -> None:
    """A fork: two different trees of one size."""
    forked = Checkpoint(ORIGIN, 13, MerkleTree.from_leaf_hashes([EMPTY_ROOT] * 13).root())
    with pytest.raises(ProofError, match="different roots"):
        verify_checkpoint_update(_at(tree, 13), forked, ())


def test_checkpoint_update_across_logs_is_refused(tree: MerkleTree) -> None:
    with pytest.raises(ProofError, match="different logs"):
        verify_checkpoint_update(
            _at(tree, 7), _at(tree, 13, "other.example/log"), tree.consistency_proof(7, 13)
        )
