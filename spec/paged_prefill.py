"""Paged prefill: a chunk of new tokens after a cached prefix, variable lengths in one batch.

Sequence ``b`` owns query rows ``cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1`` (``q_len`` of them) and
``seq_lens[b]`` keys, cached prefix and new tokens together (the new K/V are already in the
cache). The causal mask is aligned bottom right: query ``i`` of the chunk sits at position
``seq_len - q_len + i`` and sees keys ``0 .. seq_len - q_len + i``.

>>> import numpy as np
>>> kc = np.zeros((2, 4, 1, 1)); vc = np.arange(8.0).reshape(2, 4, 1, 1)
>>> q = np.zeros((2, 1, 1))        # 2 new tokens after 2 cached ones
>>> paged_prefill(q, kc, vc, [[1]], [0, 2], [4], scale=1.0)[:, 0, 0].tolist()
[5.0, 5.5]
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from spec.attention import F64, I64, AttentionParams, AttentionShapeError, as_int_array, attention
from spec.kv_cache import gather_kv
from spec.kv_quant import head_scales
from spec.paged_decode import check_attention_inputs


def query_positions(seq_len: int, q_len: int) -> I64:
    """[q_len] absolute positions of a chunk's queries: the last ``q_len`` of ``seq_len``.

    >>> query_positions(seq_len=5, q_len=2).tolist()
    [3, 4]
    """
    return np.arange(seq_len - q_len, seq_len, dtype=np.int64)


def check_cu_seqlens(cu_seqlens_q: ArrayLike, num_seqs: int, num_tokens: int) -> I64:
    """[B+1] validated cumulative query offsets: start at 0, non-decreasing, end at T."""
    cu = as_int_array("cu_seqlens_q", cu_seqlens_q, 1)
    if cu.shape[0] != num_seqs + 1:
        raise AttentionShapeError(
            "cu_seqlens_q must have B+1 entries", entries=cu.shape[0], sequences=num_seqs
        )
    if cu[0] != 0:
        raise AttentionShapeError("cu_seqlens_q must start at 0", first=int(cu[0]))
    drops = np.flatnonzero(np.diff(cu) < 0)
    if drops.size:
        i = int(drops[0])
        raise AttentionShapeError(
            "cu_seqlens_q must be non-decreasing",
            index=i + 1,
            before=int(cu[i]),
            value=int(cu[i + 1]),
        )
    if cu[-1] != num_tokens:
        raise AttentionShapeError(
            "cu_seqlens_q must end at the number of query tokens",
            last=int(cu[-1]),
            num_tokens=num_tokens,
        )
    return cu


def paged_prefill_with_lse(
    q: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    block_tables: ArrayLike,
    cu_seqlens_q: ArrayLike,
    seq_lens: ArrayLike,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: ArrayLike = 1.0,
    v_scale: ArrayLike = 1.0,
) -> tuple[F64, F64]:
    """(o [T, Hq, D], lse [T, Hq]) of the packed chunk queries ``q`` [T, Hq, D]."""
    params = AttentionParams(scale, sliding_window, softcap)
    qa, kc, vc, tables, lens = check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    ks = head_scales(k_scale, kc.shape[2], "k_scale")[:, None]  # [Hkv, 1]
    vs = head_scales(v_scale, kc.shape[2], "v_scale")[:, None]
    cu = check_cu_seqlens(cu_seqlens_q, lens.shape[0], qa.shape[0])
    out = np.zeros(qa.shape, dtype=np.float64)  # [T, Hq, D]
    lse = np.zeros(qa.shape[:2], dtype=np.float64)  # [T, Hq]
    for b, seq_len in enumerate(lens.tolist()):
        start, end = int(cu[b]), int(cu[b + 1])
        if end - start > seq_len:
            raise AttentionShapeError(
                "q_len > seq_len", sequence=b, q_len=end - start, seq_len=seq_len
            )
        k, v = gather_kv(kc, vc, tables[b], seq_len)  # [L, Hkv, D] codes
        k, v = k * ks, v * vs  # dequantized: the cache holds x / scale
        positions = query_positions(seq_len, end - start)  # [q_len]
        o_b, lse_b = attention(qa[start:end], k, v, params, q_positions=positions)
        out[start:end], lse[start:end] = o_b, lse_b
    return out, lse


def paged_prefill(
    q: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    block_tables: ArrayLike,
    cu_seqlens_q: ArrayLike,
    seq_lens: ArrayLike,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: ArrayLike = 1.0,
    v_scale: ArrayLike = 1.0,
) -> F64:
    """[T, Hq, D]: attention of a packed batch of prefill chunks over their paged K/V.

    ``q`` [T, Hq, D]; ``block_tables`` [B, W]; ``cu_seqlens_q`` [B+1] non-decreasing from 0 to T;
    ``seq_lens`` [B] counts cached plus new keys (``q_len_b <= seq_lens[b]``). ``scale``,
    ``sliding_window`` and ``softcap`` are keyword-only, as in ``kernels.paged_prefill``;
    ``k_scale``, ``v_scale`` dequantize the cache's codes as in ``paged_decode``.
    """
    window, cap = sliding_window, softcap
    args = (q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    return paged_prefill_with_lse(
        *args, scale=scale, sliding_window=window, softcap=cap, k_scale=k_scale, v_scale=v_scale
    )[0]
