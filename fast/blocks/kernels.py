"""numba kernels of the fast block manager: every state change happens here, on arrays.

State layout (all numpy arrays owned by :class:`fast.blocks.manager.BlockManager`):

* ``gpool`` / ``cpool`` int32 ``[3, num_blocks]``: row 0 the refcount, rows 1 and 2 the
  ``next`` / ``prev`` links of the free queue (a doubly linked list threaded through the block
  ids, ``-1`` = none). ``meta`` int64 ``[6]``: head, tail, free count of the GPU queue
  (``G_HEAD, G_TAIL, G_FREE``) then of the CPU queue (``C_HEAD, C_TAIL, C_FREE``). Taking from
  the head, appending at the tail and unlinking from the middle are O(1) and keep exactly the
  spec's FIFO order (``spec.block_pool``).
* ``ent`` int64 ``[2, num_gpu_blocks]``: per GPU block the hash it is cached under (row 0) and
  its prefix id (row 1, ``-1`` = not cached). ``ikeys``/``ivals`` ``[K]``: the hash index as an
  open-addressing table (linear probing, backward-shift deletion, ``-1`` = empty slot).
* Per sequence row ``r``: ``tables[r, :]`` int32 block ids (the block-table array the GPU
  takes), ``ntok[r]`` tokens, ``toks[r, :]`` token ids, ``swapped[r]``, and per full block its
  hash ``bhash[r, i]`` and prefix id ``bpid[r, i]``. ``skeys``/``svals`` map external sequence
  ids to rows (open addressing, like the index).

Kernels never raise: they validate everything first and return a status code (and numbers in
``info``) before changing anything, so that an error leaves the state as it was.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

from fast.blocks.prefix_ids import hash_intern_chain, hash_intern_one, intern_one

# status codes returned by the kernels
OK = 0
UNKNOWN = 1  # info[0] = seq id
SWAPPED = 2  # info[0] = seq id
DUPLICATE = 3
BAD_TOKEN = 4  # info[0] = batch index
NO_BLOCKS = 5  # info[0] = needed, info[1] = free
GROW = 6  # a row of tables/toks is too short: grow and retry

# meta layout
G_HEAD, G_TAIL, G_FREE, C_HEAD, C_TAIL, C_FREE = 0, 1, 2, 3, 4, 5

I64 = NDArray[np.int64]
I32 = NDArray[np.int32]
U8 = NDArray[np.uint8]


# ---------------------------------------------------------------- free queue (FIFO + unlink)
@njit(cache=True, inline="always")
def _unlink(pool: I32, meta: I64, o: int, b: int) -> None:
    p = pool[2, b]
    n = pool[1, b]
    if p >= 0:
        pool[1, p] = n
    else:
        meta[o] = n
    if n >= 0:
        pool[2, n] = p
    else:
        meta[o + 1] = p
    pool[1, b] = -1
    pool[2, b] = -1
    meta[o + 2] -= 1


@njit(cache=True, inline="always")
def _push_tail(pool: I32, meta: I64, o: int, b: int) -> None:
    t = meta[o + 1]
    pool[2, b] = t
    pool[1, b] = -1
    if t >= 0:
        pool[1, t] = b
    else:
        meta[o] = b
    meta[o + 1] = b
    meta[o + 2] += 1


@njit(cache=True, inline="always")
def _release(pool: I32, meta: I64, o: int, b: int) -> None:
    pool[0, b] -= 1
    if pool[0, b] == 0:
        _push_tail(pool, meta, o, b)


@njit(cache=True, inline="always")
def _take(pool: I32, meta: I64, o: int) -> int:
    b = meta[o]
    _unlink(pool, meta, o, b)
    pool[0, b] = 1
    return int(b)


# ---------------------------------------------------------------- open addressing (int64 -> int32)
@njit(cache=True, inline="always")
def _home(key: int, mask: int) -> int:
    x = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    h: int = np.int64((x >> np.uint64(29)) & np.uint64(mask))
    return h


@njit(cache=True)
def oa_find(keys: I64, vals: I32, key: int) -> int:
    """The value stored under ``key`` (>= 0), or -1."""
    if key < 0:
        return -1
    mask = len(keys) - 1
    i = _home(key, mask)
    while True:
        k = keys[i]
        if k == key:
            return int(vals[i])
        if k == -1:
            return -1
        i = (i + 1) & mask


@njit(cache=True)
def oa_insert(keys: I64, vals: I32, key: int, val: int) -> None:
    """Store ``key -> val``; ``key`` must be absent and the table less than full."""
    mask = len(keys) - 1
    i = _home(key, mask)
    while keys[i] != -1:
        i = (i + 1) & mask
    keys[i] = key
    vals[i] = val


@njit(cache=True)
def oa_delete(keys: I64, vals: I32, key: int) -> None:
    """Remove ``key`` (if present), shifting later probes back so lookups stay correct."""
    mask = len(keys) - 1
    i = _home(key, mask)
    while keys[i] != key:
        if keys[i] == -1:
            return
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if keys[j] == -1:
            break
        h = _home(keys[j], mask)
        if (i < j and i < h <= j) or (i > j and (h > i or h <= j)):
            continue  # keys[j] still reachable from its home slot
        keys[i] = keys[j]
        vals[i] = vals[j]
        i = j
    keys[i] = -1
    vals[i] = -1


# ---------------------------------------------------------------- prefix cache
@njit(cache=True, inline="always")
def _take_gpu(gpool: I32, meta: I64, ent: I64, ikeys: I64, ivals: I32) -> int:
    """Pop the GPU queue head; a cached block is evicted from the index first."""
    b = _take(gpool, meta, G_HEAD)
    if ent[1, b] >= 0:
        oa_delete(ikeys, ivals, ent[0, b])
        ent[1, b] = -1
    return b


@njit(cache=True, inline="always")
def _register(ent: I64, ikeys: I64, ivals: I32, b: int, h: int, pid: int) -> None:
    """Index block ``b`` under hash ``h`` unless the hash is already present."""
    if oa_find(ikeys, ivals, h) >= 0:
        return
    oa_insert(ikeys, ivals, h, b)
    ent[0, b] = h
    ent[1, b] = pid


@njit(cache=True)
def reset_cache_kernel(gpool: I32, ent: I64, ikeys: I64, ivals: I32) -> int:
    """Evict every cached block with refcount 0; return how many cached blocks remain."""
    left = 0
    for b in range(ent.shape[1]):
        if ent[1, b] >= 0:
            if gpool[0, b] == 0:
                oa_delete(ikeys, ivals, ent[0, b])
                ent[1, b] = -1
            else:
                left += 1
    return left


# ---------------------------------------------------------------- allocate
@njit(cache=True)
def allocate_kernel(
    bs: int,
    watermark: int,
    row: int,
    prompt: I64,  # [n]
    hashes: I64,  # [n // bs] (empty when caching is off)
    pids: I64,  # [n // bs]
    mutate: bool,
    gpool: I32,
    meta: I64,
    ent: I64,
    ikeys: I64,
    ivals: I32,
    tables: I32,
    ntok: I64,
    toks: I64,
    bhash: I64,
    bpid: I64,
    hits: I32,  # scratch [n // bs]
    info: I64,  # out: needed, free, number of hits
) -> int:
    """Match the cached prefix, check the demand against the watermark, then (``mutate``)
    touch the hits, take the new blocks and register the new full blocks."""
    n = prompt.shape[0]
    nh = 0
    revived = 0
    if hashes.shape[0] > 0:
        for i in range((n - 1) // bs):
            b = oa_find(ikeys, ivals, hashes[i])
            if b < 0 or ent[1, b] != pids[i]:
                break
            hits[nh] = b
            nh += 1
            if gpool[0, b] == 0:
                revived += 1
    nblocks = (n + bs - 1) // bs
    need = nblocks - nh + revived
    free = meta[G_FREE]
    info[0] = need
    info[1] = free
    info[2] = nh
    if free - need < watermark:
        return NO_BLOCKS
    if not mutate:
        return OK
    for j in range(nh):  # touch before allocate
        b = hits[j]
        if gpool[0, b] == 0:
            _unlink(gpool, meta, G_HEAD, b)
            gpool[0, b] = 1
        else:
            gpool[0, b] += 1
        tables[row, j] = b
    for j in range(nh, nblocks):
        tables[row, j] = _take_gpu(gpool, meta, ent, ikeys, ivals)
    for i in range(hashes.shape[0]):
        bhash[row, i] = hashes[i]
        bpid[row, i] = pids[i]
    for i in range(nh, hashes.shape[0]):
        _register(ent, ikeys, ivals, tables[row, i], hashes[i], pids[i])
    toks[row, :n] = prompt
    ntok[row] = n
    return OK


# ---------------------------------------------------------------- append (one token each)
@njit(cache=True)
def append_kernel(
    bs: int,
    mutate: bool,
    sids: I64,  # [N] external sequence ids
    tok_in: I64,  # [N] tokens (validated when mutate; ignored otherwise)
    bad_token: int,  # index of the first token Python found invalid, or -1
    fill_hash: I64,  # [F] hashes of the blocks this batch fills, in batch order (not nb_hash)
    nb_hash: bool,  # hash filled blocks here (the spec's default hash) instead of fill_hash
    xid: I64,  # [R] extra key id of each row (-1: none)
    xbytes: U8,  # UTF-8 bytes of every extra key, concatenated
    xoff: I64,  # [X + 1] offsets of key x in xbytes
    hscratch: NDArray[np.uint64],  # scratch for hash_into
    nodes: I64,  # prefix-id arrays (fast.blocks.prefix_ids)
    ntoks: I64,
    nkeys: I64,
    nmeta: I64,
    nstack: I64,
    gpool: I32,
    meta: I64,
    ent: I64,
    ikeys: I64,
    ivals: I32,
    skeys: I64,
    svals: I32,
    tables: I32,
    ntok: I64,
    toks: I64,
    swapped: U8,
    bhash: I64,
    bpid: I64,
    caching: bool,
    rows: I32,  # out [N]: row of each sequence
    fills: I32,  # out [N]: batch indices whose append fills a block (caching only)
    rstamp: I32,  # scratch [R], all zero
    drop: I32,  # scratch [num_gpu_blocks], all zero
    slots: I64,  # out [N]
    pairs: I64,  # out [N, 2]
    info: I64,  # out: see status codes; info[2] = number of fills, info[3] = CoW pairs
) -> int:
    """Validate a batch (spec order), count the blocks it needs, then (``mutate``) append."""
    n = sids.shape[0]
    dup = False
    unknown = False
    for k in range(n):
        r = oa_find(skeys, svals, sids[k])
        rows[k] = r
        if r < 0:
            unknown = True
        else:
            if rstamp[r] != 0:
                dup = True
            rstamp[r] = 1
    for k in range(n):
        if rows[k] >= 0:
            rstamp[rows[k]] = 0
    if unknown and not dup:  # unknown ids may repeat too
        s = np.sort(sids)
        for k in range(1, n):
            if s[k] == s[k - 1]:
                dup = True
    if dup:
        return DUPLICATE
    for k in range(n):
        r = rows[k]
        if r < 0:
            info[0] = sids[k]
            return UNKNOWN
        if swapped[r] != 0:
            info[0] = sids[k]
            return SWAPPED
    if mutate:
        if bad_token >= 0:
            info[0] = bad_token
            return BAD_TOKEN
        for k in range(n):
            if tok_in[k] < 0:
                info[0] = k
                return BAD_TOKEN
    need = 0
    nfill = 0
    grow = False
    for k in range(n):
        r = rows[k]
        t = ntok[r]
        if t + 1 > toks.shape[1]:
            grow = True
        if t % bs == 0:
            need += 1
            if t // bs >= tables.shape[1]:
                grow = True
        else:
            last = tables[r, t // bs]
            if gpool[0, last] - drop[last] > 1:
                need += 1
                drop[last] += 1
        if caching and (t + 1) % bs == 0:
            fills[nfill] = k
            nfill += 1
    for k in range(n):
        t = ntok[rows[k]]
        if t % bs != 0:
            drop[tables[rows[k], t // bs]] = 0
    info[2] = nfill
    free = meta[G_FREE]
    info[0] = need
    info[1] = free
    if need > free:
        return NO_BLOCKS
    if not mutate:
        return OK
    if grow:
        return GROW
    m = 0
    f = 0
    for k in range(n):
        r = rows[k]
        t = ntok[r]
        bi = t // bs
        if t % bs == 0:
            tables[r, bi] = _take_gpu(gpool, meta, ent, ikeys, ivals)
        else:
            last = tables[r, bi]
            if gpool[0, last] > 1:  # copy-on-write
                dst = _take_gpu(gpool, meta, ent, ikeys, ivals)
                gpool[0, last] -= 1
                tables[r, bi] = dst
                pairs[m, 0] = last
                pairs[m, 1] = dst
                m += 1
        toks[r, t] = tok_in[k]
        ntok[r] = t + 1
        if caching and (t + 1) % bs == 0:
            block = toks[r, bi * bs : (bi + 1) * bs]
            x = xid[r]
            ppid = bpid[r, bi - 1] if bi > 0 else -1
            if nb_hash:  # the node of a known prefix carries its hash (a memo)
                key = xbytes[xoff[x] : xoff[x + 1]] if x >= 0 else xbytes[0:0]
                parent = bhash[r, bi - 1] if bi > 0 else -1
                h, pid, _ = hash_intern_one(
                    ppid, parent, block, x, key, hscratch, nodes, ntoks, nkeys, nmeta, nstack
                )  # fmt: skip
            else:
                h = fill_hash[f]
                f += 1
                pid = intern_one(ppid, block, x, h, True, nodes, ntoks, nkeys, nmeta, nstack)
            bhash[r, bi] = h
            bpid[r, bi] = pid
            _register(ent, ikeys, ivals, tables[r, bi], h, pid)
        slots[k] = tables[r, bi] * bs + t % bs
    info[3] = m
    return OK


# ---------------------------------------------------------------- fork, free, swap
@njit(cache=True)
def fork_kernel(
    bs: int,
    parent: int,
    child: int,
    gpool: I32,
    tables: I32,
    ntok: I64,
    toks: I64,
    swapped: U8,
    bhash: I64,
    bpid: I64,
) -> None:
    """The child row becomes a copy of the parent row; every shared block gains a reference."""
    n = ntok[parent]
    nb = (n + bs - 1) // bs
    for j in range(nb):
        b = tables[parent, j]
        gpool[0, b] += 1
        tables[child, j] = b
    toks[child, :n] = toks[parent, :n]
    nfull = n // bs
    bhash[child, :nfull] = bhash[parent, :nfull]
    bpid[child, :nfull] = bpid[parent, :nfull]
    ntok[child] = n
    swapped[child] = 0


@njit(cache=True)
def free_kernel(
    bs: int, row: int, gpool: I32, cpool: I32, meta: I64, tables: I32, ntok: I64, swapped: U8
) -> None:
    """Release the row's blocks in reverse logical order (to the CPU pool if swapped)."""
    nb = (ntok[row] + bs - 1) // bs
    if swapped[row] != 0:
        for j in range(nb - 1, -1, -1):
            _release(cpool, meta, C_HEAD, tables[row, j])
    else:
        for j in range(nb - 1, -1, -1):
            _release(gpool, meta, G_HEAD, tables[row, j])
    for j in range(nb):
        tables[row, j] = 0  # rows stay zero past their last block (see gather_kernel)
    ntok[row] = 0
    swapped[row] = 0


