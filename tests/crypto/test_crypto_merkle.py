"""RFC 9162 Merkle tree: the reference tree's known answers, exhaustive proof checks for every
size up to 64 (each proof verifies; each mutation of it is refused), `MerkleTree` against the
reference builders, the O(log n) cost of the cached tree, and total input validation of the
verifiers (ProofError and nothing else)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sized
from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrelay.crypto import merkle
from medrelay.crypto.errors import MalformedEncoding, ProofError
from medrelay.crypto.kdf import sha256
from medrelay.crypto.merkle import (
    EMPTY_ROOT,
    MAX_CONSISTENCY_PROOF_HASHES,
    MAX_INCLUSION_PROOF_HASHES,
    MAX_TREE_SIZE,
    MerkleTree,
    TreeRangeError,
    consistency_proof,
    consistency_proof_length,
    inclusion_proof,
    inclusion_proof_length,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

MAX_EXHAUSTIVE = 64
# One more leaf than the exhaustive range, so "the next size" exists for every tested size.
LEAVES = [leaf_hash(i.to_bytes(2, "big")) for i in range(MAX_EXHAUSTIVE + 1)]
ROOTS = [root_from_leaf_hashes(LEAVES[:n]) for n in range(MAX_EXHAUSTIVE + 2)]
TREE = MerkleTree.from_leaf_hashes(LEAVES)


def _flip(value: bytes) -> bytes:
    return bytes((value[0] ^ 0x01,)) + value[1:]


def _refused(check: Callable[[], None]) -> bool:
    try:
        check()
    except ProofError:
        return True
    return False


def _mutations(proof: tuple[bytes, ...]) -> list[tuple[str, list[bytes]]]:
    """Every truncation, an extension at either end, and every adjacent swap."""
    items = list(proof)
    out: list[tuple[str, list[bytes]]] = []
    for cut in range(len(items)):
        out.append((f"without hash {cut}", items[:cut] + items[cut + 1 :]))
    out.append(("extended at the end", [*items, LEAVES[0]]))
    out.append(("extended at the start", [LEAVES[0], *items]))
    for i in range(len(items) - 1):
        swapped = list(items)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        out.append((f"hashes {i} and {i + 1} swapped", swapped))
    return out


# ------------------------------------------------------------------------------ hashing


def test_leaf_node_and_empty_hashes_are_the_rfc_9162_domain_separated_sha256() -> None:
    assert leaf_hash(b"abc") == sha256(b"\x00abc")
    assert node_hash(b"L" * 32, b"R" * 32) == sha256(b"\x01" + b"L" * 32 + b"R" * 32)
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_from_leaf_hashes([]) == EMPTY_ROOT
    assert MerkleTree().root() == EMPTY_ROOT


# ------------------------------------------------------------------------------ known answers


@pytest.fixture(scope="module")
def reference(known_answers: dict[str, Any]) -> dict[str, Any]:
    vectors: dict[str, Any] = known_answers["rfc9162_merkle"]
    return vectors


@pytest.fixture(scope="module")
def reference_leaves(reference: dict[str, Any]) -> list[bytes]:
    return [leaf_hash(bytes.fromhex(data)) for data in reference["leaves"]]


def test_reference_tree_roots_for_sizes_0_to_8(
    reference: dict[str, Any], reference_leaves: list[bytes]
) -> None:
    """The transparency-dev/merkle reference tree: both builders give the published roots."""
    tree = MerkleTree()
    for size, expected in enumerate(reference["roots_by_size_0_to_8"]):
        assert root_from_leaf_hashes(reference_leaves[:size]).hex() == expected
        assert tree.root().hex() == expected
        if size < len(reference_leaves):
            tree.append(reference_leaves[size])
    assert [tree.root(size).hex() for size in range(9)] == reference["roots_by_size_0_to_8"]


@pytest.mark.parametrize(("name", "index"), [("leaf0_size8", 0), ("leaf5_size8", 5)])
def test_reference_inclusion_proofs(
    reference: dict[str, Any], reference_leaves: list[bytes], name: str, index: int
) -> None:
    expected = reference["inclusion_proof_prefixes"][name]
    for proof in (
        inclusion_proof(reference_leaves, index, 8),
        MerkleTree.from_leaf_hashes(reference_leaves).inclusion_proof(index, 8),
    ):
        assert [h.hex()[:8] for h in proof] == expected
        root = bytes.fromhex(reference["roots_by_size_0_to_8"][8])
        verify_inclusion(reference_leaves[index], index, 8, proof, root)


@pytest.mark.parametrize(
    ("name", "old", "new"), [("2_to_8", 2, 8), ("6_to_8", 6, 8), ("2_to_5", 2, 5)]
)
def test_reference_consistency_proofs(
    reference: dict[str, Any], reference_leaves: list[bytes], name: str, old: int, new: int
) -> None:
    expected = reference["consistency_proof_prefixes"][name]
    roots = [bytes.fromhex(r) for r in reference["roots_by_size_0_to_8"]]
    tree = MerkleTree.from_leaf_hashes(reference_leaves)
    for proof in (consistency_proof(reference_leaves, old, new), tree.consistency_proof(old, new)):
        assert [h.hex()[:8] for h in proof] == expected
        verify_consistency(old, new, roots[old], roots[new], proof)


# ------------------------------------------------------------------------------ exhaustive


def test_every_inclusion_proof_up_to_64_verifies_and_every_mutation_is_refused() -> None:
    """For every size 1..64 and every index: the proof verifies, `MerkleTree` builds the same
    proof, and it is refused truncated, extended, reordered, for another index, for another size
    (with that size's root), with the wrong root, and for the wrong leaf."""
    accepted_mutations: list[str] = []
    checked = 0
    for size in range(1, MAX_EXHAUSTIVE + 1):
        root = ROOTS[size]
        for index in range(size):
            proof = inclusion_proof(LEAVES, index, size)
            assert TREE.inclusion_proof(index, size) == proof
            assert len(proof) == inclusion_proof_length(index, size)
            verify_inclusion(LEAVES[index], index, size, proof, root)
            leaf = LEAVES[index]
            attempts: list[tuple[str, Callable[[], None]]] = [
                (name, partial(verify_inclusion, leaf, index, size, mutated, root))
                for name, mutated in _mutations(proof)
            ]
            attempts += [
                (f"index {other}", partial(verify_inclusion, leaf, other, size, proof, root))
                for other in range(size)
                if other != index
            ]
            attempts += [
                (
                    f"size {other}",
                    partial(verify_inclusion, leaf, index, other, proof, ROOTS[other]),
                )
                for other in (size - 1, size + 1)
                if other > index
            ]
            attempts.append(
                ("wrong root", partial(verify_inclusion, leaf, index, size, proof, _flip(root)))
            )
            attempts.append(
                ("wrong leaf", partial(verify_inclusion, _flip(leaf), index, size, proof, root))
            )
            for name, attempt in attempts:
                checked += 1
                if not _refused(attempt):
                    accepted_mutations.append(f"leaf {index} of {size}: {name}")
    assert accepted_mutations == []
    assert checked > 40_000


def test_every_consistency_proof_up_to_64_verifies_and_every_mutation_is_refused() -> None:
    """For every 1 <= m <= n <= 64 (2,080 pairs): the proof verifies, `MerkleTree` builds the
    same proof, and it is refused truncated, extended, reordered, for another old or new size
    (with that size's root), and with either root wrong."""
    accepted_mutations: list[str] = []
    pairs = 0
    for new in range(1, MAX_EXHAUSTIVE + 1):
        for old in range(1, new + 1):
            pairs += 1
            proof = consistency_proof(LEAVES, old, new)
            assert TREE.consistency_proof(old, new) == proof
            assert len(proof) == consistency_proof_length(old, new)
            old_root, new_root = ROOTS[old], ROOTS[new]
            verify_consistency(old, new, old_root, new_root, proof)
            attempts: list[tuple[str, Callable[[], None]]] = [
                (name, partial(verify_consistency, old, new, old_root, new_root, mutated))
                for name, mutated in _mutations(proof)
            ]
            attempts += [
                (
                    f"old size {other}",
                    partial(verify_consistency, other, new, ROOTS[other], new_root, proof),
                )
                for other in (old - 1, old + 1)
                if 1 <= other <= new and other != old
            ]
            attempts += [
                (
                    f"new size {other}",
                    partial(verify_consistency, old, other, old_root, ROOTS[other], proof),
                )
                for other in (new - 1, new + 1)
                if other >= old and other != new
            ]
            attempts += [
                (
                    "wrong old root",
                    partial(verify_consistency, old, new, _flip(old_root), new_root, proof),
                ),
                (
                    "wrong new root",
                    partial(verify_consistency, old, new, old_root, _flip(new_root), proof),
                ),
            ]
            for name, attempt in attempts:
                if not _refused(attempt):
                    accepted_mutations.append(f"{old} to {new}: {name}")
    assert accepted_mutations == []
    assert pairs == 2080


def test_consistency_proof_binds_both_sizes_even_against_the_same_roots() -> None:
    """Unlike an inclusion proof (below), a consistency proof refuses any other old size for
    the same pair of roots: fr must rebuild the old root from exactly its subtrees."""
    for new in range(2, 33):
        for old in range(1, new):
            proof = consistency_proof(LEAVES, old, new)
            for other in range(1, new):
                if other != old:
                    assert _refused(
                        partial(verify_consistency, other, new, ROOTS[old], ROOTS[new], proof)
                    )


def test_an_inclusion_proof_alone_does_not_bind_the_tree_size() -> None:
    """RFC 9162 roots do not commit to the size: leaf 0's proof in a tree of 5 also verifies
    against the same root when 6 is claimed, since both trees have the same shape along that
    path. This is why a (size, root) pair must come from one signed checkpoint."""
    proof = inclusion_proof(LEAVES, 0, 5)
    verify_inclusion(LEAVES[0], 0, 5, proof, ROOTS[5])
    verify_inclusion(LEAVES[0], 0, 6, proof, ROOTS[5])
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[0], 0, 6, proof, ROOTS[6])


