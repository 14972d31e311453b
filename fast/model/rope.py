"""Rotary position embeddings (RoPE), with Llama-3 and linear frequency scaling.

Each query/key head vector of width ``D`` is split into halves ``(x1, x2)``; the pair
``(x1[i], x2[i])`` is rotated by the angle ``position * inv_freq[i]`` with
``inv_freq[i] = theta ** (-2 i / D)``. This is the "rotate half" layout of Hugging Face's Llama.
With partial rotary embeddings (Phi-4-mini) only the first ``R`` of the ``D`` lanes are rotated
(``D`` replaced by ``R`` above) and the rest pass through.
"""

from __future__ import annotations

import math

import torch

from fast.model.config import LinearRopeScaling, RopeScaling
from kernels.fused import apply_rope as apply_rope  # re-exported: the layers' unfused rope


def inverse_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | LinearRopeScaling | None = None,
    factors: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """The ``[head_dim // 2]`` float32 inverse frequencies, scaled if ``scaling``.

    Llama-3 scaling divides the slow (long-wavelength) frequencies by ``factor``, keeps the fast
    ones, and interpolates linearly in ``1 / wavelength`` between the two cut-offs; linear
    scaling divides them all by ``factor``. Explicit per-frequency ``factors`` (llama.cpp's
    ``rope_freqs``, LongRoPE's short or long factors) divide the result.
    """
    if factors is not None:
        base = inverse_frequencies(head_dim, theta, scaling)
        return base / torch.tensor(factors, dtype=torch.float32, device="cpu")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [D/2]
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return inv_freq / scaling.factor
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    dtype: torch.dtype,
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int, inv_freq [R/2] float32 -> (cos, sin), each [T, 1, R] in ``dtype``.

    The angles are computed in float32 (cos and sin multiplied by ``attention_factor``, LongRoPE's
    magnitude correction) and rounded to the activation dtype, as transformers does; computed
    once per forward pass and shared by every layer.
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, R]
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)
