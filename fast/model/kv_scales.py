"""The fp8 KV cache's per-layer scales, and their calibration on the first model step.

Each attention layer holds one :class:`LayerKVScales` (the engine sets the attribute
``kv_scales`` of every :class:`fast.model.layers.Attention`; None, the default, means an
unquantized cache and no extra work). The scales are ``[Hkv]`` float32 device tensors that the
kernels read through a pointer, so CUDA graphs captured before calibration replay with the
calibrated values. Calibration, when armed, happens inside the layer's first call after arming:
the scale becomes ``max|x| * headroom / M`` over that call's K (V) rows that are written (slot
>= 0), per tensor or per KV head (``spec.kv_quant.calibrated_scales``), and the layer disarms
itself: the scales are frozen from then on. The
engine arms the layers at the end of its construction, after the GPU warm-up, so the first
step of real requests (all prompt tokens: a prefill or its first chunk) calibrates.
"""

from __future__ import annotations

import torch

from kernels.fp8 import FP8_MAX, check_fp8_triton
from spec.errors import InvalidArgumentError

__all__ = ["LayerKVScales", "install_kv_scales"]


class LayerKVScales:
    """k_scale, v_scale [Hkv] float32 of one layer's fp8 cache, and its calibration state.

    >>> s = LayerKVScales(2, torch.float8_e4m3fn, torch.device("cpu"), per_head=True)
    >>> s.arm()
    >>> k = torch.tensor([[[896.0], [4.48]]]); v = torch.ones(1, 2, 1)   # [T=1, Hkv=2, D=1]
    >>> s.observe(k, v, torch.tensor([5])); s.k_scale.tolist(), s.armed
    ([2.0, 0.009999999776482582], False)
    >>> s.observe(k * 10, v, torch.tensor([6])); s.k_scale.tolist()   # frozen
    [2.0, 0.009999999776482582]
    """

    def __init__(
        self,
        num_kv_heads: int,
        cache_dtype: torch.dtype,
        device: torch.device,
        *,
        per_head: bool = False,
        headroom: float = 1.0,
        k_scale: float | tuple[float, ...] = 1.0,
        v_scale: float | tuple[float, ...] = 1.0,
    ) -> None:
        self.max_value = FP8_MAX[cache_dtype]
        self.per_head = per_head
        self.headroom = headroom
        self.k_scale = self._tensor("k_scale", k_scale, num_kv_heads, device)  # [Hkv] float32
        self.v_scale = self._tensor("v_scale", v_scale, num_kv_heads, device)
        self.armed = False

    @staticmethod
    def _tensor(
        name: str, value: float | tuple[float, ...], heads: int, device: torch.device
    ) -> torch.Tensor:
        values = list(value) if isinstance(value, tuple) else [float(value)] * heads
        if len(values) != heads:
            raise InvalidArgumentError(
                name, value, f"per KV head: {heads} values, one per KV head of the model"
            )
        return torch.tensor(values, dtype=torch.float32, device=device)

    def arm(self) -> None:
        """Calibrate on the next :meth:`observe`."""
        self.armed = True

    def observe(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k, v [T, Hkv, D] about to be written at slot_mapping [T]: calibrate when armed.

        In place (``copy_``), so the tensors the kernels and CUDA graphs hold see the values.
        """
        if not self.armed:
            return
        self.armed = False
        keep = slot_mapping >= 0  # [T]
        for x, scale in ((k, self.k_scale), (v, self.v_scale)):
            rows = x[keep].float().abs()  # [R, Hkv, D]
            if rows.shape[0] == 0:
                continue
            amax = rows.amax(dim=(0, 2))  # [Hkv]
            if not self.per_head:
                amax = amax.amax().expand_as(amax)
            new = torch.where(
                amax > 0, amax * self.headroom / self.max_value, torch.ones_like(amax)
            )
            scale.copy_(torch.where(torch.isfinite(new), new, scale))


def install_kv_scales(
    model: torch.nn.Module,
    cache_dtype: torch.dtype,
    device: torch.device,
    *,
    per_head: bool = False,
    headroom: float = 1.0,
    k_scale: float | tuple[float, ...] | None = None,
    v_scale: float | tuple[float, ...] | None = None,
) -> list[LayerKVScales]:
    """Give every attention layer of ``model`` its :class:`LayerKVScales` (in layer order).

    ``k_scale``/``v_scale`` fix the scales (None: 1.0 until calibrated). Nothing is armed.
    On a CUDA device below compute capability 8.9 this raises
    :class:`kernels.errors.Fp8UnsupportedError` (the Triton kernels' fp8 needs 8.9) before any
    step runs.
    """
    check_fp8_triton(device)
    scales = []
    for module in model.modules():
        # an attention layer: fast.model.layers.Attention or a subclass (it declares the class
        # attribute kv_scales = None; identified so to keep this module free of an import cycle)
        if getattr(type(module), "kv_scales", False) is None:
            s = LayerKVScales(
                int(getattr(module, "num_kv_heads")),
                cache_dtype,
                device,
                per_head=per_head,
                headroom=headroom,
                k_scale=1.0 if k_scale is None else k_scale,
                v_scale=1.0 if v_scale is None else v_scale,
            )
            setattr(module, "kv_scales", s)
            scales.append(s)
    return scales