# ------------------------------------------------------------------------------ edge sizes


def test_consistency_from_the_empty_tree_needs_an_empty_proof_and_the_empty_root() -> None:
    assert consistency_proof(LEAVES, 0, 5) == () == TREE.consistency_proof(0, 5)
    verify_consistency(0, 5, EMPTY_ROOT, ROOTS[5], [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 5, ROOTS[1], ROOTS[5], [])
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(0, 5, EMPTY_ROOT, ROOTS[5], [LEAVES[0]])


def test_equal_sizes_need_equal_roots_and_an_empty_proof() -> None:
    verify_consistency(7, 7, ROOTS[7], ROOTS[7], ())
    with pytest.raises(ProofError, match="different roots"):
        verify_consistency(7, 7, ROOTS[7], ROOTS[6], ())
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(7, 7, ROOTS[7], ROOTS[7], [LEAVES[0]])


def test_a_shrinking_tree_is_refused() -> None:
    with pytest.raises(ProofError, match="shrank"):
        verify_consistency(8, 7, ROOTS[8], ROOTS[7], [])


def test_the_proof_length_bounds_are_the_u64_maxima() -> None:
    """The largest u64 trees need 64 inclusion hashes and 65 consistency hashes."""
    assert inclusion_proof_length(0, MAX_TREE_SIZE) == MAX_INCLUSION_PROOF_HASHES == 64
    assert consistency_proof_length(3, MAX_TREE_SIZE) == MAX_CONSISTENCY_PROOF_HASHES == 65
    assert (
        max(inclusion_proof_length(i, MAX_TREE_SIZE) for i in (0, 2**63, MAX_TREE_SIZE - 1)) == 64
    )


def test_proofs_for_the_largest_sizes_walk_and_fail_only_on_the_root() -> None:
    """A proof of the right length for a u64-sized tree goes through the whole walk."""
    garbage = [LEAVES[1]] * 64
    with pytest.raises(ProofError, match="does not lead to the root"):
        verify_inclusion(LEAVES[0], MAX_TREE_SIZE - 1, MAX_TREE_SIZE, garbage[:63], ROOTS[3])
    with pytest.raises(ProofError, match="old root"):
        verify_consistency(3, MAX_TREE_SIZE, ROOTS[3], ROOTS[4], [LEAVES[1]] * 65)


# ------------------------------------------------------------------------------ bad input


def _describe(value: object) -> str:
    length = len(value) if isinstance(value, Sized) else "-"
    return f"{type(value).__name__}[{length}]"


BAD_SIZES: list[object] = [-1, MAX_TREE_SIZE + 1, 2**200, True, 3.0, "3", None, b"\x03"]
BAD_HASHES: list[object] = [b"", b"\x00" * 31, b"\x00" * 33, "a" * 32, None, 0, [b"\x00"] * 32]
BAD_PROOFS: list[object] = [
    None,
    b"\x00" * 32,
    "proof",
    iter([LEAVES[1]]),
    {LEAVES[1]},
    [b"\x00" * 31],
    [None],
    ["x" * 32],
    [LEAVES[1]] * (MAX_CONSISTENCY_PROOF_HASHES + 1),
    [LEAVES[1]] * 10_000,
]


@pytest.mark.parametrize("bad", BAD_SIZES, ids=repr)
def test_absurd_sizes_and_indices_are_proof_errors(bad: object) -> None:
    proof = inclusion_proof(LEAVES, 2, 5)
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[2], bad, 5, proof, ROOTS[5])  # type: ignore[arg-type]
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[2], 2, bad, proof, ROOTS[5])  # type: ignore[arg-type]
    cproof = consistency_proof(LEAVES, 3, 5)
    with pytest.raises(ProofError):
        verify_consistency(bad, 5, ROOTS[3], ROOTS[5], cproof)  # type: ignore[arg-type]
    with pytest.raises(ProofError):
        verify_consistency(3, bad, ROOTS[3], ROOTS[5], cproof)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", BAD_HASHES, ids=_describe)
