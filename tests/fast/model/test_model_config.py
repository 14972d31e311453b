"""ModelConfig from HF dicts and GGUF metadata, derived sizes, and the named errors."""

from __future__ import annotations

import pytest
import torch

from fast.model.attention_context import AttentionContext
from fast.model.config import InvalidModelConfigError, ModelConfig, RopeScaling
from fast.model.rope import inverse_frequencies

transformers = pytest.importorskip("transformers")


def test_benchmark_shapes_parameter_counts() -> None:
    # published sizes: Llama-3-8B 8.03B parameters, Llama-3.2-1B 1.24B (tied)
    assert round(ModelConfig.llama3_8b().num_parameters / 1e9, 2) == 8.03
    assert round(ModelConfig.llama32_1b().num_parameters / 1e9, 2) == 1.24
    assert ModelConfig.llama32_1b().head_dim == 64


def test_from_hf_config_reads_old_and_new_rope_spellings() -> None:
    base = dict(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        model_type="llama",
    )
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    old = ModelConfig.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": scaling})
    new = ModelConfig.from_hf_config({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert old == new
    assert old.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and old.rope_theta == 5e5
    assert old.num_key_value_heads == 4 and old.head_dim == 8
    qwen = ModelConfig.from_hf_config({**base, "model_type": "qwen2"})
    assert qwen.attention_bias
    mistral = ModelConfig.from_hf_config({**base, "model_type": "mistral", "sliding_window": 7})
    assert mistral.sliding_window == 7


def test_inverse_frequencies_equal_transformers_llama3() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    )
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = inverse_frequencies(128, 500000.0, RopeScaling(32.0, 1.0, 4.0, 8192))
    assert torch.equal(got, want)
    plain = inverse_frequencies(128, 500000.0)
    assert not torch.equal(got, plain)
    assert torch.equal(got[:10], plain[:10])  # high frequencies untouched


@pytest.mark.parametrize(
    "change,name",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(vocab_size=-1), "vocab_size"),
    ],
)
def test_invalid_shapes_raise_with_numbers(change: dict[str, int], name: str) -> None:
    values = dict(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    with pytest.raises(InvalidModelConfigError, match=f"{name}={change[name]}"):
        ModelConfig(**{**values, **change})


def test_unsupported_hf_features_raise() -> None:
    base = dict(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    with pytest.raises(InvalidModelConfigError, match="lacks 'vocab_size'"):
        ModelConfig.from_hf_config({k: v for k, v in base.items() if k != "vocab_size"})
    with pytest.raises(InvalidModelConfigError, match="'yarn'"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2}})
    with pytest.raises(InvalidModelConfigError, match="mlp_bias=True"):
        ModelConfig.from_hf_config({**base, "mlp_bias": True})
    with pytest.raises(InvalidModelConfigError, match="layer_types=3, num_hidden_layers=1"):
        ModelConfig.from_hf_config(
            {
                **base,
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 4,
                "layer_types": ["full_attention"] * 3,
            }
        )
    with pytest.raises(InvalidModelConfigError, match="hidden_act='gelu'"):
        ModelConfig(**ModelConfig.from_hf_config(base).__dict__ | {"hidden_act": "gelu"})
    with pytest.raises(InvalidModelConfigError, match="sliding_layers=2, num_hidden_layers=1"):
        ModelConfig(**ModelConfig.from_hf_config(base).__dict__ | {"sliding_layers": (True,) * 2})
    with pytest.raises(InvalidModelConfigError, match="attn_logit_softcap=0.0"):
        ModelConfig(**ModelConfig.from_hf_config(base).__dict__ | {"attn_logit_softcap": 0.0})


