"""How llama.cpp's converter stores each architecture in GGUF, and how to read it back.

One :class:`GGUFConventions` per GGUF ``general.architecture`` the loader reads: the llama.cpp
names of each layer's tensors (and their Hugging Face counterparts), which values the converter
changed on the way (Llama's Q/K row permutation, Gemma's norm weights stored as ``1 + w``), the
tensors that are not parameters (rope factors, read into the config), and the reader of the
architecture's metadata keys into a :class:`~fast.model.config.ModelConfig`. Which model class
runs the result is the registry's business (``fast.model.registry.gguf_architecture``).

The conventions, from llama.cpp's ``convert_hf_to_gguf.py`` (its ``conversion/`` package),
``gguf-py/gguf/constants.py`` and the hyperparameter loading in ``src/``:

* ``llama``: Q and K rows are permuted per head (rotary halves interleaved); undone here.
  ``rope.scaling.type`` ``linear`` is read here, Llama 3's scaling keys and ``rope_freqs`` by
  :meth:`ModelConfig.from_gguf <fast.model.config.ModelConfig.from_gguf>`; any other type (YaRN)
  is refused. Every architecture takes an ``attention.scale`` key as its score scale.
  ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3`` and ``phi3`` are stored as Hugging Face has them
  (llama.cpp runs them with NeoX-style rope, Hugging Face's own layout).
* ``qwen3``: per-head ``attn_q_norm`` / ``attn_k_norm``; ``attention.key_length`` is the head
  size, which need not be ``embedding_length / head_count``. No sliding window.
* ``gemma2`` / ``gemma3``: every ``*norm.weight`` is stored plus one (the model multiplies by
  ``1 + w``); four norms per layer: ``attn_norm``, ``post_attention_norm``, ``ffn_norm`` (Hugging
  Face's ``pre_feedforward_layernorm``) and ``post_ffw_norm``. The score scale is not stored:
  llama.cpp uses ``key_length ** -0.5``, except for the 27B models (46 layers for Gemma 2, 62 for
  Gemma 3), which use ``(embedding_length / head_count) ** -0.5``; an ``attention.scale`` key
  overrides both. Windows: Gemma 2 every other layer from the first, Gemma 3 five of six, both
  ``attention.sliding_window`` wide (no key: no window). Gemma 2's soft-caps are
  ``attn_logit_softcapping`` and ``final_logit_softcapping`` (llama.cpp's defaults 50 and 30);
  Gemma 3 has only the final one, when the key is there. Gemma 3's windowed layers use
  ``rope.freq_base_swa`` (default 10000) unscaled; its global layers ``rope.freq_base`` with
  ``rope.scaling.type`` ``linear`` and ``rope.scaling.factor`` where present. Gemma 2 files carry
  no ``output`` tensor (tied embeddings).
* ``phi3``: fused ``attn_qkv`` (Q, K, V rows) and ``ffn_up`` (gate then up rows), which are this
  engine's own layout; ``rope.dimension_count`` below the head size is partial rotary;
  ``attention.sliding_window`` on every layer (0: none, Phi-4); LongRoPE as two F32 tensors
  ``rope_factors_long`` / ``rope_factors_short`` with ``rope.scaling.original_context_length``
  and ``rope.scaling.attn_factor`` (when absent, Hugging Face's
  ``sqrt(1 + ln(s) / ln(original))``, ``s = context_length / original``).

A metadata key that changes what the model computes and that this reader cannot honor (a rope
scaling type other than the above, a Qwen3 sliding window whose layers the file does not say,
``value_length`` unlike ``key_length``) is refused with
:class:`~fast.model.config.InvalidModelConfigError` naming it.

>>> CONVENTIONS["gemma2"].hf_name("blk.1.post_ffw_norm.weight")
'model.layers.1.post_feedforward_layernorm.weight'
>>> CONVENTIONS["phi3"].hf_name("blk.0.attn_qkv.weight")
'model.layers.0.self_attn.qkv_proj.weight'
>>> CONVENTIONS["qwen3"].hf_name("blk.0.attn_qkv.weight") is None  # not a qwen3 tensor
True
>>> CONVENTIONS["gemma3"].norm_shift, CONVENTIONS["llama"].permute_qk
(1.0, True)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from fast.loader.dequant import dequantize
from fast.loader.gguf_file import GGUFTensor
from fast.model.config import (
    InvalidModelConfigError,
    LinearRopeScaling,
    LongRopeScaling,
    ModelConfig,
)
from fast.model.registry import gguf_architecture

__all__ = ["CONVENTIONS", "GGUFConventions", "config_from_gguf"]

_LLAMA_LAYER = {
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
_QK_NORMS = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GEMMA_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if not k.endswith(".bias")},
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_PHI3_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",  # gate and up rows, fused
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style per-frequency divisors
_LONG, _SHORT = "rope_factors_long.weight", "rope_factors_short.weight"  # Phi-3 LongRoPE

Tensors = Mapping[str, GGUFTensor]


@dataclass(frozen=True)
class GGUFConventions:
    """How llama.cpp stores one architecture (see the module docstring)."""

    name: str  # GGUF ``general.architecture``
    layer_names: Mapping[str, str]  # llama.cpp name inside ``blk.{i}.`` -> HF name in the layer
    read_config: Callable[[Mapping[str, Any], Tensors], ModelConfig]
    permute_qk: bool = False  # Q/K rows interleaved per head (llama only)
    norm_shift: float = 0.0  # added to every ``*norm.weight`` by the converter (Gemma: 1)
    config_tensors: frozenset[str] = frozenset()  # read into the config, not parameters

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a llama.cpp tensor, or None when it is not one of this
        architecture's parameters."""
        if gguf_name in _GLOBAL:
            return _GLOBAL[gguf_name]
        match = _LAYER.match(gguf_name)
        if match and match.group(2) in self.layer_names:
            return f"model.layers.{match.group(1)}.{self.layer_names[match.group(2)]}"
        return None

    def shifted(self, gguf_name: str) -> bool:
        """Whether the converter added :attr:`norm_shift` to this tensor."""
        return self.norm_shift != 0.0 and gguf_name.endswith("norm.weight")


