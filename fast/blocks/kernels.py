"""numba kernels of the fast block manager: every change of its state happens here.

Each kernel takes the packed state ``s`` (:class:`fast.blocks.state.BlockState`; its arrays are
described in :mod:`fast.blocks.state`) first, then the operation's own arguments, and returns a
named result. Kernels never raise: a kernel that can fail validates its whole input first, in the
spec's order, and returns a result whose ``status`` is one of the codes below (with the offending
numbers in named fields) before changing anything, so that an error leaves the state as it was.
:func:`fast.blocks.manager.raise_for` turns a failed result into the spec's exception.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit
from numpy.typing import NDArray

from fast.blocks.freelist import COUNT, REF, release, take, unlink
from fast.blocks.open_addressing import delete, find, insert
from fast.blocks.prefix_ids import (
    MISSING,
    hash_intern_chain,
    hash_intern_one,
    intern_one,
    lookup_chain,
)
from fast.blocks.state import ENTRY_HASH, ENTRY_PID, BlockState

__all__ = [
    "OK", "UNKNOWN", "SWAPPED", "DUPLICATE", "BAD_TOKEN", "NO_BLOCKS", "GROW", "EXISTS",
    "AllocateResult", "AppendResult", "GatherResult",
    "allocate_kernel", "append_kernel", "gather_kernel", "fork_kernel", "free_kernel",
    "swap_out_kernel", "swap_in_kernel", "reset_cache_kernel",
]  # fmt: skip

# status codes (the ``status`` field of every result)
OK = 0
UNKNOWN = 1  # a sequence id is not live (``seq_id``)
SWAPPED = 2  # a sequence is swapped out (``seq_id``)
DUPLICATE = 3  # a batch names a sequence twice
BAD_TOKEN = 4  # a token id is negative (``bad_token``: its position)
NO_BLOCKS = 5  # not enough free GPU blocks (``needed``, ``free``)
GROW = 6  # a row of ``tables``/``tokens`` is too short: grow it and call again
EXISTS = 7  # allocate onto a live sequence id

I64 = NDArray[np.int64]
I32 = NDArray[np.int32]
State = BlockState


class AllocateResult(NamedTuple):
    """What :func:`allocate_kernel` found (and did, when ``mutate`` and ``status == OK``)."""

    status: int  # OK, BAD_TOKEN, EXISTS, NO_BLOCKS
    bad_token: int  # BAD_TOKEN: position of the first negative token in the prompt; else -1
    needed: int  # GPU blocks the prompt takes from the free queue (new blocks + revived hits)
    free: int  # free GPU blocks before the call
    cached: int  # tokens served by the prefix cache (a multiple of the block size)


class AppendResult(NamedTuple):
    """What :func:`append_kernel` found (and did, when ``mutate`` and ``status == OK``)."""

    status: int  # OK, DUPLICATE, UNKNOWN, SWAPPED, BAD_TOKEN, NO_BLOCKS, GROW
    seq_id: int  # UNKNOWN, SWAPPED: the sequence; else -1
    bad_token: int  # BAD_TOKEN: batch index of the first bad token; else -1
    needed: int  # GPU blocks the batch takes (new blocks + copy-on-write copies)
    free: int  # free GPU blocks before the call
    slots: I64  # [N] slot of each appended token (empty unless appended)
    pairs: I64  # [M, 2] copy-on-write (src, dst) pairs, in batch order
    rows: I32  # [N] row of each sequence (valid from the capacity check on)
    fills: I32  # [F] batch indices whose token fills a block (prefix caching on)


class GatherResult(NamedTuple):
    """Block tables and lengths of a batch, as a GPU step takes them."""

    unknown: int  # batch index of the first sequence id that is not live, or -1
    tables: I32  # [B, W] block ids, zero padded; W = the most blocks any of them has
    lens: I32  # [B] tokens of each sequence


# ---------------------------------------------------------------- prefix cache
@njit(cache=True, inline="always")
def _take_gpu(s: State) -> int:
    """Pop the GPU queue head; a cached block is evicted from the index first."""
    b = take(s.gpu_pool, s.gpu_ends)
    if s.cache_entry[ENTRY_PID, b] >= 0:
        delete(s.index_keys, s.index_blocks, s.cache_entry[ENTRY_HASH, b])
        s.cache_entry[ENTRY_PID, b] = -1
    return b


@njit(cache=True, inline="always")
def _register(s: State, b: int, h: int, pid: int) -> None:
    """Index block ``b`` under hash ``h`` unless the hash is already present."""
    if find(s.index_keys, s.index_blocks, h) >= 0:
        return
    insert(s.index_keys, s.index_blocks, h, b)
    s.cache_entry[ENTRY_HASH, b] = h
    s.cache_entry[ENTRY_PID, b] = pid


@njit(cache=True)
def reset_cache_kernel(s: State) -> int:
    """Evict every cached block with refcount 0; return how many cached blocks remain."""
    left = 0
    entry = s.cache_entry
    for b in range(entry.shape[1]):
        if entry[ENTRY_PID, b] >= 0:
            if s.gpu_pool[REF, b] == 0:
                delete(s.index_keys, s.index_blocks, entry[ENTRY_HASH, b])
                entry[ENTRY_PID, b] = -1
            else:
                left += 1
    return left


# ---------------------------------------------------------------- allocate
@njit(cache=True)
def allocate_kernel(
    s: State,
    seq_id: int,  # a valid id (>= 0); mutate: checked against the live ids (EXISTS)
    row: int,  # mutate: the free row to fill (wide enough for the prompt)
    prompt: I64,  # [n], n >= 1
    extra: int,  # extra key id, -1 = none
    hashes: I64,  # [n // bs] the chain of a Python hash_fn (caching and not numba_hash)
    pids: I64,  # [n // bs] its prefix ids (interned by the caller when mutate)
    mutate: bool,  # False: only check (can_allocate)
) -> AllocateResult:
    """``allocate``: match the cached prefix, check the demand against the watermark, then
    (``mutate``) touch the hits, take the new blocks, register the new full blocks and map
    ``seq_id`` to ``row``. With the numba hash the chain is computed here (interning new
    prefixes when ``mutate``; read from the memo without hashing when not), and ``hashes`` and
    ``pids`` are not read. A mutating call needs ``n // bs`` free prefix-id nodes."""
    n = prompt.shape[0]
    bs = s.block_size
    if mutate:
        for t in range(n):
            if prompt[t] < 0:
                return AllocateResult(BAD_TOKEN, t, 0, 0, 0)
        if find(s.id_keys, s.id_rows, seq_id) >= 0:
            return AllocateResult(EXISTS, -1, 0, 0, 0)
    nfull = n // bs if s.caching else 0
    nscan = (n - 1) // bs if s.caching else 0  # the last token is always computed
    if s.caching and s.numba_hash:
        hashes = np.empty(nfull, dtype=np.int64)
        pids = np.empty(nfull, dtype=np.int64)
        if mutate:
            x0, x1 = s.key_offsets[max(extra, 0)], s.key_offsets[max(extra, 0) + 1]
            key = s.key_bytes[x0:x1] if extra >= 0 else s.key_bytes[0:0]
            hash_intern_chain(prompt, bs, extra, key, s.hash_scratch, hashes, pids, s.pids)
        else:
            lookup_chain(prompt, bs, extra, nscan, hashes, pids, s.pids)
    hits = np.empty(nscan, dtype=np.int32)
    nh = 0
    revived = 0
    for i in range(nscan):
        if pids[i] == MISSING:
            break
        b = find(s.index_keys, s.index_blocks, hashes[i])
        if b < 0 or s.cache_entry[ENTRY_PID, b] != pids[i]:
            break
        hits[nh] = b
        nh += 1
        if s.gpu_pool[REF, b] == 0:
            revived += 1
    nblocks = (n + bs - 1) // bs
    need = nblocks - nh + revived
    free = s.gpu_ends[COUNT]
    if free - need < s.watermark:
        return AllocateResult(NO_BLOCKS, -1, need, free, 0)
    if not mutate:
        return AllocateResult(OK, -1, need, free, nh * bs)
    pool = s.gpu_pool
    for j in range(nh):  # touch before allocate
        b = hits[j]
        if pool[REF, b] == 0:
            unlink(pool, s.gpu_ends, b)
        pool[REF, b] += 1
        s.tables[row, j] = b
    for j in range(nh, nblocks):
        s.tables[row, j] = _take_gpu(s)
    for i in range(nfull):
        s.block_hash[row, i] = hashes[i]
        s.block_pid[row, i] = pids[i]
    for i in range(nh, nfull):
        _register(s, s.tables[row, i], hashes[i], pids[i])
    s.tokens[row, :n] = prompt
    s.num_tokens[row] = n
    s.extra_id[row] = extra
    insert(s.id_keys, s.id_rows, seq_id, row)
    return AllocateResult(OK, -1, need, free, nh * bs)


