"""Fused element-wise steps around a layer's matmuls: validated entry points, torch fallbacks.

``rope_write_kv``, ``add_rms_norm`` and ``silu_mul`` do in one kernel what a layer otherwise does
in a chain of small ones (kernels/triton_fused.py says which). Each checks its arguments (shapes,
dtypes, devices; a bad one raises a :class:`~kernels.errors.KernelInputError` subclass naming the
numbers) and runs Triton on CUDA tensors (or under ``TRITON_INTERPRET=1`` with
``backend="triton"``) and the unfused torch chain otherwise, which is also the reference the
tests hold the kernels to.

>>> import torch
>>> x, d, w = torch.ones(2, 4), torch.ones(2, 4), torch.full((4,), 3.0)
>>> total, normed = add_rms_norm(x, d, w, eps=0.0)
>>> total[0].tolist(), normed[0].tolist()
([2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0])
>>> silu_mul(torch.tensor([[0.0, 2.0]])).tolist()  # silu(0) * 2
[[0.0]]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.backend import resolve_backend
from kernels.cache_ops import check_write_kv
from kernels.checks import FLOAT_DTYPES
from kernels.errors import (
    DeviceMismatchError,
    DTypeMismatchError,
    KernelInputError,
    ShapeMismatchError,
)

__all__ = ["rope_write_kv", "add_rms_norm", "silu_mul", "apply_rope", "rotate_half"]


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_float(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise DTypeMismatchError(name, _dt(t), _dt(ref))
    if t.device != ref.device:
        raise DeviceMismatchError(name, str(t.device), str(ref.device))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """x [..., R] -> [..., R]: (x1, x2) -> (-x2, x1), the rotary embedding's partner lanes."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every head of x [T, H, D] by its token's angles (cos, sin [T, 1, R]) -> [T, H, D].

    Queries and keys are rotated in one call by passing them side by side as one head axis.
    With ``R < D`` (partial rotary) lanes ``R..D-1`` pass through unrotated. The unfused rope
    of the model's layers (fast.model.rope) and the fallback of :func:`rope_write_kv`.
    """
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :r]  # [T, H, R]
    return torch.cat((rot * cos + rotate_half(rot) * sin, x[..., r:]), dim=-1)


def rope_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate queries and keys, write keys and values to the cache; return the queries.

    qkv [T, (Hq + 2 Hkv) D] (the fused projection's output: queries, keys, values), cos and sin
    [T, 1, R] or [T, R] (``R <= D`` rotated lanes, even), caches [N, bs, Hkv, D] of qkv's dtype,
    slot_mapping [T] int (slot -1 writes nothing) -> queries [T, Hq, D], contiguous.
    """
    if qkv.dim() != 2:
        raise ShapeMismatchError("qkv", tuple(qkv.shape), "[T, (Hq + 2 Hkv) D]")
    if qkv.dtype not in FLOAT_DTYPES:
        raise DTypeMismatchError("qkv", _dt(qkv), "a float dtype")
    t = qkv.shape[0]
    if k_cache.dim() != 4:
        raise ShapeMismatchError("k_cache", tuple(k_cache.shape), "[N, bs, Hkv, D]")
    _, _, hkv, d = k_cache.shape
    if isinstance(num_heads, bool) or num_heads < 1 or qkv.shape[1] != (num_heads + 2 * hkv) * d:
        raise ShapeMismatchError("qkv", tuple(qkv.shape), f"[{t}, ({num_heads} + 2*{hkv})*{d}]")
    # the keys and values as write_kv takes them: the same checks (shapes, dtypes, the caches
    # as a pair, slot dtype and range; an fp8 cache is refused here: it quantizes in write_kv)
    k = qkv[:, num_heads * d : (num_heads + hkv) * d].reshape(t, hkv, d)  # [T, Hkv, D]
    v = qkv[:, (num_heads + hkv) * d :].reshape(t, hkv, d)  # [T, Hkv, D]
    check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    if k_cache.dtype != qkv.dtype:
        raise DTypeMismatchError("k_cache", _dt(k_cache), _dt(qkv))
    for name, x in (("cos", cos), ("sin", sin)):
        _check_float(name, x, qkv)
        if x.shape not in ((t, 1, x.shape[-1]), (t, x.shape[-1])) or x.shape != cos.shape:
            raise ShapeMismatchError(name, tuple(x.shape), f"[{t}, 1, R] or [{t}, R], as cos")
    r = cos.shape[-1]
    if r > d or r % 2 or r == 0:
        raise ShapeMismatchError("cos", tuple(cos.shape), f"R even, 2 <= R <= {d}")
    cos2, sin2 = cos.reshape(t, r), sin.reshape(t, r)  # [T, R]
    if t == 0:
        return qkv.new_empty(0, num_heads, d)
    if resolve_backend(backend, qkv.device) == "triton":
        from kernels.triton_fused import triton_rope_write_kv

        if k_cache.stride()[1:] != (hkv * d, d, 1):  # the kernel packs [row, head, dim]
            raise ShapeMismatchError(
                "k_cache strides", tuple(k_cache.stride()), f"(any, {hkv * d}, {d}, 1)"
            )
        qkv = qkv if qkv.stride(1) == 1 else qkv.contiguous()
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
        return triton_rope_write_kv(qkv, cos2, sin2, k_cache, v_cache, slot_mapping, num_heads)
    qk = qkv[:, : (num_heads + hkv) * d].reshape(t, num_heads + hkv, d)  # [T, Hq + Hkv, D]
    qk = apply_rope(qk, cos2[:, None, :], sin2[:, None, :])  # [T, Hq + Hkv, D]
    keep = slot_mapping >= 0
    rows = slot_mapping[keep].long()
    bs = k_cache.shape[1]
    blocks, within = rows // bs, rows % bs
    k_cache[blocks, within] = qk[keep, num_heads:]
    v_cache[blocks, within] = v[keep]
    return qk[:, :num_heads].contiguous()


