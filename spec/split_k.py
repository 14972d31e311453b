"""Split-K: attention over a partition of the keys, then an exact log-sum-exp merge.

Each part ``j`` of the keys yields a partial state ``(o_j, lse_j)``: the softmax-weighted mean of
its values and the log of its softmax denominator. With ``m = max_j lse_j`` and
``w_j = exp(lse_j - m)`` the merge is ``o = sum_j w_j o_j / sum_j w_j`` and
``lse = m + log(sum_j w_j)``, equal to attention over all the keys at once. An empty part (or one
whose keys are all masked) has ``o = 0, lse = -inf``, gets weight 0, and changes nothing.

>>> import numpy as np
>>> from spec.attention import AttentionParams, attention
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.normal(size=(1, 2, 4)), rng.normal(size=(6, 1, 4)), rng.normal(size=(6, 1, 4))
>>> p = AttentionParams(scale=0.5)
>>> o, lse = split_k_attention(q, k, v, p, boundaries=[2, 2, 5])   # parts 0:2, 2:2, 2:5, 5:6
>>> o_ref, lse_ref = attention(q, k, v, p)
>>> bool(np.allclose(o, o_ref) and np.allclose(lse, lse_ref))
True
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from spec.attention import F64, AttentionParams, AttentionShapeError, as_int_array, attention


def partial_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    params: AttentionParams,
    q_positions: ArrayLike,
    k_positions: ArrayLike,
) -> tuple[F64, F64]:
    """(o [Q, Hq, D], lse [Q, Hq]) of ``q`` [Q, Hq, D] over one part ``k``, ``v`` [K, Hkv, D].

    The arguments of :func:`spec.attention.attention`, in its order; here both position arrays
    are required.

    Positions are absolute (``q_positions`` [Q], ``k_positions`` [K]) so the causal mask and the
    sliding window are the ones of the whole sequence. ``K = 0`` gives ``o = 0, lse = -inf``.
    """
    return attention(q, k, v, params, q_positions=q_positions, k_positions=k_positions)


def merge_states(os: ArrayLike, lses: ArrayLike) -> tuple[F64, F64]:
    """Merge partial states ``os`` [S, ..., D], ``lses`` [S, ...] -> (o [..., D], lse [...]).

    ``lses`` may hold ``-inf`` (an empty part); NaN and ``+inf`` are refused. ``S = 0`` gives the
    empty state.

    >>> o, lse = merge_states([[[1.0, 0.0]], [[0.0, 1.0]]], [[0.0], [np.log(3.0)]])
    >>> o.tolist(), round(float(lse[0]), 6)          # weights 1 : 3, lse = log 4
    ([[0.25, 0.75]], 1.386294)
    """
    o_parts = np.asarray(os, dtype=np.float64)
    lse_parts = np.asarray(lses, dtype=np.float64)
    if o_parts.ndim < 2 or o_parts.shape[:-1] != lse_parts.shape:
        raise AttentionShapeError(
            "os must be [S, ..., D] and lses [S, ...]", os=o_parts.shape, lses=lse_parts.shape
        )
    if not np.all(np.isfinite(o_parts)):
        count = int(np.sum(~np.isfinite(o_parts)))
        raise AttentionShapeError("os holds a non-finite value", count=count)
    bad = np.isnan(lse_parts) | (lse_parts == np.inf)
    if np.any(bad):
        raise AttentionShapeError("lses holds NaN or +inf", count=int(np.sum(bad)))
    m = lse_parts.max(axis=0, initial=-np.inf)  # [...]
    seen = np.isfinite(m)  # some part saw a key
    m_safe = np.where(seen, m, 0.0)
    w = np.exp(lse_parts - m_safe)  # [S, ...]; exp(-inf) = 0
    total = np.where(seen, w.sum(axis=0), 1.0)  # [...], >= 1 where seen
    o = (w[..., None] * o_parts).sum(axis=0) / total[..., None]  # [..., D]
    o = np.where(seen[..., None], o, 0.0)
    lse = np.where(seen, m_safe + np.log(total), -np.inf)
    return np.asarray(o, dtype=np.float64), np.asarray(lse, dtype=np.float64)


def split_k_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    params: AttentionParams,
    boundaries: ArrayLike,
    q_positions: ArrayLike | None = None,
) -> tuple[F64, F64]:
    """Attention of ``q`` [Q, Hq, D] over ``k``, ``v`` [K, Hkv, D] cut at ``boundaries``, merged.

    ``boundaries`` are non-decreasing cut points in ``[0, K]``; parts are the key ranges between
    consecutive points of ``[0, *boundaries, K]`` (so repeated points make empty parts). Queries
    default to the last ``Q`` positions, as in :func:`spec.attention.attention`.
    """
    ka = np.asarray(k, dtype=np.float64)
    num_k = ka.shape[0] if ka.ndim == 3 else 0
    cuts = as_int_array("boundaries", boundaries, 1)
    points = np.concatenate([[0], cuts, [num_k]]).astype(np.int64)
    if np.any(np.diff(points) < 0):
        raise AttentionShapeError(
            "boundaries must be non-decreasing within [0, K]",
            boundaries=cuts.tolist(),
            num_keys=num_k,
        )
    qa = np.asarray(q, dtype=np.float64)
    if q_positions is None:
        num_q = qa.shape[0] if qa.ndim == 3 else 0
        if num_q > num_k:
            raise AttentionShapeError(
                "more queries than keys for bottom-right alignment", q_len=num_q, num_keys=num_k
            )
        q_positions = np.arange(num_k - num_q, num_k, dtype=np.int64)
    va = np.asarray(v, dtype=np.float64)
    states = [
        partial_attention(qa, ka[a:b], va[a:b], params, q_positions, np.arange(a, b))
        for a, b in zip(points[:-1].tolist(), points[1:].tolist())
    ]
    return merge_states([s[0] for s in states], [s[1] for s in states])
