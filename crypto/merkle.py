"""RFC 9162 Merkle tree hashing, inclusion and consistency proofs (the identity log's tree).

Owns the tree arithmetic of the identity authority's transparency log (notes/crypto.md §7.2):
clients verify that a certificate event is in the log (inclusion) and that the log only ever grew
(consistency); the server builds both proofs.

Construction (RFC 9162 §2.1.1, identical to RFC 6962 §2.1):

    MTH({})      = SHA-256()                            the empty tree
    leaf hash    = SHA-256(0x00 || d)                   `leaf_hash`
    MTH(D[n])    = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   `node_hash`,
                   k = the largest power of two smaller than n

Proofs are built as RFC 9162 defines them (PATH, §2.1.3.1; PROOF and SUBPROOF, §2.1.4.1) and
verified with the RFC's bit-walk algorithms (§2.1.3.2 and §2.1.4.2). Before the walk the verifier
also checks that the proof has exactly the length its sizes call for, so a truncated or extended
proof is refused with a message that says so, not only as "root mismatch".

Two builders:
- the module functions (`root_from_leaf_hashes`, `inclusion_proof`, `consistency_proof`) are the
  RFC definitions over a list of leaf hashes, O(n) hashes per call; they are the reference that
  the tests hold `MerkleTree` to, and are fine for small trees;
- `MerkleTree` is the server's incremental tree: it caches every complete, power-of-two-aligned
  subtree, so a root at any past size and any proof cost O(log n) hash operations.

What a proof does not bind: the RFC's verification takes the tree size as an input and a root
hash does not commit to it, so an inclusion proof can verify against the right root under a
different claimed size when the two trees have the same shape along the path. The size and the
root must therefore come together from one signed checkpoint (`medrelay.crypto.checkpoint`).

Sizes and indices are u64 (RFC 9162 `tree_size`). Every verification failure, including absurd
sizes, wrong-length hashes and non-list proofs, is a `ProofError`; nothing else is raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from medrelay.crypto.errors import MalformedEncoding, ProofError
from medrelay.crypto.kdf import sha256

HASH_SIZE: Final = 32
MAX_TREE_SIZE: Final = 2**64 - 1
"""Tree sizes are u64; an index is below its tree size."""

MAX_INCLUSION_PROOF_HASHES: Final = 64
"""ceil(log2(n)) for the largest u64 size."""

MAX_CONSISTENCY_PROOF_HASHES: Final = 65
"""A consistency proof from an odd size m can hold one more hash than an inclusion proof in the
same tree: the old tree's rightmost leaf as a seed, then up to 64 siblings (e.g. m = 3,
n = 2**64 - 1 needs 65). RFC 9162 states no bound; this is the arithmetic one."""

EMPTY_ROOT: Final = sha256(b"")

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"


class TreeRangeError(ProofError):
    """A size or index that this tree (or this list of leaves) does not have: asking for a proof
    of leaf 10 in a tree of 5, or from size 7 to size 3."""

    code = "tree_range"


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one log entry (RFC 9162 §2.1.1)."""
    return sha256(_LEAF_PREFIX + bytes(data))


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): an interior node (RFC 9162 §2.1.1)."""
    return sha256(_NODE_PREFIX + left + right)


def _largest_power_of_two_below(n: int) -> int:
    """k with k < n <= 2k, for n >= 2: where RFC 9162 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------------------------
# Reference builders: the RFC 9162 definitions, word for word, over a list of leaf hashes.


def _check_leaf_hashes(leaf_hashes: Sequence[bytes], count: int) -> None:
    for position in range(count):
        value = leaf_hashes[position]
        if not isinstance(value, bytes) or len(value) != HASH_SIZE:
            raise MalformedEncoding(f"leaf hash {position} is not {HASH_SIZE} bytes")


def _mth(leaves: Sequence[bytes], start: int, end: int) -> bytes:
    """MTH(D[start:end]) for end > start (RFC 9162 §2.1.1)."""
    n = end - start
    if n == 1:
        return leaves[start]
    k = _largest_power_of_two_below(n)
    return node_hash(_mth(leaves, start, start + k), _mth(leaves, start + k, end))


