"""What the Triton kernels share: supported sizes and the dot-product configuration."""

from __future__ import annotations

import torch

from kernels.backend import interpreting
from kernels.checks import AttentionDims
from kernels.errors import HeadDimError, PageSizeError, ShapeMismatchError, UnsupportedDTypeError

__all__ = [
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "TRITON_PAGE_SIZES",
    "check_triton_dims",
    "check_inner_contiguous",
    "dot_config",
    "next_pow2",
    "padded_head_dim",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Every multiple of 16 from 32 to 256. Dims that are not powers of two run padded to the next one
#: (``padded_head_dim``) with the padding lanes masked off.
TRITON_HEAD_DIMS = tuple(range(32, 257, 16))
#: Powers of two from 1 to 256 (a tile of keys may span many pages; page 1 is one key per page).
TRITON_PAGE_SIZES = tuple(1 << i for i in range(9))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
    """The kernels' tile width over the head dim: the next power of two (``tl.arange`` needs one).

    >>> [padded_head_dim(d) for d in (32, 48, 80, 128, 160, 256)]
    [32, 64, 128, 128, 256, 256]
    """
    return next_pow2(head_dim)


def check_triton_dims(dims: AttentionDims, dtype: torch.dtype) -> None:
    """Page size a power of two in [1, 256]; head dim a multiple of 16 in [32, 256]; fp16, bf16
    or fp32."""
    if dims.block_size not in TRITON_PAGE_SIZES:
        raise PageSizeError(
            dims.block_size,
            "a power of two in [1, 256] for the Triton kernels (1, 2, 4, ..., 256)",
        )
    if dims.head_dim not in TRITON_HEAD_DIMS:
        raise HeadDimError(
            dims.head_dim,
            "a multiple of 16 in [32, 256] for the Triton kernels "
            f"({', '.join(map(str, TRITON_HEAD_DIMS))})",
        )
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
