"""Dense reference attention: the math every paged variant must reproduce.

Everything is numpy float64. A query at absolute position ``p`` sees key ``j`` iff ``j <= p``,
and with a sliding window ``w`` also ``j > p - w``. Logits are ``s = scale * q.k``, soft-capped as
``s = c * tanh(s / c)`` when a cap ``c`` is set. Query head ``h`` reads KV head
``h // (Hq // Hkv)``. A row with no visible key has output 0 and log-sum-exp ``-inf``.

>>> import numpy as np
>>> q, k = np.ones((1, 1, 2)), np.zeros((3, 1, 2))
>>> v = np.arange(3.0).reshape(3, 1, 1) * [1, 1]
>>> o, lse = attention(q, k, v, AttentionParams(scale=1.0))
>>> o[0, 0], round(float(lse[0, 0]), 6)   # equal logits: the mean of v, lse = log 3
(array([1., 1.]), 1.098612)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from spec.errors import InvalidArgumentError, PagedKVError

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

LOGITS_BUDGET = 1 << 22  # logits held at once (32 MiB of float64); bounds memory, not results


class AttentionShapeError(InvalidArgumentError):
    """A shape or value handed to the attention spec is invalid.

    ``what`` says which rule was broken; ``numbers`` holds the offending values by name (they are
    also in the message). As an :class:`~spec.errors.InvalidArgumentError` it also carries
    ``name``/``value`` (the first offending number) and ``reason`` (= ``what``); it is a
    ``ValueError`` and a ``PagedKVError``.
    """

    def __init__(self, what: str, **numbers: Any) -> None:
        self.what = what
        self.numbers: dict[str, Any] = dict(numbers)
        self.name, self.value = next(iter(numbers.items()), ("", None))
        self.reason = what
        detail = ", ".join(f"{name}={value!r}" for name, value in numbers.items())
        PagedKVError.__init__(self, f"{what} ({detail})" if detail else what)


@dataclass(frozen=True)
class AttentionParams:
    """How logits are formed and masked.

    ``scale`` multiplies ``q.k`` (usually ``1/sqrt(head_dim)``); ``sliding_window`` ``w`` keeps
    only the ``w`` most recent keys (``j > p - w``); ``softcap`` ``c`` maps each scaled logit to
    ``c * tanh(s / c)``.
    """

    scale: float
    sliding_window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise AttentionShapeError("scale must be finite and > 0", scale=self.scale)
        window = self.sliding_window
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1
        ):
            raise AttentionShapeError(
                "sliding_window must be an int >= 1 or None", sliding_window=self.sliding_window
            )
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise AttentionShapeError(
                "softcap must be finite and > 0 or None", softcap=self.softcap
            )


def as_float_array(name: str, x: ArrayLike, ndim: int) -> F64:
    """``x`` as a float64 array of ``ndim`` dimensions with only finite values."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise AttentionShapeError(f"{name} must have {ndim} dimensions", shape=arr.shape)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        index = tuple(int(i) for i in bad)
        raise AttentionShapeError(f"{name} holds a non-finite value", index=index)
    return arr


def as_int_array(name: str, x: ArrayLike, ndim: int) -> I64:
    """``x`` as an int64 array of ``ndim`` dimensions; floats and bools are refused."""
    arr = np.asarray(x)
    if arr.size > 0 and not np.issubdtype(arr.dtype, np.integer):
        raise AttentionShapeError(f"{name} must hold integers", dtype=str(arr.dtype))
    arr = arr.astype(np.int64)
    if arr.ndim != ndim:
        raise AttentionShapeError(f"{name} must have {ndim} dimensions", shape=arr.shape)
    return arr


def kv_head_map(num_q_heads: int, num_kv_heads: int) -> I64:
    """[Hq] the KV head each query head reads: ``h // (Hq // Hkv)``.

    >>> kv_head_map(8, 2).tolist()
    [0, 0, 0, 0, 1, 1, 1, 1]
    """
    if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise AttentionShapeError(
            "num_q_heads must be a positive multiple of num_kv_heads",
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
        )
    group = num_q_heads // num_kv_heads
    return np.arange(num_q_heads, dtype=np.int64) // group


def visible(q_positions: I64, k_positions: I64, sliding_window: int | None) -> NDArray[np.bool_]:
    """[Q, K] whether the query at ``q_positions[i]`` sees the key at ``k_positions[j]``.

    >>> visible(np.array([2]), np.arange(4), sliding_window=2).astype(int).tolist()
    [[0, 1, 1, 0]]
    """
    p = q_positions[:, None]  # [Q, 1]
    j = k_positions[None, :]  # [1, K]
    mask = j <= p
    if sliding_window is not None:
        mask &= j > p - sliding_window
    return np.asarray(mask, dtype=np.bool_)


def logits(q: F64, k: F64, params: AttentionParams) -> F64:
    """[Q, Hq, K] scaled, soft-capped logits of ``q`` [Q, Hq, D] against ``k`` [K, Hkv, D].

    Each KV head is multiplied once with all the query heads that read it (no repeated K).
    """
    num_q, num_heads, head_dim = q.shape
    heads = kv_head_map(num_heads, k.shape[1])  # [Hq]
    s = np.empty((num_q, num_heads, k.shape[0]), dtype=np.float64)  # [Q, Hq, K]
    for n in range(k.shape[1]):
        group = np.flatnonzero(heads == n)  # query heads reading KV head n
        rows = q[:, group, :].reshape(num_q * group.size, head_dim)  # [Q * g, D]
        s[:, group, :] = (rows @ k[:, n, :].T).reshape(num_q, group.size, k.shape[0])
    s *= params.scale
    if params.softcap is not None:
        s = params.softcap * np.tanh(s / params.softcap)
    return s


