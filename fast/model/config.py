"""Model configuration: the shape of a Llama-family decoder, read from Hugging Face or GGUF.

One frozen dataclass, :class:`ModelConfig`, describes every architecture the engine serves
(Llama 2 and 3, Mistral, Qwen2, Qwen3, Gemma 2 and 3, Phi-3, SmolLM2): they differ in numbers
(heads, rope base and scaling, windows, soft-caps) and a few switches (tied embeddings, Q/K/V
bias, per-head Q/K norms, the norm's weight offset, the MLP's activation). Which module stacks
the layers is ``architecture``'s business (``fast.model.registry``); the readers of the
architecture-specific config keys live in that architecture's module (``fast.model.gemma``...).
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
class LinearRopeScaling:
    """Position interpolation (``rope_type: "linear"``): every frequency divided by ``factor``."""

    factor: float


@dataclass(frozen=True)
class LongRopeScaling:
    """Phi-3's LongRoPE (``rope_type: "longrope"``, formerly ``"su"``).

    Frequency ``i`` is divided by ``short_factor[i]`` for the tokens of a sequence whose length
    (cached + new tokens after the step) is at most ``original_max_position_embeddings``, and by
    ``long_factor[i]`` past it; cos and sin are multiplied by ``attention_factor`` either way.
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float


ACTIVATIONS = ("silu", "gelu_tanh")
"""The MLP's gate activations: SwiGLU's ``silu``, GeGLU's tanh-approximated ``gelu``."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder-only model.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` when built from a dict.
    ``rope_freq_factors`` (llama.cpp's ``rope_freqs`` tensor, how Llama-3.1 GGUF files store
    their rope scaling) divides each rotary frequency; it applies on top of ``rope_scaling``.

    Per-layer attention: ``sliding_window`` applies to every layer when ``sliding_layers`` is
    None, else to the layers it marks True (:meth:`layer_window`); ``rope_local_theta`` (Gemma 3)
    is the rope base of those windowed layers, which then take no rope scaling. Scores are
    scaled by ``query_pre_attn_scalar ** -0.5`` (default ``head_dim ** -0.5``) and soft-capped
    ``c * tanh(s / c)`` by ``attn_logit_softcap``; logits by ``final_logit_softcap``.
    ``rotary_dim`` (default ``head_dim``) is the rotated prefix of each head (partial rotary).
    RMSNorm multiplies by ``weight + norm_weight_offset`` (Gemma: 1); embeddings are multiplied
    by ``embedding_multiplier`` rounded to the activation dtype (Gemma: ``sqrt(hidden_size)``).
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
    rope_scaling: RopeScaling | LinearRopeScaling | LongRopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    architecture: str = "LlamaForCausalLM"
    sliding_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None
    rotary_dim: int | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    qk_norm: bool = False
    norm_weight_offset: float = 0.0
    hidden_act: str = "silu"
    embedding_multiplier: float = 1.0

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
        rotary = self.rotary_dimension
        if not (isinstance(rotary, int) and 2 <= rotary <= self.head_dim and rotary % 2 == 0):
            raise InvalidModelConfigError(
                "rotary_dim must be even and within [2, head_dim]",
                rotary_dim=rotary,
                head_dim=self.head_dim,
            )
        if self.rope_freq_factors is not None and (
            len(self.rope_freq_factors) != rotary // 2
            or not all(f > 0 for f in self.rope_freq_factors)
        ):
            raise InvalidModelConfigError(
                "rope_freq_factors needs head_dim // 2 positive factors",
                head_dim=self.head_dim,
                rotary_dim=rotary,
                factors=len(self.rope_freq_factors),
            )
        self._check_attention_params()
        self._check_rope_scaling()

    def _check_attention_params(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise InvalidModelConfigError(
                "sliding_window must be >= 1", sliding_window=self.sliding_window
            )
        if self.sliding_layers is not None:
            if len(self.sliding_layers) != self.num_hidden_layers:
                raise InvalidModelConfigError(
                    "sliding_layers needs one flag per layer",
                    sliding_layers=len(self.sliding_layers),
                    num_hidden_layers=self.num_hidden_layers,
                )
            if self.sliding_window is None:
                raise InvalidModelConfigError(
                    "sliding_layers without a sliding_window",
                    windowed_layers=sum(self.sliding_layers),
                )
        for name in (
            "query_pre_attn_scalar",
            "attn_logit_softcap",
            "final_logit_softcap",
            "rope_local_theta",
        ):
            value = getattr(self, name)
            if value is not None and not (value > 0 and value != float("inf")):
                raise InvalidModelConfigError(
                    f"{name} must be positive and finite", **{name: value}
                )
        if not (self.embedding_multiplier > 0 and self.embedding_multiplier != float("inf")):
            raise InvalidModelConfigError(
                "embedding_multiplier must be positive and finite",
                embedding_multiplier=self.embedding_multiplier,
            )
        if self.hidden_act not in ACTIVATIONS:
            raise InvalidModelConfigError(
                f"hidden_act must be one of {ACTIVATIONS}", hidden_act=self.hidden_act
            )

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if isinstance(scaling, LinearRopeScaling) and not scaling.factor > 0:
            raise InvalidModelConfigError("linear rope factor must be > 0", factor=scaling.factor)
        if isinstance(scaling, LongRopeScaling):
            half = self.rotary_dimension // 2
            if (
                len(scaling.short_factor) != half
                or len(scaling.long_factor) != half
                or not all(f > 0 for f in scaling.short_factor + scaling.long_factor)
            ):
                raise InvalidModelConfigError(
                    "longrope needs rotary_dim // 2 positive short and long factors",
                    rotary_dim=self.rotary_dimension,
                    short_factor=len(scaling.short_factor),
                    long_factor=len(scaling.long_factor),
                )
            if scaling.original_max_position_embeddings < 1:
                raise InvalidModelConfigError(
                    "longrope original_max_position_embeddings must be >= 1",
                    original_max_position_embeddings=scaling.original_max_position_embeddings,
                )
            if self.rope_freq_factors is not None:
                raise InvalidModelConfigError(
                    "longrope and rope_freq_factors cannot both divide the frequencies",
                    factors=len(self.rope_freq_factors),
                )

    # -- per-layer attention
    @property
    def rotary_dimension(self) -> int:
        """Rotated width of each head: ``rotary_dim``, or all of ``head_dim``."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: ``query_pre_attn_scalar ** -0.5``, else ``head_dim ** -0.5``."""
        base = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        return float(base**-0.5)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: it attends to every earlier token)."""
        if self.sliding_layers is None or self.sliding_layers[layer]:
            return self.sliding_window
        return None

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """:meth:`layer_window` of every layer."""
        return tuple(self.layer_window(i) for i in range(self.num_hidden_layers))

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
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * h * f + 2 * h  # Gemma's two extra norms per layer (2 h) not counted
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + h

    # -- constructors
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict of a Llama-like model.

        Reads the keys Llama, Mistral, Qwen2, Qwen3 and Phi-3 spell alike; the readers in
        ``fast.model.qwen3``, ``gemma`` and ``phi3`` add their architecture's own keys. Windows
        follow transformers 5.24: Mistral's and Phi-3's on every layer; Qwen's only with
        ``use_sliding_window``, on the layers ``layer_types`` marks ``"sliding_attention"``
        (when absent: the layers from ``max_window_layers`` on).
        """
        fields = hf_common_fields(cfg)
        model_type = str(cfg.get("model_type", "llama"))
        if cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
            raise InvalidModelConfigError(
                "only the bias-free SwiGLU MLP is supported",
                mlp_bias=cfg.get("mlp_bias"),
                hidden_act=cfg.get("hidden_act"),
            )
        window: int | None = None
        layers: tuple[bool, ...] | None = None
        if model_type in ("mistral", "phi3"):
            window = cfg.get("sliding_window") or None
        elif model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            window = cfg.get("sliding_window") or None
            first = int(cfg.get("max_window_layers", 28))
            default = [i >= first for i in range(fields["num_hidden_layers"])]
            layers = sliding_layers_from_types(cfg, default) if window else None
        rope_params = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        return cls(
            **fields,
            rope_scaling=rope_scaling_from_dict(rope_params),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            sliding_window=int(window) if window else None,
            sliding_layers=layers,
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
            architecture="Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM",
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


# transformers' model_type -> architecture, for config.json files without "architectures"
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def hf_architecture(cfg: Mapping[str, Any]) -> str:
    """``architectures[0]`` of a config.json, else the architecture of its ``model_type``.

    >>> hf_architecture({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    'Qwen3ForCausalLM'
    >>> hf_architecture({"model_type": "gemma3_text"})
    'Gemma3ForCausalLM'
    """
    names = cfg.get("architectures")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) and n for n in names)
    ):
        # e.g. a bare string: falling back to model_type (default llama) would load another
        # architecture's weights as Llama
        raise InvalidModelConfigError(
            'config.json "architectures" must be a list of names', architectures=names
        )
    if names:
        return str(names[0])
    model_type = str(cfg.get("model_type", "llama"))
    return _MODEL_TYPES.get(model_type, model_type)