def test_wrong_length_or_typed_hashes_are_proof_errors(bad: object) -> None:
    proof = inclusion_proof(LEAVES, 2, 5)
    with pytest.raises(ProofError):
        verify_inclusion(bad, 2, 5, proof, ROOTS[5])  # type: ignore[arg-type]
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[2], 2, 5, proof, bad)  # type: ignore[arg-type]
    cproof = consistency_proof(LEAVES, 3, 5)
    with pytest.raises(ProofError):
        verify_consistency(3, 5, bad, ROOTS[5], cproof)  # type: ignore[arg-type]
    with pytest.raises(ProofError):
        verify_consistency(3, 5, ROOTS[3], bad, cproof)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", BAD_PROOFS, ids=_describe)
def test_malformed_proofs_are_proof_errors(bad: object) -> None:
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[2], 2, 5, bad, ROOTS[5])  # type: ignore[arg-type]
    with pytest.raises(ProofError):
        verify_consistency(3, 5, ROOTS[3], ROOTS[5], bad)  # type: ignore[arg-type]


def test_index_at_or_beyond_the_size_is_refused() -> None:
    with pytest.raises(ProofError, match="not below the tree size"):
        verify_inclusion(LEAVES[0], 5, 5, [], ROOTS[5])
    with pytest.raises(ProofError, match="not below the tree size"):
        verify_inclusion(LEAVES[0], 0, 0, [], EMPTY_ROOT)


