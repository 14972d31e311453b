"""Paged decode: one query token per sequence, reading K and V through its block table.

The new token's K/V are already in the cache, so the query of sequence ``b`` sits at position
``seq_lens[b] - 1`` and sees keys ``0..seq_lens[b]-1`` (fewer with a sliding window). A sequence
with ``seq_len = 0`` sees nothing: its output is 0 and its log-sum-exp ``-inf``.

>>> import numpy as np
>>> kc = np.zeros((3, 2, 1, 1)); vc = np.arange(6.0).reshape(3, 2, 1, 1)
>>> q = np.zeros((1, 2, 1))        # two query heads share the one KV head
>>> paged_decode(q, kc, vc, [[2, 0]], [3], scale=1.0)[0, :, 0].tolist()
[3.0, 3.0]

Tokens 0, 1, 2 live in block 2 (rows 0, 1) and block 0 (row 0), holding values 4, 5, 0; equal
logits average them to 3.

``scale``, ``sliding_window`` and ``softcap`` are keyword-only, with the names and order of
``kernels.paged_decode``; they form a :class:`spec.attention.AttentionParams` (validated there).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from spec.attention import (
    F64,
    I64,
    AttentionParams,
    AttentionShapeError,
    as_float_array,
    as_int_array,
    attention,
    kv_head_map,
)
from spec.kv_cache import Cache, check_cache_pair, gather_kv
from spec.kv_quant import head_scales


def check_attention_inputs(
    q: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    block_tables: ArrayLike,
    seq_lens: ArrayLike,
) -> tuple[F64, Cache, Cache, I64, I64]:
    """Validated (q [N, Hq, D], k_cache, v_cache, block_tables [B, W], seq_lens [B])."""
    kc, vc = check_cache_pair(k_cache, v_cache)
    qa = as_float_array("q", q, 3)
    if qa.shape[2] != kc.shape[3]:
        raise AttentionShapeError(
            "q head_dim differs from the cache's",
            q_head_dim=qa.shape[2],
            cache_head_dim=kc.shape[3],
        )
    kv_head_map(qa.shape[1], kc.shape[2])
    tables = as_int_array("block_tables", block_tables, 2)
    lens = as_int_array("seq_lens", seq_lens, 1)
    if tables.shape[0] != lens.shape[0]:
        raise AttentionShapeError(
            "block_tables and seq_lens disagree on the batch size",
            block_tables=tables.shape[0],
            seq_lens=lens.shape[0],
        )
    negative = np.flatnonzero(lens < 0)
    if negative.size:
        b = int(negative[0])
        raise AttentionShapeError("seq_len must be >= 0", sequence=b, seq_len=int(lens[b]))
    return qa, kc, vc, tables, lens


def paged_decode_with_lse(
    q: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    block_tables: ArrayLike,
    seq_lens: ArrayLike,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: ArrayLike = 1.0,
    v_scale: ArrayLike = 1.0,
) -> tuple[F64, F64]:
    """(o [B, Hq, D], lse [B, Hq]) of ``q`` [B, Hq, D] against each sequence's cached keys."""
    params = AttentionParams(scale, sliding_window, softcap)
    qa, kc, vc, tables, lens = check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    ks = head_scales(k_scale, kc.shape[2], "k_scale")[:, None]  # [Hkv, 1]
    vs = head_scales(v_scale, kc.shape[2], "v_scale")[:, None]
    if qa.shape[0] != lens.shape[0]:
        raise AttentionShapeError(
            "decode needs one query per sequence", queries=qa.shape[0], sequences=lens.shape[0]
        )
    out = np.zeros(qa.shape, dtype=np.float64)  # [B, Hq, D]
    lse = np.zeros(qa.shape[:2], dtype=np.float64)  # [B, Hq]
    for b, seq_len in enumerate(lens.tolist()):
        k, v = gather_kv(kc, vc, tables[b], seq_len)  # [L, Hkv, D] codes
        k, v = k * ks, v * vs  # dequantized: the cache holds x / scale
        o_b, lse_b = attention(qa[b : b + 1], k, v, params, q_positions=[seq_len - 1])
        out[b], lse[b] = o_b[0], lse_b[0]
    return out, lse


def paged_decode(
    q: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    block_tables: ArrayLike,
    seq_lens: ArrayLike,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: ArrayLike = 1.0,
    v_scale: ArrayLike = 1.0,
) -> F64:
    """[B, Hq, D]: one decode step of attention for a batch of sequences.

    ``q`` [B, Hq, D]; ``k_cache``, ``v_cache`` [num_blocks, bs, Hkv, D]; ``block_tables`` [B, W]
    (entries past ``ceil(seq_len / bs)`` are not read); ``seq_lens`` [B] counts the keys of each
    sequence, the current token included. ``k_scale``, ``v_scale`` (one number or ``[Hkv]``)
    dequantize: the cache holds ``x / scale`` (``spec.kv_quant``), so keys and values read are
    ``code * scale``.
    """
    return paged_decode_with_lse(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        k_scale=k_scale,
        v_scale=v_scale,
    )[0]
