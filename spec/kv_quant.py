"""fp8 KV cache: the quantize and dequantize maps, the formats and the scales, in float64.

A cache of kind ``kv_cache_dtype`` (vLLM's names: ``"auto"``, ``"fp8"`` = ``"fp8_e4m3"``,
``"fp8_e5m2"``) stores, for each element ``x`` of a new key (value) of KV head ``h``, the code
``Q(x / s_h)``: ``x`` divided by the head's scale ``s_h``, saturated to the format's largest finite
value ``±M`` and rounded to the nearest point of the format's grid, ties to even. A reader
dequantizes ``code * s_h``. ``"auto"`` stores ``x / s_h`` unrounded (and the kernels allow only
``s_h = 1`` there, so an ``"auto"`` cache holds the inputs themselves).

The two formats (the OCP fp8 formats as ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` hold
them): ``m`` mantissa bits, smallest normal exponent ``e_min``, largest finite ``M``:

* e4m3 (FN, no infinities): ``m = 3``, ``e_min = -6``, ``M = 448``; subnormal spacing ``2^-9``;
* e5m2: ``m = 2``, ``e_min = -14``, ``M = 57344``; subnormal spacing ``2^-16``.

On ``|y| <= M`` rounding moves ``y`` by at most half the grid spacing there,
``2^(max(floor(log2|y|), e_min) - m - 1) <= max(2^-(m+1) |y|, 2^(e_min - m - 1))``; past ``M``
saturation moves it by ``|y| - M``. :func:`element_error_bound` returns that per element, in the
units of ``x``. Infinities saturate to ``±M``; NaN stays NaN.

>>> import numpy as np
>>> E4M3 = FP8_FORMATS["fp8_e4m3"]
>>> round_to_grid(np.array([7.99, 17.0, 19.0, 500.0, -1e9, 2.0**-10]), E4M3).tolist()
[8.0, 16.0, 20.0, 448.0, -448.0, 0.0]
>>> quantize(np.array([3.0, 900.0]), 2.0, "fp8").tolist()   # x / 2, saturated at 448
[1.5, 448.0]
>>> dequantize(np.array([1.5, 448.0]), 2.0).tolist()
[3.0, 896.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike

from spec.attention import F64, AttentionShapeError
from spec.errors import InvalidArgumentError

__all__ = [
    "Fp8Format",
    "FP8_FORMATS",
    "KV_CACHE_DTYPES",
    "fp8_format",
    "round_to_grid",
    "grid_values",
    "quantize",
    "dequantize",
    "head_scales",
    "calibrated_scales",
    "element_error_bound",
]


@dataclass(frozen=True)
class Fp8Format:
    """An fp8 format: ``mantissa_bits`` m, smallest normal exponent ``min_exponent``, ``max_value``.

    >>> FP8_FORMATS["fp8_e5m2"].subnormal_spacing == 2.0**-16
    True
    """

    name: str
    mantissa_bits: int
    min_exponent: int
    max_value: float

    @property
    def subnormal_spacing(self) -> float:
        """Grid spacing below the smallest normal ``2^e_min``: ``2^(e_min - m)``."""
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def unit_roundoff(self) -> float:
        """``2^-(m+1)``: the largest relative rounding error among normal numbers."""
        return 2.0 ** -(self.mantissa_bits + 1)


FP8_FORMATS = MappingProxyType(
    {
        "fp8_e4m3": Fp8Format("fp8_e4m3", 3, -6, 448.0),
        "fp8_e5m2": Fp8Format("fp8_e5m2", 2, -14, 57344.0),
    }
)

#: Every accepted ``kv_cache_dtype`` and the fp8 format it stores (None: unquantized).
KV_CACHE_DTYPES = MappingProxyType(
    {
        "auto": None,
        "fp8": FP8_FORMATS["fp8_e4m3"],
        "fp8_e4m3": FP8_FORMATS["fp8_e4m3"],
        "fp8_e5m2": FP8_FORMATS["fp8_e5m2"],
    }
)


def fp8_format(kv_cache_dtype: str) -> Fp8Format | None:
    """The format a ``kv_cache_dtype`` name stores (None for ``"auto"``); unknown names raise.

    >>> fp8_format("fp8").name, fp8_format("auto")
    ('fp8_e4m3', None)
    >>> fp8_format("int8")
    Traceback (most recent call last):
        ...
    spec.errors.InvalidArgumentError: invalid kv_cache_dtype='int8': one of auto, fp8, ..._e5m2
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InvalidArgumentError(
            "kv_cache_dtype", kv_cache_dtype, "one of " + ", ".join(KV_CACHE_DTYPES)
        )
    return KV_CACHE_DTYPES[kv_cache_dtype]


