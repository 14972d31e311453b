"""Exact prefix ids for the fast block manager's prefix cache, interned in arrays.

The spec's index maps a block hash to one block, and a hit also requires the cached block's
whole token prefix (and extra key) to equal the request's, so that a hash collision never reuses
a wrong block. Comparing whole prefixes on every lookup costs O(prefix); instead each distinct
``(prefix, extra_key)`` gets an integer **prefix id** by hash-consing: the id of block ``i`` is
the node interned under ``(id of block i-1, tokens of block i, extra key id)``, so two prefixes
have the same id exactly when they are equal. A hit is then ``index[hash] == b and pid[b] ==
request pid``: the spec's rule, compared in O(1).

Nodes live in the arrays of a :class:`PrefixIdArrays`: ``nodes`` int64 ``[5, N]`` (rows
``P_PARENT``, ``P_EXTRA``, ``P_HASH``, ``P_USED``, ``P_KEY``: parent id, extra key id, block hash,
in use, content key), ``tokens`` int64 ``[N, bs]`` (the block's tokens), ``slots`` int64 ``[2N]``,
an open-addressing table of node ids keyed by a cheap multiplicative **content key** of ``(parent
id, extra key id, tokens)`` (equality is decided by comparing parent, extra and tokens, so the key
only spreads the probes), ``counts`` int64 ``[2]`` (``counts[BUMP]``: nodes ever handed out,
``counts[FREED]``: size of the free stack) and ``free_stack`` int64 ``[N]`` (freed node ids).

Because a node's block hash is a function of its prefix, the node doubles as a **hash memo**:
:func:`hash_intern_chain` finds a block's node by content key first and only computes BLAKE2b
(two compressions, about 0.45 us per 16-token block) only for prefixes never seen, so a prompt
that repeats a cached system prompt hashes only its new blocks. :meth:`PrefixIds.collect` frees
the nodes no live sequence or cached block (nor any descendant of theirs) refers to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numba import njit
from numpy.typing import NDArray

from fast.blocks.hash import hash_into
from fast.blocks.open_addressing import home

__all__ = [
    "PrefixIds",
    "PrefixIdArrays",
    "MISSING",
    "lookup_chain",
    "intern_one",
    "intern_chain",
    "hash_intern_chain",
    "hash_intern_one",
]

MISSING = -2
"""The prefix id of a prefix that was never interned (matches no cached block)."""

I64 = NDArray[np.int64]
P_PARENT, P_EXTRA, P_HASH, P_USED, P_KEY = 0, 1, 2, 3, 4
"""Rows of ``PrefixIdArrays.nodes``."""
N_ROWS = 5
BUMP, FREED = 0, 1
"""Slots of ``PrefixIdArrays.counts``."""


class PrefixIdArrays(NamedTuple):
    """The node arrays (see the module docstring); one argument of the interning functions."""

    nodes: I64  # [5, N]
    tokens: I64  # [N, bs]
    slots: I64  # [2N] open-addressing table of node ids, -1 = empty
    counts: I64  # [2] BUMP, FREED
    free_stack: I64  # [N]


@njit(cache=True, inline="always")
def _content_key(parent: int, block: I64, extra: int) -> int:
    """A cheap 64-bit key of ``(parent, extra, block)`` for the node table (not the hash)."""
    k = (np.uint64(parent) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(extra + 2)
    for t in range(block.shape[0]):
        k = (k ^ np.uint64(block[t])) * np.uint64(0xBF58476D1CE4E5B9)
    key: int = np.int64(k ^ (k >> np.uint64(31)))
    return key


@njit(cache=True)
def _find(key: int, parent: int, block: I64, extra: int, ids: PrefixIdArrays) -> tuple[int, int]:
    """``(node id or -1, the empty slot where it would go)``."""
    nodes, ntoks, slots = ids.nodes, ids.tokens, ids.slots
    mask = slots.shape[0] - 1
    slot = home(key, mask)
    bs = block.shape[0]
    while True:
        j = slots[slot]
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
    slot: int, key: int, parent: int, block: I64, extra: int, h: int, ids: PrefixIdArrays
) -> int:
    nodes, counts = ids.nodes, ids.counts
    if counts[FREED] > 0:
        counts[FREED] -= 1
        j = ids.free_stack[counts[FREED]]
    else:
        j = counts[BUMP]
        counts[BUMP] += 1
    nodes[P_PARENT, j] = parent
    nodes[P_EXTRA, j] = extra
    nodes[P_HASH, j] = h
    nodes[P_USED, j] = 1
    nodes[P_KEY, j] = key
    ids.tokens[j, :] = block
    ids.slots[slot] = j
    return int(j)


@njit(cache=True)
def intern_one(
    parent: int,
    block: I64,  # [bs]
    extra: int,
    h: int,
    create: bool,
    ids: PrefixIdArrays,
) -> int:
    """The id of ``prefix(parent) + block`` under ``extra``; new (with block hash ``h``) if
    ``create``, else MISSING. With ``create`` there must be a free node (see
    :meth:`PrefixIds.reserve`)."""
    if parent == MISSING:
        return MISSING
    key = _content_key(parent, block, extra)
    j, slot = _find(key, parent, block, extra, ids)
    if j >= 0:
        return j
    if not create:
        return MISSING
    return _create(slot, key, parent, block, extra, h, ids)


@njit(cache=True, inline="always")
def hash_intern_one(
    parent: int,  # prefix id of the blocks before (-1 = none)
    parent_hash: int,  # their hash (-1 = none)
    block: I64,  # [bs]
    extra: int,
    key_bytes: NDArray[np.uint8],
    scratch: NDArray[np.uint64],
    ids: PrefixIdArrays,
) -> tuple[int, int, bool]:
    """``(spec hash, prefix id, hashed)`` of one full block, interning it if new: the hash is
    read from the node when the prefix is already interned and computed (BLAKE2b) otherwise.
    Needs a free node."""
    key = _content_key(parent, block, extra)
    j, slot = _find(key, parent, block, extra, ids)
    if j >= 0:
        h: int = ids.nodes[P_HASH, j]
        return h, j, False
    h = hash_into(parent_hash, block, key_bytes, extra >= 0, scratch)
    j = _create(slot, key, parent, block, extra, h, ids)
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
    ids: PrefixIdArrays,
) -> int:
    """Spec (BLAKE2b) hashes and prefix ids of every full block, interning new prefixes; a
    block whose prefix is already interned takes its hash from the node instead of hashing.
    Needs ``n // bs`` free nodes. Returns how many blocks were hashed."""
    parent = -1
    h = -1
    hashed = 0
    for i in range(hashes.shape[0]):
        h, parent, new = hash_intern_one(
            parent, h, tokens[i * bs : (i + 1) * bs], extra, key_bytes, scratch, ids
        )
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
    ids: PrefixIdArrays,
) -> I64:
    """Prefix ids ``[n // bs]`` of every full block of ``tokens`` (MISSING past the first
    prefix never seen, when not ``create``)."""
    nfull = hashes.shape[0]
    out = np.empty(nfull, dtype=np.int64)
    parent = -1
    for i in range(nfull):
        parent = intern_one(parent, tokens[i * bs : (i + 1) * bs], extra, hashes[i], create, ids)
        out[i] = parent
    return out