def check_qkv(q: F64, k: F64, v: F64) -> None:
    """Raise unless ``q`` [Q, Hq, D], ``k`` and ``v`` [K, Hkv, D] fit together."""
    if k.shape != v.shape:
        raise AttentionShapeError("k and v must have the same shape", k=k.shape, v=v.shape)
    if q.shape[2] != k.shape[2]:
        raise AttentionShapeError(
            "q and k head_dim differ", q_head_dim=q.shape[2], k_head_dim=k.shape[2]
        )
    kv_head_map(q.shape[1], k.shape[1])


def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    params: AttentionParams,
    q_positions: ArrayLike | None = None,
    k_positions: ArrayLike | None = None,
) -> tuple[F64, F64]:
    """Softmax attention of ``q`` [Q, Hq, D] over ``k``, ``v`` [K, Hkv, D].

    Returns ``(o [Q, Hq, D], lse [Q, Hq])``. ``k_positions`` [K] defaults to ``0..K-1``;
    ``q_positions`` [Q] defaults to the last ``Q`` positions (``K-Q .. K-1``: the causal mask
    aligned bottom right, which needs ``Q <= K``). ``lse`` is the natural log of the sum of the
    exponentiated visible logits; rows that see no key get ``o = 0`` and ``lse = -inf``.
    """
    qa = as_float_array("q", q, 3)
    ka = as_float_array("k", k, 3)
    va = as_float_array("v", v, 3)
    check_qkv(qa, ka, va)
    qp, kp = positions(qa.shape[0], ka.shape[0], q_positions, k_positions)
    o = np.zeros(qa.shape, dtype=np.float64)  # [Q, Hq, D]
    lse = np.full(qa.shape[:2], -np.inf)  # [Q, Hq]
    step = max(1, LOGITS_BUDGET // max(1, qa.shape[1] * ka.shape[0]))  # query rows at a time
    for start in range(0, qa.shape[0], step):
        rows = slice(start, start + step)
        mask = visible(qp[rows], kp, params.sliding_window)[:, None, :]  # [q, 1, K]
        s = np.where(mask, logits(qa[rows], ka, params), -np.inf)  # [q, Hq, K]
        o[rows], lse[rows] = softmax_states(s, va)
    return o, lse


def positions(
    num_q: int, num_k: int, q_positions: ArrayLike | None, k_positions: ArrayLike | None
) -> tuple[I64, I64]:
    """(q_positions [Q], k_positions [K]), defaulting to keys ``0..K-1`` and queries at the end."""
    if k_positions is None:
        kp = np.arange(num_k, dtype=np.int64)
    else:
        kp = as_int_array("k_positions", k_positions, 1)
        if kp.shape[0] != num_k:
            raise AttentionShapeError(
                "k_positions must have one entry per key", k_positions=kp.shape[0], keys=num_k
            )
    if q_positions is None:
        if num_q > num_k:
            raise AttentionShapeError(
                "more queries than keys for bottom-right alignment", q_len=num_q, num_keys=num_k
            )
        return np.arange(num_k - num_q, num_k, dtype=np.int64), kp
    qp = as_int_array("q_positions", q_positions, 1)
    if qp.shape[0] != num_q:
        raise AttentionShapeError(
            "q_positions must have one entry per query", q_positions=qp.shape[0], queries=num_q
        )
    return qp, kp


def softmax_states(s: F64, v: F64) -> tuple[F64, F64]:
    """(o [Q, Hq, D], lse [Q, Hq]) from masked logits ``s`` [Q, Hq, K] and ``v`` [K, Hkv, D].

    ``-inf`` in ``s`` marks a hidden key. The maximum is subtracted before exponentiating, so
    nothing overflows; a row whose keys are all hidden gets ``o = 0``, ``lse = -inf``.
    """
    num_q, num_heads, num_k = s.shape
    heads = kv_head_map(num_heads, v.shape[1])  # [Hq]
    m = s.max(axis=2, initial=-np.inf)  # [Q, Hq]
    seen = np.isfinite(m)  # rows with at least one visible key
    m_safe = np.where(seen, m, 0.0)
    p = np.exp(s - m_safe[:, :, None])  # [Q, Hq, K]; exp(-inf) = 0
    total = np.where(seen, p.sum(axis=2), 1.0)  # [Q, Hq], >= 1 where seen
    o = np.empty((num_q, num_heads, v.shape[2]), dtype=np.float64)  # [Q, Hq, D]
    for n in range(v.shape[1]):
        group = np.flatnonzero(heads == n)  # query heads reading KV head n
        weights = p[:, group, :].reshape(num_q * group.size, num_k)  # [Q * g, K]
        o[:, group, :] = (weights @ v[:, n, :]).reshape(num_q, group.size, v.shape[2])
    o = np.where(seen[:, :, None], o / total[:, :, None], 0.0)
    lse = np.where(seen, m_safe + np.log(total), -np.inf)
    return np.asarray(o, dtype=np.float64), np.asarray(lse, dtype=np.float64)
