"""Phi-3 and Phi-4 (``Phi3ForCausalLM``).

Differences from Llama:

* the checkpoint stores the fused projections themselves (``self_attn.qkv_proj`` as Q, K, V
  rows; ``mlp.gate_up_proj`` as gate, up rows), which are this engine's own layout, so they load
  as they are;
* ``head_dim`` is often not a power of two (96 for Phi-3-mini);
* a sliding window (``sliding_window``) applies to every layer, as in Mistral;
* partial rotary embeddings (``partial_rotary_factor`` < 1, Phi-4-mini): only the first
  ``int(head_dim * factor)`` lanes of each head are rotated;
* LongRoPE (``rope_type`` ``"longrope"``, formerly ``"su"``), :class:`LongRopeScaling`.

LongRoPE, precisely: frequency ``i`` is divided by ``short_factor[i]`` or ``long_factor[i]``,
and cos and sin are multiplied by ``attention_factor`` (config's, else
``sqrt(1 + ln(s) / ln(original_max_position_embeddings))`` with ``s`` = the config's ``factor``,
else ``max_position_embeddings / original_max_position_embeddings``; 1 when ``s <= 1``). A token
uses the long factors when its sequence's length after the step (cached + new tokens) exceeds
``original_max_position_embeddings``. For one sequence this is transformers' choice (it picks by
``max(position_ids) + 1`` of each forward pass), including that K/V cached with the short factors
stay as they are once a sequence grows past the threshold. It differs where transformers would
see another length: a prompt split by chunked prefill across the threshold (early chunks use
the short factors), and prefix-cache hits reusing blocks a shorter sequence wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from fast.model.attention_context import AttentionContext
from fast.model.config import InvalidModelConfigError, LongRopeScaling, ModelConfig
from fast.model.llama import LlamaForCausalLM
from fast.model.rope import inverse_frequencies, rope_cos_sin


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with the checkpoint's fused projection names and LongRoPE."""

    def expected_weight_names(self) -> set[str]:
        """The parameter names themselves: the checkpoint is fused as the model is."""
        return {name for name, _ in self.named_parameters()}

    def rope_frequencies(self) -> tuple[torch.Tensor, ...]:
        """LongRoPE: (short, long) inverse frequencies [R/2]; otherwise Llama's."""
        c, scaling = self.config, self.config.rope_scaling
        if not isinstance(scaling, LongRopeScaling):
            return super().rope_frequencies()
        r = c.rotary_dimension
        return (
            inverse_frequencies(r, c.rope_theta, None, scaling.short_factor),
            inverse_frequencies(r, c.rope_theta, None, scaling.long_factor),
        )

    def rope_table(self, layer: int) -> int:
        return 0

    def rope(
        self, positions: torch.Tensor, ctx: AttentionContext, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """positions [T] -> [(cos, sin) [T, 1, R]], short or long factors per token."""
        scaling = self.config.rope_scaling
        if not isinstance(scaling, LongRopeScaling):
            return super().rope(positions, ctx, dtype)
        short, long = self.rope_inv_freqs(positions.device)
        factor = scaling.attention_factor
        cos_s, sin_s = rope_cos_sin(positions, short, dtype, factor)  # [T, 1, R] each
        cos_l, sin_l = rope_cos_sin(positions, long, dtype, factor)
        threshold = scaling.original_max_position_embeddings
        use_long = (ctx.token_seq_lens() > threshold)[:, None, None]  # [T, 1, 1]
        return [(torch.where(use_long, cos_l, cos_s), torch.where(use_long, sin_l, sin_s))]


def phi3_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """A Phi-3 / Phi-4 config.json -> :class:`ModelConfig`.

    >>> c = phi3_config(dict(vocab_size=8, hidden_size=192, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=2, model_type="phi3",
    ...     rope_parameters=dict(rope_type="default", rope_theta=1e4,
    ...                          partial_rotary_factor=0.75)))
    >>> c.head_dim, c.rotary_dimension
    (96, 72)
    """
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    plain = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_parameters")}
    base = ModelConfig.from_hf_config({**plain, "rope_theta": theta})
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rotary = int(base.head_dim * partial)
    if kind in ("default", None):
        return replace(base, rotary_dim=rotary)
    if kind not in ("longrope", "su"):
        raise InvalidModelConfigError("unsupported Phi-3 rope scaling type", rope_type=kind)
    original = params.get("original_max_position_embeddings") or cfg.get(
        "original_max_position_embeddings"
    )
    if not original:
        raise InvalidModelConfigError(
            "longrope needs original_max_position_embeddings", keys=sorted(params)
        )
    original = int(original)
    factor = float(params.get("factor") or base.max_position_embeddings / original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    scaling = LongRopeScaling(
        short_factor=tuple(float(f) for f in params["short_factor"]),
        long_factor=tuple(float(f) for f in params["long_factor"]),
        original_max_position_embeddings=original,
        attention_factor=float(attention),
    )
    return replace(base, rotary_dim=rotary, rope_scaling=scaling)