def _half_spacing(a: F64, fmt: Fp8Format) -> F64:
    """Half the grid spacing at magnitudes ``a`` (``0 <= a <= M``, no NaN)."""
    _, exp = np.frexp(a)  # a = f * 2^exp, f in [0.5, 1): floor(log2 a) = exp - 1
    e = np.maximum(np.where(a > 0, exp - 1, fmt.min_exponent), fmt.min_exponent)
    return np.asarray(np.ldexp(1.0, e - fmt.mantissa_bits - 1), dtype=np.float64)


def round_to_grid(y: ArrayLike, fmt: Fp8Format) -> F64:
    """``y`` saturated to ``[-M, M]`` and rounded to the nearest grid point, ties to even.

    Exact in float64: the spacing is a power of two, so ``|y| / spacing`` is exact and
    ``np.rint`` rounds it half to even. Signs (and ``-0.0``) are kept; NaN stays NaN.
    """
    ya = np.asarray(y, dtype=np.float64)
    a = np.minimum(np.abs(ya), fmt.max_value)  # saturate; NaN propagates
    finite = np.where(np.isnan(a), 0.0, a)
    spacing = 2.0 * _half_spacing(finite, fmt)
    r = np.rint(a / spacing) * spacing  # grid points are multiples of the local spacing
    return np.asarray(np.copysign(np.minimum(r, fmt.max_value), ya), dtype=np.float64)


def grid_values(fmt: Fp8Format) -> F64:
    """Every non-negative finite value of the format, ascending (from sign, exponent, mantissa).

    >>> g = grid_values(FP8_FORMATS["fp8_e4m3"])
    >>> len(g), float(g[1]), float(g[-1])
    (127, 0.001953125, 448.0)
    """
    m = fmt.mantissa_bits
    sub = np.arange(0, 2**m) * fmt.subnormal_spacing  # 0 and the subnormals
    normals = [
        (1.0 + np.arange(2**m) / 2**m) * 2.0**e
        for e in range(fmt.min_exponent, int(math.log2(fmt.max_value)) + 1)
    ]
    values = np.concatenate([sub, *normals])
    return np.asarray(values[values <= fmt.max_value], dtype=np.float64)