def root_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of the whole list; SHA-256("") for an empty list. O(n) hashes."""
    _check_leaf_hashes(leaf_hashes, len(leaf_hashes))
    if not leaf_hashes:
        return EMPTY_ROOT
    return _mth(leaf_hashes, 0, len(leaf_hashes))


def _path(leaves: Sequence[bytes], m: int, start: int, end: int) -> list[bytes]:
    """PATH(m, D[start:end]) of RFC 9162 §2.1.3.1, m relative to start."""
    n = end - start
    if n == 1:
        return []
    k = _largest_power_of_two_below(n)
    if m < k:
        return [*_path(leaves, m, start, start + k), _mth(leaves, start + k, end)]
    return [*_path(leaves, m - k, start + k, end), _mth(leaves, start, start + k)]


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, tree_size: int) -> tuple[bytes, ...]:
    """PATH(index, D[tree_size]) over the first `tree_size` leaf hashes. O(n) hashes."""
    if not 0 <= index < tree_size <= len(leaf_hashes):
        raise TreeRangeError(
            f"no leaf {index} in a tree of size {tree_size} ({len(leaf_hashes)} leaves known)"
        )
    _check_leaf_hashes(leaf_hashes, tree_size)
    return tuple(_path(leaf_hashes, index, 0, tree_size))


def _subproof(leaves: Sequence[bytes], m: int, start: int, end: int, whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[start:end], b) of RFC 9162 §2.1.4.1, m relative to start."""
    n = end - start
    if m == n:
        return [] if whole else [_mth(leaves, start, end)]
    k = _largest_power_of_two_below(n)
    if m <= k:
        return [*_subproof(leaves, m, start, start + k, whole), _mth(leaves, start + k, end)]
    return [*_subproof(leaves, m - k, start + k, end, False), _mth(leaves, start, start + k)]


def consistency_proof(
    leaf_hashes: Sequence[bytes], old_size: int, new_size: int
) -> tuple[bytes, ...]:
    """PROOF(old_size, D[new_size]) over the first `new_size` leaf hashes. O(n) hashes.

    Empty when old_size is 0 or equals new_size: there is nothing to prove (the verifier then
    checks the roots directly).
    """
    if not 0 <= old_size <= new_size <= len(leaf_hashes):
        raise TreeRangeError(
            f"no consistency proof from size {old_size} to {new_size} "
            f"({len(leaf_hashes)} leaves known)"
        )
    _check_leaf_hashes(leaf_hashes, new_size)
    if old_size in (0, new_size):
        return ()
    return tuple(_subproof(leaf_hashes, old_size, 0, new_size, True))


# --------------------------------------------------------------------------------------------
# Verification: RFC 9162 §2.1.3.2 and §2.1.4.2.


def _check_size(value: object, what: str) -> int:
    # bool is an int subclass; a True "size" is a caller's bug, not a size of 1.
    if type(value) is not int or not 0 <= value <= MAX_TREE_SIZE:
        raise ProofError(f"{what} must be an integer in [0, 2**64 - 1]")
    return value


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        raise ProofError(f"{what} must be {HASH_SIZE} bytes")
    return bytes(value)


def _check_proof(proof: object, max_hashes: int, what: str) -> list[bytes]:
    if not isinstance(proof, list | tuple):
        raise ProofError(f"{what} must be a list of hashes")
    if len(proof) > max_hashes:
        raise ProofError(f"{what} has {len(proof)} hashes; no proof needs more than {max_hashes}")
    return [_check_hash(item, f"{what} hash {position}") for position, item in enumerate(proof)]


def _inner_and_border(index: int, size: int) -> tuple[int, int]:
    """How an inclusion path for `index` in a tree of `size` splits (index < size): `inner`
    siblings below the point where the path leaves the perfect subtrees, then `border` siblings
    on the tree's ragged right edge."""
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def inclusion_proof_length(index: int, tree_size: int) -> int:
    """The exact number of hashes in the inclusion proof of `index` in a tree of `tree_size`."""
    if not 0 <= index < tree_size:
        raise TreeRangeError(f"no leaf {index} in a tree of size {tree_size}")
    inner, border = _inner_and_border(index, tree_size)
    return inner + border


