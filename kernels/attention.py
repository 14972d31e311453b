"""Public paged-attention entry points: validate, pick a backend, run, fill ``out``."""

from __future__ import annotations

import torch

from kernels.backend import resolve_backend
from kernels.checks import check_decode, check_out, check_params, check_prefill
from kernels.fp8 import check_fp8_triton, check_scales, is_fp8, scale_tensor
from kernels.torch_attention import dequantized_view, torch_paged_decode, torch_paged_prefill

__all__ = ["paged_decode", "paged_prefill"]


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float | torch.Tensor = 1.0,
    v_scale: float | torch.Tensor = 1.0,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one new query per sequence over its paged K/V.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, bs, Hkv, D]; block_tables [B, W] int32;
    seq_lens [B] int32 (keys of sequence b, the query's own included) -> [B, Hq, D].
    ``num_splits`` fixes the split-K factor of the Triton kernel (None: chosen to fill the GPU).
    An fp8 cache is dequantized on load, ``code * k_scale`` (``v_scale``): numbers or ``[Hkv]``
    float32 tensors on the cache's device; other caches take only the scale 1.0.

    >>> import torch
    >>> k = torch.randn(4, 8, 2, 64); v = torch.randn(4, 8, 2, 64)
    >>> q = torch.randn(1, 4, 64)
    >>> bt = torch.tensor([[3, 1]], dtype=torch.int32); lens = torch.tensor([11], dtype=torch.int32)
    >>> paged_decode(q, k, v, bt, lens, scale=0.125).shape
    torch.Size([1, 4, 64])
    """
    dims = check_decode(q, k_cache, v_cache, block_tables, seq_lens)
    check_params(scale, sliding_window, softcap)
    check_scales(k_cache, k_scale, v_scale)
    if out is not None:
        check_out(out, q)
    use_triton = resolve_backend(backend, q.device) == "triton"
    scales = None
    if is_fp8(k_cache.dtype):
        if use_triton:
            check_fp8_triton(q.device)
        scales = (
            scale_tensor(k_scale, dims.num_kv_heads, q.device, "k_scale"),  # [Hkv] float32
            scale_tensor(v_scale, dims.num_kv_heads, q.device, "v_scale"),
        )
    if use_triton:
        from kernels.triton_decode import triton_paged_decode

        return triton_paged_decode(
            q,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            dims,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            num_splits=num_splits,
            out=out,
            kv_scales=scales,
        )
    if scales is not None:
        k_cache, v_cache, block_tables = dequantized_view(
            q, k_cache, v_cache, block_tables, seq_lens, *scales
        )
    result = torch_paged_decode(
        q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap
    )
    if out is None:
        return result
    out.copy_(result)
    return out


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float | torch.Tensor = 1.0,
    v_scale: float | torch.Tensor = 1.0,
    max_seqlen_q: int | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of new (prefill or chunked-prefill) tokens after a cached prefix.

    q [T, Hq, D] packed by cu_seqlens_q [B+1]; seq_lens [B] = cached + new keys; the new K/V are
    already in the cache; query i of sequence b sits at position seq_lens[b] - q_len_b + i
    (bottom-right causal). ``max_seqlen_q`` is accepted for API compatibility; the Triton
    kernel derives its tiles on the device. ``k_scale``, ``v_scale`` dequantize an fp8 cache as
    in :func:`paged_decode`. -> [T, Hq, D]
    """
    dims = check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    check_params(scale, sliding_window, softcap)
    check_scales(k_cache, k_scale, v_scale)
    if out is not None:
        check_out(out, q)
    use_triton = resolve_backend(backend, q.device) == "triton"
    scales = None
    if is_fp8(k_cache.dtype):
        if use_triton:
            check_fp8_triton(q.device)
        scales = (
            scale_tensor(k_scale, dims.num_kv_heads, q.device, "k_scale"),  # [Hkv] float32
            scale_tensor(v_scale, dims.num_kv_heads, q.device, "v_scale"),
        )
    if use_triton:
        from kernels.triton_prefill import triton_paged_prefill

        return triton_paged_prefill(
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_seqlens_q,
            seq_lens,
            dims,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            out=out,
            kv_scales=scales,
        )
    if scales is not None:
        k_cache, v_cache, block_tables = dequantized_view(
            q, k_cache, v_cache, block_tables, seq_lens, *scales
        )
    result = torch_paged_prefill(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, sliding_window, softcap
    )
    if out is None:
        return result
    out.copy_(result)
    return out
