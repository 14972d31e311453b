"""Qwen3 (``Qwen3ForCausalLM``): Llama with per-head RMSNorm on the queries and keys.

Differences from Llama:

* each query and key head is RMS-normed over its ``head_dim`` lanes (``self_attn.q_norm`` /
  ``k_norm``, weights of size ``head_dim``) after the projection and before rope;
* no bias on the Q/K/V projections (Qwen2 had one), unless ``attention_bias`` says so;
* ``head_dim`` is its own key and may differ from ``hidden_size / num_attention_heads``;
* Qwen2's per-layer sliding windows (``use_sliding_window``, ``layer_types`` /
  ``max_window_layers``), read by :meth:`ModelConfig.from_hf_config`.

The model is :class:`~fast.model.llama.LlamaForCausalLM` with ``ModelConfig.qk_norm`` on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fast.model.config import ModelConfig


def qwen3_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """A Qwen3 config.json -> :class:`ModelConfig` (Q/K norms on, bias only if configured).

    >>> c = qwen3_config(dict(vocab_size=8, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=2, num_attention_heads=4, head_dim=16, model_type="qwen3"))
    >>> c.qk_norm, c.attention_bias, c.head_dim, c.q_size
    (True, False, 16, 64)
    """
    base = ModelConfig.from_hf_config({**cfg, "attention_bias": cfg.get("attention_bias", False)})
    return replace(base, qk_norm=True)