def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * (weight + offset)) for x, delta [T, H], weight [H].

    The sum is rounded to x's dtype (the residual stream), then normalized in float32.
    """
    if x.dim() != 2 or delta.shape != x.shape:
        raise ShapeMismatchError("delta", tuple(delta.shape), f"{tuple(x.shape)} (2-D)")
    if weight.shape != (x.shape[1],):
        raise ShapeMismatchError("weight", tuple(weight.shape), f"[{x.shape[1]}]")
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeMismatchError("x", _dt(x), "a float dtype")
    if weight.dtype not in FLOAT_DTYPES:
        raise DTypeMismatchError("weight", _dt(weight), "a float dtype")
    for name, value in (("eps", eps), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KernelInputError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or (name == "eps" and value < 0):
            raise KernelInputError(
                f"{name} must be finite{' and >= 0' if name == 'eps' else ''}, got {value}"
            )
    _check_float("delta", delta, x)
    if weight.device != x.device:
        raise DeviceMismatchError("weight", str(weight.device), str(x.device))
    if resolve_backend(backend, x.device) == "triton":
        from kernels.triton_fused import triton_add_rms_norm

        return triton_add_rms_norm(
            x.contiguous(), delta.contiguous(), weight.contiguous(), eps, offset
        )
    total = x + delta  # [T, H]
    normed = F.rms_norm(total.float(), (x.shape[1],), None, eps)  # [T, H] float32
    return total, (normed * (weight.float() + offset)).to(x.dtype)


def silu_mul(gate_up: torch.Tensor, gelu: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """gate_up [T, 2F] -> act(gate) * up [T, F]; act is SiLU, or GELU (tanh) with ``gelu``."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ShapeMismatchError("gate_up", tuple(gate_up.shape), "[T, 2F]")
    if gate_up.dtype not in FLOAT_DTYPES:
        raise DTypeMismatchError("gate_up", _dt(gate_up), "a float dtype")
    if not isinstance(gelu, bool):
        raise KernelInputError(f"gelu must be a bool, got {gelu!r}")
    if resolve_backend(backend, gate_up.device) == "triton":
        from kernels.triton_fused import triton_silu_mul

        return triton_silu_mul(gate_up.contiguous(), gelu)
    gate, up = gate_up.chunk(2, dim=-1)  # [T, F] each
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    return act * up
