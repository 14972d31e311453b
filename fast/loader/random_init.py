"""Random-weight models of real shapes, for tests and GPU benchmarks (nothing to download)."""

from __future__ import annotations

import torch

from fast.loader.weights import empty_model
from fast.model import LlamaForCausalLM
from fast.model.config import ModelConfig


@torch.no_grad()
def random_weights(
    config: ModelConfig,
    *,
    seed: int,
    dtype: torch.dtype,
    device: torch.device | str,
    std: float = 0.02,
) -> LlamaForCausalLM:
    """A model with weights ~ N(0, std) and norms that scale by 1, drawn on ``device``.

    The draw happens on the target device with its own generator, so an 8B-parameter bf16 model
    initializes in about a second on a GPU. The same seed on the same device gives the same
    weights.
    """
    model = empty_model(config, dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            param.fill_(1.0 - config.norm_weight_offset)  # Gemma scales by 1 + weight
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
    return model
