"""``check_integrity`` of the fast block manager: every invariant of its arrays, spelled out.

A test tool (O(state) per call, in Python): the free queues are well-linked FIFO lists holding
exactly the refcount-0 blocks; refcounts equal the number of tables referencing each block; no
CPU block is shared; shared GPU blocks hold the same tokens at the same position; the id maps
agree; the hash index and the cached entries agree; every row's hashes and prefix ids are those
of its tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fast.blocks import kernels as K
from fast.blocks.prefix_ids import P_USED, intern_chain
from spec.prefix_cache import chain_hashes

if TYPE_CHECKING:
    from fast.blocks.manager import BlockManager

__all__ = ["check_integrity"]


def _check_queue(name: str, pool: NDArray[np.int32], meta: NDArray[np.int64], o: int) -> None:
    n = pool.shape[1]
    seen: list[int] = []
    prev = -1
    b = int(meta[o])
    while b >= 0:
        if len(seen) > n:
            raise AssertionError(f"{name} free queue has a cycle")
        if int(pool[2, b]) != prev:
            raise AssertionError(f"{name} block {b} has prev {pool[2, b]}, want {prev}")
        if int(pool[0, b]) != 0:
            raise AssertionError(f"{name} block {b} is queued with refcount {pool[0, b]}")
        seen.append(b)
        prev = b
        b = int(pool[1, b])
    if int(meta[o + 1]) != prev:
        raise AssertionError(f"{name} queue tail is {meta[o + 1]}, want {prev}")
    if int(meta[o + 2]) != len(seen):
        raise AssertionError(f"{name} free count {meta[o + 2]} but {len(seen)} queued")
    zero = set(np.flatnonzero(pool[0] == 0).tolist())
    if zero != set(seen):
        raise AssertionError(f"{name}: refcount-0 blocks {sorted(zero)} != queued {sorted(seen)}")


def check_integrity(bm: BlockManager) -> None:
    """Raise AssertionError unless every invariant of ``bm``'s arrays holds."""
    bs = bm._bs
    g = bm.config.num_gpu_blocks
    c = bm.config.num_cpu_blocks
    _check_queue("GPU", bm._gpool, bm._meta, K.G_HEAD)
    _check_queue("CPU", bm._cpool, bm._meta, K.C_HEAD)
    gref = np.zeros(g, dtype=np.int64)
    cref = np.zeros(c, dtype=np.int64)
    where: dict[int, tuple[int, list[int]]] = {}
    if len(set(bm._rows.values())) != len(bm._rows):
        raise AssertionError("two sequences share a row")
    for seq_id, row in bm._rows.items():
        if K.oa_find(bm._skeys, bm._svals, seq_id) != row:
            raise AssertionError(f"id map disagrees for sequence {seq_id}")
        if seq_id in bm._freed:
            raise AssertionError(f"sequence {seq_id} is both live and freed")
        n = int(bm._ntok[row])
        nb = -(-n // bs)
        if n < 1:
            raise AssertionError(f"sequence {seq_id} holds {n} tokens")
        blocks = bm._tables[row, :nb].tolist()
        if bm._tables[row, nb:].any():
            raise AssertionError(f"sequence {seq_id}: its table row is not zero past block {nb}")
        if len(set(blocks)) != nb:
            raise AssertionError(f"block table {blocks} repeats a block")
        swapped = bool(bm._swapped[row])
        refs = cref if swapped else gref
        for i, b in enumerate(blocks):
            if not 0 <= b < refs.shape[0]:
                raise AssertionError(f"sequence {seq_id} references block {b}")
            refs[b] += 1
            if not swapped:
                here = (i, bm._toks[row, i * bs : min(n, (i + 1) * bs)].tolist())
                if where.setdefault(b, here) != here:
                    raise AssertionError(f"block {b} shared with different content: {here}")
        if bm._caching:
            extra = bm._extra[row]
            if bm._xid[row] != bm._extra_id(extra):
                raise AssertionError(f"sequence {seq_id} has extra key id {bm._xid[row]}")
            hashes = chain_hashes(bm._toks[row, :n].tolist(), bs, extra, bm._hash_fn)
            if hashes != bm._bhash[row, : n // bs].tolist():
                raise AssertionError(f"sequence {seq_id} has stale block hashes")
            pids = intern_chain(
                bm._toks[row, :n],
                bs,
                bm._bhash[row, : n // bs],
                int(bm._xid[row]),
                False,
                *bm._pids.args(),
            )
            if pids.tolist() != bm._bpid[row, : n // bs].tolist():
                raise AssertionError(f"sequence {seq_id} has stale prefix ids")
            if not swapped:
                for i in range(n // bs):
                    b = blocks[i]
                    if bm._ent[1, b] >= 0 and bm._ent[1, b] != bm._bpid[row, i]:
                        raise AssertionError(
                            f"sequence {seq_id} uses cached block {b} holding another prefix"
                        )
    free_rows = sorted(set(range(bm._tables.shape[0])) - set(bm._rows.values()))
    if bm._tables[free_rows].any() or bm._ntok[free_rows].any():
        raise AssertionError("a free row holds blocks or tokens")
    if not np.array_equal(gref, bm._gpool[0]):
        raise AssertionError(f"GPU refcounts {bm._gpool[0].tolist()} != references {gref.tolist()}")
    if not np.array_equal(cref, bm._cpool[0]):
        raise AssertionError(f"CPU refcounts {bm._cpool[0].tolist()} != references {cref.tolist()}")
    if (cref > 1).any():
        raise AssertionError("a CPU block is shared by two swapped-out sequences")
    cached = np.flatnonzero(bm._ent[1] >= 0)
    if int((bm._ikeys >= 0).sum()) != cached.shape[0]:
        raise AssertionError(f"{(bm._ikeys >= 0).sum()} hashes but {cached.shape[0]} cached blocks")
    for b in cached.tolist():
        if K.oa_find(bm._ikeys, bm._ivals, int(bm._ent[0, b])) != b:
            raise AssertionError(f"cached block {b} is not found under its hash")
        if bm._pids.nodes[P_USED, int(bm._ent[1, b])] == 0:
            raise AssertionError(f"cached block {b} has a collected prefix id")
    live = bm._live_pids()
    if live.size and (bm._pids.nodes[P_USED, live] == 0).any():
        raise AssertionError("a live prefix id was collected")
