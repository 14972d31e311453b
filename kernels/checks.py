"""Input validation shared by every backend: shapes, dtypes, devices and (on CPU) values.

Value checks (lengths, block ids, slots) read tensor contents. On a CUDA device that would force a
host synchronisation on every call, so they run only for CPU tensors; shape, dtype and device
checks run always.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.errors import (
    DeviceMismatchError,
    DTypeMismatchError,
    GQARatioError,
    IndexOutOfRangeError,
    KernelInputError,
    ShapeMismatchError,
    UnsupportedDTypeError,
)
from kernels.fp8 import FP8_DTYPES

__all__ = [
    "AttentionDims",
    "FLOAT_DTYPES",
    "check_attention_inputs",
    "check_decode",
    "check_prefill",
    "check_out",
    "check_cache_pair",
    "check_params",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: What a cache may hold: the float dtypes, and fp8 (kernels.fp8) read with q of a float dtype.
CACHE_DTYPES = FLOAT_DTYPES + tuple(FP8_DTYPES)
_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class AttentionDims:
    """The sizes an attention call works with, read off its tensors."""

    num_tokens: int  # B for decode, T for prefill
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    batch: int
    max_blocks: int  # W, the block table's width

    @property
    def group(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.num_q_heads // self.num_kv_heads


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _same_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise DeviceMismatchError(name, str(t.device), str(ref.device))


def _index_tensor(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise UnsupportedDTypeError(name, _dt(t), ("int32", "int64"))
    if len(t.shape) != ndim:
        raise ShapeMismatchError(name, tuple(t.shape), f"{ndim} dimensions")


def check_cache_pair(
    k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches: ``[num_blocks, block_size, num_kv_heads, head_dim]``, same shape/dtype.

    The dtype is a float dtype or an fp8 one (``torch.float8_e4m3fn``, ``torch.float8_e5m2``).

    Returns the pair unchanged (as ``spec.kv_cache.check_cache_pair`` returns its validated
    arrays)."""
    shape = k_cache.shape  # each tensor attribute read once: these checks run on every call
    if len(shape) != 4:
        raise ShapeMismatchError(
            "k_cache", tuple(shape), "[num_blocks, block_size, num_kv_heads, head_dim]"
        )
    if v_cache.shape != shape:
        raise ShapeMismatchError("v_cache", tuple(v_cache.shape), f"{tuple(shape)}")
    dtype = k_cache.dtype
    if v_cache.dtype != dtype:
        raise DTypeMismatchError("v_cache", _dt(v_cache), _dt(k_cache))
    _same_device("v_cache", v_cache, k_cache)
    if dtype not in CACHE_DTYPES:
        raise UnsupportedDTypeError("k_cache", _dt(k_cache), tuple(map(str, CACHE_DTYPES)))
    stride = k_cache.stride()
    if stride != v_cache.stride() or stride[-1] != 1:
        raise ShapeMismatchError(
            "k_cache/v_cache strides", tuple(stride), "equal, last dimension contiguous"
        )
    return k_cache, v_cache


def check_params(scale: float, sliding_window: int | None, softcap: float | None) -> None:
    """Scale finite; window >= 1; soft-cap > 0."""
    if not (scale == scale and abs(scale) != float("inf")):
        raise KernelInputError(f"scale must be finite, got {scale}")
    if sliding_window is not None and sliding_window < 1:
        raise IndexOutOfRangeError("sliding_window", sliding_window, 1, 2**31 - 1)
    if softcap is not None and not softcap > 0:
        raise KernelInputError(f"softcap must be > 0, got {softcap}")


def check_attention_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> AttentionDims:
    """Checks shared by decode and prefill; returns the dimensions."""
    check_cache_pair(k_cache, v_cache)
    q_shape, cache_dtype, device = q.shape, k_cache.dtype, q.device
    if len(q_shape) != 3:
        raise ShapeMismatchError("q", tuple(q_shape), "[tokens, num_q_heads, head_dim]")
    if q.dtype != cache_dtype and not (cache_dtype in FP8_DTYPES and q.dtype in FLOAT_DTYPES):
        raise DTypeMismatchError("q", _dt(q), _dt(k_cache))
    for name, t in (("k_cache", k_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != device:
            raise DeviceMismatchError(name, str(t.device), str(device))
    num_blocks, block_size, hkv, d = k_cache.shape
    if q_shape[2] != d:
        raise ShapeMismatchError("q", tuple(q_shape), f"head_dim {d} as in k_cache")
    hq = q_shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise GQARatioError(hq, hkv)
    _index_tensor("block_tables", block_tables, 2)
    _index_tensor("seq_lens", seq_lens, 1)
    batch = seq_lens.shape[0]
    tables_shape = block_tables.shape
    if tables_shape[0] != batch:
        raise ShapeMismatchError("block_tables", tuple(tables_shape), f"[{batch}, W]")
    width = tables_shape[1]
    if device.type == "cpu" and batch > 0:
        lens_max, lens_min = int(seq_lens.max()), int(seq_lens.min())
        cap = width * block_size
        if lens_min < 0 or lens_max > cap:
            bad = lens_min if lens_min < 0 else lens_max
            raise IndexOutOfRangeError("seq_lens", bad, 0, cap)
        used = (torch.arange(width) * block_size)[None, :] < seq_lens[:, None].long()
        ids = block_tables[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise IndexOutOfRangeError("block_tables", bad, 0, num_blocks - 1)
    return AttentionDims(q_shape[0], hq, hkv, d, num_blocks, block_size, batch, width)


def check_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> AttentionDims:
    """Decode: one query per sequence, ``q [B, Hq, D]``."""
    dims = check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    if dims.num_tokens != dims.batch:
        raise ShapeMismatchError("q", tuple(q.shape), f"[{dims.batch}, Hq, D] (one per sequence)")
    return dims


def check_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
) -> AttentionDims:
    """Prefill: ``q [T, Hq, D]`` packed by ``cu_seqlens_q [B+1]``; each q_len <= seq_len."""
    dims = check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    _index_tensor("cu_seqlens_q", cu_seqlens_q, 1)
    _same_device("cu_seqlens_q", cu_seqlens_q, q)
    if cu_seqlens_q.shape[0] != dims.batch + 1:
        raise ShapeMismatchError("cu_seqlens_q", tuple(cu_seqlens_q.shape), f"[{dims.batch + 1}]")
    if q.device.type == "cpu":
        cu = cu_seqlens_q.long()
        if int(cu[0]) != 0 or int(cu[-1]) != dims.num_tokens:
            raise ShapeMismatchError(
                "cu_seqlens_q", tuple(cu.tolist()), f"starting at 0, ending at T={dims.num_tokens}"
            )
        q_lens = cu[1:] - cu[:-1]
        if dims.batch and int(q_lens.min()) < 0:
            raise IndexOutOfRangeError("cu_seqlens_q step", int(q_lens.min()), 0, dims.num_tokens)
        over = q_lens - seq_lens.long()
        if dims.batch and int(over.max()) > 0:
            b = int(over.argmax())
            raise IndexOutOfRangeError("q_len", int(q_lens[b]), 0, int(seq_lens[b]))
    return dims


def check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    """``out`` must match ``q`` in shape, dtype and device."""
    if out.shape != q.shape:
        raise ShapeMismatchError("out", tuple(out.shape), f"{tuple(q.shape)}")
    if out.dtype != q.dtype:
        raise DTypeMismatchError("out", _dt(out), _dt(q))
    _same_device("out", out, q)
