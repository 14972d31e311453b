"""Load a GGUF file (llama.cpp's format): metadata, dequantized tensors, tokenizer."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from fast.loader.dequant import (
    UnsupportedQuantizationError,
    dequantize,
    supported_types,
    unpermute_qk,
)
from fast.loader.gguf_file import read_gguf
from fast.loader.weights import check_complete, empty_model
from fast.model import LlamaForCausalLM, WeightLoadError
from fast.model.config import ModelConfig
from fast.tokenizer.gguf import tokenizer_from_gguf
from fast.tokenizer.tokenizer import Tokenizer

# llama.cpp tensor name -> Hugging Face tensor name ("{i}" = layer index)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_ARCHITECTURES = {"llama", "qwen2"}  # Mistral and SmolLM2 files say "llama"


class UnsupportedGGUFError(ValueError):
    """The GGUF file holds an architecture or tensor this loader does not handle."""


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None when it has no counterpart.

    >>> hf_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    >>> hf_name("output_norm.weight")
    'model.norm.weight'
    >>> hf_name("rope_freqs.weight") is None  # read into the config, not a parameter
    True
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


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
    arch = str(metadata.get("general.architecture"))
    if arch not in _ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"GGUF architecture {arch!r} in {path} is not one of {sorted(_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in tensor_list}
    if "token_embd.weight" not in tensors:
        raise UnsupportedGGUFError(f"{path} has no token_embd.weight tensor")
    config = ModelConfig.from_gguf(
        metadata,
        tie_word_embeddings="output.weight" not in tensors,
        vocab_size=tensors["token_embd.weight"].shape[0],
    )
    if "rope_freqs.weight" in tensors:  # Llama 3.1+ files store rope scaling as factors
        freqs = tensors["rope_freqs.weight"]
        factors = dequantize(freqs.data, freqs.type_id, freqs.shape, freqs.name)
        config = replace(config, rope_freq_factors=tuple(float(f) for f in factors))
    model = empty_model(config, dtype, device)
    loaded: list[str] = []
    for name, tensor in tensors.items():
        target = hf_name(name)
        if target is None:
            if name == "rope_freqs.weight":
                continue  # read above into the config
            raise UnsupportedGGUFError(f"GGUF tensor {name!r} has no counterpart in the model")
        dest = model.weight_destination(target)
        if dest is not None and tuple(dest.shape) != tensor.shape:
            raise WeightLoadError(target, "shape mismatch", tuple(dest.shape), tensor.shape)
        permute = arch == "llama" and (".attn_q." in name or ".attn_k." in name)
        direct = (
            dest is not None
            and not permute
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
            dest.copy_(torch.from_numpy(weight))
        loaded.append(target)
    check_complete(model, loaded)
    return model, tokenizer_from_gguf(metadata), config
