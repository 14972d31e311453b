"""The paged KV cache: writing through a slot mapping, copying and swapping blocks, gathering.

Per layer, K and V are each ``[num_blocks, block_size, Hkv, D]``. Token ``t`` of a sequence lives
at slot ``block_table[t // bs] * bs + t % bs``; slot ``s`` is row ``s % bs`` of block ``s // bs``.

>>> import numpy as np
>>> kc = np.zeros((4, 2, 1, 1)); vc = np.zeros((4, 2, 1, 1))
>>> t = np.array([10.0, 11.0, 12.0]).reshape(3, 1, 1)
>>> write_kv(t, -t, kc, vc, [6, 7, 2])          # tokens 0, 1 in block 3, token 2 in block 1
>>> k, v = gather_kv(kc, vc, block_table=[3, 1], seq_len=3)
>>> k[:, 0, 0].tolist(), v[:, 0, 0].tolist()
([10.0, 11.0, 12.0], [-10.0, -11.0, -12.0])
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from spec.attention import F64, I64, AttentionShapeError, as_int_array
from spec.kv_quant import quantize

Cache = NDArray[np.floating]


def check_cache(name: str, cache: object) -> Cache:
    """Raise unless ``cache`` is a writable float ndarray ``[num_blocks, block_size, Hkv, D]``."""
    if not isinstance(cache, np.ndarray):
        raise AttentionShapeError(f"{name} must be a numpy ndarray", type=type(cache).__name__)
    if cache.ndim != 4:
        raise AttentionShapeError(
            f"{name} must be [num_blocks, block_size, Hkv, D]", shape=cache.shape
        )
    if not np.issubdtype(cache.dtype, np.floating):
        raise AttentionShapeError(f"{name} must hold floats", dtype=str(cache.dtype))
    return cache


def check_cache_pair(k_cache: object, v_cache: object) -> tuple[Cache, Cache]:
    """Raise unless the K and V caches are valid and of one shape."""
    kc, vc = check_cache("k_cache", k_cache), check_cache("v_cache", v_cache)
    if kc.shape != vc.shape:
        raise AttentionShapeError(
            "k_cache and v_cache shapes differ", k_cache=kc.shape, v_cache=vc.shape
        )
    return kc, vc


def slots_of(block_table: ArrayLike, seq_len: int, block_size: int) -> I64:
    """[seq_len] physical slots of tokens ``0..seq_len-1``.

    >>> slots_of([5, 2], 3, block_size=2).tolist()
    [10, 11, 4]
    """
    table = as_int_array("block_table", block_table, 1)
    if seq_len < 0:
        raise AttentionShapeError("seq_len must be >= 0", seq_len=seq_len)
    needed = -(-seq_len // block_size)
    if table.shape[0] < needed:
        raise AttentionShapeError(
            "block table too short for seq_len",
            seq_len=seq_len,
            block_size=block_size,
            needed_blocks=needed,
            table_len=table.shape[0],
        )
    t = np.arange(seq_len, dtype=np.int64)  # [L]
    return np.asarray(table[t // block_size] * block_size + t % block_size, dtype=np.int64)


def gather_kv(
    k_cache: ArrayLike, v_cache: ArrayLike, block_table: ArrayLike, seq_len: int
) -> tuple[F64, F64]:
    """(k, v) each [seq_len, Hkv, D] float64: a sequence's keys and values in logical order.

    Only the first ``ceil(seq_len / bs)`` entries of ``block_table`` are read (the rest may be
    padding) and each must name a block of the pool.
    """
    kc, vc = check_cache_pair(k_cache, v_cache)
    num_blocks, block_size = kc.shape[0], kc.shape[1]
    slots = slots_of(block_table, seq_len, block_size)  # [L]
    blocks = slots // block_size
    if blocks.size and (blocks.min() < 0 or blocks.max() >= num_blocks):
        bad = int(blocks[(blocks < 0) | (blocks >= num_blocks)][0])
        raise AttentionShapeError("block id out of range", block=bad, num_blocks=num_blocks)
    offsets = slots % block_size
    k = np.asarray(kc[blocks, offsets], dtype=np.float64)  # [L, Hkv, D]
    v = np.asarray(vc[blocks, offsets], dtype=np.float64)  # [L, Hkv, D]
    return k, v


def write_kv(
    k: ArrayLike,
    v: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    slot_mapping: ArrayLike,
    *,
    kv_cache_dtype: str = "auto",
    k_scale: ArrayLike = 1.0,
    v_scale: ArrayLike = 1.0,
) -> None:
    """Store ``k``, ``v`` [T, Hkv, D] at ``slot_mapping`` [T] in place; slot ``-1`` is skipped.

    The new tokens come first, then the caches they go into (vLLM's ``reshape_and_cache``
    order, as ``kernels.write_kv``). What is stored is the code ``spec.kv_quant.quantize(k,
    k_scale, kv_cache_dtype)`` (likewise for v): with the defaults, ``k`` itself; with an fp8
    ``kv_cache_dtype``, ``k / k_scale`` saturated and rounded onto the fp8 grid (scales: one
    number, or ``[Hkv]`` per KV head). Readers multiply by the scale again (``paged_decode``'s
    ``k_scale``).

    >>> kc = np.zeros((1, 2, 1, 2)); vc = np.zeros((1, 2, 1, 2))
    >>> k = np.array([[[3.3, 1000.0]]])
    >>> write_kv(k, k, kc, vc, [1], kv_cache_dtype="fp8", k_scale=0.5, v_scale=2.0)
    >>> kc[0, 1, 0].tolist(), vc[0, 1, 0].tolist()   # 6.6 -> 6.5; 2000 and 500 saturate
    ([6.5, 448.0], [1.625, 448.0])

    All checks run before anything is written: slots must lie in ``[-1, num_blocks * bs)`` and
    the non-negative ones must be distinct.
    """
    kc, vc = check_cache_pair(k_cache, v_cache)
    ka, va = np.asarray(k), np.asarray(v)
    slots = as_int_array("slot_mapping", slot_mapping, 1)
    expected = (slots.shape[0],) + kc.shape[2:]
    if ka.shape != expected or va.shape != expected:
        raise AttentionShapeError(
            "k and v must be [T, Hkv, D] matching the cache",
            k=ka.shape,
            v=va.shape,
            expected=expected,
        )
    num_slots = kc.shape[0] * kc.shape[1]
    bad = np.flatnonzero((slots < -1) | (slots >= num_slots))
    if bad.size:
        i = int(bad[0])
        raise AttentionShapeError(
            "slot out of range", index=i, slot=int(slots[i]), num_slots=num_slots
        )
    live = np.flatnonzero(slots >= 0)  # tokens that are written
    values, counts = np.unique(slots[live], return_counts=True)
    if np.any(counts > 1):
        raise AttentionShapeError("slot written twice", slot=int(values[counts > 1][0]))
    k_codes = quantize(ka[live], k_scale, kv_cache_dtype)  # [live, Hkv, D]
    v_codes = quantize(va[live], v_scale, kv_cache_dtype)
    bs = kc.shape[1]
    kc[slots[live] // bs, slots[live] % bs] = k_codes
    vc[slots[live] // bs, slots[live] % bs] = v_codes


def check_block_pairs(name: str, pairs: ArrayLike, num_src: int, num_dst: int) -> I64:
    """[N, 2] ``pairs`` of (source block, destination block), in range, destinations distinct."""
    arr = np.asarray(pairs)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    arr = as_int_array(name, arr, 2)
    if arr.shape[1] != 2:
        raise AttentionShapeError(f"{name} must be [N, 2]", shape=arr.shape)
    for column, limit, role in ((0, num_src, "source"), (1, num_dst, "destination")):
        ids = arr[:, column]
        bad = np.flatnonzero((ids < 0) | (ids >= limit))
        if bad.size:
            i = int(bad[0])
            raise AttentionShapeError(
                f"{role} block out of range", index=i, block=int(ids[i]), num_blocks=limit
            )
    values, counts = np.unique(arr[:, 1], return_counts=True)
    if np.any(counts > 1):
        twice = int(values[counts > 1][0])
        raise AttentionShapeError(f"{name}: destination block named twice", block=twice)
    return arr


def copy_blocks(k_cache: ArrayLike, v_cache: ArrayLike, pairs: ArrayLike) -> None:
    """Copy-on-write: for each (src, dst) in ``pairs`` [N, 2], block ``dst`` := block ``src``.

    Both K and V are copied.

    Destinations are distinct and no block is both a source and a destination, so the order of
    the pairs does not matter (a kernel may run them in parallel). A source may be copied to
    several destinations.
    """
    kc, vc = check_cache_pair(k_cache, v_cache)
    arr = check_block_pairs("pairs", pairs, kc.shape[0], kc.shape[0])
    both = np.intersect1d(arr[:, 0], arr[:, 1])
    if both.size:
        raise AttentionShapeError(
            "block is both a copy source and a destination", block=int(both[0])
        )
    kc[arr[:, 1]] = kc[arr[:, 0]]
    vc[arr[:, 1]] = vc[arr[:, 0]]


def swap_blocks(src_cache: ArrayLike, dst_cache: ArrayLike, mapping: ArrayLike) -> None:
    """For each (s, d) in ``mapping`` [N, 2]: ``dst_cache[d] := src_cache[s]`` (one of K or V).

    The pools may differ in ``num_blocks`` but not in block shape; destinations are distinct.
    All sources are read before any destination is written.
    """
    src, dst = check_cache("src_cache", src_cache), check_cache("dst_cache", dst_cache)
    if src.shape[1:] != dst.shape[1:]:
        raise AttentionShapeError("block shapes differ between pools", src=src.shape, dst=dst.shape)
    arr = check_block_pairs("mapping", mapping, src.shape[0], dst.shape[0])
    dst[arr[:, 1]] = src[arr[:, 0]]
