"""Shared loader steps: build an uninitialized model on the target device, check completeness."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fast.model import LlamaForCausalLM, WeightLoadError
from fast.model.config import ModelConfig
from fast.model.registry import build_model


def empty_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> LlamaForCausalLM:
    """A model whose parameters are allocated (not initialized) in ``dtype`` on ``device``.

    Built on the meta device first, so no time is spent on default initialization and no
    host copy is made of a model meant for the GPU. The class is ``config.architecture``'s
    (``fast.model.registry``).
    """
    with torch.device("meta"):
        model = build_model(config)
    for module in model.modules():
        for name, meta in list(module._parameters.items()):
            if meta is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(meta.shape, dtype=dtype, device=device), requires_grad=False
                )
    return model.eval()


def check_complete(model: LlamaForCausalLM, loaded: Iterable[str]) -> None:
    """Raise :class:`WeightLoadError` naming the first parameter no checkpoint tensor filled."""
    missing = model.expected_weight_names() - set(loaded)
    if missing:
        first = sorted(missing)[0]
        raise WeightLoadError(first, f"missing from the checkpoint ({len(missing)} missing)")
