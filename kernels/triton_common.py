"""What the Triton kernels share: supported sizes and the dot-product configuration."""

from __future__ import annotations

import torch

from kernels.backend import interpreting
from kernels.checks import AttentionDims
from kernels.errors import HeadDimError, PageSizeError, ShapeMismatchError, UnsupportedDTypeError

__all__ = [
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "check_triton_dims",
    "check_inner_contiguous",
    "dot_config",
    "next_pow2",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (64, 128, 256)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def check_triton_dims(dims: AttentionDims, dtype: torch.dtype) -> None:
    """Page size a power of two in [8, 256]; head dim 64, 128 or 256; fp16, bf16 or fp32."""
    bs = dims.block_size
    if bs < 8 or bs > 256 or bs & (bs - 1):
        raise PageSizeError(bs, "a power of two in [8, 256] for the Triton kernels")
    if dims.head_dim not in TRITON_HEAD_DIMS:
        raise HeadDimError(dims.head_dim, "64, 128 or 256 for the Triton kernels")
    if dtype not in TRITON_DTYPES:
        raise UnsupportedDTypeError("q", str(dtype), ("float16", "bfloat16", "float32"))


def dot_config(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast-before-dot) for a dtype.

    float32 uses IEEE products ("ieee"), not TF32, so the 1e-5 bound holds. Triton's CPU
    interpreter computes bfloat16 dots wrongly (numpy has no bfloat16), so under the interpreter
    bfloat16 operands are widened to float32 first; the values are unchanged (bf16 -> fp32 is
    exact), only the accumulation gets more precise.
    """
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return precision, interpreting() and dtype == torch.bfloat16


def check_inner_contiguous(cache: torch.Tensor) -> None:
    """The Triton kernels index ``[block, row, head, dim]`` with the inner three dimensions
    packed; only the block stride may be arbitrary (a pool may be a view of a larger tensor)."""
    _, bs, hkv, d = cache.shape
    if cache.stride()[1:] != (hkv * d, d, 1):
        raise ShapeMismatchError(
            "k_cache strides", tuple(cache.stride()), f"(any, {hkv * d}, {d}, 1) for Triton"
        )
