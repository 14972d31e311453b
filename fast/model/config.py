"""Model configuration: the shape of a Llama-family decoder, read from Hugging Face or GGUF.

One frozen dataclass, :class:`ModelConfig`, describes every architecture the engine serves
(Llama 2 and 3, Mistral, Qwen2, SmolLM2): they differ only in numbers (heads, rope base, rope
scaling) and two switches (tied embeddings, bias on the Q/K/V projections).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class InvalidModelConfigError(ValueError):
    """A model configuration is missing a field or holds an impossible value."""

    def __init__(self, message: str, **numbers: object) -> None:
        details = ", ".join(f"{k}={v!r}" for k, v in numbers.items())
        super().__init__(f"{message} ({details})" if details else message)
        self.numbers = numbers


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rope scaling (``rope_type: "llama3"``).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided
    by ``factor``; shorter than ``original_max_position_embeddings / high_freq_factor`` are kept;
    the band between is interpolated linearly.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder-only model.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` when built from a dict.
    ``rope_freq_factors`` (llama.cpp's ``rope_freqs`` tensor, how Llama-3.1 GGUF files store
    their rope scaling) divides each rotary frequency; it applies on top of ``rope_scaling``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidModelConfigError(f"{name} must be a positive int", **{name: value})
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise InvalidModelConfigError(
                "num_attention_heads must be a multiple of num_key_value_heads",
                num_attention_heads=self.num_attention_heads,
                num_key_value_heads=self.num_key_value_heads,
            )
        if self.head_dim % 2 != 0:
            raise InvalidModelConfigError(
                "head_dim must be even for rotary embeddings", head_dim=self.head_dim
            )
        if self.rope_freq_factors is not None and (
            len(self.rope_freq_factors) != self.head_dim // 2
            or not all(f > 0 for f in self.rope_freq_factors)
        ):
            raise InvalidModelConfigError(
                "rope_freq_factors needs head_dim // 2 positive factors",
                head_dim=self.head_dim,
                factors=len(self.rope_freq_factors),
            )

    # -- derived sizes
    @property
    def q_size(self) -> int:
        """Width of the query projection output: ``num_attention_heads * head_dim``."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projection outputs."""
        return self.num_key_value_heads * self.head_dim

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, f = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + h

    # -- constructors
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2 model types)."""

        def need(key: str) -> Any:
            if key not in cfg:
                raise InvalidModelConfigError(f"config.json lacks {key!r}", keys=sorted(cfg))
            return cfg[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        model_type = str(cfg.get("model_type", "llama"))
        bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        head_dim = cfg.get("head_dim") or hidden // heads
        rope_params = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(rope_params, Mapping):
            theta = rope_params.get("rope_theta")
        eos = cfg.get("eos_token_id")
        if cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
            raise InvalidModelConfigError(
                "only the bias-free SwiGLU MLP is supported",
                mlp_bias=cfg.get("mlp_bias"),
                hidden_act=cfg.get("hidden_act"),
            )
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise InvalidModelConfigError(
                "Qwen2 per-layer sliding windows are not supported",
                max_window_layers=cfg.get("max_window_layers"),
            )
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=_rope_scaling_from_dict(rope_params),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            sliding_window=int(window) if window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_gguf(
        cls,
        metadata: Mapping[str, Any],
        *,
        tie_word_embeddings: bool,
        vocab_size: int | None = None,
    ) -> ModelConfig:
        """Build from GGUF metadata (``general.architecture`` and its ``<arch>.*`` keys).

        Whether the output projection is tied is a property of the tensors present, not of the
        metadata, so the caller passes it.
        """
        arch = str(metadata.get("general.architecture", "llama"))

        def key(name: str, default: Any = None) -> Any:
            full = f"{arch}.{name}"
            if full not in metadata:
                if default is None:
                    raise InvalidModelConfigError(f"GGUF metadata lacks {full!r}", arch=arch)
                return default
            return metadata[full]

        heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        if vocab_size is None:
            vocab_size = int(key("vocab_size", len(metadata.get("tokenizer.ggml.tokens", []))))
        head_dim = int(key("attention.key_length", hidden // heads))
        rope_dim = int(key("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise InvalidModelConfigError(
                "partial rotary embeddings are not supported",
                rope_dimension_count=rope_dim,
                head_dim=head_dim,
            )
        scaling: RopeScaling | None = None
        if (
            f"{arch}.rope.scaling.factor" in metadata
            and str(metadata.get(f"{arch}.rope.scaling.type", "llama3")) == "llama3"
        ):
            scaling = RopeScaling(
                factor=float(key("rope.scaling.factor")),
                low_freq_factor=float(key("rope.scaling.low_freq_factor", 1.0)),
                high_freq_factor=float(key("rope.scaling.high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    key("rope.scaling.original_context_length", 8192)
                ),
            )
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(key("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(key("context_length", 4096)),
            tie_word_embeddings=tie_word_embeddings,
            attention_bias=arch == "qwen2",
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        )

    # -- the GPU benchmark shapes (docs/workloads.md)
    @classmethod
    def llama3_8b(cls) -> ModelConfig:
        """Llama-3-8B: hidden 4096, 32 layers, 32 heads / 8 KV heads, ffn 14336, vocab 128256."""
        return cls(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            max_position_embeddings=8192,
            bos_token_id=128000,
            eos_token_id=128001,
        )

    @classmethod
    def llama32_1b(cls) -> ModelConfig:
        """Llama-3.2-1B: hidden 2048, 16 layers, 32 heads / 8 KV heads, ffn 8192, tied."""
        return cls(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            bos_token_id=128000,
            eos_token_id=128001,
        )


def _rope_scaling_from_dict(params: Any) -> RopeScaling | None:
    """Read a HF ``rope_scaling`` dict; only ``llama3`` changes the frequencies here."""
    if not isinstance(params, Mapping):
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise InvalidModelConfigError("unsupported rope scaling type", rope_type=kind)
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
