"""Writing new tokens into the paged cache, copy-on-write block copies, and swapping blocks.

Cache layout: ``[num_blocks, block_size, num_kv_heads, head_dim]``; slot ``s`` is row
``s % block_size`` of block ``s // block_size``; slot -1 marks padding and is skipped.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.backend import resolve_backend
from kernels.checks import FLOAT_DTYPES, check_cache_pair
from kernels.errors import (
    DTypeMismatchError,
    IndexOutOfRangeError,
    ShapeMismatchError,
    UnsupportedDTypeError,
)
from kernels.fp8 import check_fp8_triton, check_kv_cache_dtype, check_scales, is_fp8, scale_tensor
from kernels.fp8 import quantize as fp8_quantize

__all__ = [
    "write_kv",
    "check_write_kv",
    "write_rows",
    "copy_blocks",
    "swap_blocks",
    "as_pairs",
    "as_bytes",
]


def as_pairs(pairs: Any, device: torch.device, name: str = "pairs") -> torch.Tensor:
    """A ``[N, 2]`` int64 tensor on ``device`` from a tensor, numpy array or list of pairs."""
    t = torch.as_tensor(pairs, dtype=torch.int64)
    if t.numel() == 0:
        return torch.empty(0, 2, dtype=torch.int64, device=device)
    if t.dim() != 2 or t.shape[1] != 2:
        raise ShapeMismatchError(name, tuple(t.shape), "[N, 2]")
    return t.to(device)


def _check_ids(name: str, ids: torch.Tensor, high: int) -> None:
    if ids.device.type == "cpu" and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= high:
            raise IndexOutOfRangeError(name, lo if lo < 0 else hi, 0, high - 1)


def check_write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The validation of :func:`write_kv` (shapes, dtypes, slots within the cache or -1)."""
    check_cache_pair(k_cache, v_cache)
    nb, bs, hkv, d = k_cache.shape
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or tuple(x.shape[1:]) != (hkv, d):
            raise ShapeMismatchError(name, tuple(x.shape), f"[T, {hkv}, {d}]")
        if x.dtype != k_cache.dtype and not (is_fp8(k_cache.dtype) and x.dtype in FLOAT_DTYPES):
            raise DTypeMismatchError(name, str(x.dtype), str(k_cache.dtype))
    if v.shape != k.shape:
        raise ShapeMismatchError("v", tuple(v.shape), f"{tuple(k.shape)} as k")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise UnsupportedDTypeError("slot_mapping", str(slot_mapping.dtype), ("int64", "int32"))
    if slot_mapping.shape != (k.shape[0],):
        raise ShapeMismatchError("slot_mapping", tuple(slot_mapping.shape), f"[{k.shape[0]}]")
    if slot_mapping.device.type == "cpu" and slot_mapping.numel():
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= nb * bs:
            raise IndexOutOfRangeError("slot_mapping", lo if lo < -1 else hi, -1, nb * bs - 1)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    kv_cache_dtype: str = "auto",
    k_scale: float | torch.Tensor = 1.0,
    v_scale: float | torch.Tensor = 1.0,
    backend: str = "auto",
) -> None:
    """Store the K/V of ``T`` new tokens at their slots; slot -1 is skipped.

    k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, bs, Hkv, D]; slot_mapping [T] (int64).
    An fp8 cache (``torch.float8_e4m3fn`` / ``float8_e5m2``) stores ``k / k_scale`` saturated to
    the format's range and rounded to nearest even (``spec.kv_quant.quantize``); ``k_scale``,
    ``v_scale`` are numbers or ``[Hkv]`` float32 tensors on the cache's device.
    ``kv_cache_dtype`` (vLLM's names) must name the cache's dtype or be ``"auto"``.
    """
    check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    check_kv_cache_dtype(kv_cache_dtype, k_cache)
    check_scales(k_cache, k_scale, v_scale)
    fp8 = is_fp8(k_cache.dtype)
    use_triton = resolve_backend(backend, k_cache.device) == "triton"
    if fp8:
        if use_triton:
            check_fp8_triton(k_cache.device)
        hkv, dev = k_cache.shape[2], k_cache.device
        ks = scale_tensor(k_scale, hkv, dev, "k_scale")  # [Hkv] float32
        vs = scale_tensor(v_scale, hkv, dev, "v_scale")
    if k.shape[0] == 0:
        return
    if use_triton:
        from kernels.triton_write_kv import triton_write_kv

        if fp8:
            triton_write_kv(k, v, k_cache, v_cache, slot_mapping, ks, vs)
        else:
            triton_write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    keep = slot_mapping >= 0
    k, v = k[keep], v[keep]
    if fp8:
        k, v = fp8_quantize(k, ks, k_cache.dtype), fp8_quantize(v, vs, k_cache.dtype)
    write_rows(k, v, k_cache, v_cache, slot_mapping[keep].long())


def write_rows(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Unchecked torch store: k, v [R, Hkv, D] at flat cache rows ``rows [R]`` int64 (all valid).

    For callers that validated the step once with :func:`check_write_kv`.
    """
    nb, bs, hkv, d = k_cache.shape
    k_cache, v_cache, k, v = as_bytes(k_cache), as_bytes(v_cache), as_bytes(k), as_bytes(v)
    k_cache.view(nb * bs, hkv, d).index_copy_(0, rows, k)
    v_cache.view(nb * bs, hkv, d).index_copy_(0, rows, v)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes (uint8 view, same shape): torch's CPU ``index_copy_`` has no
    fp8 kernel, and a block moved as bytes is unchanged by construction."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, pairs: Any) -> None:
    """Copy whole blocks ``src -> dst`` for each row ``(src, dst)`` of ``pairs [N, 2]``.

    All sources are read before any destination is written (copy-on-write pairs never chain).
    """
    check_cache_pair(k_cache, v_cache)
    p = as_pairs(pairs, k_cache.device)
    if p.shape[0] == 0:
        return
    _check_ids("pairs", p, k_cache.shape[0])
    src, dst = p[:, 0], p[:, 1]
    for cache in (as_bytes(k_cache), as_bytes(v_cache)):
        cache.index_copy_(0, dst, cache.index_select(0, src))


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, mapping: Any) -> None:
    """Copy blocks between pools (GPU <-> pinned CPU): ``dst[m[:,1]] = src[m[:,0]]``.

    src_cache [Ns, bs, Hkv, D], dst_cache [Nd, bs, Hkv, D] (any devices), mapping [N, 2]
    """
    if src_cache.shape[1:] != dst_cache.shape[1:] or src_cache.dim() != 4:
        raise ShapeMismatchError(
            "dst_cache", tuple(dst_cache.shape), f"[N, {', '.join(map(str, src_cache.shape[1:]))}]"
        )
    if src_cache.dtype != dst_cache.dtype:
        raise DTypeMismatchError("dst_cache", str(dst_cache.dtype), str(src_cache.dtype))
    m = as_pairs(mapping, torch.device("cpu"), "mapping")
    if m.shape[0] == 0:
        return
    _check_ids("mapping[:, 0]", m[:, 0], src_cache.shape[0])
    _check_ids("mapping[:, 1]", m[:, 1], dst_cache.shape[0])
    src_cache, dst_cache = as_bytes(src_cache), as_bytes(dst_cache)
    src_idx = m[:, 0].to(src_cache.device, non_blocking=True)
    dst_idx = m[:, 1].to(dst_cache.device, non_blocking=True)
    moved = src_cache.index_select(0, src_idx).to(dst_cache.device, non_blocking=True)
    dst_cache.index_copy_(0, dst_idx, moved)
