"""Exact prefix ids for the fast block manager's prefix cache, interned in arrays.

The spec's index maps a block hash to one block, and a hit also requires the cached block's
whole token prefix (and extra key) to equal the request's, so that a hash collision never reuses
a wrong block. Comparing whole prefixes on every lookup costs O(prefix); instead each distinct
``(prefix, extra_key)`` gets an integer **prefix id** by hash-consing: the id of block ``i`` is
the node interned under ``(id of block i-1, tokens of block i, extra key id)``, so two prefixes
have the same id exactly when they are equal. A hit is then ``index[hash] == b and pid[b] ==
request pid``: the spec's rule, compared in O(1).

Nodes live in arrays: ``nodes`` int64 ``[5, N]`` (parent id, extra key id, block hash, in use,
content key), ``ntoks`` int64 ``[N, bs]`` (the block's tokens), an open-addressing table ``nkeys``
keyed by a cheap multiplicative **content key** of ``(parent id, extra key id, tokens)`` (equality
is decided by comparing parent, extra and tokens, so the key only spreads the probes), ``nmeta``
``[2]`` (bump pointer, free-stack size) and ``nstack`` (freed node ids).

Because a node's block hash is a function of its prefix, the node doubles as a **hash memo**:
:func:`hash_intern_chain` finds a block's node by content key first and only computes BLAKE2b
(two compressions, about 0.45 us per 16-token block) only for prefixes never seen, so a prompt
that repeats a cached system prompt hashes only its new blocks. :meth:`PrefixIds.collect` frees
the nodes no live sequence or cached block (nor any descendant of theirs) refers to.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit
from numpy.typing import NDArray

from fast.blocks.hash import hash_into

__all__ = [
    "PrefixIds",
    "MISSING",
    "intern_one",
    "intern_chain",
    "hash_intern_chain",
    "hash_intern_one",
]

MISSING = -2
"""The prefix id of a prefix that was never interned (matches no cached block)."""

I64 = NDArray[np.int64]
P_PARENT, P_EXTRA, P_HASH, P_USED, P_KEY = 0, 1, 2, 3, 4
N_ROWS = 5


@njit(cache=True, inline="always")
def _home(key: int, mask: int) -> int:
    x = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    h: int = np.int64((x >> np.uint64(29)) & np.uint64(mask))
    return h


@njit(cache=True, inline="always")
def _content_key(parent: int, block: I64, extra: int) -> int:
    """A cheap 64-bit key of ``(parent, extra, block)`` for the node table (not the hash)."""
    k = (np.uint64(parent) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(extra + 2)
    for t in range(block.shape[0]):
        k = (k ^ np.uint64(block[t])) * np.uint64(0xBF58476D1CE4E5B9)
    key: int = np.int64(k ^ (k >> np.uint64(31)))
    return key


@njit(cache=True)
def _find(
    key: int, parent: int, block: I64, extra: int, nodes: I64, ntoks: I64, nkeys: I64
) -> tuple[int, int]:
    """``(node id or -1, the empty slot where it would go)``."""
    mask = nkeys.shape[0] - 1
    slot = _home(key, mask)
    bs = block.shape[0]
    while True:
        j = nkeys[slot]
        if j == -1:
            return -1, slot
        if nodes[P_KEY, j] == key and nodes[P_PARENT, j] == parent and nodes[P_EXTRA, j] == extra:
            same = True
            for t in range(bs):
                if ntoks[j, t] != block[t]:
                    same = False
                    break
            if same:
                return int(j), slot
        slot = (slot + 1) & mask


@njit(cache=True, inline="always")
def _create(
    slot: int, key: int, parent: int, block: I64, extra: int, h: int,
    nodes: I64, ntoks: I64, nkeys: I64, nmeta: I64, nstack: I64,
) -> int:  # fmt: skip
    if nmeta[1] > 0:
        nmeta[1] -= 1
        j = nstack[nmeta[1]]
    else:
        j = nmeta[0]
        nmeta[0] += 1
    nodes[P_PARENT, j] = parent
    nodes[P_EXTRA, j] = extra
    nodes[P_HASH, j] = h
    nodes[P_USED, j] = 1
    nodes[P_KEY, j] = key
    ntoks[j, :] = block
    nkeys[slot] = j
    return int(j)


@njit(cache=True)
def intern_one(
    parent: int,
    block: I64,  # [bs]
    extra: int,
    h: int,
    create: bool,
    nodes: I64,
    ntoks: I64,
    nkeys: I64,
    nmeta: I64,
    nstack: I64,
) -> int:
    """The id of ``prefix(parent) + block`` under ``extra``; new (with block hash ``h``) if
    ``create``, else MISSING. With ``create`` there must be a free node (see
    :meth:`PrefixIds.reserve`)."""
    if parent == MISSING:
        return MISSING
    key = _content_key(parent, block, extra)
    j, slot = _find(key, parent, block, extra, nodes, ntoks, nkeys)
    if j >= 0:
        return j
    if not create:
        return MISSING
    return _create(slot, key, parent, block, extra, h, nodes, ntoks, nkeys, nmeta, nstack)


@njit(cache=True, inline="always")
def hash_intern_one(
    parent: int,  # prefix id of the blocks before (-1 = none)
    parent_hash: int,  # their hash (-1 = none)
    block: I64,  # [bs]
    extra: int,
    key_bytes: NDArray[np.uint8],
    scratch: NDArray[np.uint64],
    nodes: I64,
    ntoks: I64,
    nkeys: I64,
    nmeta: I64,
    nstack: I64,
) -> tuple[int, int, bool]:
    """``(spec hash, prefix id, hashed)`` of one full block, interning it if new: the hash is
    read from the node when the prefix is already interned and computed (BLAKE2b) otherwise.
    Needs a free node."""
    key = _content_key(parent, block, extra)
    j, slot = _find(key, parent, block, extra, nodes, ntoks, nkeys)
    if j >= 0:
        h: int = nodes[P_HASH, j]
        return h, j, False
    h = hash_into(parent_hash, block, key_bytes, extra >= 0, scratch)
    j = _create(slot, key, parent, block, extra, h, nodes, ntoks, nkeys, nmeta, nstack)
    return h, j, True


@njit(cache=True)
def hash_intern_chain(
    tokens: I64,  # [n]
    bs: int,
    extra: int,
    key_bytes: NDArray[np.uint8],
    scratch: NDArray[np.uint64],
    hashes: I64,  # out [n // bs]
    pids: I64,  # out [n // bs]
    nodes: I64,
    ntoks: I64,
    nkeys: I64,
    nmeta: I64,
    nstack: I64,
) -> int:
    """Spec (BLAKE2b) hashes and prefix ids of every full block, interning new prefixes; a
    block whose prefix is already interned takes its hash from the node instead of hashing.
    Needs ``n // bs`` free nodes. Returns how many blocks were hashed."""
    parent = -1
    h = -1
    hashed = 0
    for i in range(hashes.shape[0]):
        h, parent, new = hash_intern_one(
            parent, h, tokens[i * bs : (i + 1) * bs], extra, key_bytes, scratch,
            nodes, ntoks, nkeys, nmeta, nstack,
        )  # fmt: skip
        hashed += new
        hashes[i] = h
        pids[i] = parent
    return hashed


