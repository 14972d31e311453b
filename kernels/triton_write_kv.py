# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton write of new tokens' K/V into the paged cache: one program per token.

Program ``t`` reads ``slot_mapping[t]``; slot -1 (padding) writes nothing. Otherwise the token's
``[Hkv, D]`` rows go to block ``slot // PAGE``, row ``slot % PAGE``; the offset is int64.

Into an fp8 cache the program stores ``Q(x / s_h)`` exactly as ``spec.kv_quant`` defines it
(the exact quotient saturated to ``±M`` and rounded to the grid, half to even), bit for bit:
``y = x / s_h`` in float32, saturated (infinities too; NaN stays NaN), and rounded with exact
arithmetic: the grid spacing at ``|y|`` is the power of two ``2^(max(e, e_min) - m)`` (``e`` read
from the float32 exponent bits), ``|y| / spacing`` is exact, and adding and subtracting ``2^23``
rounds it to an integer, half to even. Where the float32 quotient lands exactly on a midpoint of
the grid that the exact quotient only approaches (``8.75 / fp32(0.7)`` is ``12.5`` in float32,
``12.50000021`` exactly), the sign of the exact residual ``x - y s_h`` (float64) breaks the tie.
The result is a value of the fp8 format, so the final conversion is exact on every device;
Triton's own float32 -> fp8 rounding is not relied on (its CPU interpreter rounds 7.99 to 4 in
e4m3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import KernelInputError
from kernels.fp8 import FP8_DTYPES
from kernels.triton_common import next_pow2
from kernels.triton_launch import FastLaunch
from spec.kv_quant import FP8_FORMATS

__all__ = ["triton_write_kv"]


@triton.jit
def _quantize(x, s, MANT: tl.constexpr, EMIN: tl.constexpr, FMAX: tl.constexpr):
    """x [N] (any float) / s [N] float32 rounded to the fp8 grid, as float32 (module docstring)."""
    y = x.to(tl.float32) / s  # correctly rounded float32 quotient
    # exact residual: y * s has at most 48 significant bits, so this float64 difference is exact
    rem = x.to(tl.float64) - y.to(tl.float64) * s.to(tl.float64)
    a = tl.minimum(tl.abs(y), FMAX, propagate_nan=tl.PropagateNan.ALL)
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127  # floor(log2 a); -127 for 0 and fp32 subnormals
    e = tl.maximum(e, EMIN)
    spacing = ((e - MANT + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - MANT)
    t = a / spacing  # exact, < 2^(MANT + 1) + 1
    r = (t + 8388608.0) - 8388608.0  # rint(t), half to even
    # y itself may sit on a midpoint the exact quotient x / s only approaches: break the tie
    # toward the exact quotient (|x / s| > |y| iff the residual has y's sign)
    tie = (tl.abs(t - r) == 0.5) & (rem != 0.0)
    up = (rem > 0.0) == (y > 0.0)
    r = tl.where(tie, tl.where(up, t + 0.5, t - 0.5), r) * spacing
    sign = (y.to(tl.int32, bitcast=True) >> 31) << 31  # the sign bit of y
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    ks_ptr,
    vs_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HD_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    FP8: tl.constexpr,
    MANT: tl.constexpr,
    EMIN: tl.constexpr,
    FMAX: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        i = tl.arange(0, HD_PAD)  # flattened (head, dim)
        ok = i < HKV * D
        h = (i // D).to(tl.int64)
        d = i % D
        tt = t.to(tl.int64)
        k = tl.load(k_ptr + tt * stride_kt + h * stride_kh + d, mask=ok)
        v = tl.load(v_ptr + tt * stride_vt + h * stride_vh + d, mask=ok)
        if FP8:
            ks = tl.load(ks_ptr + h, mask=ok, other=1.0)  # [HD_PAD] the lane's head scale
            vs = tl.load(vs_ptr + h, mask=ok, other=1.0)
            k = _quantize(k, ks, MANT, EMIN, FMAX)
            v = _quantize(v, vs, MANT, EMIN, FMAX)
        k = k.to(kc_ptr.dtype.element_ty)
        v = v.to(vc_ptr.dtype.element_ty)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_ct + h * stride_ch + d
        tl.store(kc_ptr + dst, k, mask=ok)
        tl.store(vc_ptr + dst, v, mask=ok)


_WRITE_KV = FastLaunch(_write_kv_kernel)


def triton_write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k, v [T, Hkv, D] -> caches [num_blocks, bs, Hkv, D] at slot_mapping [T] (validated).

    An fp8 cache needs ``k_scale``, ``v_scale`` [Hkv] float32 on the cache's device."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _, bs, hkv, d = k_cache.shape
    fmt = FP8_FORMATS[FP8_DTYPES[k_cache.dtype]] if k_cache.dtype in FP8_DTYPES else None
    if fmt is not None and (k_scale is None or v_scale is None):
        raise KernelInputError("an fp8 cache needs k_scale and v_scale ([Hkv] float32)")
    _WRITE_KV(
        (k.shape[0], 1, 1),
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if k_scale is not None else slot_mapping,
        v_scale if v_scale is not None else slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HKV=hkv,
        D=d,
        HD_PAD=next_pow2(hkv * d),
        PAGE=bs,
        FP8=fmt is not None,
        MANT=fmt.mantissa_bits if fmt else 0,
        EMIN=fmt.min_exponent if fmt else 0,
        FMAX=fmt.max_value if fmt else 0.0,
        num_warps=4,
    )
