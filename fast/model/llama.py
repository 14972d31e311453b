"""The Llama-family causal LM over a flat token batch and a paged KV cache.

The base of every architecture (``fast.model.registry``): a subclass swaps the decoder layer
(``decoder_layer``, Gemma), the rope tables (:meth:`LlamaForCausalLM.rope_frequencies` /
:meth:`LlamaForCausalLM.rope`, Phi-3's LongRoPE) or the checkpoint's tensor names (Phi-3's
fused projections); the rest follows ``ModelConfig`` switches.
"""

from __future__ import annotations

import torch
from torch import nn

from fast.model.attention_context import AttentionContext
from fast.model.config import InvalidModelConfigError, LongRopeScaling, ModelConfig
from fast.model.layers import DecoderLayer, Embedding, Linear, RMSNorm
from fast.model.rope import inverse_frequencies, rope_cos_sin
from fast.model.step_plan import plan_decode_step

# Hugging Face projection name -> (our fused module, index of its slice)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class WeightLoadError(ValueError):
    """A checkpoint tensor has an unknown name or a shape the model does not expect."""

    def __init__(
        self,
        name: str,
        message: str,
        expected: tuple[int, ...] | None = None,
        got: tuple[int, ...] | None = None,
    ) -> None:
        detail = f" (expected shape {expected}, got {got})" if expected is not None else ""
        super().__init__(f"weight {name!r}: {message}{detail}")
        self.name, self.expected, self.got = name, expected, got


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm (Hugging Face's ``model.*`` names)."""

    def __init__(self, config: ModelConfig, layer: type[DecoderLayer] = DecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weight_offset)


class LlamaForCausalLM(nn.Module):
    """Llama 2/3, Mistral, Qwen2/3, SmolLM2: ``forward`` returns hidden states, not logits.

    Logits are computed only for the rows the sampler needs (``compute_logits``), usually the
    last token of each sequence.
    """

    decoder_layer: type[DecoderLayer] = DecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.decoder_layer)
        self.lm_head: Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # Kept off the module's buffers so that model.to(dtype) cannot round them to bf16.
        self._inv_freqs = self.rope_frequencies()  # each [R/2] float32, CPU
        self._inv_freqs_on: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._layer_rope = tuple(self.rope_table(i) for i in range(config.num_hidden_layers))

    fused_ops = False  # what use_fused_ops set last

    def use_fused_ops(self, on: bool = True) -> None:
        """Run each layer's rope + KV write, residual add + norm and gated activation as the
        fused kernels of ``kernels.fused`` (``on``) or as the unfused chains (fast.model.layers)."""
        self.fused_ops = on
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.fused = on
            layer.self_attn.fused = on
            layer.mlp.fused = on

    def rope_frequencies(self) -> tuple[torch.Tensor, ...]:
        """The inverse frequencies [R/2] (float32, CPU) of each rope table.

        Table 0 is the model's; with ``rope_local_theta`` (Gemma 3) table 1 serves the windowed
        layers, unscaled.
        """
        c = self.config
        if isinstance(c.rope_scaling, LongRopeScaling):
            raise InvalidModelConfigError(
                "longrope scaling needs the Phi-3 model", architecture=c.architecture
            )
        tables = [
            inverse_frequencies(
                c.rotary_dimension, c.rope_theta, c.rope_scaling, c.rope_freq_factors
            )
        ]
        if c.rope_local_theta is not None:
            tables.append(inverse_frequencies(c.rotary_dimension, c.rope_local_theta))
        return tuple(tables)

    def rope_table(self, layer: int) -> int:
        """Which of :meth:`rope` 's tables layer ``layer`` rotates by."""
        local = self.config.rope_local_theta is not None
        return 1 if local and self.config.layer_window(layer) is not None else 0

    def rope_inv_freqs(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The float32 rotary inverse frequencies [R/2] of every table on ``device`` (cached)."""
        cached = self._inv_freqs_on.get(device)
        if cached is None:
            cached = tuple(f.to(device) for f in self._inv_freqs)
            self._inv_freqs_on[device] = cached
        return cached

    def rope(
        self, positions: torch.Tensor, ctx: AttentionContext, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """positions [T] -> (cos, sin) [T, 1, R] of every rope table, once per forward."""
        return [rope_cos_sin(positions, f, dtype) for f in self.rope_inv_freqs(positions.device)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, H]; writes the new K/V into kv_caches."""
        if len(kv_caches) != self.config.num_hidden_layers:
            raise ValueError(
                f"need one (k, v) cache per layer: {len(kv_caches)} given, "
                f"{self.config.num_hidden_layers} layers"
            )
        x, ropes = self.embed(input_ids, positions, ctx)  # [T, H]; per table (cos, sin)
        plan = plan_decode_step(self.config, ctx, x.dtype, kv_caches)  # once per step
        for layer, table, (k_cache, v_cache) in zip(self.model.layers, self._layer_rope, kv_caches):
            x = layer(x, ctx, k_cache, v_cache, ropes[table], plan)
        out: torch.Tensor = self.model.norm(x)
        return out

    def embed(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """input_ids [T], positions [T] -> (x [T, H], per rope table (cos, sin) [T, 1, R]): what
        the forward computes before its first layer."""
        x = self.model.embed_tokens(input_ids)  # [T, H]
        if self.config.embedding_multiplier != 1.0:  # rounded to the activation dtype first
            x = x * float(torch.tensor(self.config.embedding_multiplier, dtype=x.dtype))
        return x, self.rope(positions, ctx, x.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] float32 (soft-capped, in the model dtype, if the
        config says so)."""
        weight = (
            self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        )  # [V, H]
        logits = torch.nn.functional.linear(hidden, weight)  # [N, V]
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    # -- weights, by Hugging Face name
    def expected_weight_names(self) -> set[str]:
        """The Hugging Face tensor names a complete checkpoint provides."""
        names: set[str] = set()
        for name, _ in self.named_parameters():
            prefix, _, leaf = name.rpartition(".")
            module, _, stem = prefix.rpartition(".")
            fused = [hf for hf, (ours, _) in _FUSED.items() if ours == stem]
            names.update(f"{module}.{hf}.{leaf}" for hf in fused) if fused else names.add(name)
        return names

    def weight_destination(self, name: str) -> torch.Tensor | None:
        """The tensor (a view into a possibly fused parameter) that HF tensor ``name`` fills.

        None for tensors the model does not store (rotary caches; ``lm_head`` when tied).
        Raises :class:`WeightLoadError` for names the model does not know.
        """
        if "rotary_emb" in name:
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: the embedding is the output projection
        prefix, _, leaf = name.rpartition(".")
        module, _, stem = prefix.rpartition(".")
        target_name = name
        if stem in _FUSED:
            target_name = f"{module}.{_FUSED[stem][0]}.{leaf}"
        param = self._parameter(target_name)
        if param is None:
            raise WeightLoadError(name, "no such parameter in the model")
        dest: torch.Tensor = param.data
        if stem in _FUSED:
            sizes = self._fused_sizes(stem)
            index = _FUSED[stem][1]
            dest = dest.narrow(0, sum(sizes[:index]), sizes[index])
        return dest

    @torch.no_grad()
    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one Hugging Face-named tensor into its (possibly fused) parameter."""
        dest = self.weight_destination(name)
        if dest is None:
            return
        if tuple(dest.shape) != tuple(tensor.shape):
            raise WeightLoadError(name, "shape mismatch", tuple(dest.shape), tuple(tensor.shape))
        dest.copy_(tensor)

    def _parameter(self, name: str) -> nn.Parameter | None:
        module_name, _, leaf = name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            return None
        param = module._parameters.get(leaf)
        return param

    def _fused_sizes(self, stem: str) -> list[int]:
        c = self.config
        if stem in ("q_proj", "k_proj", "v_proj"):
            return [c.q_size, c.kv_size, c.kv_size]
        return [c.intermediate_size, c.intermediate_size]


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One zeroed (K, V) pair per layer, each [num_blocks, block_size, Hkv, D]."""
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"num_blocks and block_size must be >= 1: {num_blocks}, {block_size}")
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(config.num_hidden_layers)
    ]
