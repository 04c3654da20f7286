"""Merkle trees of RFC 9162 (Certificate Transparency 2.0), section 2.1: one signature covers a batch.

A leaf hash is SHA-256(0x00 || data) and an inner node SHA-256(0x01 || left || right); a tree of n leaves
splits at the largest power of two below n, so every size has exactly one shape and the root of a given
size commits to the order of its leaves. `inclusion_proofs` builds every leaf's audit path at once (the
relay's side), `tree_root` only the root (for a consumer that holds every leaf of a bundle);
`root_from_proof` is the verification algorithm of RFC 9162 section 2.1.3.2 (the consumer's side): it accepts
exactly one path length per (index, size) and never a path that was altered.
"""

import hashlib
from collections.abc import Callable, Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
HASH_BYTES = 32

NodeHash = Callable[[bytes, bytes], bytes]


class ProofError(ValueError):
    """The inclusion proof does not fit the tree it claims (index outside it, a path too short or too long)."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """The tree over LEAVES level by level, leaves first, root last. Each level pairs neighbours and lifts an odd
    last node as it is, which gives RFC 9162's tree (split at the largest power of two below the size) with
    every node of a level at its index."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        level = levels[-1]
        parents = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            parents.append(level[-1])
        levels.append(parents)
    return levels


def tree_root(leaves: Sequence[bytes]) -> bytes:
    """The root over LEAVES (leaf hashes, in order): what a holder of every leaf checks a batch signature with."""
    return _levels(leaves)[-1][0]


def inclusion_proofs(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root over LEAVES (leaf hashes, in order) and, for each leaf, its audit path from the leaf up."""
    levels = _levels(leaves)
    paths: list[list[bytes]] = [[] for _ in leaves]
    for depth, level in enumerate(levels[:-1]):
        # At DEPTH, the leaves of one block of 2**DEPTH share a node; its sibling (if any) joins all their paths.
        width = 1 << depth
        for node in range(len(level)):
            sibling = node ^ 1
            if sibling < len(level):
                entry = level[sibling]
                for path in paths[node * width:(node + 1) * width]:
                    path.append(entry)
    return levels[-1][0], paths


def root_from_proof(leaf: bytes, index: int, size: int, path: Sequence[bytes], node: NodeHash = node_hash) -> bytes:
    """The root that LEAF at INDEX of a tree of SIZE leaves leads to along PATH (RFC 9162, 2.1.3.2).

    The caller compares it with the signed root. NODE computes inner nodes (a memoising one may be passed:
    the result is the same). Raises ProofError when the path cannot belong to such a tree."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is outside a tree of {size}")
    position, last = index, size - 1
    root = leaf
    for sibling in path:
        if last == 0:
            raise ProofError("the path is longer than the tree is deep")
        if len(sibling) != HASH_BYTES:
            raise ProofError("a path entry is not a SHA-256 hash")
        if position & 1 or position == last:
            root = node(sibling, root)
            if not position & 1:
                while position and not position & 1:
                    position >>= 1
                    last >>= 1
        else:
            root = node(root, sibling)
        position >>= 1
        last >>= 1
    if last != 0:
        raise ProofError("the path is shorter than the tree is deep")
    return root