def consistency_proof_length(old_size: int, new_size: int) -> int:
    """The exact number of hashes in the consistency proof from `old_size` to `new_size`."""
    if not 0 <= old_size <= new_size:
        raise TreeRangeError(f"no consistency proof from size {old_size} to {new_size}")
    if old_size in (0, new_size):
        return 0
    inner, border = _inner_and_border(old_size - 1, new_size)
    # The old tree's largest complete subtree on the path, of 2**shift leaves, is shared whole by
    # both trees: its hash is one element (or, when it is the whole old tree, the old root).
    shift = (old_size & -old_size).bit_length() - 1
    seed = 0 if old_size == 1 << shift else 1
    return seed + inner - shift + border


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `tree_size` leaves whose root is
    `root` (RFC 9162 §2.1.3.2). Raises `ProofError` otherwise; returns None on success."""
    leaf = _check_hash(leaf_hash, "leaf hash")
    index = _check_size(index, "leaf index")
    tree_size = _check_size(tree_size, "tree size")
    expected_root = _check_hash(root, "root hash")
    path = _check_proof(proof, MAX_INCLUSION_PROOF_HASHES, "inclusion proof")
    # Step 1.
    if index >= tree_size:
        raise ProofError(f"leaf index {index} is not below the tree size {tree_size}")
    expected = inclusion_proof_length(index, tree_size)
    if len(path) != expected:
        raise ProofError(
            f"inclusion proof has {len(path)} hashes; leaf {index} of a tree of {tree_size} "
            f"needs {expected}"
        )
    # Steps 2 and 3.
    fn, sn = index, tree_size - 1
    r = leaf
    # Step 4.
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # Step 5.
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != expected_root:
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of `new_size` leaves with root `new_root` extends the tree of
    `old_size` leaves with root `old_root` (RFC 9162 §2.1.4.2). Raises `ProofError` otherwise.

    Sizes outside the RFC's 0 < old < new: equal sizes need an empty proof and equal roots; an
    empty old tree (whose root must be SHA-256("")) is a prefix of every tree, with an empty
    proof; a shrinking tree is refused.
    """
    old_size = _check_size(old_size, "old tree size")
    new_size = _check_size(new_size, "new tree size")
    first_hash = _check_hash(old_root, "old root hash")
    second_hash = _check_hash(new_root, "new root hash")
    path = _check_proof(proof, MAX_CONSISTENCY_PROOF_HASHES, "consistency proof")
    if old_size > new_size:
        raise ProofError(f"the tree shrank from {old_size} to {new_size} leaves")
    if old_size == 0:
        if path:
            raise ProofError("a consistency proof from the empty tree must be empty")
        if first_hash != EMPTY_ROOT or (new_size == 0 and second_hash != EMPTY_ROOT):
            raise ProofError("the root of the empty tree must be SHA-256 of the empty string")
        return
    if old_size == new_size:
        if path:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if first_hash != second_hash:
            raise ProofError(f"two different roots for the same tree size {old_size}")
        return
    expected = consistency_proof_length(old_size, new_size)
    if len(path) != expected:
        raise ProofError(
            f"consistency proof has {len(path)} hashes; {old_size} to {new_size} needs {expected}"
        )
    # Step 1 (an empty path) cannot happen here: every 0 < old < new needs at least one hash.
    # Step 2.
    if _is_power_of_two(old_size):
        path = [first_hash, *path]
    # Step 3.
    fn, sn = old_size - 1, new_size - 1
    # Step 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = path[0]
    # Step 6.
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # Step 7.
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if fr != first_hash:
        raise ProofError(f"consistency proof does not lead to the old root (size {old_size})")
    if sr != second_hash:
        raise ProofError(f"consistency proof does not lead to the new root (size {new_size})")


# --------------------------------------------------------------------------------------------
# The server's tree.