def hf_common_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`ModelConfig` fields every supported config.json spells the same way.

    Sizes, norm epsilon, rope base (top-level ``rope_theta`` or a flat ``rope_parameters``),
    context length, tied embeddings, special tokens and the architecture name.
    """

    def need(key: str) -> Any:
        if key not in cfg:
            raise InvalidModelConfigError(f"config.json lacks {key!r}", keys=sorted(cfg))
        return cfg[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    rope_params = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(rope_params, Mapping):
        theta = rope_params.get("rope_theta")
    eos = cfg.get("eos_token_id")
    return dict(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta if theta is not None else 10000.0),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        architecture=hf_architecture(cfg),
    )


_LAYER_TYPES = {"sliding_attention": True, "full_attention": False}


def sliding_layers_from_types(cfg: Mapping[str, Any], default: list[bool]) -> tuple[bool, ...]:
    """Which layers slide: config.json's ``layer_types``, else ``default`` (one flag a layer).

    >>> sliding_layers_from_types({"layer_types": ["full_attention", "sliding_attention"]}, [])
    (False, True)
    """
    types = cfg.get("layer_types")
    if types is None:
        return tuple(default)
    if not isinstance(types, list) or any(t not in _LAYER_TYPES for t in types):
        raise InvalidModelConfigError(
            f"layer_types must list {sorted(_LAYER_TYPES)}", layer_types=types
        )
    if len(types) != int(cfg.get("num_hidden_layers", len(types))):
        raise InvalidModelConfigError(
            "layer_types needs one entry per layer",
            layer_types=len(types),
            num_hidden_layers=cfg.get("num_hidden_layers"),
        )
    return tuple(_LAYER_TYPES[t] for t in types)


def rope_scaling_from_dict(params: Any) -> RopeScaling | LinearRopeScaling | None:
    """Read a HF ``rope_scaling`` / ``rope_parameters`` dict: ``default``, ``linear``, ``llama3``.

    Any other type is refused by name (Phi-3's ``longrope`` is read by ``fast.model.phi3``).
    """
    if not isinstance(params, Mapping):
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind == "linear":
        return LinearRopeScaling(factor=float(params["factor"]))
    if kind != "llama3":
        raise InvalidModelConfigError("unsupported rope scaling type", rope_type=kind)
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
