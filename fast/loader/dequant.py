"""Dequantization of GGUF tensors by the ``gguf`` package (llama.cpp's Python reference).

Every ggml type that ``gguf.quants.dequantize`` implements is accepted: the plain ``F32``,
``F16`` and ``BF16``, the 32-element block types (``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``,
``Q8_0``, ``IQ4_NL``, ``MXFP4``), the 256-element K-quants (``Q2_K`` to ``Q6_K``) and the
i-quants and ternary types. :func:`supported_types` lists them as the installed package has
them; a tensor of any other type (``Q8_1``, ``Q8_K``, the integer types) raises
:class:`UnsupportedQuantizationError` naming it and the supported ones.

The package's dequantizers are run on slices of :data:`CHUNK_ELEMENTS` elements written
straight into the destination, which keeps the temporaries small and cache-resident: 3x to 4x
faster than one call per tensor, and 1.5x slower than the hand-written numpy of Q4_0, Q4_1 and
Q8_0 it replaced (on SmolLM2-135M's file; ``docs/model-files.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30  # ggml type ids
CHUNK_ELEMENTS = 1 << 18  # elements dequantized per call of the package


class UnsupportedQuantizationError(ValueError):
    """A GGUF tensor uses a ggml type this loader does not dequantize."""

    def __init__(self, name: str, type_id: int) -> None:
        super().__init__(
            f"tensor {name!r} has ggml type {type_name(type_id)} ({type_id}), which cannot be "
            f"dequantized; supported: {', '.join(supported_types().values())}"
        )
        self.name, self.type_id = name, type_id


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # a dependency of pagedkv; an environment may still lack it
        raise ImportError(
            f"reading GGUF files needs the gguf package: pip install gguf ({e})"
        ) from e
    return gguf


def type_name(type_id: int) -> str:
    """ggml's name of a type id, or ``"unknown"``.

    >>> type_name(12), type_name(999)
    ('Q4_K', 'unknown')
    """
    try:
        return str(_gguf().GGMLQuantizationType(type_id).name)
    except ValueError:
        return "unknown"


def block_size(type_id: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type; KeyError for an unknown id.

    >>> block_size(Q4_K), block_size(F32)
    ((256, 144), (1, 4))
    """
    gguf = _gguf()
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise KeyError(type_id) from None
    elements, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    return int(elements), int(nbytes)


@functools.cache
def supported_types() -> dict[int, str]:
    """Type id -> name of every ggml type the installed ``gguf`` package dequantizes.

    Found by asking the package to dequantize one zero block of each type it knows:

    >>> names = supported_types().values()
    >>> {"F32", "F16", "BF16", "Q4_0", "Q8_0", "Q2_K", "Q4_K", "Q6_K"} <= set(names)
    True
    >>> "Q8_K" in names, "Q8_1" in names
    (False, False)
    """
    gguf = _gguf()
    out = {}
    for qtype in gguf.GGMLQuantizationType:
        nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
        try:
            gguf.quants.dequantize(np.zeros(nbytes, dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        out[int(qtype)] = str(qtype.name)
    return out


def dequantize(
    data: NDArray[np.generic],
    type_id: int,
    shape: Sequence[int],
    name: str = "?",
    out: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Raw GGUF tensor data -> float32 array of ``shape`` (numpy order).

    With ``out`` (a C-contiguous float32 array of ``shape``), the values are written there
    and ``out`` is returned, sparing a temporary the size of the tensor.

    One Q4_1 block by hand: scale 0.5, minimum -1, the nibbles 0..15 in the low halves
    (elements 0-15) and 15..0 in the high halves (elements 16-31):

    >>> d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    >>> q = np.arange(16, dtype=np.uint8)
    >>> block = np.frombuffer(d + m + (q | (15 - q) << 4).tobytes(), dtype=np.uint8)
    >>> len(block), block_size(Q4_1)
    (20, (32, 20))
    >>> x = dequantize(block, Q4_1, (32,))
    >>> x[:4].tolist(), x[14:18].tolist(), x[-2:].tolist()
    ([-1.0, -0.5, 0.0, 0.5], [6.0, 6.5, 6.5, 6.0], [-0.5, -1.0])
    """
    if type_id not in supported_types():
        raise UnsupportedQuantizationError(name, type_id)
    shape = tuple(int(s) for s in shape)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(
            f"tensor {name!r}: out must be C-contiguous float32 {shape}, "
            f"got {out.dtype} {out.shape}"
        )
    elements, nbytes = block_size(type_id)
    row = shape[-1] if shape else 1
    if row % elements:
        raise ValueError(
            f"tensor {name!r}: rows of {row} elements are not a multiple of the "
            f"{elements}-element blocks of {type_name(type_id)}"
        )
    count = int(np.prod(shape))
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != count // elements * nbytes:
        raise ValueError(
            f"tensor {name!r}: {raw.size} bytes of {type_name(type_id)} data, "
            f"expected {count // elements * nbytes} for shape {shape}"
        )
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(type_id)
    flat = out.reshape(-1)
    per = max(1, CHUNK_ELEMENTS // elements)  # blocks per call
    for first in range(0, count // elements, per):
        last = min(count // elements, first + per)
        flat[first * elements : last * elements] = gguf.quants.dequantize(
            raw[first * nbytes : last * nbytes], qtype
        )
    return out


def unpermute_qk(weight: NDArray[np.float32], num_heads: int) -> NDArray[np.float32]:
    """Undo llama.cpp's Q/K row permutation: [rows, ...] -> [rows, ...].

    llama.cpp stores each head's rotary pairs interleaved (``x0, x_{D/2}, x1, ...``) where
    Hugging Face keeps the halves apart; per head, rows ``(2, D/2)`` were swapped to
    ``(D/2, 2)``. This swaps them back. ``permute_qk`` is its inverse.

    One head of width 8 (a column of row numbers stands in for the weight rows):

    >>> rows = np.arange(8, dtype=np.float32)[:, None]
    >>> permute_qk(rows, num_heads=1).ravel().tolist()
    [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
    >>> unpermute_qk(permute_qk(rows, num_heads=1), num_heads=1).ravel().tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    rows = weight.shape[0]
    head = rows // num_heads
    w = weight.reshape(num_heads, head // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(weight.shape)


def permute_qk(weight: NDArray[np.float32], num_heads: int) -> NDArray[np.float32]:
    """The permutation llama.cpp's converter applies (Hugging Face -> GGUF layout)."""
    rows = weight.shape[0]
    head = rows // num_heads
    w = weight.reshape(num_heads, 2, head // 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(weight.shape)