# ---------------------------------------------------------------- append (one token each)
@njit(cache=True)
def append_kernel(
    s: State,
    sids: I64,  # [N] sequence ids
    tok_in: I64,  # [N] tokens (checked when mutate)
    bad_token: int,  # batch index of the first token the caller found invalid, or -1
    fill_hash: I64,  # [F] Python hash_fn: hashes of the blocks this batch fills, in order
    mutate: bool,  # False: only check (can_append, or counting the fills to hash)
) -> AppendResult:
    """``append_batch``: validate the batch in the spec's order, count the blocks it needs,
    then (``mutate``) append ``tok_in[k]`` to ``sids[k]`` in batch order. A block filled by
    sequence ``k`` is hashed (numba hash; ``fill_hash`` otherwise), interned and registered
    before sequence ``k + 1`` takes a block. A mutating call with prefix caching needs ``N``
    free prefix-id nodes."""
    n = sids.shape[0]
    bs = s.block_size
    rows = np.empty(n, dtype=np.int32)
    fills = np.empty(n if s.caching else 0, dtype=np.int32)
    no_slots = np.empty(0, dtype=np.int64)
    no_pairs = np.empty((0, 2), dtype=np.int64)
    seen = s.row_seen
    dup = False
    unknown = False
    for k in range(n):
        r = find(s.id_keys, s.id_rows, sids[k])
        rows[k] = r
        if r < 0:
            unknown = True
        else:
            if seen[r] != 0:
                dup = True
            seen[r] = 1
    for k in range(n):
        if rows[k] >= 0:
            seen[rows[k]] = 0
    if unknown and not dup:  # unknown ids may repeat too
        srt = np.sort(sids)
        for k in range(1, n):
            if srt[k] == srt[k - 1]:
                dup = True
    if dup:
        return AppendResult(DUPLICATE, -1, -1, 0, 0, no_slots, no_pairs, rows, fills[:0])
    for k in range(n):
        r = rows[k]
        if r < 0:
            return AppendResult(UNKNOWN, sids[k], -1, 0, 0, no_slots, no_pairs, rows, fills[:0])
        if s.swapped[r] != 0:
            return AppendResult(SWAPPED, sids[k], -1, 0, 0, no_slots, no_pairs, rows, fills[:0])
    if mutate:
        if bad_token >= 0:
            return AppendResult(BAD_TOKEN, -1, bad_token, 0, 0, no_slots, no_pairs, rows, fills[:0])
        for k in range(n):
            if tok_in[k] < 0:
                return AppendResult(BAD_TOKEN, -1, k, 0, 0, no_slots, no_pairs, rows, fills[:0])
    pool = s.gpu_pool
    cow = s.cow_count
    need = 0
    nfill = 0
    grow = False
    for k in range(n):
        r = rows[k]
        t = s.num_tokens[r]
        if t + 1 > s.tokens.shape[1]:
            grow = True
        if t % bs == 0:
            need += 1
            if t // bs >= s.tables.shape[1]:
                grow = True
        else:
            last = s.tables[r, t // bs]
            if pool[REF, last] - cow[last] > 1:
                need += 1
                cow[last] += 1
        if s.caching and (t + 1) % bs == 0:
            fills[nfill] = k
            nfill += 1
    for k in range(n):
        t = s.num_tokens[rows[k]]
        if t % bs != 0:
            cow[s.tables[rows[k], t // bs]] = 0
    free = s.gpu_ends[COUNT]
    fills = fills[:nfill]
    if need > free:
        return AppendResult(NO_BLOCKS, -1, -1, need, free, no_slots, no_pairs, rows, fills)
    if not mutate:
        return AppendResult(OK, -1, -1, need, free, no_slots, no_pairs, rows, fills)
    if grow:
        return AppendResult(GROW, -1, -1, need, free, no_slots, no_pairs, rows, fills)
    slots = np.empty(n, dtype=np.int64)
    pairs = np.empty((n, 2), dtype=np.int64)
    m = 0
    f = 0
    for k in range(n):
        r = rows[k]
        t = s.num_tokens[r]
        bi = t // bs
        if t % bs == 0:
            s.tables[r, bi] = _take_gpu(s)
        else:
            last = s.tables[r, bi]
            if pool[REF, last] > 1:  # copy-on-write
                dst = _take_gpu(s)
                pool[REF, last] -= 1
                s.tables[r, bi] = dst
                pairs[m, 0] = last
                pairs[m, 1] = dst
                m += 1
        s.tokens[r, t] = tok_in[k]
        s.num_tokens[r] = t + 1
        if s.caching and (t + 1) % bs == 0:
            block = s.tokens[r, bi * bs : (bi + 1) * bs]
            x = s.extra_id[r]
            ppid = s.block_pid[r, bi - 1] if bi > 0 else -1
            if s.numba_hash:  # the node of a known prefix carries its hash (a memo)
                x0, x1 = s.key_offsets[max(x, 0)], s.key_offsets[max(x, 0) + 1]
                key = s.key_bytes[x0:x1] if x >= 0 else s.key_bytes[0:0]
                parent = s.block_hash[r, bi - 1] if bi > 0 else -1
                h, pid, _ = hash_intern_one(
                    ppid, parent, block, x, key, s.hash_scratch, s.pids
                )  # fmt: skip
            else:
                h = fill_hash[f]
                f += 1
                pid = intern_one(ppid, block, x, h, True, s.pids)
            s.block_hash[r, bi] = h
            s.block_pid[r, bi] = pid
            _register(s, s.tables[r, bi], h, pid)
        slots[k] = s.tables[r, bi] * bs + t % bs
    return AppendResult(OK, -1, -1, need, free, slots, pairs[:m], rows, fills)


# ---------------------------------------------------------------- fork, free, swap
@njit(cache=True)
def fork_kernel(s: State, parent: int, child: int, child_id: int) -> None:
    """Row ``child`` becomes a copy of row ``parent`` (every shared block gains a reference)
    and sequence ``child_id`` (not live) maps to it."""
    bs = s.block_size
    n = s.num_tokens[parent]
    nb = (n + bs - 1) // bs
    for j in range(nb):
        b = s.tables[parent, j]
        s.gpu_pool[REF, b] += 1
        s.tables[child, j] = b
    s.tokens[child, :n] = s.tokens[parent, :n]
    nfull = n // bs
    s.block_hash[child, :nfull] = s.block_hash[parent, :nfull]
    s.block_pid[child, :nfull] = s.block_pid[parent, :nfull]
    s.num_tokens[child] = n
    s.swapped[child] = 0
    s.extra_id[child] = s.extra_id[parent]
    insert(s.id_keys, s.id_rows, child_id, child)


@njit(cache=True)
def free_kernel(s: State, row: int, seq_id: int) -> None:
    """Release the row's blocks in reverse logical order (to the CPU pool if swapped), clear
    the row and forget ``seq_id``."""
    nb = (s.num_tokens[row] + s.block_size - 1) // s.block_size
    if s.swapped[row] != 0:
        for j in range(nb - 1, -1, -1):
            release(s.cpu_pool, s.cpu_ends, s.tables[row, j])
    else:
        for j in range(nb - 1, -1, -1):
            release(s.gpu_pool, s.gpu_ends, s.tables[row, j])
    for j in range(nb):
        s.tables[row, j] = 0  # rows stay zero past their last block (see gather_kernel)
    s.num_tokens[row] = 0
    s.swapped[row] = 0
    s.extra_id[row] = -1
    delete(s.id_keys, s.id_rows, seq_id)


@njit(cache=True)
def swap_out_kernel(s: State, row: int) -> I64:
    """Fresh CPU blocks in logical order, then GPU references dropped in reverse order; returns
    the ``(gpu, cpu)`` pairs ``[nb, 2]``. The CPU pool must have ``nb`` free blocks."""
    nb = (s.num_tokens[row] + s.block_size - 1) // s.block_size
    mapping = np.empty((nb, 2), dtype=np.int64)
    for j in range(nb):
        mapping[j, 0] = s.tables[row, j]
        mapping[j, 1] = take(s.cpu_pool, s.cpu_ends)
    for j in range(nb - 1, -1, -1):
        release(s.gpu_pool, s.gpu_ends, s.tables[row, j])
    for j in range(nb):
        s.tables[row, j] = mapping[j, 1]
    s.swapped[row] = 1
    return mapping


@njit(cache=True)
def swap_in_kernel(s: State, row: int) -> I64:
    """GPU blocks from the queue head in logical order, CPU blocks released in reverse order,
    full blocks offered to the prefix cache; returns the ``(cpu, gpu)`` pairs ``[nb, 2]``. The
    GPU pool must have ``nb`` free blocks."""
    bs = s.block_size
    nb = (s.num_tokens[row] + bs - 1) // bs
    mapping = np.empty((nb, 2), dtype=np.int64)
    for j in range(nb):
        mapping[j, 0] = s.tables[row, j]
        mapping[j, 1] = _take_gpu(s)
    for j in range(nb - 1, -1, -1):
        release(s.cpu_pool, s.cpu_ends, s.tables[row, j])
    for j in range(nb):
        s.tables[row, j] = mapping[j, 1]
    s.swapped[row] = 0
    if s.caching:
        for i in range(s.num_tokens[row] // bs):
            _register(s, s.tables[row, i], s.block_hash[row, i], s.block_pid[row, i])
    return mapping


# ---------------------------------------------------------------- what the GPU step takes
@njit(cache=True)
def gather_kernel(s: State, sids: I64) -> GatherResult:
    """Block tables ``[B, W]`` (int32, zero padded) and lengths ``[B]`` of the sequences
    ``sids``; ``W`` is the most blocks any of them has. Rows are zero past their last block, so
    each row is one slice copy."""
    bs = s.block_size
    b = sids.shape[0]
    rows = np.empty(b, dtype=np.int32)
    lens = np.empty(b, dtype=np.int32)
    w = 0
    for k in range(b):
        r = find(s.id_keys, s.id_rows, sids[k])
        if r < 0:
            return GatherResult(k, np.empty((0, 0), dtype=np.int32), lens)
        rows[k] = r
        n = s.num_tokens[r]
        lens[k] = n
        w = max(w, (n + bs - 1) // bs)
    out = np.empty((b, w), dtype=np.int32)
    for k in range(b):
        out[k, :] = s.tables[rows[k], :w]
    return GatherResult(-1, out, lens)
