"""numba kernels of the fast block manager: every change of its state happens here.

Each kernel takes the packed state ``s`` (:class:`fast.blocks.state.BlockState`; its arrays are
described in :mod:`fast.blocks.state`) first, then the operation's own arguments, and returns a
named result. Kernels never raise: a kernel that can fail validates its whole input first, in the
spec's order, and returns a result whose ``status`` is one of the codes below (with the offending
numbers in named fields) before changing anything, so that an error leaves the state as it was.
The manager turns a failed result into the spec's exception (same type, same numbers).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit
from numpy.typing import NDArray

from fast.blocks.freelist import COUNT, EVICTED, REF, release, take, unlink
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
    "BAD_COUNT",
    "AllocateResult", "AppendResult",
    "allocate_kernel", "append_kernel", "gather_kernel", "fork_kernel", "free_kernel",
    "swap_out_kernel", "swap_in_kernel", "reset_cache_kernel", "mark_computed_kernel",
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
BAD_COUNT = 8  # mark_computed: a count outside [computed, num_tokens] (``bad_token``: position)

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
    num_pairs: int  # copy-on-write pairs written to ``pairs`` (appended)


# ---------------------------------------------------------------- prefix cache
@njit(cache=True, inline="always")
def _take_gpu(s: State) -> int:
    """Pop the GPU queue head; a cached block is evicted from the index first."""
    b = take(s.gpu_pool, s.gpu_ends)
    if s.cache_entry[ENTRY_PID, b] >= 0:
        delete(s.index_keys, s.index_blocks, s.cache_entry[ENTRY_HASH, b])
        s.cache_entry[ENTRY_PID, b] = -1
        s.gpu_ends[EVICTED] += 1
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
    gpu_pool = s.gpu_pool
    index_keys = s.index_keys
    index_blocks = s.index_blocks
    cache_entry = s.cache_entry
    left = 0
    entry = cache_entry
    for b in range(entry.shape[1]):
        if entry[ENTRY_PID, b] >= 0:
            if gpu_pool[REF, b] == 0:
                delete(index_keys, index_blocks, entry[ENTRY_HASH, b])
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
    tables = s.tables
    tokens = s.tokens
    num_tokens = s.num_tokens
    block_hash = s.block_hash
    block_pid = s.block_pid
    extra_id = s.extra_id
    gpu_pool = s.gpu_pool
    gpu_ends = s.gpu_ends
    id_keys = s.id_keys
    id_rows = s.id_rows
    index_keys = s.index_keys
    index_blocks = s.index_blocks
    cache_entry = s.cache_entry
    n = prompt.shape[0]
    bs = s.block_size
    if mutate:
        for t in range(n):
            if prompt[t] < 0:
                return AllocateResult(BAD_TOKEN, t, 0, 0, 0)
        if find(id_keys, id_rows, seq_id) >= 0:
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
        b = find(index_keys, index_blocks, hashes[i])
        if b < 0 or cache_entry[ENTRY_PID, b] != pids[i]:
            break
        hits[nh] = b
        nh += 1
        if gpu_pool[REF, b] == 0:
            revived += 1
    nblocks = (n + bs - 1) // bs
    need = nblocks - nh + revived
    free = gpu_ends[COUNT]
    if free - need < s.watermark:
        return AllocateResult(NO_BLOCKS, -1, need, free, 0)
    if not mutate:
        return AllocateResult(OK, -1, need, free, nh * bs)
    pool = gpu_pool
    for j in range(nh):  # touch before allocate
        b = hits[j]
        if pool[REF, b] == 0:
            unlink(pool, gpu_ends, b)
        pool[REF, b] += 1
        tables[row, j] = b
    for j in range(nh, nblocks):
        tables[row, j] = _take_gpu(s)
    for i in range(nfull):
        block_hash[row, i] = hashes[i]
        block_pid[row, i] = pids[i]
    tokens[row, :n] = prompt
    s.num_computed[row] = nh * bs
    num_tokens[row] = n
    extra_id[row] = extra
    insert(id_keys, id_rows, seq_id, row)
    return AllocateResult(OK, -1, need, free, nh * bs)


# ---------------------------------------------------------------- append (one token each)
@njit(cache=True)
def append_kernel(
    s: State,
    sids: I64,  # [N] sequence ids
    tok_in: I64,  # [N] tokens (checked when mutate)
    bad_token: int,  # batch index of the first token the caller found invalid, or -1
    fill_hash: I64,  # [F] Python hash_fn: hashes of the blocks this batch fills, in order
    mutate: bool,  # False: only check (can_append)
    slots: I64,  # out [N] (mutate): slot of each appended token
    pairs: I64,  # out [N, 2] (mutate): copy-on-write (src, dst) pairs, the first num_pairs rows
) -> AppendResult:
    """``append_batch``: validate the batch in the spec's order, count the blocks it needs,
    then (``mutate``) append ``tok_in[k]`` to ``sids[k]`` in batch order. A block filled by
    sequence ``k`` is hashed (numba hash; ``fill_hash`` otherwise), interned and registered
    before sequence ``k + 1`` takes a block. A mutating call with prefix caching needs ``N``
    free prefix-id nodes. The outputs are the caller's arrays: results boxed into new arrays
    would cost more per call than the arrays' allocation in Python."""
    tables = s.tables
    tokens = s.tokens
    num_tokens = s.num_tokens
    swapped = s.swapped
    block_hash = s.block_hash
    block_pid = s.block_pid
    extra_id = s.extra_id
    gpu_pool = s.gpu_pool
    gpu_ends = s.gpu_ends
    id_keys = s.id_keys
    id_rows = s.id_rows
    n = sids.shape[0]
    bs = s.block_size
    rows = np.empty(n, dtype=np.int32)
    seen = s.row_seen
    dup = False
    unknown = False
    for k in range(n):
        r = find(id_keys, id_rows, sids[k])
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
        return AppendResult(DUPLICATE, -1, -1, 0, 0, 0)
    for k in range(n):
        r = rows[k]
        if r < 0:
            return AppendResult(UNKNOWN, sids[k], -1, 0, 0, 0)
        if swapped[r] != 0:
            return AppendResult(SWAPPED, sids[k], -1, 0, 0, 0)
    if mutate:
        if bad_token >= 0:
            return AppendResult(BAD_TOKEN, -1, bad_token, 0, 0, 0)
        for k in range(n):
            if tok_in[k] < 0:
                return AppendResult(BAD_TOKEN, -1, k, 0, 0, 0)
    pool = gpu_pool
    cow = s.cow_count
    need = 0
    grow = False
    for k in range(n):
        r = rows[k]
        t = num_tokens[r]
        if t + 1 > tokens.shape[1]:
            grow = True
        if t % bs == 0:
            need += 1
            if t // bs >= tables.shape[1]:
                grow = True
        else:
            last = tables[r, t // bs]
            if pool[REF, last] - cow[last] > 1:
                need += 1
                cow[last] += 1
    for k in range(n):
        t = num_tokens[rows[k]]
        if t % bs != 0:
            cow[tables[rows[k], t // bs]] = 0
    free = gpu_ends[COUNT]
    if need > free:
        return AppendResult(NO_BLOCKS, -1, -1, need, free, 0)
    if not mutate:
        return AppendResult(OK, -1, -1, need, free, 0)
    if grow:
        return AppendResult(GROW, -1, -1, need, free, 0)
    m = 0
    f = 0
    for k in range(n):
        r = rows[k]
        t = num_tokens[r]
        bi = t // bs
        if t % bs == 0:
            tables[r, bi] = _take_gpu(s)
        else:
            last = tables[r, bi]
            if pool[REF, last] > 1:  # copy-on-write
                dst = _take_gpu(s)
                pool[REF, last] -= 1
                tables[r, bi] = dst
                pairs[m, 0] = last
                pairs[m, 1] = dst
                m += 1
        tokens[r, t] = tok_in[k]
        num_tokens[r] = t + 1
        if s.caching and (t + 1) % bs == 0:
            block = tokens[r, bi * bs : (bi + 1) * bs]
            x = extra_id[r]
            ppid = block_pid[r, bi - 1] if bi > 0 else -1
            if s.numba_hash:  # the node of a known prefix carries its hash (a memo)
                x0, x1 = s.key_offsets[max(x, 0)], s.key_offsets[max(x, 0) + 1]
                key = s.key_bytes[x0:x1] if x >= 0 else s.key_bytes[0:0]
                parent = block_hash[r, bi - 1] if bi > 0 else -1
                h, pid, _ = hash_intern_one(ppid, parent, block, x, key, s.hash_scratch, s.pids)
            else:
                h = fill_hash[f]
                f += 1
                pid = intern_one(ppid, block, x, h, True, s.pids)
            block_hash[r, bi] = h
            block_pid[r, bi] = pid
        slots[k] = tables[r, bi] * bs + t % bs
    return AppendResult(OK, -1, -1, need, free, m)


# ---------------------------------------------------------------- computed KV
@njit(cache=True)
def mark_computed_kernel(s: State, sids: I64, counts: I64) -> AppendResult:
    """``mark_computed_batch``: validate in the spec's order (a repeated id, then per
    sequence: unknown, swapped, a count outside ``[computed, num_tokens]``), then raise each
    row's computed count and register, in batch order, the full blocks it completes."""
    id_keys = s.id_keys
    id_rows = s.id_rows
    num_tokens = s.num_tokens
    num_computed = s.num_computed
    swapped = s.swapped
    tables = s.tables
    block_hash = s.block_hash
    block_pid = s.block_pid
    n = sids.shape[0]
    bs = s.block_size
    srt = np.sort(sids)
    for k in range(1, n):
        if srt[k] == srt[k - 1]:
            return AppendResult(DUPLICATE, -1, -1, 0, 0, 0)
    rows = np.empty(n, dtype=np.int32)
    for k in range(n):
        r = find(id_keys, id_rows, sids[k])
        if r < 0:
            return AppendResult(UNKNOWN, sids[k], -1, 0, 0, 0)
        if swapped[r] != 0:
            return AppendResult(SWAPPED, sids[k], -1, 0, 0, 0)
        if not num_computed[r] <= counts[k] <= num_tokens[r]:
            return AppendResult(BAD_COUNT, sids[k], k, 0, 0, 0)
        rows[k] = r
    for k in range(n):
        r = rows[k]
        old = num_computed[r]
        num_computed[r] = counts[k]
        if s.caching:
            for i in range(old // bs, counts[k] // bs):
                _register(s, tables[r, i], block_hash[r, i], block_pid[r, i])
    return AppendResult(OK, -1, -1, 0, 0, 0)


# ---------------------------------------------------------------- fork, free, swap
@njit(cache=True)
def fork_kernel(s: State, parent: int, child: int, child_id: int) -> None:
    """Row ``child`` becomes a copy of row ``parent`` (every shared block gains a reference)
    and sequence ``child_id`` (not live) maps to it."""
    tables = s.tables
    tokens = s.tokens
    num_tokens = s.num_tokens
    swapped = s.swapped
    block_hash = s.block_hash
    block_pid = s.block_pid
    extra_id = s.extra_id
    gpu_pool = s.gpu_pool
    id_keys = s.id_keys
    id_rows = s.id_rows
    bs = s.block_size
    n = num_tokens[parent]
    nb = (n + bs - 1) // bs
    for j in range(nb):
        b = tables[parent, j]
        gpu_pool[REF, b] += 1
        tables[child, j] = b
    tokens[child, :n] = tokens[parent, :n]
    nfull = n // bs
    block_hash[child, :nfull] = block_hash[parent, :nfull]
    block_pid[child, :nfull] = block_pid[parent, :nfull]
    num_tokens[child] = n
    s.num_computed[child] = s.num_computed[parent]
    swapped[child] = 0
    extra_id[child] = extra_id[parent]
    insert(id_keys, id_rows, child_id, child)


@njit(cache=True)
def free_kernel(s: State, row: int, seq_id: int) -> None:
    """Release the row's blocks in reverse logical order (to the CPU pool if swapped), clear
    the row and forget ``seq_id``."""
    tables = s.tables
    num_tokens = s.num_tokens
    swapped = s.swapped
    extra_id = s.extra_id
    gpu_pool = s.gpu_pool
    cpu_pool = s.cpu_pool
    gpu_ends = s.gpu_ends
    cpu_ends = s.cpu_ends
    id_keys = s.id_keys
    id_rows = s.id_rows
    nb = (num_tokens[row] + s.block_size - 1) // s.block_size
    if swapped[row] != 0:
        for j in range(nb - 1, -1, -1):
            release(cpu_pool, cpu_ends, tables[row, j])
    else:
        for j in range(nb - 1, -1, -1):
            release(gpu_pool, gpu_ends, tables[row, j])
    for j in range(nb):
        tables[row, j] = 0  # rows stay zero past their last block (see gather_kernel)
    num_tokens[row] = 0
    s.num_computed[row] = 0
    swapped[row] = 0
    extra_id[row] = -1
    delete(id_keys, id_rows, seq_id)


@njit(cache=True)
def swap_out_kernel(s: State, row: int) -> I64:
    """Fresh CPU blocks in logical order, then GPU references dropped in reverse order; returns
    the ``(gpu, cpu)`` pairs ``[nb, 2]``. The CPU pool must have ``nb`` free blocks."""
    tables = s.tables
    num_tokens = s.num_tokens
    swapped = s.swapped
    gpu_pool = s.gpu_pool
    cpu_pool = s.cpu_pool
    gpu_ends = s.gpu_ends
    cpu_ends = s.cpu_ends
    nb = (num_tokens[row] + s.block_size - 1) // s.block_size
    mapping = np.empty((nb, 2), dtype=np.int64)
    for j in range(nb):
        mapping[j, 0] = tables[row, j]
        mapping[j, 1] = take(cpu_pool, cpu_ends)
    for j in range(nb - 1, -1, -1):
        release(gpu_pool, gpu_ends, tables[row, j])
    for j in range(nb):
        tables[row, j] = mapping[j, 1]
    swapped[row] = 1
    return mapping


@njit(cache=True)
def swap_in_kernel(s: State, row: int) -> I64:
    """GPU blocks from the queue head in logical order, CPU blocks released in reverse order,
    the full blocks below the computed count offered to the prefix cache; returns the
    ``(cpu, gpu)`` pairs ``[nb, 2]``. The GPU pool must have ``nb`` free blocks."""
    tables = s.tables
    num_tokens = s.num_tokens
    swapped = s.swapped
    block_hash = s.block_hash
    block_pid = s.block_pid
    cpu_pool = s.cpu_pool
    cpu_ends = s.cpu_ends
    bs = s.block_size
    nb = (num_tokens[row] + bs - 1) // bs
    mapping = np.empty((nb, 2), dtype=np.int64)
    for j in range(nb):
        mapping[j, 0] = tables[row, j]
        mapping[j, 1] = _take_gpu(s)
    for j in range(nb - 1, -1, -1):
        release(cpu_pool, cpu_ends, tables[row, j])
    for j in range(nb):
        tables[row, j] = mapping[j, 1]
    swapped[row] = 0
    if s.caching:
        for i in range(s.num_computed[row] // bs):
            _register(s, tables[row, i], block_hash[row, i], block_pid[row, i])
    return mapping


# ---------------------------------------------------------------- what the GPU step takes
@njit(cache=True)
def gather_kernel(s: State, sids: I64, lens: I32) -> I32 | None:
    """Block tables ``[B, W]`` (int32, zero padded) of the sequences ``sids``, ``W`` the most
    blocks any of them has, and their lengths into ``lens`` ``[B]``; None when one of them is
    not live. Rows are zero past their last block, so each row is one slice copy. (No result
    record: boxing one costs about as much per call as the whole lookup of a small batch.)"""
    tables = s.tables
    num_tokens = s.num_tokens
    id_keys = s.id_keys
    id_rows = s.id_rows
    bs = s.block_size
    b = sids.shape[0]
    rows = np.empty(b, dtype=np.int32)
    w = 0
    for k in range(b):
        r = find(id_keys, id_rows, sids[k])
        if r < 0:
            return None
        rows[k] = r
        n = num_tokens[r]
        lens[k] = n
        w = max(w, (n + bs - 1) // bs)
    out = np.empty((b, w), dtype=np.int32)
    for k in range(b):
        out[k, :] = tables[rows[k], :w]
    return out