def test_qwen2_per_layer_windows_follow_transformers() -> None:
    """transformers 5.24: windows only with use_sliding_window, on layers >= max_window_layers
    (or those layer_types marks), and none at all when the flag is off."""
    base = dict(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        model_type="qwen2",
        sliding_window=6,
    )
    on = {**base, "use_sliding_window": True, "max_window_layers": 3}
    assert ModelConfig.from_hf_config(on).layer_windows == (None, None, None, 6)
    typed = {**on, "layer_types": ["sliding_attention", "full_attention"] * 2}
    assert ModelConfig.from_hf_config(typed).layer_windows == (6, None, 6, None)
    off = {**typed, "use_sliding_window": False}
    assert ModelConfig.from_hf_config(off).layer_windows == (None,) * 4
    hf = transformers.Qwen2Config(**{k: v for k, v in on.items() if k != "model_type"})
    assert ModelConfig.from_hf_config(hf.to_dict()).layer_windows == tuple(
        6 if t == "sliding_attention" else None for t in hf.layer_types
    )


def test_from_gguf_metadata() -> None:
    md = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 1,
        "llama.rope.freq_base": 5e5,
        "llama.rope.scaling.factor": 8.0,
        "llama.context_length": 1024,
        "tokenizer.ggml.eos_token_id": 9,
    }
    c = ModelConfig.from_gguf(md, tie_word_embeddings=True, vocab_size=100)
    assert (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.head_dim) == (2, 64, 1, 16)
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and c.eos_token_id == 9
    with pytest.raises(InvalidModelConfigError, match="llama.block_count"):
        ModelConfig.from_gguf(
            {k: v for k, v in md.items() if k != "llama.block_count"},
            tie_word_embeddings=True,
            vocab_size=100,
        )


def test_attention_context_build() -> None:
    ctx = AttentionContext.build([[5, 2, 4], [7]], [3, 0], [2, 1], block_size=2)
    # seq 0: pos 3 -> block 2 offset 1 = slot 5, pos 4 -> block 4 offset 0 = slot 8; seq 1: 14
    assert ctx.slot_mapping.tolist() == [5, 8, 14]
    assert ctx.block_tables.tolist() == [[5, 2, 4], [7, 0, 0]]
    assert ctx.seq_lens.tolist() == [5, 1] and ctx.cu_seqlens_q.tolist() == [0, 2, 3]
    assert ctx.max_seqlen_q == 2 and not ctx.is_decode and ctx.num_tokens == 3
    assert ctx.block_tables.dtype == torch.int32 and ctx.slot_mapping.dtype == torch.int64
    assert AttentionContext.build([[1]], [0], [1], 4).is_decode
    with pytest.raises(ValueError, match="1 blocks of 2 cannot hold 2 \\+ 1"):
        AttentionContext.build([[1]], [2], [1], 2)


def test_rope_freq_factors_validated() -> None:
    values = dict(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    assert ModelConfig(**values, rope_freq_factors=(1.0, 2.0, 4.0, 8.0)).rope_freq_factors
    with pytest.raises(InvalidModelConfigError, match="factors=3"):
        ModelConfig(**values, rope_freq_factors=(1.0, 2.0, 4.0))
    with pytest.raises(InvalidModelConfigError, match="head_dim=8"):
        ModelConfig(**values, rope_freq_factors=(1.0, 0.0, 4.0, 8.0))


def test_gguf_head_dim_from_key_length_and_partial_rope_rejected() -> None:
    md = {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.key_length": 32,
        "llama.rope.dimension_count": 32,
    }
    assert ModelConfig.from_gguf(md, tie_word_embeddings=True, vocab_size=10).head_dim == 32
    with pytest.raises(InvalidModelConfigError, match="rope_dimension_count=16"):
        ModelConfig.from_gguf(
            {**md, "llama.rope.dimension_count": 16}, tie_word_embeddings=True, vocab_size=10
        )


def test_architectures_that_is_not_a_list_of_names_is_refused() -> None:
    # a bare string used to fall back to model_type (default "llama"): a GPT-2 config.json
    # without model_type would have been loaded as Llama
    from fast.model.config import hf_architecture

    for bad in ("GPT2LMHeadModel", [None], [""], {"name": "LlamaForCausalLM"}):
        with pytest.raises(InvalidModelConfigError, match="architectures") as e:
            hf_architecture({"architectures": bad})
        assert e.value.numbers == {"architectures": bad}
    assert hf_architecture({"architectures": ["Qwen3ForCausalLM"]}) == "Qwen3ForCausalLM"
    assert hf_architecture({"architectures": None, "model_type": "phi3"}) == "Phi3ForCausalLM"