@njit(cache=True)
def lookup_chain(
    tokens: I64,  # [n]
    bs: int,
    extra: int,
    count: int,
    hashes: I64,  # out [>= count]
    pids: I64,  # out [>= count]
    ids: PrefixIdArrays,
) -> int:
    """Hashes and prefix ids of the first ``count`` full blocks, read from the nodes without
    hashing or creating anything; returns how many leading blocks are interned (``pids`` is
    MISSING from there on, ``hashes`` is left unset: no cached block can match such a prefix)."""
    parent = -1
    for i in range(count):
        block = tokens[i * bs : (i + 1) * bs]
        j, _ = _find(_content_key(parent, block, extra), parent, block, extra, ids)
        if j < 0:
            pids[i:count] = MISSING
            return i
        hashes[i] = ids.nodes[P_HASH, j]
        pids[i] = j
        parent = j
    return count


@njit(cache=True)
def _rebuild(nodes: I64, slots: I64) -> None:
    slots[:] = -1
    mask = slots.shape[0] - 1
    for j in range(nodes.shape[1]):
        if nodes[P_USED, j] != 0:
            slot = home(nodes[P_KEY, j], mask)
            while slots[slot] != -1:
                slot = (slot + 1) & mask
            slots[slot] = j


class PrefixIds:
    """Interned prefix ids: equal ids if and only if equal (prefix, extra key).

    Owns the node arrays (:attr:`arrays`), which it replaces when it grows: readers must take
    ``arrays`` again after :meth:`reserve`.
    """

    def __init__(self, block_size: int, capacity: int = 256) -> None:
        self.bs = block_size
        nodes = np.zeros((N_ROWS, capacity), dtype=np.int64)
        slots = np.empty(2 * capacity, dtype=np.int64)  # capacity is a power of 2
        # all -1 (no node is used); through _rebuild so that numba compiles it now, not at the
        # first collection or growth mid-run: on the H200 that compile stalled step 1467 of the
        # 1,000-request trace for 256-280 ms (the table's first growth, 32,768 -> 65,536 ids)
        _rebuild(nodes, slots)
        self.arrays = PrefixIdArrays(
            nodes,
            np.zeros((capacity, block_size), dtype=np.int64),
            slots,
            np.zeros(2, dtype=np.int64),
            np.zeros(capacity, dtype=np.int64),
        )

    def __len__(self) -> int:
        counts = self.arrays.counts
        return int(counts[BUMP] - counts[FREED])

    @property
    def capacity(self) -> int:
        """Node slots."""
        return int(self.arrays.nodes.shape[1])

    def free(self) -> int:
        """Nodes that can still be created without collecting or growing."""
        return self.capacity - len(self)

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
        old, a = self.capacity, self.arrays
        nodes = np.zeros((N_ROWS, cap), dtype=np.int64)
        nodes[:, :old] = a.nodes
        tokens = np.zeros((cap, self.bs), dtype=np.int64)
        tokens[:old] = a.tokens
        stack = np.zeros(cap, dtype=np.int64)
        stack[:old] = a.free_stack
        slots = np.full(2 * cap, -1, dtype=np.int64)
        _rebuild(nodes, slots)
        self.arrays = PrefixIdArrays(nodes, tokens, slots, a.counts, stack)

    def collect(self, live: I64) -> None:
        """Free every node that is neither in ``live`` nor an ancestor of one."""
        a = self.arrays
        keep = np.zeros(self.capacity, dtype=bool)
        frontier = np.unique(live[live >= 0])
        while frontier.size:
            keep[frontier] = True
            parents = a.nodes[P_PARENT, frontier]
            parents = parents[parents >= 0]
            frontier = np.unique(parents[~keep[parents]])
        used = a.nodes[P_USED] != 0
        dead = np.flatnonzero(used & ~keep)
        a.nodes[P_USED, dead] = 0
        top = int(a.counts[BUMP])
        free_ids = np.flatnonzero(a.nodes[P_USED, :top] == 0)
        a.free_stack[: free_ids.size] = free_ids[::-1]
        a.counts[FREED] = free_ids.size
        _rebuild(a.nodes, a.slots)