@njit(cache=True)
def intern_chain(
    tokens: I64,
    bs: int,
    hashes: I64,  # [n // bs]
    extra: int,
    create: bool,
    nodes: I64,
    ntoks: I64,
    nkeys: I64,
    nmeta: I64,
    nstack: I64,
) -> I64:
    """Prefix ids ``[n // bs]`` of every full block of ``tokens`` (MISSING past the first
    prefix never seen, when not ``create``)."""
    nfull = hashes.shape[0]
    out = np.empty(nfull, dtype=np.int64)
    parent = -1
    for i in range(nfull):
        parent = intern_one(
            parent, tokens[i * bs : (i + 1) * bs], extra, hashes[i], create,
            nodes, ntoks, nkeys, nmeta, nstack,
        )  # fmt: skip
        out[i] = parent
    return out


@njit(cache=True)
def _rebuild(nodes: I64, nkeys: I64) -> None:
    nkeys[:] = -1
    mask = nkeys.shape[0] - 1
    for j in range(nodes.shape[1]):
        if nodes[P_USED, j] != 0:
            slot = _home(nodes[P_KEY, j], mask)
            while nkeys[slot] != -1:
                slot = (slot + 1) & mask
            nkeys[slot] = j


class PrefixIds:
    """Interned prefix ids: equal ids if and only if equal (prefix, extra key)."""

    def __init__(self, block_size: int, capacity: int = 256) -> None:
        self.bs = block_size
        self.nodes = np.zeros((N_ROWS, capacity), dtype=np.int64)  # [5, N]
        self.ntoks = np.zeros((capacity, block_size), dtype=np.int64)  # [N, bs]
        self.nkeys = np.full(2 * capacity, -1, dtype=np.int64)  # capacity is a power of 2
        self.nmeta = np.zeros(2, dtype=np.int64)  # bump pointer, free-stack size
        self.nstack = np.zeros(capacity, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.nmeta[0] - self.nmeta[1])

    @property
    def capacity(self) -> int:
        """Node slots."""
        return int(self.nodes.shape[1])

    def free(self) -> int:
        """Nodes that can still be created without collecting or growing."""
        return self.capacity - len(self)

    def args(self) -> tuple[I64, I64, I64, I64, I64]:
        """The arrays the kernels take, in order."""
        return self.nodes, self.ntoks, self.nkeys, self.nmeta, self.nstack

    def reserve(self, n: int, live: Callable[[], I64] | None) -> None:
        """Make room for ``n`` new nodes: collect (keeping the ids ``live()`` returns), then grow
        by doubling."""
        if self.free() >= n:
            return
        if live is not None:
            self.collect(live())
        cap = self.capacity
        while cap - len(self) < max(n, cap // 4):
            cap *= 2
        if cap != self.capacity:
            self._grow(cap)

    def _grow(self, cap: int) -> None:
        old = self.capacity
        nodes = np.zeros((N_ROWS, cap), dtype=np.int64)
        nodes[:, :old] = self.nodes
        ntoks = np.zeros((cap, self.bs), dtype=np.int64)
        ntoks[:old] = self.ntoks
        nstack = np.zeros(cap, dtype=np.int64)
        nstack[:old] = self.nstack
        self.nodes, self.ntoks, self.nstack = nodes, ntoks, nstack
        self.nkeys = np.full(2 * cap, -1, dtype=np.int64)
        _rebuild(self.nodes, self.nkeys)

    def collect(self, live: I64) -> None:
        """Free every node that is neither in ``live`` nor an ancestor of one."""
        keep = np.zeros(self.capacity, dtype=bool)
        frontier = np.unique(live[live >= 0])
        while frontier.size:
            keep[frontier] = True
            parents = self.nodes[P_PARENT, frontier]
            parents = parents[parents >= 0]
            frontier = np.unique(parents[~keep[parents]])
        used = self.nodes[P_USED] != 0
        dead = np.flatnonzero(used & ~keep)
        self.nodes[P_USED, dead] = 0
        top = int(self.nmeta[0])
        free_ids = np.flatnonzero(self.nodes[P_USED, :top] == 0)
        self.nstack[: free_ids.size] = free_ids[::-1]
        self.nmeta[1] = free_ids.size
        _rebuild(self.nodes, self.nkeys)
