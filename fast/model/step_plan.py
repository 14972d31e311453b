"""Validate one CPU decode step once and derive what every layer shares.

The public kernels (``kernels.write_kv``, ``kernels.paged_decode``) validate their inputs on
every call, and on the CPU the value checks read tensor contents. A 30-layer model would run
those checks, and rebuild the same gather indices and masks, 30 times per step. Every layer of
a step sees the same metadata and caches of one shape, so :func:`plan_decode_step` runs the same
checks once, builds the indices once, and the layers call the unchecked torch paths.

Layers may differ in their sliding window (Qwen2, Gemma): one gather plan is built per distinct
window, shared by the layers that have it. A soft-capped model (Gemma 2) gets no plan: the
planned decode is fused SDPA, which has no soft-cap, so its layers run the checked kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fast.model.attention_context import AttentionContext
from fast.model.config import ModelConfig
from kernels.cache_ops import check_write_kv
from kernels.checks import check_decode, check_params
from kernels.torch_attention import DecodePlan, plan_decode


@dataclass(frozen=True)
class DecodeStepPlan:
    """What the layers of one validated CPU decode step share."""

    attend: dict[int | None, DecodePlan]  # sliding window -> gather indices and masks
    keep: torch.Tensor | None  # [T] bool, new tokens with a slot (None: all of them)
    rows: torch.Tensor  # [R] int64, flat cache rows of the kept tokens


def _uniform(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Every layer's pair has layer 0's shape, dtype, device and strides."""
    k0 = kv_caches[0][0]
    shape, dtype, device, stride = k0.shape, k0.dtype, k0.device, k0.stride()
    return all(
        c.shape == shape and c.dtype == dtype and c.device == device and c.stride() == stride
        for pair in kv_caches
        for c in pair
    )


def plan_decode_step(
    config: ModelConfig,
    ctx: AttentionContext,
    dtype: torch.dtype,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
) -> DecodeStepPlan | None:
    """Validate a decode step once; None where the per-layer public kernels must run instead.

    None for prefill steps, non-CPU caches, caches that differ between layers, soft-capped models,
    and activations whose dtype differs from the cache (the public kernels then raise their
    named errors).
    Invalid metadata raises the same named errors as ``kernels.write_kv`` / ``paged_decode``.
    """
    if not ctx.is_decode or not kv_caches or ctx.num_tokens == 0:
        return None
    if config.attn_logit_softcap is not None:
        return None
    k0, v0 = kv_caches[0]
    if k0.device.type != "cpu" or k0.dtype != dtype or not _uniform(kv_caches):
        return None
    t = ctx.num_tokens
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    probe_kv = torch.empty(t, hkv, d, dtype=dtype)  # stands for every layer's k, v [T, Hkv, D]
    check_write_kv(probe_kv, probe_kv, k0, v0, ctx.slot_mapping)
    dims = check_decode(torch.empty(t, hq, d, dtype=dtype), k0, v0, ctx.block_tables, ctx.seq_lens)
    windows = sorted(set(config.layer_windows), key=lambda w: -1 if w is None else w)
    for window in windows:
        check_params(config.attention_scale, window, None)
    slots = ctx.slot_mapping
    kept = slots >= 0  # [T]
    keep, rows = (None, slots.long()) if bool(kept.all()) else (kept, slots[kept].long())
    lens = ctx.seq_lens.long()
    attend = {
        w: plan_decode(ctx.block_tables, lens, dims.num_blocks, dims.block_size, w) for w in windows
    }
    return DecodeStepPlan(attend, keep, rows)
