"""The model + Hugging Face loader against transformers on random tiny checkpoints (float32, CPU).

Each case builds a seeded transformers model, saves it with ``save_pretrained`` (safetensors),
loads it back through ``fast.loader.load_model`` and checks that prefill logits agree within 1e-4
and that 10 greedy tokens (paged prefill, then paged decode through ``kernels``) are identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fast.loader import LoadedModel, load_model
from fast.model import WeightLoadError, allocate_kv_caches
from fast.model.attention_context import AttentionContext

transformers = pytest.importorskip("transformers")

BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    ),
    "llama_tied": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    ),
    "llama3_rope_scaling": (
        "LlamaConfig",
        dict(
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen2_bias": (
        "Qwen2Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
    ),
    "mistral_window": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=6),
    ),
}
PROMPT_LEN, NEW_TOKENS, BLOCK = 9, 10, 4


def build_hf(kind: str, overrides: dict[str, Any], seed: int) -> Any:
    """A seeded transformers model whose every weight (norms and biases too) is random."""
    torch.manual_seed(seed)
    config = getattr(transformers, kind)(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def hf_greedy(model: Any, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by full recomputation, and the prompt's logits [P, V]."""
    ids = prompt.clone()
    with torch.no_grad():
        first = model(ids[None]).logits[0]
        for _ in range(steps):
            nxt = model(ids[None]).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt[None]])
    return ids[len(prompt) :].tolist(), first


def paged_greedy(
    lm: LoadedModel,
    prompts: list[torch.Tensor],
    steps: int,
    tables: list[list[int]],
    num_blocks: int,
    device: str = "cpu",
    bs: int = BLOCK,
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens for a batch of prompts: one flat paged prefill, then batched decodes.

    Returns the tokens of each sequence and the prefill logits of all prompt tokens [sum P, V].
    """
    model, config = lm.model, lm.config
    caches = allocate_kv_caches(config, num_blocks, bs, torch.float32, device)
    lens = [len(p) for p in prompts]
    ctx = AttentionContext.build(tables, [0] * len(prompts), lens, bs, device=device)
    input_ids = torch.cat(prompts).to(device)  # [T]
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)  # [T]
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        hidden = model(input_ids, positions, ctx, caches)  # [T, H]
        logits = model.compute_logits(hidden)  # [T, V]
        last = torch.tensor(lens, device=device).cumsum(0) - 1
        tokens = logits[last].argmax(-1)  # [B]
        for step in range(steps):
            for b in range(len(prompts)):
                out[b].append(int(tokens[b]))
            if step == steps - 1:
                break
            cached = [n + step for n in lens]
            ctx = AttentionContext.build(tables, cached, [1] * len(prompts), bs, device=device)
            hidden = model(tokens, torch.tensor(cached, device=device), ctx, caches)  # [B, H]
            tokens = model.compute_logits(hidden).argmax(-1)  # [B]
    return out, logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_and_greedy_match_transformers(case: str, tmp_path: Path) -> None:
    kind, overrides = CASES[case]
    hf = build_hf(kind, overrides, seed=1)
    hf.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    lm = load_model(str(tmp_path))
    assert lm.config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, BASE["vocab_size"], (PROMPT_LEN,), generator=gen)
    ref_tokens, ref_logits = hf_greedy(hf, prompt, NEW_TOKENS)
    blocks = (PROMPT_LEN + NEW_TOKENS + BLOCK - 1) // BLOCK
    tokens, logits = paged_greedy(lm, [prompt], NEW_TOKENS, [list(range(blocks))], blocks)
    assert logits.dtype == torch.float32
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert tokens[0] == ref_tokens


def test_batched_ragged_prefill_equals_single_sequences(tmp_path: Path) -> None:
    """Three prompts of different lengths in one flat batch, scattered permuted block tables."""
    hf = build_hf("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2), seed=3)
    hf.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=gen) for n in (5, 12, 1)]
    tables = [[9, 2, 14, 6, 11], [0, 13, 4, 8, 1, 7], [3, 12, 5, 10, 15]]
    tokens, _ = paged_greedy(lm, prompts, 6, tables, 16)
    for prompt, got in zip(prompts, tokens):
        want, _ = hf_greedy(hf, prompt, 6)
        assert got == want


def test_missing_weight_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf = build_hf("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2), seed=5)
    hf.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(str(tmp_path))


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf = build_hf("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2), seed=6)
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    lm = load_model(str(tmp_path))
    ids = torch.arange(7)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        caches = allocate_kv_caches(lm.config, 2, BLOCK, torch.float32, "cpu")
        ctx = AttentionContext.build([[1, 0]], [0], [7], BLOCK)
        got = lm.model.compute_logits(lm.model(ids, ids, ctx, caches))
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.gpu
def test_gpu_triton_path_matches_transformers(tmp_path: Path) -> None:
    """Same comparison on CUDA (Triton kernels need head_dim 64 and pages of >= 8), float32."""
    hf = build_hf(
        "Qwen2Config",
        dict(
            hidden_size=256, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False
        ),
        seed=8,
    )
    hf.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cuda")
    assert lm.config.head_dim == 64
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=gen) for n in (19, 7)]
    tokens, logits = paged_greedy(
        lm, prompts, 8, [[4, 1, 6, 0], [2, 5, 3, 7]], 8, device="cuda", bs=8
    )
    for prompt, got in zip(prompts, tokens):
        want, _ = hf_greedy(hf, prompt, 8)
        assert got == want
    _, ref_logits = hf_greedy(hf, prompts[0], 0)
    assert (logits[:19].cpu() - ref_logits).abs().max().item() < 1e-3
