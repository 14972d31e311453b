"""Random-weight models: deterministic init, dtypes, and the paged-cache consistency property
(one prefill = prefix then chunk = token-by-token decode), on CPU and on a GPU."""

from __future__ import annotations

import time

import pytest
import torch

from fast.loader import LoadedModel, random_model
from fast.model import LlamaForCausalLM, allocate_kv_caches
from fast.model.attention_context import AttentionContext
from fast.model.config import ModelConfig

TINY = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
BS = 4


def run(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    chunks: list[int],
    table: list[int],
    dtype: torch.dtype,
    device: str,
    bs: int = BS,
) -> torch.Tensor:
    """Feed ``ids`` in chunks of the given sizes through one cache; logits of every token."""
    caches = allocate_kv_caches(model.config, max(table) + 1, bs, dtype, device)
    out, done = [], 0
    for n in chunks:
        ctx = AttentionContext.build([table], [done], [n], bs, device=device)
        pos = torch.arange(done, done + n, device=device)
        out.append(model.compute_logits(model(ids[done : done + n], pos, ctx, caches)))
        done += n
    return torch.cat(out)


def test_same_seed_same_weights_and_init_statistics() -> None:
    a = random_model(TINY, seed=3, dtype=torch.float32)
    b = random_model(TINY, seed=3, dtype=torch.float32)
    c = random_model(TINY, seed=4, dtype=torch.float32)
    wa, wb, wc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])
    assert torch.equal(wa["model.norm.weight"], torch.ones(64))
    std = wa["model.layers.0.mlp.gate_up_proj.weight"].std().item()
    assert 0.018 < std < 0.022
    assert a.tokenizer is None and a.config == TINY


@pytest.mark.parametrize("chunks", [[11], [5, 6], [1] * 11, [8, 1, 1, 1]])
def test_prefill_chunks_and_decode_agree(chunks: list[int]) -> None:
    lm = random_model(TINY, seed=0, dtype=torch.float32)
    ids = torch.randint(0, 128, (11,), generator=torch.Generator().manual_seed(0))
    table = [6, 1, 4]
    with torch.no_grad():
        whole = run(lm.model, ids, [11], table, torch.float32, "cpu")
        parts = run(lm.model, ids, chunks, table, torch.float32, "cpu")
    assert whole.shape == (11, 128) and whole.dtype == torch.float32
    assert (whole - parts).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype: torch.dtype) -> None:
    ids = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = run(
            random_model(TINY, seed=5, dtype=torch.float32).model,
            ids,
            [6, 1, 1, 1],
            [0, 1, 2],
            torch.float32,
            "cpu",
        )
        lm: LoadedModel = random_model(TINY, seed=5, dtype=torch.float32)
        half = lm.model.to(dtype)
        assert half.model.embed_tokens.weight.dtype == dtype
        got = run(half, ids, [6, 1, 1, 1], [0, 1, 2], dtype, "cpu")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 2e-2


@pytest.mark.gpu
def test_gpu_matches_cpu_on_small_model() -> None:
    """Triton kernels (head dim 64, pages of 8) against the CPU torch path, float32."""
    config = ModelConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    cpu = random_model(config, seed=7, dtype=torch.float32)
    gpu = random_model(config, seed=7, dtype=torch.float32, device="cuda")
    gpu.model.load_state_dict({k: v.cuda() for k, v in cpu.model.state_dict().items()})
    ids = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(2))
    chunks, table = [13, 1, 1, 5, 1], [3, 0, 2]
    with torch.no_grad():
        ref = run(cpu.model, ids, chunks, table, torch.float32, "cpu", bs=8)
        got = run(gpu.model, ids.cuda(), chunks, table, torch.float32, "cuda", bs=8)
    assert (got.cpu() - ref).abs().max().item() < 1e-3
    assert torch.equal(got.cpu().argmax(-1), ref.argmax(-1))


@pytest.mark.gpu
def test_gpu_llama32_1b_random_init_and_consistency() -> None:
    config = ModelConfig.llama32_1b()
    torch.cuda.synchronize()
    start = time.perf_counter()
    lm = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    assert time.perf_counter() - start < 30.0
    ids = torch.randint(0, config.vocab_size, (40,), device="cuda")
    with torch.no_grad():
        BSZ = 16
        caches = allocate_kv_caches(config, 4, BSZ, torch.bfloat16, "cuda")
        ctx = AttentionContext.build([[2, 0, 3]], [0], [39], BSZ, device="cuda")
        lm.model(ids[:39], torch.arange(39, device="cuda"), ctx, caches)
        ctx = AttentionContext.build([[2, 0, 3]], [39], [1], BSZ, device="cuda")
        dec = lm.model.compute_logits(
            lm.model(ids[39:], torch.tensor([39], device="cuda"), ctx, caches)
        )
        caches = allocate_kv_caches(config, 4, BSZ, torch.bfloat16, "cuda")
        ctx = AttentionContext.build([[1, 3, 0]], [0], [40], BSZ, device="cuda")
        full = lm.model.compute_logits(lm.model(ids, torch.arange(40, device="cuda"), ctx, caches))[
            -1:
        ]
    assert torch.isfinite(dec).all()
    assert ((dec - full).norm() / full.norm()).item() < 2e-2
