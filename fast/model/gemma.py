"""Gemma 2 (``Gemma2ForCausalLM``) and Gemma 3 text (``Gemma3ForCausalLM``).

Differences from Llama, both versions:

* RMSNorm multiplies by ``1 + weight`` (weights stored around 0), computed in float32;
* token embeddings are multiplied by ``sqrt(hidden_size)``, rounded to the model dtype first;
* the MLP is GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``;
* every layer has four norms: the attention's output and the MLP's output are normed too
  before they join the residual (``post_attention_layernorm``, ``post_feedforward_layernorm``;
  Llama's ``post_attention_layernorm`` is Gemma's ``pre_feedforward_layernorm``);
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``;
* layers alternate between a sliding window and global attention (``layer_types``; by default
  Gemma 2 slides on every other layer from the first, Gemma 3 on five of every six);
* input and output embeddings are tied.

Gemma 2 also soft-caps the attention scores (``attn_logit_softcapping``, default 50) and the
final logits (``final_logit_softcapping``, default 30): ``c * tanh(s / c)``. Gemma 3 drops the
soft-caps (unless configured), adds per-head Q/K norms (as Qwen3, with Gemma's ``1 + weight``)
and gives the windowed layers their own rope base (``rope_local_base_freq``, or
``rope_parameters["sliding_attention"]``) without the global layers' rope scaling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fast.model.attention_context import AttentionContext
from fast.model.config import (
    InvalidModelConfigError,
    ModelConfig,
    hf_common_fields,
    rope_scaling_from_dict,
    sliding_layers_from_types,
)
from fast.model.layers import DecoderLayer, RMSNorm
from fast.model.llama import LlamaForCausalLM
from fast.model.step_plan import DecodeStepPlan


class GemmaDecoderLayer(DecoderLayer):
    """Sandwich-normed residual block.

    ``x + post_attn_norm(attn(input_norm(x)))``, then ``x + post_ff_norm(mlp(pre_ff_norm(x)))``.
    """

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__(config, layer)
        eps, offset = config.rms_norm_eps, config.norm_weight_offset
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: DecodeStepPlan | None = None,
    ) -> torch.Tensor:
        # x [T, H], rope (cos, sin) [T, 1, R] of the positions -> [T, H]
        attn: torch.Tensor = self.self_attn(
            self.input_layernorm(x), ctx, k_cache, v_cache, rope, plan
        )
        x = x + self.post_attention_layernorm(attn)
        mlp: torch.Tensor = self.mlp(self.pre_feedforward_layernorm(x))
        out: torch.Tensor = x + self.post_feedforward_layernorm(mlp)
        return out


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 and Gemma 3 text: Llama with :class:`GemmaDecoderLayer` (the rest is config)."""

    decoder_layer = GemmaDecoderLayer


def _gemma_fields(cfg: Mapping[str, Any], every: int, softcaps: tuple[Any, Any]) -> dict[str, Any]:
    """What Gemma 2 and 3 share; layer ``i`` slides by default unless ``(i + 1) % every == 0``."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise InvalidModelConfigError(
            "Gemma's MLP must use gelu_pytorch_tanh", hidden_activation=act
        )
    if cfg.get("use_bidirectional_attention"):
        raise InvalidModelConfigError(
            "bidirectional (non-causal) Gemma attention is not supported",
            use_bidirectional_attention=cfg.get("use_bidirectional_attention"),
        )
    fields = hf_common_fields({**cfg, "tie_word_embeddings": cfg.get("tie_word_embeddings", True)})
    window = cfg.get("sliding_window") or None
    layers = fields["num_hidden_layers"]
    attn_cap = cfg.get("attn_logit_softcapping", softcaps[0])
    final_cap = cfg.get("final_logit_softcapping", softcaps[1])
    return dict(
        fields,
        attention_bias=bool(cfg.get("attention_bias", False)),
        sliding_window=int(window) if window else None,
        sliding_layers=(
            sliding_layers_from_types(cfg, [(i + 1) % every != 0 for i in range(layers)])
            if window
            else None
        ),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        attn_logit_softcap=float(attn_cap) if attn_cap is not None else None,
        final_logit_softcap=float(final_cap) if final_cap is not None else None,
        norm_weight_offset=1.0,
        hidden_act="gelu_tanh",
        embedding_multiplier=math.sqrt(fields["hidden_size"]),
    )


def gemma2_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """A Gemma 2 config.json -> :class:`ModelConfig` (soft-caps 50 / 30 unless configured)."""
    fields = _gemma_fields(cfg, 2, (50.0, 30.0))
    rope_params = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    return ModelConfig(**fields, rope_scaling=rope_scaling_from_dict(rope_params))


def gemma3_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """A Gemma 3 text config.json -> :class:`ModelConfig`.

    Rope: transformers 5's ``rope_parameters`` keyed by layer type, or the older top-level
    ``rope_theta`` (default 1e6), ``rope_local_base_freq`` (default 1e4) and ``rope_scaling``
    (global layers only).
    """
    fields = _gemma_fields(cfg, int(cfg.get("sliding_window_pattern", 6)), (None, None))
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        full = params["full_attention"] or {}
        local = params.get("sliding_attention") or {}
        if rope_scaling_from_dict(local) is not None:
            raise InvalidModelConfigError(
                "rope scaling on Gemma 3's sliding layers is not supported",
                rope_type=local.get("rope_type"),
            )
        theta, local_theta, scaling = (
            full.get("rope_theta", 1e6),
            local.get("rope_theta", 1e4),
            rope_scaling_from_dict(full),
        )
    else:
        flat = params if isinstance(params, Mapping) else {}
        theta = cfg.get("rope_theta", flat.get("rope_theta", 1e6))
        local_theta = cfg.get("rope_local_base_freq", 1e4)
        scaling = rope_scaling_from_dict(cfg.get("rope_scaling") or flat)
    return ModelConfig(
        **{**fields, "rope_theta": float(theta)},
        rope_scaling=scaling,
        rope_local_theta=float(local_theta),
        qk_norm=True,
    )