sizes = st.one_of(
    st.integers(min_value=0, max_value=70),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**63, MAX_TREE_SIZE, MAX_TREE_SIZE + 1]),
)
hashes = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40))
proofs = st.lists(hashes, max_size=70)


@settings(max_examples=150, deadline=None)
@given(leaf=hashes, index=sizes, size=sizes, proof=proofs, root=hashes)
def test_verify_inclusion_raises_only_proof_error_on_arbitrary_input(
    leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes
) -> None:
    """Random inputs never verify, but for the one genuine proof they can draw: a one-leaf
    tree's root is its leaf hash, so leaf 0 of size 1 with an empty path and root == leaf."""
    if index == 0 and size == 1 and not proof and len(leaf) == 32 and leaf == root:
        verify_inclusion(leaf, index, size, proof, root)
        return
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, proof, root)


@settings(max_examples=150, deadline=None)
@given(old=sizes, new=sizes, old_root=hashes, new_root=hashes, proof=proofs)
def test_verify_consistency_raises_only_proof_error_on_arbitrary_input(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> None:
    """Random roots never verify (a random old == new pair with equal random roots aside)."""
    if old == new and old_root == new_root and not proof and 0 < old <= MAX_TREE_SIZE:
        return
    with pytest.raises(ProofError):
        verify_consistency(old, new, old_root, new_root, proof)


# ------------------------------------------------------------------------------ MerkleTree


def test_tree_restored_from_leaf_hashes_equals_the_incrementally_built_tree() -> None:
    built = MerkleTree()
    for index, value in enumerate(LEAVES):
        assert built.append(value) == index
    restored = MerkleTree.from_leaf_hashes(LEAVES)
    assert restored.size == built.size == len(restored) == len(LEAVES)
    for size in range(len(LEAVES) + 1):
        assert restored.root(size) == built.root(size) == ROOTS[size]
    assert [restored.leaf_hash(i) for i in range(len(LEAVES))] == LEAVES
    assert repr(restored) == f"MerkleTree(size={len(LEAVES)})"


@settings(max_examples=40, deadline=None)
@given(data=st.data(), size=st.integers(min_value=1, max_value=3000))
def test_tree_agrees_with_the_reference_builders_on_larger_trees(
    data: st.DataObject, size: int
) -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(size)]
    tree = MerkleTree.from_leaf_hashes(leaves)
    n = data.draw(st.integers(min_value=1, max_value=size), label="n")
    index = data.draw(st.integers(min_value=0, max_value=n - 1), label="index")
    old = data.draw(st.integers(min_value=0, max_value=n), label="old")
    root = root_from_leaf_hashes(leaves[:n])
    assert tree.root(n) == root
    proof = tree.inclusion_proof(index, n)
    assert proof == inclusion_proof(leaves, index, n)
    verify_inclusion(leaves[index], index, n, proof, root)
    cproof = tree.consistency_proof(old, n)
    assert cproof == consistency_proof(leaves, old, n)
    verify_consistency(old, n, tree.root(old), root, cproof)


