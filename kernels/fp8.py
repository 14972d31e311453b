"""fp8 KV caches in the kernels: dtypes, scales, the torch quantize/dequantize, capability checks.

The maps are ``spec.kv_quant``'s: a cache of ``torch.float8_e4m3fn`` (``"fp8"``, ``"fp8_e4m3"``)
or ``torch.float8_e5m2`` (``"fp8_e5m2"``) holds ``Q(x / s_h)``, saturated to ``±M`` and rounded to
nearest even; readers multiply by ``s_h``. Scales reach the kernels as ``[Hkv]`` float32 tensors
on the cache's device (one number is broadcast), read through a pointer so that a CUDA graph
captured before calibration sees the calibrated values. A cache that is not fp8 takes only the
scale 1.0.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.errors import (
    DeviceMismatchError,
    DTypeMismatchError,
    Fp8UnsupportedError,
    KernelInputError,
    ShapeMismatchError,
)
from spec.kv_quant import FP8_FORMATS, fp8_format

__all__ = [
    "FP8_DTYPES",
    "FP8_MAX",
    "is_fp8",
    "cache_dtype",
    "scale_tensor",
    "check_scales",
    "check_kv_cache_dtype",
    "check_fp8_triton",
    "quantize",
    "dequantize",
]

#: torch dtype -> the spec's format name.
FP8_DTYPES: dict[torch.dtype, str] = {
    torch.float8_e4m3fn: "fp8_e4m3",
    torch.float8_e5m2: "fp8_e5m2",
}
#: torch dtype -> largest finite value (448, 57344).
FP8_MAX: dict[torch.dtype, float] = {t: FP8_FORMATS[n].max_value for t, n in FP8_DTYPES.items()}
_BY_NAME = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
#: Triton's fp8 conversions need sm_89 (Ada) or newer.
MIN_CAPABILITY = (8, 9)


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of the fp8 cache dtypes."""
    return dtype in FP8_DTYPES


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of a cache of kind ``kv_cache_dtype`` (``"auto"``: the model's dtype).

    >>> cache_dtype("fp8", torch.bfloat16), cache_dtype("auto", torch.float32)
    (torch.float8_e4m3fn, torch.float32)
    """
    fmt = fp8_format(kv_cache_dtype)  # raises InvalidArgumentError naming the known kinds
    return model_dtype if fmt is None else _BY_NAME[fmt.name]


def check_kv_cache_dtype(kv_cache_dtype: str, cache: torch.Tensor) -> None:
    """``kv_cache_dtype`` names the cache's own dtype (``"auto"``: whatever it is)."""
    want = cache_dtype(kv_cache_dtype, cache.dtype)
    if want != cache.dtype:
        raise DTypeMismatchError(
            f"k_cache (kv_cache_dtype={kv_cache_dtype!r})",
            str(cache.dtype).replace("torch.", ""),
            str(want).replace("torch.", ""),
        )


def check_scales(cache: torch.Tensor, k_scale: Any, v_scale: Any) -> None:
    """A cache that is not fp8 takes only the scale 1.0 (the kernels do not rescale it)."""
    if is_fp8(cache.dtype):
        return
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if isinstance(s, torch.Tensor) or s != 1.0:
            raise KernelInputError(
                f"{name} applies to fp8 caches only; the cache has dtype "
                f"{str(cache.dtype).replace('torch.', '')} and {name}={s!r} (use 1.0)"
            )


def scale_tensor(scale: Any, num_kv_heads: int, device: torch.device, name: str) -> torch.Tensor:
    """[Hkv] float32 scales on ``device`` from a number or a ``[]`` / ``[Hkv]`` tensor.

    A tensor of the right dtype, shape and device is returned as is (no copy, no sync); values
    are checked (finite, > 0) only for CPU tensors and numbers.
    """
    if isinstance(scale, torch.Tensor):
        if scale.device != device:
            raise DeviceMismatchError(name, str(scale.device), str(device))
        t = scale.to(torch.float32)
        if t.dim() == 0:
            t = t.expand(num_kv_heads)
        if tuple(t.shape) != (num_kv_heads,):
            raise ShapeMismatchError(name, tuple(scale.shape), f"[] or [{num_kv_heads}]")
        t = t.contiguous()
    else:
        t = torch.full((num_kv_heads,), float(scale), dtype=torch.float32, device=device)
    if t.device.type == "cpu" and not bool(((t > 0) & torch.isfinite(t)).all()):
        raise KernelInputError(f"{name} must be finite and > 0, got {t.tolist()}")
    return t


def check_fp8_triton(device: torch.device) -> None:
    """Triton's fp8 loads and conversions need a CUDA device of compute capability >= 8.9."""
    if device.type != "cuda":
        return  # the interpreter decodes fp8 in software
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise Fp8UnsupportedError(
            "an fp8 KV cache on the Triton backend",
            "a CUDA device of compute capability >= 8.9 (Ada, Hopper or newer) for fp8 conversions",
            f"{torch.cuda.get_device_name(device)} with compute capability {cap[0]}.{cap[1]} "
            "(use kv_cache_dtype='auto', or backend='torch')",
        )


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, Hkv, D] -> codes [T, Hkv, D] of ``dtype``, bit for bit ``spec.kv_quant.quantize``.

    As the spec: ``y = x / scale`` in float64 (for float32/bf16/fp16 inputs and float32 scales
    no quotient lands on an fp8 rounding midpoint unless it is exactly one), saturated to ``±M``
    (infinities too; NaN stays NaN), rounded to the grid in float64 arithmetic (the spacing is a
    power of two, ``torch.round`` is half to even), then converted: the value is on the grid, so
    the conversion is exact. Converting the float64 ``y`` directly would round twice (via
    float32).
    """
    fmt = FP8_FORMATS[FP8_DTYPES[dtype]]
    y = x.to(torch.float64) / scale.to(torch.float64)[:, None]  # [T, Hkv, D]
    a = y.abs().clamp_(max=fmt.max_value)
    _, e = torch.frexp(a)  # a = f * 2^e, f in [0.5, 1): floor(log2 a) = e - 1
    e = (e - 1).clamp_(min=fmt.min_exponent) - fmt.mantissa_bits  # log2 of the spacing
    spacing = torch.ldexp(torch.ones_like(a), e)
    r = torch.round(a / spacing) * spacing
    return torch.copysign(r, y).to(dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., Hkv, D] -> ``codes * scale`` in ``dtype`` (float32 or float64)."""
    return codes.to(dtype) * scale.to(dtype)[:, None]
