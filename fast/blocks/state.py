"""The fast block manager's state: every array, its shape, dtype, meaning and writers.

:class:`BlockArrays` names the arrays; :func:`pack` turns them into a :class:`BlockState`, a
numba structref holding the *same* arrays (no copy), which every kernel of
:mod:`fast.blocks.kernels` takes as its first argument ``s`` and reads as ``s.tables``,
``s.gpu_pool``... One structref argument costs less per call than the 25 arrays it replaces
(measured in ``docs/fast-blocks.md``); a NamedTuple argument would cost more, because numba types
its fields one by one on every call. The manager keeps both views: it reads the arrays in Python
through :class:`BlockArrays`, and packs them again whenever it replaces one (growth).

``G``/``C`` are the GPU/CPU pool sizes, ``R`` the rows (one per live sequence, grown by doubling),
``W`` the blocks a row can hold (grown by doubling), ``bs`` the block size. Every slot and row has
one meaning in every kernel. Writers are the kernels of :mod:`fast.blocks.kernels` (``allocate``
= ``allocate_kernel``, and so on); the manager writes only when it grows or rebuilds an array.

Configuration (scalars, fixed at construction):

* ``block_size`` (``bs``), ``watermark`` (blocks ``allocate`` must leave free),
  ``caching`` (prefix caching on), ``numba_hash`` (the hash is the spec's default, computed in
  numba; otherwise the manager's Python ``hash_fn`` and the kernels take its hashes as input).

Block pools (:mod:`fast.blocks.freelist`; written by allocate, append, fork, free, swap_out,
swap_in):

* ``gpu_pool`` int32 ``[3, G]``: row ``REF`` the refcount of each GPU block, rows ``NEXT`` and
  ``PREV`` its neighbours in the free queue (``-1`` = none).
* ``gpu_ends`` int64 ``[4]``: ``HEAD``, ``TAIL`` and ``COUNT`` of the GPU free queue, and
  ``EVICTED``: how many blocks taken from it dropped their prefix-cache entry.
* ``cpu_pool`` int32 ``[3, C]``, ``cpu_ends`` int64 ``[4]``: the same for the CPU pool (written by
  free, swap_out, swap_in only).

Prefix cache (written by mark_computed, swap_in, reset_cache, and by every kernel that takes
a GPU block, since taking a cached free block evicts it):

* ``cache_entry`` int64 ``[2, G]``: row ``ENTRY_HASH`` the hash block ``b`` is cached under, row
  ``ENTRY_PID`` its prefix id (``-1`` = not cached).
* ``index_keys`` int64 ``[K]``, ``index_blocks`` int32 ``[K]``: the hash index, hash -> block, an
  open-addressing table (:mod:`fast.blocks.open_addressing`), ``K`` a power of two ``> 2G``.
* ``pids`` (:class:`fast.blocks.prefix_ids.PrefixIdArrays`): the interned prefix ids and the hash
  memo (written by allocate and append when a block fills; collected and grown by the manager).
* ``key_bytes`` uint8 ``[*]``, ``key_offsets`` int64 ``[X + 1]``: the UTF-8 bytes of every extra
  key seen, key ``x`` at ``key_bytes[key_offsets[x]:key_offsets[x + 1]]`` (manager only).
* ``hash_scratch`` uint64: scratch of :func:`fast.blocks.hash.hash_into`, sized for the longest
  extra key (allocate, append).

Sequences (one row each):

* ``id_keys`` int64 ``[S]``, ``id_rows`` int32 ``[S]``: sequence id -> row, open addressing
  (allocate, fork insert; free deletes; the manager rebuilds it larger).
* ``tables`` int32 ``[R, W]``: the block table of each row, physical ids in logical order, zero
  past the last block (the layout a GPU kernel takes; CPU ids while swapped out). Written by
  allocate, append, fork, free, swap_out, swap_in.
* ``num_tokens`` int64 ``[R]``, ``tokens`` int64 ``[R, W * bs]``: length and token ids (read only
  below the length). Written by allocate, append, fork, free.
* ``swapped`` uint8 ``[R]``: 1 while the row holds CPU block ids (swap_out, swap_in, fork, free).
* ``block_hash``, ``block_pid`` int64 ``[R, W]``: hash and prefix id of each full block (read
  only below ``num_tokens // bs``; allocate, append, fork).
* ``extra_id`` int64 ``[R]``: the row's extra key id, ``-1`` = none (allocate, fork, free).
* ``num_computed`` int64 ``[R]``: leading tokens whose KV is written; the full blocks below it
  are the ones offered to the prefix cache (allocate: the cached tokens; mark_computed raises
  it; fork copies it; free clears it).

Scratch, all zero between calls (append only):

* ``row_seen`` int32 ``[R]``: marks the rows of a batch to find repeated sequence ids.
* ``cow_count`` int32 ``[G]``: copy-on-writes counted so far per shared last block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numba import njit, types
from numba.experimental import structref
from numpy.typing import NDArray

from fast.blocks.prefix_ids import PrefixIdArrays

__all__ = [
    "ENTRY_HASH", "ENTRY_PID", "BlockArrays", "BlockState", "pack", "live_prefix_ids",
]  # fmt: skip

ENTRY_HASH, ENTRY_PID = 0, 1
"""Rows of ``cache_entry``."""

I64 = NDArray[np.int64]
I32 = NDArray[np.int32]
U8 = NDArray[np.uint8]


class BlockArrays(NamedTuple):
    """The state, named (layout in the module docstring)."""

    block_size: int
    watermark: int
    caching: bool
    numba_hash: bool
    gpu_pool: I32  # [3, G] REF, NEXT, PREV
    gpu_ends: I64  # [4] HEAD, TAIL, COUNT, EVICTED
    cpu_pool: I32  # [3, C]
    cpu_ends: I64  # [4]
    cache_entry: I64  # [2, G] ENTRY_HASH, ENTRY_PID
    index_keys: I64  # [K]
    index_blocks: I32  # [K]
    pids: PrefixIdArrays
    key_bytes: U8  # [*]
    key_offsets: I64  # [X + 1]
    hash_scratch: NDArray[np.uint64]
    id_keys: I64  # [S]
    id_rows: I32  # [S]
    tables: I32  # [R, W]
    num_tokens: I64  # [R]
    tokens: I64  # [R, W * bs]
    swapped: U8  # [R]
    block_hash: I64  # [R, W]
    block_pid: I64  # [R, W]
    extra_id: I64  # [R]
    num_computed: I64  # [R]
    row_seen: I32  # [R] scratch
    cow_count: I32  # [G] scratch


@structref.register
class BlockStateType(types.StructRef):
    """The numba type of :class:`BlockState` (one per combination of field types)."""

    def preprocess_fields(self, fields: Any) -> Any:
        return tuple((name, types.unliteral(typ)) for name, typ in fields)  # type: ignore[no-untyped-call]


if TYPE_CHECKING:
    # For the type checker a BlockState has exactly the fields of BlockArrays (it does: the
    # structref is built from them, field by field), which is how the kernels read it.
    BlockState = BlockArrays
else:

    class BlockState(structref.StructRefProxy):
        """The arrays of a :class:`BlockArrays`, packed as one kernel argument (see
        :func:`pack`). Python reads the arrays through the :class:`BlockArrays` it was packed
        from; kernels read and write the same memory through this object."""

    structref.define_proxy(BlockState, BlockStateType, list(BlockArrays._fields))


@njit(cache=True)
def _pack(a: BlockArrays) -> BlockState:
    return BlockState(*a)


def pack(a: BlockArrays) -> BlockState:
    """The kernels' view of ``a``: the same arrays (no copy) in one structref.

    >>> import numpy as np
    >>> from fast.blocks.freelist import new_pool
    >>> from fast.blocks.kernels import reset_cache_kernel
    >>> from fast.blocks.prefix_ids import PrefixIds
    >>> i64, i32 = np.zeros(4, np.int64), np.zeros(4, np.int32)
    >>> table, grid = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int64)
    >>> a = BlockArrays(1, 0, True, True, *new_pool(2), *new_pool(0),
    ...                 np.full((2, 2), -1, np.int64), np.full(8, -1, np.int64),
    ...                 np.full(8, -1, np.int32), PrefixIds(1, 8).arrays, np.zeros(0, np.uint8),
    ...                 i64[:1], np.zeros(40, np.uint64), i64, i32, table, i64[:1], grid,
    ...                 np.zeros(1, np.uint8), grid, grid, i64[:1], i64[:1], i32[:1], i32[:2])
    >>> reset_cache_kernel(pack(a))  # nothing cached
    0
    """
    state: BlockState = _pack(a)
    return state


def live_prefix_ids(a: BlockArrays) -> I64:
    """Prefix ids referenced by cached blocks and by the full blocks of live rows (the ids a
    collection of :class:`fast.blocks.prefix_ids.PrefixIds` must keep)."""
    if not a.caching:
        return np.zeros(0, dtype=np.int64)
    cols = np.arange(a.block_pid.shape[1])[None, :]  # [1, W]
    mask = cols < (a.num_tokens // a.block_size)[:, None]  # [R, W]
    cached = a.cache_entry[ENTRY_PID]
    return np.concatenate([cached[cached >= 0], a.block_pid[mask]])