class MerkleTree:
    """An append-only RFC 9162 tree that answers for any past size in O(log n) hashes.

    It keeps, for every level h, the hashes of the complete subtrees of 2**h leaves that start at
    a multiple of 2**h (level 0 holds the leaf hashes themselves), packed 32 bytes apiece in one
    bytearray per level: about 2n hashes, 64 bytes per leaf. Such a node never changes once its
    last leaf is appended, so it serves every later size too.

    Complexity, for a tree of n leaves:
    - `append`: amortised 1 hash (at most log2 n when it completes a large subtree);
    - `root(size)`: one hash per set bit of `size`, at most 64;
    - `inclusion_proof` and `consistency_proof`: O(log n). Every range RFC 9162's recursion
      visits begins at a multiple of the largest power of two it splits at, so its left halves are
      cached nodes; only the one ragged right-edge range the path turns away from is folded, in
      O(log n) hashes, once;
    - `from_leaf_hashes` (restoring a persisted log): n appends, O(n).

    Not thread-safe: the identity authority owns one instance and serialises appends.
    """

    __slots__ = ("_levels", "_size")

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0

    @classmethod
    def from_leaf_hashes(cls, leaf_hashes: Iterable[bytes]) -> MerkleTree:
        """Rebuild the tree (and its cache) from the log's stored leaf hashes, in order."""
        tree = cls()
        for value in leaf_hashes:
            tree.append(value)
        return tree

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"MerkleTree(size={self._size})"

    def append(self, leaf_hash: bytes) -> int:
        """Add one leaf hash (see `leaf_hash`); returns its index."""
        if not isinstance(leaf_hash, bytes | bytearray) or len(leaf_hash) != HASH_SIZE:
            raise MalformedEncoding(f"a leaf hash must be {HASH_SIZE} bytes")
        if self._size >= MAX_TREE_SIZE:
            raise TreeRangeError("the tree is full (2**64 - 1 leaves)")
        index = self._size
        node = bytes(leaf_hash)
        level, position = 0, index
        while True:
            self._levels[level] += node
            if not position & 1:
                break
            # A right child completes its parent: cache the parent one level up.
            node = node_hash(self._node(level, position - 1), node)
            level, position = level + 1, position >> 1
            if level == len(self._levels):
                self._levels.append(bytearray())
        self._size = index + 1
        return index

    def leaf_hash(self, index: int) -> bytes:
        if not 0 <= index < self._size:
            raise TreeRangeError(f"no leaf {index} in a tree of size {self._size}")
        return self._node(0, index)

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first `size` leaves (default: all of them)."""
        size = self._resolve(size)
        if size == 0:
            return EMPTY_ROOT
        return self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> tuple[bytes, ...]:
        """PATH(index, D[size]) (RFC 9162 §2.1.3.1) for the tree at `size` (default: now)."""
        size = self._resolve(size)
        if not 0 <= index < size:
            raise TreeRangeError(f"no leaf {index} in a tree of size {size}")
        siblings: list[bytes] = []
        start, end, m = 0, size, index
        while end - start > 1:
            k = _largest_power_of_two_below(end - start)
            if m < k:
                siblings.append(self._subtree(start + k, end))
                end = start + k
            else:
                siblings.append(self._subtree(start, start + k))
                start, m = start + k, m - k
        siblings.reverse()  # PATH lists the deepest sibling first
        return tuple(siblings)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> tuple[bytes, ...]:
        """PROOF(old_size, D[new_size]) (RFC 9162 §2.1.4.1); empty for 0 or equal sizes."""
        new_size = self._resolve(new_size)
        if not 0 <= old_size <= new_size:
            raise TreeRangeError(f"no consistency proof from size {old_size} to {new_size}")
        if old_size in (0, new_size):
            return ()
        nodes: list[bytes] = []
        start, end, m, whole = 0, new_size, old_size, True
        while m != end - start:
            k = _largest_power_of_two_below(end - start)
            if m <= k:
                nodes.append(self._subtree(start + k, end))
                end = start + k
            else:
                nodes.append(self._subtree(start, start + k))
                start, m, whole = start + k, m - k, False
        if not whole:
            nodes.append(self._subtree(start, end))
        nodes.reverse()  # SUBPROOF lists the deepest node first
        return tuple(nodes)

    def _resolve(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise TreeRangeError(f"no tree of size {size}; the log has {self._size} leaves")
        return size

    def _node(self, level: int, position: int) -> bytes:
        offset = position * HASH_SIZE
        return bytes(self._levels[level][offset : offset + HASH_SIZE])

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]), end <= size: a cached node when the range is a complete aligned
        subtree, otherwise split as RFC 9162 does (only ragged right edges get here)."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            level = n.bit_length() - 1
            return self._node(level, start >> level)
        k = _largest_power_of_two_below(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))
