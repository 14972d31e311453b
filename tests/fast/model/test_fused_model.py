"""A model with ``use_fused_ops`` computes what the unfused layers compute.

On the CPU the fused entry points run their torch fallbacks (the Triton kernels themselves are
held to those in tests/kernels/test_fused.py); these tests hold the layers' fused wiring (which
tensor goes where, the residual stream, the KV write through ``rope_write_kv``) to the unfused
path. The ``gpu`` test runs the Triton kernels inside the engine with CUDA graphs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fast.model.layers as layers
from fast.engine.config import EngineConfig
from fast.engine.engine import LLMEngine
from fast.engine.sampling_params import SamplingParams
from fast.loader import LoadedModel, random_model
from fast.model.attention_context import AttentionContext
from fast.model.config import ModelConfig
from fast.model.llama import allocate_kv_caches
from spec.errors import InvalidArgumentError

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the layers' calls of the three fused entry points."""
    calls = {"rope_write_kv": 0, "add_rms_norm": 0, "silu_mul": 0}
    for name in calls:
        real = getattr(layers, name)

        def wrapper(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(layers, name, wrapper)
    return calls


def _prefill(model: LoadedModel, ids: list[int]) -> tuple[torch.Tensor, list[Any]]:
    bs, n = 4, len(ids)
    blocks = -(-n // bs)
    caches = allocate_kv_caches(model.config, blocks + 1, bs, torch.float32, "cpu")
    ctx = AttentionContext.build([list(range(blocks))[::-1]], [0], [n], bs)
    with torch.no_grad():
        hidden = model.model(torch.tensor(ids), torch.arange(n), ctx, caches)
        return model.model.compute_logits(hidden), caches


def test_fused_prefill_equals_unfused(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = random_model(CFG, seed=3, dtype=torch.float32, device="cpu")
    fused = random_model(CFG, seed=3, dtype=torch.float32, device="cpu")
    fused.model.use_fused_ops()
    want, want_caches = _prefill(plain, PROMPTS[2])
    calls = _counting(monkeypatch)
    got, got_caches = _prefill(fused, PROMPTS[2])
    assert calls == {"rope_write_kv": 2, "add_rms_norm": 2, "silu_mul": 2}  # once per layer
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    for (gk, gv), (wk, wv) in zip(got_caches, want_caches, strict=True):
        assert torch.allclose(gk, wk, atol=1e-6) and torch.equal(gv, wv)
    fused.model.use_fused_ops(False)
    again, _ = _prefill(fused, PROMPTS[2])
    assert torch.equal(again, want) and calls["rope_write_kv"] == 2  # off: the unfused path


def _greedy(device: str, fused: bool, **engine: Any) -> list[list[int]]:
    model = random_model(CFG, seed=4, dtype=torch.float32, device=device)
    e = LLMEngine(
        model, device=device, dtype="float32", block_size=4, max_num_seqs=4, fused_ops=fused,
        **engine,
    )  # fmt: skip
    assert all(layer.fused == fused for layer in model.model.model.layers)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        e.add_request(str(i), p, params)
    done: dict[str, list[int]] = {}
    while e.has_unfinished_requests():
        for out in e.step(finished_only=True):
            done[out.request_id] = list(out.outputs[0].token_ids)
    assert e.num_free_gpu_blocks == e.num_gpu_blocks
    return [done[str(i)] for i in range(len(PROMPTS))]


def test_fused_engine_greedy_equals_unfused_with_chunked_prefill() -> None:
    args = dict(max_model_len=64, max_num_batched_tokens=8, enable_chunked_prefill=True)
    assert _greedy("cpu", True, **args) == _greedy("cpu", False, **args)


def test_engines_sharing_a_model_each_run_their_own_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = random_model(CFG, seed=5, dtype=torch.float32, device="cpu")
    args: dict[str, Any] = dict(device="cpu", dtype="float32", block_size=4, max_model_len=64)
    fused = LLMEngine(model, fused_ops=True, **args)
    plain = LLMEngine(model, fused_ops=False, **args)  # the same layers, switched off
    calls = _counting(monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for engine, want in ((fused, True), (plain, False), (fused, True)):
        before = calls["silu_mul"]
        engine.add_request("r", {"prompt_token_ids": PROMPTS[0]}, params)
        while engine.has_unfinished_requests():
            engine.step()
        assert (calls["silu_mul"] > before) == want


def test_fused_ops_option_is_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="fused_ops"):
        EngineConfig(fused_ops=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="single-device"):
        EngineConfig(fused_ops=True, tensor_parallel_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_engine_with_graphs_equals_unfused() -> None:
    want = _greedy("cuda", False, max_model_len=64, enforce_eager=True)
    assert _greedy("cuda", True, max_model_len=64) == want  # decode graphs, Triton kernels
    assert _greedy("cuda", True, max_model_len=64, enforce_eager=True) == want