def _float_tensor(tensors: Tensors, name: str) -> tuple[float, ...]:
    t = tensors[name]
    return tuple(float(f) for f in dequantize(t.data, t.type_id, t.shape, t.name).reshape(-1))


class _Keys:
    """The ``<arch>.*`` metadata of one file; a missing required key is named."""

    def __init__(self, metadata: Mapping[str, Any], arch: str) -> None:
        self.metadata, self.arch = metadata, arch

    def get(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{name}", default)

    def need(self, name: str) -> Any:
        full = f"{self.arch}.{name}"
        if full not in self.metadata:
            raise InvalidModelConfigError(f"GGUF metadata lacks {full!r}", arch=self.arch)
        return self.metadata[full]

    def count(self, name: str, default: int | None = None) -> int:
        """A size or count: one non-negative integer (llama.cpp also writes per-layer lists,
        which these architectures do not have)."""
        value = self.need(name) if default is None else self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidModelConfigError(
                "GGUF metadata value must be a non-negative integer", **{name: value}
            )
        return value

    def number(self, name: str, default: float | None = None, *, zero: bool = False) -> float:
        """A real value: one finite number > 0 (>= 0 with ``zero``, where 0 means "none"), not
        a bool, a string or a per-layer list; a missing required key is named."""
        value = self.need(name) if default is None else self.get(name, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            need = "a finite number >= 0" if zero else "a finite number > 0"
            raise InvalidModelConfigError(
                f"GGUF metadata value must be {need}", **{f"{self.arch}.{name}": value}
            )
        return float(value)


def _hf_fields(keys: _Keys, tensors: Tensors) -> dict[str, Any]:
    """The config.json fields every new architecture stores under the same GGUF keys."""
    heads = keys.count("attention.head_count")
    hidden = keys.count("embedding_length")
    head_dim = keys.count("attention.key_length", hidden // max(heads, 1))
    value_dim = keys.count("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise InvalidModelConfigError(
            "value heads of another size than the key heads are not supported",
            key_length=head_dim,
            value_length=value_dim,
        )
    md = keys.metadata
    return dict(
        architectures=[gguf_architecture(keys.arch).name],
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=keys.count("feed_forward_length"),
        num_hidden_layers=keys.count("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=keys.count("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=keys.number("attention.layer_norm_rms_epsilon"),
        rope_theta=keys.number("rope.freq_base", 10000.0),
        max_position_embeddings=keys.count("context_length"),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
    )


def _rope_scaling(keys: _Keys, allowed: tuple[str, ...]) -> dict[str, Any] | None:
    """``rope.scaling.type`` as a config.json ``rope_scaling`` dict (None: no scaling)."""
    kind = keys.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in allowed:
        raise InvalidModelConfigError(
            f"GGUF rope scaling type of {keys.arch} must be one of {('none', *allowed)}",
            rope_scaling_type=kind,
        )
    if kind == "linear":
        return {"rope_type": "linear", "factor": keys.number("rope.scaling.factor")}
    return None  # longrope: its factors are tensors, read by the Phi-3 reader


def _check_rope_dim(keys: _Keys, head_dim: int) -> None:
    rope_dim = keys.count("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise InvalidModelConfigError(
            f"partial rotary embeddings are not supported for {keys.arch}",
            rope_dimension_count=rope_dim,
            head_dim=head_dim,
        )


def _attention_scalar(keys: _Keys, fields: Mapping[str, Any], layers_27b: int) -> float:
    """Gemma's ``query_pre_attn_scalar`` as llama.cpp derives it (module docstring)."""
    if keys.get("attention.scale") is not None:
        return keys.number("attention.scale") ** -2
    if fields["num_hidden_layers"] == layers_27b:
        return float(fields["hidden_size"] // fields["num_attention_heads"])
    return float(fields["head_dim"])


def _with_scale(keys: _Keys, config: ModelConfig) -> ModelConfig:
    """An ``attention.scale`` key sets the score scale (as ``query_pre_attn_scalar``)."""
    if keys.get("attention.scale") is None:
        return config
    return replace(config, query_pre_attn_scalar=keys.number("attention.scale") ** -2)


def _read_llama(metadata: Mapping[str, Any], tensors: Tensors) -> ModelConfig:
    arch = str(metadata["general.architecture"])
    keys = _Keys(metadata, arch)
    kind = keys.get("rope.scaling.type")
    if kind not in (None, "none", "linear", "llama3"):  # llama3: scaling.factor and friends
        raise InvalidModelConfigError(
            f"GGUF rope scaling type of {arch} must be none, linear or llama3",
            rope_scaling_type=kind,
        )
    config = ModelConfig.from_gguf(
        metadata,
        tie_word_embeddings="output.weight" not in tensors,
        vocab_size=tensors["token_embd.weight"].shape[0],
    )
    if kind == "linear":  # from_gguf reads only Llama 3's scaling keys
        factor = keys.number("rope.scaling.factor")
        config = replace(config, rope_scaling=LinearRopeScaling(factor))
    if _ROPE_FREQS in tensors:  # Llama 3.1+ files store rope scaling as factors
        config = replace(config, rope_freq_factors=_float_tensor(tensors, _ROPE_FREQS))
    return _with_scale(keys, config)


def _read_qwen3(metadata: Mapping[str, Any], tensors: Tensors) -> ModelConfig:
    keys = _Keys(metadata, "qwen3")
    fields = _hf_fields(keys, tensors)
    _check_rope_dim(keys, fields["head_dim"])
    window = keys.get("attention.sliding_window")
    if window:  # llama.cpp runs Qwen3 without windows; the file would not say which layers
        raise InvalidModelConfigError(
            "a sliding window in a qwen3 GGUF file is not supported", sliding_window=window
        )
    cfg = dict(
        fields,
        model_type="qwen3",
        attention_bias="blk.0.attn_q.bias" in tensors,
        rope_scaling=_rope_scaling(keys, ("linear",)),
    )
    config = gguf_architecture("qwen3").read_hf_config(cfg)
    if _ROPE_FREQS in tensors:
        config = replace(config, rope_freq_factors=_float_tensor(tensors, _ROPE_FREQS))
    return _with_scale(keys, config)


def _gemma_fields(keys: _Keys, tensors: Tensors, layers_27b: int) -> dict[str, Any]:
    fields = _hf_fields(keys, tensors)
    _check_rope_dim(keys, fields["head_dim"])
    window = keys.count("attention.sliding_window", 0)  # 0 or absent: no window
    return dict(
        fields,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=window or None,
        query_pre_attn_scalar=_attention_scalar(keys, fields, layers_27b),
    )


def _read_gemma2(metadata: Mapping[str, Any], tensors: Tensors) -> ModelConfig:
    keys = _Keys(metadata, "gemma2")
    attn_cap = keys.number("attn_logit_softcapping", 50.0, zero=True)  # 0: no cap
    final_cap = keys.number("final_logit_softcapping", 30.0, zero=True)
    cfg = dict(
        _gemma_fields(keys, tensors, layers_27b=46),
        model_type="gemma2",
        attn_logit_softcapping=attn_cap or None,
        final_logit_softcapping=final_cap or None,
        rope_scaling=_rope_scaling(keys, ("linear",)),
    )
    return gguf_architecture("gemma2").read_hf_config(cfg)


def _read_gemma3(metadata: Mapping[str, Any], tensors: Tensors) -> ModelConfig:
    keys = _Keys(metadata, "gemma3")
    final_cap = keys.number("final_logit_softcapping", 0.0, zero=True)  # 0 or absent: none
    cfg = dict(
        _gemma_fields(keys, tensors, layers_27b=62),
        model_type="gemma3_text",
        sliding_window_pattern=6,
        attn_logit_softcapping=None,
        final_logit_softcapping=final_cap or None,
        rope_local_base_freq=keys.number("rope.freq_base_swa", 10000.0),
        rope_scaling=_rope_scaling(keys, ("linear",)),
    )
    return gguf_architecture("gemma3").read_hf_config(cfg)


def _read_phi3(metadata: Mapping[str, Any], tensors: Tensors) -> ModelConfig:
    keys = _Keys(metadata, "phi3")
    fields = _hf_fields(keys, tensors)
    rope_dim = keys.count("rope.dimension_count", fields["head_dim"])
    window = keys.count("attention.sliding_window", 0)  # 0 or absent: no window
    _rope_scaling(keys, ("longrope",))  # refuses any other type by name
    base = gguf_architecture("phi3").read_hf_config(
        dict(fields, model_type="phi3", sliding_window=window or None)
    )
    present = [n for n in (_LONG, _SHORT) if n in tensors]
    if len(present) == 1:
        raise InvalidModelConfigError(
            "LongRoPE needs both rope_factors_long and rope_factors_short", present=present
        )
    if not present and keys.get("rope.scaling.type") == "longrope":
        raise InvalidModelConfigError(
            "rope scaling type longrope without rope_factors_long / rope_factors_short tensors",
            rope_scaling_type="longrope",
        )
    scaling: LongRopeScaling | None = None
    if present:
        original = keys.count("rope.scaling.original_context_length")
        attention = (
            keys.number("rope.scaling.attn_factor")
            if keys.get("rope.scaling.attn_factor") is not None
            else None
        )
        if attention is None:
            s = base.max_position_embeddings / original
            attention = 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(original))
        scaling = LongRopeScaling(
            short_factor=_float_tensor(tensors, _SHORT),
            long_factor=_float_tensor(tensors, _LONG),
            original_max_position_embeddings=original,
            attention_factor=float(attention),
        )
    return _with_scale(keys, replace(base, rotary_dim=rope_dim, rope_scaling=scaling))


CONVENTIONS: dict[str, GGUFConventions] = {
    c.name: c
    for c in (
        GGUFConventions(
            "llama",
            _LLAMA_LAYER,
            _read_llama,
            permute_qk=True,
            config_tensors=frozenset({_ROPE_FREQS}),
        ),
        GGUFConventions(
            "qwen2", _LLAMA_LAYER, _read_llama, config_tensors=frozenset({_ROPE_FREQS})
        ),
        GGUFConventions(
            "qwen3",
            {**_LLAMA_LAYER, **_QK_NORMS},
            _read_qwen3,
            config_tensors=frozenset({_ROPE_FREQS}),
        ),
        GGUFConventions("gemma2", _GEMMA_LAYER, _read_gemma2, norm_shift=1.0),
        GGUFConventions("gemma3", {**_GEMMA_LAYER, **_QK_NORMS}, _read_gemma3, norm_shift=1.0),
        GGUFConventions("phi3", _PHI3_LAYER, _read_phi3, config_tensors=frozenset({_LONG, _SHORT})),
    )
}
"""Every GGUF ``general.architecture`` the loader reads, by name."""


def config_from_gguf(metadata: Mapping[str, Any], tensors: Tensors) -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF file whose architecture is in :data:`CONVENTIONS`."""
    arch = str(metadata.get("general.architecture"))
    return CONVENTIONS[arch].read_config(metadata, tensors)
