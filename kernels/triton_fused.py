# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton kernels that fuse the small steps around a layer's matmuls (issue 12's decode floor).

A decode step of a small batch is bound by reading the weights; everything else in a layer is a
string of tiny element-wise kernels whose launches and round trips through memory add up (about
1.3 ms of a 6 ms step at batch 1 on an H200, docs/performance.md). Three kernels replace most of
them; each reads its inputs once and writes its outputs once:

* :func:`rope_write_kv` -- from the fused QKV projection's output ``[T, Q + 2 KV]``: rotate the
  query and key heads (rotary embedding, ``rotate_half`` convention, the first ``R`` lanes of
  each head), write the rotated keys and the values into the paged cache at ``slot_mapping``
  (slot -1 writes nothing), and return the rotated queries ``[T, Hq, D]`` contiguous (what the
  attention kernels read). Replaces the rope's five element-wise kernels, the query copy and the
  KV write. Grid ``(T, Hq + Hkv)``: one program per (token, head).
* :func:`add_rms_norm` -- ``s = x + delta`` (the residual add, rounded to the activation dtype as
  the unfused add is) and ``rms_norm(s) * (weight + offset)``, returning both. One program per
  row.
* :func:`silu_mul` -- the gated activation ``act(gate) * up`` from the fused gate/up projection's
  output ``[T, 2F]`` (SiLU, or GELU with the tanh approximation for Gemma). Grid
  ``(T, cdiv(F, BLOCK))``.

Arithmetic is float32 inside each kernel with one rounding to the output dtype at the end, so a
fused result can differ from the unfused chain of bf16 operations by the roundings the chain
makes in between (tests/kernels/test_fused.py bounds it); in float32 they agree to a few ulps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import next_pow2
from kernels.triton_launch import FastLaunch

__all__ = ["triton_rope_write_kv", "triton_add_rms_norm", "triton_silu_mul"]


@triton.jit
def _rope_write_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    q_ptr,
    kc_ptr,
    vc_ptr,
    stride_t,
    stride_cos,
    stride_sin,
    stride_cb,
    stride_ct,
    stride_ch,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_D)  # [BLOCK_D] head-dim lanes, >= D
    ok = lanes < D
    rot = lanes < R
    half: tl.constexpr = R // 2
    row = qkv_ptr + t * stride_t + h * D  # query heads, then key heads, side by side
    x = tl.load(row + lanes, mask=ok, other=0.0).to(tl.float32)
    partner = tl.where(lanes < half, lanes + half, lanes - half)
    xp = tl.load(row + partner, mask=rot, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * stride_cos + lanes, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_sin + lanes, mask=rot, other=0.0).to(tl.float32)
    y = tl.where(rot, x * c + tl.where(lanes < half, -xp, xp) * s, x)  # [BLOCK_D]
    if h < HQ:
        tl.store(q_ptr + (t * HQ + h) * D + lanes, y.to(q_ptr.dtype.element_ty), mask=ok)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            kh = h - HQ
            dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_ct + kh * stride_ch
            tl.store(kc_ptr + dst + lanes, y.to(kc_ptr.dtype.element_ty), mask=ok)
            v = tl.load(row + HKV * D + lanes, mask=ok, other=0.0)  # value head kh
            tl.store(vc_ptr + dst + lanes, v.to(vc_ptr.dtype.element_ty), mask=ok)


_ROPE_WRITE = FastLaunch(_rope_write_kernel)


def triton_rope_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) D] (last dim contiguous), cos/sin [T, 1, R] or [T, R], caches
    [N, bs, Hkv, D], slot_mapping [T] -> rotated queries [T, Hq, D] (validated by the caller)."""
    t = qkv.shape[0]
    _, bs, hkv, d = k_cache.shape
    cos2, sin2 = cos.reshape(t, -1), sin.reshape(t, -1)  # [T, R]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    _ROPE_WRITE(
        (t, num_heads + hkv, 1),
        qkv,
        cos2,
        sin2,
        slot_mapping,
        q,
        k_cache,
        v_cache,
        qkv.stride(0),
        cos2.stride(0),
        sin2.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HQ=num_heads,
        HKV=hkv,
        D=d,
        BLOCK_D=next_pow2(d),
        R=cos2.shape[1],
        PAGE=bs,
        num_warps=1 if d <= 128 else 2,
    )
    return q


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    delta_ptr,
    w_ptr,
    sum_ptr,
    out_ptr,
    eps,
    offset,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    x = tl.load(x_ptr + r * H + cols, mask=ok, other=0.0).to(tl.float32)
    dx = tl.load(delta_ptr + r * H + cols, mask=ok, other=0.0).to(tl.float32)
    s = (x + dx).to(sum_ptr.dtype.element_ty)  # the residual, rounded as the unfused add
    tl.store(sum_ptr + r * H + cols, s, mask=ok)
    sf = s.to(tl.float32)
    inv = tl.rsqrt(tl.sum(sf * sf, 0) / H + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32) + offset
    tl.store(out_ptr + r * H + cols, (sf * inv * w).to(out_ptr.dtype.element_ty), mask=ok)


_ADD_RMS_NORM = FastLaunch(_add_rms_norm_kernel)


def triton_add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [T, H] contiguous, weight [H] -> (x + delta, rms_norm(x + delta)), each [T, H]."""
    t, h = x.shape
    total, out = torch.empty_like(x), torch.empty_like(x)
    if t == 0:
        return total, out
    block = next_pow2(h)
    _ADD_RMS_NORM(
        (t, 1, 1),
        x,
        delta,
        weight,
        total,
        out,
        float(eps),
        float(offset),
        H=h,
        BLOCK_H=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return total, out


@triton.jit
def _silu_mul_kernel(
    gu_ptr,
    out_ptr,
    F: tl.constexpr,
    BLOCK: tl.constexpr,
    GELU: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(gu_ptr + r * (2 * F) + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r * (2 * F) + F + cols, mask=ok, other=0.0).to(tl.float32)
    if GELU:  # 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), tanh(y) = 1 - 2 / (e^2y + 1)
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
    else:
        a = g / (1.0 + tl.exp(-g))
    tl.store(out_ptr + r * F + cols, (a * u).to(out_ptr.dtype.element_ty), mask=ok)


_SILU_MUL = FastLaunch(_silu_mul_kernel)


def triton_silu_mul(gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """gate_up [T, 2F] contiguous -> act(gate) * up [T, F] (act: SiLU, or GELU-tanh)."""
    t, two_f = gate_up.shape
    f = two_f // 2
    out = torch.empty(t, f, dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(1024, next_pow2(f))
    _SILU_MUL((t, triton.cdiv(f, block), 1), gate_up, out, F=f, BLOCK=block, GELU=gelu, num_warps=4)
    return out