def test_tree_proofs_and_roots_cost_logarithmic_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With cached complete subtrees, every root and proof of a 5,000-leaf tree at any past size
    costs at most 2*log2(n) + 2 hash operations (the reference builders spend O(n))."""
    size = 5000
    tree = MerkleTree.from_leaf_hashes(leaf_hash(i.to_bytes(4, "big")) for i in range(size))
    calls = 0
    real_node_hash = merkle.node_hash

    def counting_node_hash(left: bytes, right: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return real_node_hash(left, right)

    monkeypatch.setattr(merkle, "node_hash", counting_node_hash)
    bound = 2 * math.ceil(math.log2(size)) + 2
    worst = 0
    for n in [*range(1, 70), *range(size - 70, size + 1), 4095, 4096, 4097, 2049, 3333]:
        for operation in (
            lambda: tree.root(n),  # noqa: B023
            lambda: tree.inclusion_proof(0, n),  # noqa: B023
            lambda: tree.inclusion_proof(n - 1, n),  # noqa: B023
            lambda: tree.inclusion_proof(n // 3, n),  # noqa: B023
            lambda: tree.consistency_proof(n // 2, n),  # noqa: B023
            lambda: tree.consistency_proof(max(n - 1, 0), n),  # noqa: B023
            lambda: tree.consistency_proof(1, n),  # noqa: B023
        ):
            calls = 0
            operation()
            worst = max(worst, calls)
    assert 0 < worst <= bound


def test_tree_refuses_sizes_and_indices_it_does_not_have() -> None:
    tree = MerkleTree.from_leaf_hashes(LEAVES[:5])
    for attempt in (
        lambda: tree.root(6),
        lambda: tree.root(-1),
        lambda: tree.inclusion_proof(5),
        lambda: tree.inclusion_proof(-1),
        lambda: tree.inclusion_proof(3, 3),
        lambda: tree.inclusion_proof(0, 6),
        lambda: tree.consistency_proof(4, 3),
        lambda: tree.consistency_proof(2, 6),
        lambda: tree.consistency_proof(-1),
        lambda: tree.leaf_hash(5),
    ):
        with pytest.raises(TreeRangeError):
            attempt()
    assert issubclass(TreeRangeError, ProofError)


def test_reference_builders_refuse_sizes_and_indices_they_do_not_have() -> None:
    for attempt in (
        lambda: inclusion_proof(LEAVES[:5], 5, 5),
        lambda: inclusion_proof(LEAVES[:5], 0, 6),
        lambda: inclusion_proof(LEAVES[:5], -1, 5),
        lambda: consistency_proof(LEAVES[:5], 3, 2),
        lambda: consistency_proof(LEAVES[:5], 3, 6),
        lambda: consistency_proof_length(-1, 3),
        lambda: inclusion_proof_length(3, 3),
    ):
        with pytest.raises(TreeRangeError):
            attempt()


def test_leaf_hashes_must_be_32_bytes() -> None:
    with pytest.raises(MalformedEncoding):
        MerkleTree().append(b"\x00" * 31)
    with pytest.raises(MalformedEncoding):
        MerkleTree().append("x" * 32)  # type: ignore[arg-type]
    with pytest.raises(MalformedEncoding):
        root_from_leaf_hashes([LEAVES[0], b"short"])
    with pytest.raises(MalformedEncoding):
        inclusion_proof([LEAVES[0], b"short"], 0, 2)
