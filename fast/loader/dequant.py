"""Vectorized numpy dequantization of the GGUF tensor types the loader accepts.

A ggml quantized row is a run of 32-element blocks. Each block stores float16 scale(s) then
packed integers:

- ``Q8_0`` (34 bytes): scale ``d``, 32 int8 ``q``; ``x = d * q``.
- ``Q4_0`` (18 bytes): scale ``d``, 16 bytes of nibbles; the low nibbles are elements 0-15,
  the high nibbles elements 16-31; ``x = d * (q - 8)``.
- ``Q4_1`` (20 bytes): scale ``d``, minimum ``m``, 16 bytes of nibbles as in Q4_0;
  ``x = d * q + m``.

``F32``, ``F16`` and ``BF16`` are stored plainly (BF16 as the top 16 bits of a float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30  # ggml type ids
QK = 32  # elements per quantized block
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", BF16: "BF16"}


class UnsupportedQuantizationError(ValueError):
    """A GGUF tensor uses a ggml type this loader does not dequantize."""

    def __init__(self, name: str, type_id: int) -> None:
        super().__init__(
            f"tensor {name!r} has ggml type {type_id}; supported: {sorted(TYPE_NAMES.values())}"
        )
        self.name, self.type_id = name, type_id


def _f16(blocks: NDArray[np.uint8], start: int) -> NDArray[np.float32]:
    # blocks [N, B] uint8 -> [N, 1] float32: the float16 stored at byte `start` of each block
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


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
    >>> len(block), _BLOCK_BYTES[Q4_1]
    (20, 20)
    >>> x = dequantize(block, Q4_1, (32,))
    >>> x[:4].tolist(), x[14:18].tolist(), x[-2:].tolist()
    ([-1.0, -0.5, 0.0, 0.5], [6.0, 6.5, 6.5, 6.0], [-0.5, -1.0])
    """
    count = int(np.prod(shape))
    if out is None:
        out = np.empty(tuple(shape), dtype=np.float32)
    elif out.shape != tuple(shape) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(
            f"tensor {name!r}: out must be C-contiguous float32 {tuple(shape)}, "
            f"got {out.dtype} {out.shape}"
        )
    if type_id == F32:
        out[...] = np.ascontiguousarray(data).view(np.float32).reshape(shape)
        return out
    if type_id == F16:
        out[...] = np.asarray(data).view(np.float16).reshape(shape)
        return out
    if type_id == BF16:
        bits = out.reshape(-1).view(np.uint32)
        bits[...] = np.ascontiguousarray(data).view(np.uint16).reshape(-1)
        bits <<= np.uint32(16)
        return out
    if type_id not in _BLOCK_BYTES:
        raise UnsupportedQuantizationError(name, type_id)
    if count % QK != 0:
        raise ValueError(f"tensor {name!r}: {count} elements is not a multiple of {QK}")
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(count // QK, _BLOCK_BYTES[type_id])
    flat = out.reshape(count // QK, QK)  # [N, 32] view
    if type_id == Q8_0:
        flat[...] = blocks[:, 2:].view(np.int8)
        flat *= _f16(blocks, 0)
        return out
    packed = blocks[:, 2:] if type_id == Q4_0 else blocks[:, 4:]  # [N, 16]
    flat[:, : QK // 2] = packed & np.uint8(0x0F)
    flat[:, QK // 2 :] = packed >> np.uint8(4)
    if type_id == Q4_0:
        flat -= np.float32(8)
        flat *= _f16(blocks, 0)
    else:  # Q4_1
        flat *= _f16(blocks, 0)
        flat += _f16(blocks, 2)
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
