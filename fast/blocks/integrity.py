"""``check_integrity`` of the fast block manager: every invariant of its state, spelled out.

A test tool (O(state) per call, in Python) that reads a :class:`fast.blocks.state.BlockArrays`
and the manager's Python bookkeeping (never the manager itself): the free queues are well-linked
FIFO lists holding exactly the refcount-0 blocks; refcounts equal the number of tables
referencing each block; no CPU block is shared; shared GPU blocks hold the same tokens at the
same position; the id map agrees with the live rows; the hash index and the cached entries
agree; every row's hashes and prefix ids are those of its tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
from numpy.typing import NDArray

from fast.blocks.freelist import COUNT, HEAD, NEXT, PREV, REF, TAIL
from fast.blocks.open_addressing import find
from fast.blocks.prefix_ids import P_USED, intern_chain
from fast.blocks.state import ENTRY_HASH, ENTRY_PID, BlockArrays, live_prefix_ids
from spec.prefix_cache import HashFn, chain_hashes

__all__ = ["check_integrity"]


def _check_queue(name: str, pool: NDArray[np.int32], ends: NDArray[np.int64]) -> None:
    n = pool.shape[1]
    seen: list[int] = []
    prev = -1
    b = int(ends[HEAD])
    while b >= 0:
        if len(seen) > n:
            raise AssertionError(f"{name} free queue has a cycle")
        if int(pool[PREV, b]) != prev:
            raise AssertionError(f"{name} block {b} has prev {pool[PREV, b]}, want {prev}")
        if int(pool[REF, b]) != 0:
            raise AssertionError(f"{name} block {b} is queued with refcount {pool[REF, b]}")
        seen.append(b)
        prev = b
        b = int(pool[NEXT, b])
    if int(ends[TAIL]) != prev:
        raise AssertionError(f"{name} queue tail is {ends[TAIL]}, want {prev}")
    if int(ends[COUNT]) != len(seen):
        raise AssertionError(f"{name} free count {ends[COUNT]} but {len(seen)} queued")
    zero = set(np.flatnonzero(pool[REF] == 0).tolist())
    if zero != set(seen):
        raise AssertionError(f"{name}: refcount-0 blocks {sorted(zero)} != queued {sorted(seen)}")


def _key_of(a: BlockArrays, x: int) -> str | None:
    if x < 0:
        return None
    return bytes(a.key_bytes[a.key_offsets[x] : a.key_offsets[x + 1]]).decode("utf-8")


def check_integrity(
    a: BlockArrays,
    rows: Mapping[int, int],
    freed: AbstractSet[int],
    extra_keys: Sequence[str | None],
    hash_fn: HashFn,
) -> None:
    """Raise AssertionError unless every invariant holds.

    ``rows`` maps each live sequence id to its row, ``freed`` holds the ids freed before (none
    live), ``extra_keys[row]`` is the extra key of the sequence in ``row`` and ``hash_fn`` the
    manager's block hash.
    """
    bs = a.block_size
    _check_queue("GPU", a.gpu_pool, a.gpu_ends)
    _check_queue("CPU", a.cpu_pool, a.cpu_ends)
    gref = np.zeros(a.gpu_pool.shape[1], dtype=np.int64)
    cref = np.zeros(a.cpu_pool.shape[1], dtype=np.int64)
    where: dict[int, tuple[int, list[int]]] = {}
    if len(set(rows.values())) != len(rows):
        raise AssertionError("two sequences share a row")
    if int((a.id_keys >= 0).sum()) != len(rows):
        raise AssertionError(f"the id map holds {(a.id_keys >= 0).sum()} ids, {len(rows)} live")
    for seq_id, row in rows.items():
        if find(a.id_keys, a.id_rows, seq_id) != row:
            raise AssertionError(f"id map disagrees for sequence {seq_id}")
        if seq_id in freed:
            raise AssertionError(f"sequence {seq_id} is both live and freed")
        n = int(a.num_tokens[row])
        nb = -(-n // bs)
        if n < 1:
            raise AssertionError(f"sequence {seq_id} holds {n} tokens")
        blocks = a.tables[row, :nb].tolist()
        if a.tables[row, nb:].any():
            raise AssertionError(f"sequence {seq_id}: its table row is not zero past block {nb}")
        if len(set(blocks)) != nb:
            raise AssertionError(f"block table {blocks} repeats a block")
        computed = int(a.num_computed[row])
        if not 0 <= computed <= n:
            raise AssertionError(f"sequence {seq_id}: {computed} computed tokens of {n}")
        swapped = bool(a.swapped[row])
        refs = cref if swapped else gref
        for i, b in enumerate(blocks):
            if not 0 <= b < refs.shape[0]:
                raise AssertionError(f"sequence {seq_id} references block {b}")
            refs[b] += 1
            if not swapped:
                here = (i, a.tokens[row, i * bs : min(n, (i + 1) * bs)].tolist())
                if where.setdefault(b, here) != here:
                    raise AssertionError(f"block {b} shared with different content: {here}")
        extra = extra_keys[row]
        if _key_of(a, int(a.extra_id[row])) != extra:
            raise AssertionError(
                f"sequence {seq_id} has extra key id {a.extra_id[row]}, its key is {extra!r}"
            )
        if a.caching:
            hashes = chain_hashes(a.tokens[row, :n].tolist(), bs, extra, hash_fn)
            if hashes != a.block_hash[row, : n // bs].tolist():
                raise AssertionError(f"sequence {seq_id} has stale block hashes")
            pids = intern_chain(
                a.tokens[row, :n], bs, a.block_hash[row, : n // bs], int(a.extra_id[row]), False,
                a.pids,
            )  # fmt: skip
            if pids.tolist() != a.block_pid[row, : n // bs].tolist():
                raise AssertionError(f"sequence {seq_id} has stale prefix ids")
            if not swapped:
                for i in range(n // bs):
                    b = blocks[i]
                    pid = a.cache_entry[ENTRY_PID, b]
                    if pid >= 0 and pid != a.block_pid[row, i]:
                        raise AssertionError(
                            f"sequence {seq_id} uses cached block {b} holding another prefix"
                        )
    free_rows = sorted(set(range(a.tables.shape[0])) - set(rows.values()))
    if (
        a.tables[free_rows].any()
        or a.num_tokens[free_rows].any()
        or a.num_computed[free_rows].any()
    ):
        raise AssertionError("a free row holds blocks or tokens")
    if (a.extra_id[free_rows] != -1).any() or a.row_seen.any() or a.cow_count.any():
        raise AssertionError("a free row has an extra key, or append's scratch is not zero")
    if not np.array_equal(gref, a.gpu_pool[REF]):
        raise AssertionError(f"GPU refcounts {a.gpu_pool[REF].tolist()} != {gref.tolist()}")
    if not np.array_equal(cref, a.cpu_pool[REF]):
        raise AssertionError(f"CPU refcounts {a.cpu_pool[REF].tolist()} != {cref.tolist()}")
    if (cref > 1).any():
        raise AssertionError("a CPU block is shared by two swapped-out sequences")
    cached = np.flatnonzero(a.cache_entry[ENTRY_PID] >= 0)
    if int((a.index_keys >= 0).sum()) != cached.shape[0]:
        raise AssertionError(f"{(a.index_keys >= 0).sum()} hashes but {cached.shape[0]} cached")
    nodes = a.pids.nodes
    for b in cached.tolist():
        if find(a.index_keys, a.index_blocks, int(a.cache_entry[ENTRY_HASH, b])) != b:
            raise AssertionError(f"cached block {b} is not found under its hash")
        if nodes[P_USED, int(a.cache_entry[ENTRY_PID, b])] == 0:
            raise AssertionError(f"cached block {b} has a collected prefix id")
    live = live_prefix_ids(a)
    if live.size and (nodes[P_USED, live] == 0).any():
        raise AssertionError("a live prefix id was collected")
