# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton write of new tokens' K/V into the paged cache: one program per token.

Program ``t`` reads ``slot_mapping[t]``; slot -1 (padding) writes nothing. Otherwise the token's
``[Hkv, D]`` rows go to block ``slot // PAGE``, row ``slot % PAGE``; the offset is int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import next_pow2

__all__ = ["triton_write_kv"]


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
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
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_ct + h * stride_ch + d
        tl.store(kc_ptr + dst, k, mask=ok)
        tl.store(vc_ptr + dst, v, mask=ok)


def triton_write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D] -> caches [num_blocks, bs, Hkv, D] at slot_mapping [T] (validated)."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _, bs, hkv, d = k_cache.shape
    _write_kv_kernel[(k.shape[0],)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
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
        num_warps=4,
    )
