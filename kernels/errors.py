"""Named exceptions for bad kernel inputs; each carries the offending numbers as attributes.

They all derive from :class:`KernelInputError`, itself a ``PagedKVError`` and a ``ValueError``, so
callers can catch
one family. The message always names the argument and the numbers that were wrong.
"""

from __future__ import annotations

from spec.errors import PagedKVError

__all__ = [
    "KernelInputError",
    "DTypeMismatchError",
    "UnsupportedDTypeError",
    "PageSizeError",
    "HeadDimError",
    "GQARatioError",
    "ShapeMismatchError",
    "DeviceMismatchError",
    "IndexOutOfRangeError",
    "BackendUnavailableError",
    "Fp8UnsupportedError",
]


class KernelInputError(PagedKVError, ValueError):
    """Base class: an argument handed to a kernel is invalid (a
    :class:`spec.errors.PagedKVError`)."""


class DTypeMismatchError(KernelInputError):
    """Two tensors that must share a dtype do not."""

    def __init__(self, name: str, dtype: str, expected: str) -> None:
        self.name, self.dtype, self.expected = name, dtype, expected
        super().__init__(f"{name} has dtype {dtype}, expected {expected}")


class UnsupportedDTypeError(KernelInputError):
    """A tensor's dtype is not one the chosen backend supports."""

    def __init__(self, name: str, dtype: str, supported: tuple[str, ...]) -> None:
        self.name, self.dtype, self.supported = name, dtype, supported
        super().__init__(f"{name} has dtype {dtype}; supported: {', '.join(supported)}")


class PageSizeError(KernelInputError):
    """The cache's page (block) size is outside what the backend supports."""

    def __init__(self, block_size: int, allowed: str) -> None:
        self.block_size, self.allowed = block_size, allowed
        super().__init__(f"block_size {block_size} is not supported: must be {allowed}")


class HeadDimError(KernelInputError):
    """The head dimension is not one the backend supports, or differs between tensors."""

    def __init__(self, head_dim: int, allowed: str) -> None:
        self.head_dim, self.allowed = head_dim, allowed
        super().__init__(f"head_dim {head_dim} is not supported: must be {allowed}")


class GQARatioError(KernelInputError):
    """The number of query heads is not a multiple of the number of KV heads."""

    def __init__(self, num_q_heads: int, num_kv_heads: int) -> None:
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        super().__init__(
            f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )


class ShapeMismatchError(KernelInputError):
    """A tensor's shape does not fit the others."""

    def __init__(self, name: str, shape: tuple[int, ...], expected: str) -> None:
        self.name, self.shape, self.expected = name, shape, expected
        super().__init__(f"{name} has shape {shape}, expected {expected}")


class DeviceMismatchError(KernelInputError):
    """Tensors that must live on one device do not."""

    def __init__(self, name: str, device: str, expected: str) -> None:
        self.name, self.device, self.expected = name, device, expected
        super().__init__(f"{name} is on {device}, expected {expected}")


class IndexOutOfRangeError(KernelInputError):
    """A length, slot or block id lies outside its valid range."""

    def __init__(self, name: str, value: int, low: int, high: int) -> None:
        self.name, self.value, self.low, self.high = name, value, low, high
        super().__init__(f"{name} holds {value}, outside the valid range [{low}, {high}]")


class BackendUnavailableError(KernelInputError):
    """The requested backend cannot run on these tensors (e.g. Triton on CPU without the
    interpreter)."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend, self.reason = backend, reason
        super().__init__(f"backend {backend!r} is unavailable: {reason}")


class Fp8UnsupportedError(KernelInputError):
    """An fp8 KV cache on hardware or a backend that cannot run it; names what is missing."""

    def __init__(self, what: str, needed: str, found: str) -> None:
        self.what, self.needed, self.found = what, needed, found
        super().__init__(f"{what} needs {needed}; found {found}")
