"""Triton paged-attention kernels, with torch fallbacks used when there is no GPU.

This package deliberately defines no ``__version__``: Hugging Face publishes a distribution whose
import name is also ``kernels``, and transformers probes for that name.
"""

from kernels.attention import paged_decode, paged_prefill
from kernels.cache_ops import copy_blocks, swap_blocks, write_kv
from kernels.errors import KernelInputError

__all__ = [
    "paged_decode",
    "paged_prefill",
    "write_kv",
    "copy_blocks",
    "swap_blocks",
    "KernelInputError",
]