@njit(cache=True)
def swap_out_kernel(
    bs: int,
    row: int,
    gpool: I32,
    cpool: I32,
    meta: I64,
    tables: I32,
    ntok: I64,
    swapped: U8,
    mapping: I64,  # out [nb, 2]: (gpu, cpu)
) -> None:
    """Fresh CPU blocks in logical order, then GPU references dropped in reverse order."""
    nb = (ntok[row] + bs - 1) // bs
    for j in range(nb):
        mapping[j, 0] = tables[row, j]
        mapping[j, 1] = _take(cpool, meta, C_HEAD)
    for j in range(nb - 1, -1, -1):
        _release(gpool, meta, G_HEAD, tables[row, j])
    for j in range(nb):
        tables[row, j] = mapping[j, 1]
    swapped[row] = 1


@njit(cache=True)
def swap_in_kernel(
    bs: int,
    row: int,
    caching: bool,
    gpool: I32,
    cpool: I32,
    meta: I64,
    ent: I64,
    ikeys: I64,
    ivals: I32,
    tables: I32,
    ntok: I64,
    swapped: U8,
    bhash: I64,
    bpid: I64,
    mapping: I64,  # out [nb, 2]: (cpu, gpu)
) -> None:
    """GPU blocks from the queue head in logical order, CPU blocks released in reverse order,
    full blocks offered to the prefix cache."""
    nb = (ntok[row] + bs - 1) // bs
    for j in range(nb):
        mapping[j, 0] = tables[row, j]
        mapping[j, 1] = _take_gpu(gpool, meta, ent, ikeys, ivals)
    for j in range(nb - 1, -1, -1):
        _release(cpool, meta, C_HEAD, tables[row, j])
    for j in range(nb):
        tables[row, j] = mapping[j, 1]
    swapped[row] = 0
    if caching:
        for i in range(ntok[row] // bs):
            _register(ent, ikeys, ivals, tables[row, i], bhash[row, i], bpid[row, i])


# ---------------------------------------------------------------- what the GPU step takes
@njit(cache=True)
def gather_kernel(
    bs: int, skeys: I64, svals: I32, sids: I64, tables: I32, ntok: I64
) -> tuple[int, I32, I32]:
    """Block tables ``[B, W]`` (int32, zero padded) and lengths ``[B]`` of the sequences
    ``sids``; ``W`` is the most blocks any of them has. Returns ``(first unknown index or -1,
    tables, lens)``. Rows are zero past their last block, so each row is one slice copy."""
    b = sids.shape[0]
    rows = np.empty(b, dtype=np.int32)
    lens = np.empty(b, dtype=np.int32)
    w = 0
    for k in range(b):
        r = oa_find(skeys, svals, sids[k])
        if r < 0:
            return k, np.empty((0, 0), dtype=np.int32), lens
        rows[k] = r
        n = ntok[r]
        lens[k] = n
        w = max(w, (n + bs - 1) // bs)
    out = np.empty((b, w), dtype=np.int32)
    for k in range(b):
        r = rows[k]
        for j in range(w):
            out[k, j] = tables[r, j]
    return -1, out, lens


@njit(cache=True)
def decode_kernel(
    bs: int,
    sids: I64,
    tok_in: I64,
    caching: bool,  # with the spec's default hash (filled blocks are hashed here)
    xid: I64,
    xbytes: U8,
    xoff: I64,
    hscratch: NDArray[np.uint64],
    nodes: I64,
    ntoks: I64,
    nkeys: I64,
    nmeta: I64,
    nstack: I64,
    gpool: I32,
    meta: I64,
    ent: I64,
    ikeys: I64,
    ivals: I32,
    skeys: I64,
    svals: I32,
    tables: I32,
    ntok: I64,
    toks: I64,
    swapped: U8,
    bhash: I64,
    bpid: I64,
    rows: I32,
    rstamp: I32,
    drop: I32,
    slots: I64,
    pairs: I64,
    info: I64,
) -> tuple[int, I32, I32]:
    """``append_kernel`` then the step's block tables ``[B, W]`` and lengths ``[B]``, in one
    call: the whole bookkeeping of a decode step."""
    empty = np.empty(0, dtype=np.int64)
    fills = np.empty(sids.shape[0], dtype=np.int32)
    status = append_kernel(
        bs, True, sids, tok_in, -1, empty, True, xid, xbytes, xoff, hscratch,
        nodes, ntoks, nkeys, nmeta, nstack,
        gpool, meta, ent, ikeys, ivals, skeys, svals,
        tables, ntok, toks, swapped, bhash, bpid, caching, rows, fills, rstamp, drop, slots,
        pairs, info,
    )  # fmt: skip
    b = sids.shape[0]
    lens = np.empty(b, dtype=np.int32)
    if status != OK:
        return status, np.empty((0, 0), dtype=np.int32), lens
    w = 0
    for k in range(b):
        n = ntok[rows[k]]
        lens[k] = n
        w = max(w, (n + bs - 1) // bs)
    out = np.empty((b, w), dtype=np.int32)
    for k in range(b):
        r = rows[k]
        for j in range(w):
            out[k, j] = tables[r, j]
    return OK, out, lens


EXISTS = 7  # info[3] = batch index


@njit(cache=True)
def allocate_batch_kernel(
    bs: int,
    watermark: int,
    caching: bool,
    precomputed: bool,  # hashes and prefix ids given (a Python hash_fn) instead of computed
    sids: I64,  # [B] validated new ids
    flat: I64,  # [sum n] validated prompts, concatenated
    offs: I64,  # [B + 1]
    xreq: I64,  # [B] extra key ids
    hin: I64,  # [sum n // bs] precomputed hashes
    pin: I64,  # [sum n // bs] precomputed prefix ids
    hoffs: I64,  # [B + 1]
    xbytes: U8,
    xoff: I64,
    hscratch: NDArray[np.uint64],
    nodes: I64,
    ntoks: I64,
    nkeys: I64,
    nmeta: I64,
    nstack: I64,
    gpool: I32,
    meta: I64,
    ent: I64,
    ikeys: I64,
    ivals: I32,
    skeys: I64,
    svals: I32,
    tables: I32,
    ntok: I64,
    toks: I64,
    bhash: I64,
    bpid: I64,
    xid: I64,
    rows_avail: I32,  # [B] the rows to use, in order
    cached_out: I64,  # out [B]
    info: I64,  # out: needed, free, hits, number of prompts allocated
) -> int:
    """``allocate`` each prompt in order (hash, intern, match, check, take); stops at the first
    that fails (EXISTS or NO_BLOCKS) with the earlier ones done, as one call after another."""
    for k in range(sids.shape[0]):
        info[3] = k
        sid = sids[k]
        for t in range(offs[k], offs[k + 1]):
            if flat[t] < 0:
                info[0] = t
                return BAD_TOKEN
        if oa_find(skeys, svals, sid) >= 0:
            return EXISTS
        prompt = flat[offs[k] : offs[k + 1]]
        n = prompt.shape[0]
        x = xreq[k]
        if not caching:
            hashes = hin[0:0]
            pids = pin[0:0]
        elif precomputed:
            hashes = hin[hoffs[k] : hoffs[k + 1]]
            pids = pin[hoffs[k] : hoffs[k + 1]]
        else:
            nfull = n // bs
            hashes = np.empty(nfull, dtype=np.int64)
            pids = np.empty(nfull, dtype=np.int64)
            key = xbytes[xoff[x] : xoff[x + 1]] if x >= 0 else xbytes[0:0]
            hash_intern_chain(
                prompt, bs, x, key, hscratch, hashes, pids, nodes, ntoks, nkeys, nmeta, nstack
            )  # fmt: skip
        hits = np.empty(hashes.shape[0], dtype=np.int32)
        row = rows_avail[k]
        status = allocate_kernel(
            bs, watermark, row, prompt, hashes, pids, False, gpool, meta, ent, ikeys, ivals,
            tables, ntok, toks, bhash, bpid, hits, info,
        )  # fmt: skip
        if status != OK:
            return status
        allocate_kernel(
            bs, watermark, row, prompt, hashes, pids, True, gpool, meta, ent, ikeys, ivals,
            tables, ntok, toks, bhash, bpid, hits, info,
        )  # fmt: skip
        oa_insert(skeys, svals, sid, row)
        xid[row] = x
        cached_out[k] = info[2] * bs
    info[3] = sids.shape[0]
    return OK


@njit(cache=True)
def free_batch_kernel(
    bs: int,
    sids: I64,  # [B]
    gpool: I32,
    cpool: I32,
    meta: I64,
    skeys: I64,
    svals: I32,
    tables: I32,
    ntok: I64,
    swapped: U8,
    xid: I64,
    rows_out: I32,  # out [B]: the freed rows
) -> int:
    """``free`` each sequence in order; returns how many were freed before an unknown id."""
    for k in range(sids.shape[0]):
        r = oa_find(skeys, svals, sids[k])
        if r < 0:
            return k
        free_kernel(bs, r, gpool, cpool, meta, tables, ntok, swapped)
        oa_delete(skeys, svals, sids[k])
        xid[r] = -1
        rows_out[k] = r
    n: int = sids.shape[0]
    return n


@njit(cache=True)
def fork_batch_kernel(
    bs: int,
    parents: I64,  # [B]
    children: I64,  # [B] validated ids
    gpool: I32,
    skeys: I64,
    svals: I32,
    tables: I32,
    ntok: I64,
    toks: I64,
    swapped: U8,
    bhash: I64,
    bpid: I64,
    xid: I64,
    rows_avail: I32,  # [B] the child rows to use, in order
    info: I64,  # out: info[3] = number forked
) -> int:
    """``fork`` each (parent, child) in order; stops at the first error (UNKNOWN parent,
    SWAPPED parent, EXISTS child) with the earlier forks done."""
    for k in range(parents.shape[0]):
        info[3] = k
        p = oa_find(skeys, svals, parents[k])
        if p < 0:
            return UNKNOWN
        if swapped[p] != 0:
            return SWAPPED
        if oa_find(skeys, svals, children[k]) >= 0:
            return EXISTS
        c = rows_avail[k]
        fork_kernel(bs, p, c, gpool, tables, ntok, toks, swapped, bhash, bpid)
        xid[c] = xid[p]
        oa_insert(skeys, svals, children[k], c)
    info[3] = parents.shape[0]
    return OK
