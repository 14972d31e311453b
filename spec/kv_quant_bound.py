"""The error bound of attention read from an fp8 KV cache, per output element.

The derivation is in docs/attention.md ("Attention over an fp8 cache: the error bound"). For a
query row ``q`` (head ``h``, reading KV head ``n``) with exact softmax weights ``p_j`` over its
visible keys, per-element quantization errors ``dk[j, d]``, ``dv[j, d]``
(:func:`spec.kv_quant.element_error_bound`), and the logit perturbation bounds

    ``eps_j = scale * sum_d |q_d| dk[j, d]``   (``|s^_j - s_j| <= eps_j``, soft-cap or not),

with ``E = sum_j p_j exp(eps_j)`` and ``rho_j = exp(eps_j) E - 1`` (``|p^_j - p_j| <= p_j rho_j``),
the output read from the cache differs from exact attention over the unquantized K/V by at most

    ``B[d] = sum_j p_j (1 + rho_j) dv[j, d] + sum_j p_j rho_j |v[j, d]|``

in exact arithmetic. A kernel adds the rounding of its compute dtype on top
(``spec.tolerances``). Rows that see no key output 0 either way: bound 0.

>>> import numpy as np
>>> from spec.attention import AttentionParams, attention
>>> from spec.kv_quant import dequantize, quantize
>>> rng = np.random.default_rng(1)
>>> q, k, v = rng.normal(size=(4, 2, 8)), rng.normal(size=(6, 1, 8)), rng.normal(size=(6, 1, 8))
>>> p = AttentionParams(scale=8**-0.5)
>>> kq = dequantize(quantize(k, 0.01, "fp8"), 0.01)
>>> vq = dequantize(quantize(v, 0.01, "fp8"), 0.01)
>>> err = np.abs(attention(q, kq, vq, p)[0] - attention(q, k, v, p)[0])
>>> bound = attention_error_bound(q, k, v, p, k_scale=0.01, v_scale=0.01, kv_cache_dtype="fp8")
>>> bool(np.all(err <= bound)), bool(bound.max() < 0.5)
(True, True)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from spec.attention import (
    F64,
    LOGITS_BUDGET,
    AttentionParams,
    as_float_array,
    check_qkv,
    kv_head_map,
    logits,
    positions,
    visible,
)
from spec.kv_quant import element_error_bound

__all__ = ["attention_error_bound"]


def attention_error_bound(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    params: AttentionParams,
    *,
    k_scale: ArrayLike,
    v_scale: ArrayLike,
    kv_cache_dtype: str,
    q_positions: ArrayLike | None = None,
    k_positions: ArrayLike | None = None,
) -> F64:
    """[Q, Hq, D] bound on ``|attention(q, K^, V^) - attention(q, K, V)|`` per output element.

    ``k``, ``v`` [K, Hkv, D] are the unquantized keys and values; ``K^``, ``V^`` what a cache of
    kind ``kv_cache_dtype`` with scales ``k_scale``, ``v_scale`` (one number or ``[Hkv]``) gives
    back. Positions and masking as :func:`spec.attention.attention`.
    """
    qa = as_float_array("q", q, 3)
    ka = as_float_array("k", k, 3)
    va = as_float_array("v", v, 3)
    check_qkv(qa, ka, va)
    qp, kp = positions(qa.shape[0], ka.shape[0], q_positions, k_positions)
    dk = element_error_bound(ka, k_scale, kv_cache_dtype)  # [K, Hkv, D]
    dv = element_error_bound(va, v_scale, kv_cache_dtype)
    plain = AttentionParams(params.scale)  # eps: |q| . dk, scaled; tanh is 1-Lipschitz
    heads = kv_head_map(qa.shape[1], ka.shape[1])  # [Hq]
    bound = np.zeros(qa.shape, dtype=np.float64)  # [Q, Hq, D]
    step = max(1, LOGITS_BUDGET // max(1, qa.shape[1] * ka.shape[0]))
    for start in range(0, qa.shape[0], step):
        rows = slice(start, start + step)
        mask = visible(qp[rows], kp, params.sliding_window)[:, None, :]  # [q, 1, K]
        s = np.where(mask, logits(qa[rows], ka, params), -np.inf)  # [q, Hq, K]
        m = s.max(axis=2, initial=-np.inf)  # [q, Hq]
        seen = np.isfinite(m)
        w = np.exp(s - np.where(seen, m, 0.0)[:, :, None])  # [q, Hq, K]
        p = w / np.where(seen, w.sum(axis=2), 1.0)[:, :, None]  # exact weights; 0 if hidden
        eps = logits(np.abs(qa[rows]), dk, plain)  # [q, Hq, K]
        grow = np.where(mask, np.exp(eps), 0.0)  # exp(eps_j) on visible keys
        big_e = (p * grow).sum(axis=2, keepdims=True)  # [q, Hq, 1]
        rho = np.where(mask, grow * big_e - 1.0, 0.0)  # [q, Hq, K]
        for n in range(ka.shape[1]):
            group = np.flatnonzero(heads == n)  # query heads reading KV head n
            pg, rg = p[:, group, :], rho[:, group, :]  # [q, g, K]
            bound[rows, group, :] = (pg * (1.0 + rg)) @ dv[:, n, :] + (pg * rg) @ np.abs(
                va[:, n, :]
            )
    return bound