def head_scales(scale: ArrayLike, num_kv_heads: int, name: str = "scale") -> F64:
    """[Hkv] per-head scales from one number (per tensor) or ``Hkv`` numbers; finite and > 0.

    >>> head_scales(0.5, 3).tolist(), head_scales([1.0, 2.0], 2).tolist()
    ([0.5, 0.5, 0.5], [1.0, 2.0])
    """
    s = np.asarray(scale, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(num_kv_heads, float(s))
    if s.shape != (num_kv_heads,):
        raise AttentionShapeError(
            f"{name} must be one number or one per KV head", shape=s.shape, heads=num_kv_heads
        )
    bad = np.flatnonzero(~(np.isfinite(s) & (s > 0)))
    if bad.size:
        i = int(bad[0])
        raise AttentionShapeError(f"{name} must be finite and > 0", head=i, value=float(s[i]))
    return s


def quantize(x: ArrayLike, scale: ArrayLike, kv_cache_dtype: str) -> F64:
    """The codes ``Q(x / s)`` of ``x`` [..., Hkv, D] (float64 values on the format's grid).

    ``scale`` is one number or ``[Hkv]`` (broadcast over the head axis, ``x``'s second to last).
    ``"auto"`` returns ``x / s`` unrounded.
    """
    xa = np.asarray(x, dtype=np.float64)
    fmt = fp8_format(kv_cache_dtype)
    s = _scales_for(xa, scale)
    y = xa / s
    return np.asarray(y, dtype=np.float64) if fmt is None else round_to_grid(y, fmt)


def dequantize(codes: ArrayLike, scale: ArrayLike) -> F64:
    """``codes * s``: what a reader of the cache sees (``scale`` one number or ``[Hkv]``)."""
    ca = np.asarray(codes, dtype=np.float64)
    return np.asarray(ca * _scales_for(ca, scale), dtype=np.float64)


def _scales_for(x: F64, scale: ArrayLike) -> F64:
    """``scale`` shaped to broadcast over ``x`` [..., Hkv, D]: [Hkv, 1] or a number."""
    s = np.asarray(scale, dtype=np.float64)
    if s.ndim == 0:
        return np.asarray(head_scales(s, 1)[0], dtype=np.float64)
    if x.ndim < 2:
        raise AttentionShapeError("per-head scales need x [..., Hkv, D]", shape=x.shape)
    return head_scales(s, x.shape[-2])[:, None]


def calibrated_scales(
    x: ArrayLike, kv_cache_dtype: str, per_head: bool = False, headroom: float = 1.0
) -> F64:
    """[Hkv] scales mapping ``headroom`` times the largest ``|x|`` of ``x`` [T, Hkv, D] onto
    the format's ``M``.

    Per tensor (default) every head gets ``max|x| * headroom / M``; ``per_head`` uses each
    head's own maximum. ``headroom > 1`` leaves room for later values beyond those seen (they
    saturate only past ``headroom * max|x|``). A maximum of 0 (or no tokens) gives scale 1;
    ``"auto"`` always 1.

    >>> x = np.array([[[1.0, -896.0], [2.0, 4.0]]])  # T 1, Hkv 2, D 2
    >>> calibrated_scales(x, "fp8").tolist(), calibrated_scales(x, "fp8", per_head=True).tolist()
    ([2.0, 2.0], [2.0, 0.008928571428571428])
    """
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim != 3:
        raise AttentionShapeError("x must be [T, Hkv, D]", shape=xa.shape)
    fmt = fp8_format(kv_cache_dtype)
    heads = xa.shape[1]
    if fmt is None or xa.size == 0:
        return np.ones(heads)
    amax = np.abs(xa).max(axis=(0, 2))  # [Hkv]
    if not per_head:
        amax = np.full(heads, amax.max())
    if not (math.isfinite(headroom) and headroom > 0):
        raise AttentionShapeError("headroom must be finite and > 0", headroom=headroom)
    return np.asarray(np.where(amax > 0, amax * headroom / fmt.max_value, 1.0), dtype=np.float64)


def element_error_bound(x: ArrayLike, scale: ArrayLike, kv_cache_dtype: str) -> F64:
    """Per element of ``x`` [..., Hkv, D]: a bound on ``|dequantize(quantize(x)) - x|``.

    ``s * (|y| - M)`` where ``y = x / s`` saturates, else ``s`` times half the grid spacing at
    ``|y|`` (``2^(max(floor(log2|y|), e_min) - m - 1)``). 0 for ``"auto"``.

    >>> element_error_bound(np.array([[[17.0, 1000.0]]]), 2.0, "fp8").tolist()  # y = 8.5, 500
    [[[1.0, 104.0]]]
    """
    xa = np.asarray(x, dtype=np.float64)
    fmt = fp8_format(kv_cache_dtype)
    if fmt is None:
        return np.zeros(xa.shape)
    s = _scales_for(xa, scale)
    a = np.abs(xa / s)
    over = a > fmt.max_value
    inside = _half_spacing(np.where(over, fmt.max_value, a), fmt)
    return np.asarray(s * np.where(over, a - fmt.max_value, inside), dtype=np.float64)
