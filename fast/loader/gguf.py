"""Load a GGUF file (llama.cpp's format): metadata, dequantized tensors, tokenizer.

The file's ``general.architecture`` is looked up in the model registry
(:func:`fast.model.registry.gguf_architecture`: ``llama``, ``qwen2``, ``qwen3``, ``gemma2``,
``gemma3``, ``phi3``); how llama.cpp stored that architecture (tensor names, permuted or shifted
values, metadata keys) is in :mod:`fast.loader.gguf_arch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fast.loader.dequant import (
    UnsupportedQuantizationError,
    dequantize,
    supported_types,
    unpermute_qk,
)
from fast.loader.gguf_arch import CONVENTIONS, GGUFConventions
from fast.loader.gguf_file import read_gguf
from fast.loader.weights import check_complete, empty_model
from fast.model import LlamaForCausalLM, WeightLoadError
from fast.model.config import ModelConfig
from fast.model.registry import UnsupportedArchitectureError, gguf_architecture
from fast.tokenizer.gguf import tokenizer_from_gguf
from fast.tokenizer.tokenizer import Tokenizer


class UnsupportedGGUFError(ValueError):
    """The GGUF file holds an architecture or tensor this loader does not handle."""


class UnsupportedGGUFArchitectureError(UnsupportedArchitectureError, UnsupportedGGUFError):
    """The file's ``general.architecture`` is not in the model registry: both an
    :class:`~fast.model.registry.UnsupportedArchitectureError` (naming the supported GGUF
    architectures, ``.supported``) and an :class:`UnsupportedGGUFError`, with the file's
    ``.path``."""

    def __init__(self, name: str, path: str | Path) -> None:
        super().__init__(name, "GGUF architecture")
        self.path = str(path)
        self.args = (f"{self.args[0]} (in {self.path})",)


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a llama.cpp tensor of architecture ``arch``, or None when it
    has no counterpart (:mod:`fast.loader.gguf_arch` has each architecture's names).

    >>> hf_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    >>> hf_name("output_norm.weight")
    'model.norm.weight'
    >>> hf_name("blk.0.post_attention_norm.weight", "gemma2")
    'model.layers.0.post_attention_layernorm.weight'
    >>> hf_name("rope_freqs.weight") is None  # read into the config, not a parameter
    True
    """
    if arch not in CONVENTIONS:
        raise UnsupportedGGUFError(
            f"no GGUF conventions for architecture {arch!r}; "
            f"supported: {', '.join(sorted(CONVENTIONS))}"
        )
    return CONVENTIONS[arch].hf_name(gguf_name)


def gguf_conventions(metadata: Mapping[str, Any], path: str | Path) -> GGUFConventions:
    """The conventions of the file's ``general.architecture``, looked up through the model
    registry: an architecture it does not list raises :class:`UnsupportedGGUFArchitectureError`.
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise UnsupportedGGUFError(f"{path} has no general.architecture string: {arch!r}")
    try:
        gguf_architecture(arch)
    except UnsupportedArchitectureError:
        raise UnsupportedGGUFArchitectureError(arch, path) from None
    if arch not in CONVENTIONS:  # registered for Hugging Face checkpoints only
        raise UnsupportedGGUFError(
            f"GGUF architecture {arch!r} in {path} has no GGUF conventions; "
            f"supported: {', '.join(sorted(CONVENTIONS))}"
        )
    return CONVENTIONS[arch]


def load_gguf(
    path: str | Path, *, dtype: torch.dtype, device: torch.device | str
) -> tuple[LlamaForCausalLM, Tokenizer, ModelConfig]:
    """(model, tokenizer, config) from one GGUF file; quantized tensors are dequantized.

    Every tensor's type is checked before anything is allocated: one the ``gguf`` package
    cannot dequantize raises :class:`~fast.loader.dequant.UnsupportedQuantizationError`.
    """
    metadata, tensor_list = read_gguf(path)
    for t in tensor_list:
        if t.type_id not in supported_types():
            raise UnsupportedQuantizationError(t.name, t.type_id)
    conventions = gguf_conventions(metadata, path)
    tensors = {t.name: t for t in tensor_list}
    if "token_embd.weight" not in tensors:
        raise UnsupportedGGUFError(f"{path} has no token_embd.weight tensor")
    config = conventions.read_config(metadata, tensors)
    model = empty_model(config, dtype, device)
    loaded: list[str] = []
    for name, tensor in tensors.items():
        target = conventions.hf_name(name)
        if target is None:
            if name in conventions.config_tensors:
                continue  # read into the config
            raise UnsupportedGGUFError(
                f"GGUF tensor {name!r} has no counterpart in a {conventions.name} model"
            )
        dest = model.weight_destination(target)
        if dest is not None and tuple(dest.shape) != tensor.shape:
            raise WeightLoadError(target, "shape mismatch", tuple(dest.shape), tensor.shape)
        permute = conventions.permute_qk and (".attn_q." in name or ".attn_k." in name)
        shift = conventions.shifted(name)
        direct = (
            dest is not None
            and not permute
            and not shift
            and dest.device.type == "cpu"
            and dest.dtype == torch.float32
            and dest.is_contiguous()
        )
        if direct:  # write straight into the parameter: no temporary, no copy
            assert dest is not None
            dequantize(tensor.data, tensor.type_id, tensor.shape, name, out=dest.numpy())
        elif dest is not None:
            weight = dequantize(tensor.data, tensor.type_id, tensor.shape, name)
            if permute:
                heads = (
                    config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
                )
                weight = unpermute_qk(weight, heads)
            if shift:  # Gemma: the file holds 1 + w, the model multiplies by 1 + w itself
                weight = weight - conventions.norm_shift
            dest.copy_(torch.from_numpy(weight))
        loaded.append(target)
    check_complete(model, loaded)
    return model, tokenizer_from_gguf(metadata, path), config
