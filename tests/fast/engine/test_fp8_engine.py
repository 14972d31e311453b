"""The engine with an fp8 KV cache on the CPU: allocation and capacity, calibration and frozen
scales, given scales, the checked path's dequantization, swaps, and refused names."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from test_engine_batch import CFG  # the small engine model the batch tests use

from fast.engine.config import EngineConfig
from fast.engine.engine import LLMEngine
from fast.engine.sampling_params import SamplingParams
from fast.loader import random_model
from fast.model.layers import Attention
from spec.errors import InvalidArgumentError

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _engine(**kw: Any) -> LLMEngine:
    model = random_model(CFG, seed=0, dtype=torch.float32, device="cpu")
    args: dict[str, Any] = dict(
        device="cpu", dtype="float32", block_size=8, max_model_len=128, max_num_seqs=8
    )
    args.update(kw)
    return LLMEngine(model, **args)


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[str(i)] for i in range(len(prompts))]


def test_fp8_cache_is_allocated_in_fp8_with_four_times_the_fp32_blocks() -> None:
    gb = 26 * 4096 / 2**30  # 26 fp32 blocks of 2 layers x 8 tokens x 2 heads x 16 dims
    plain = _engine(kv_cache_gb=gb)
    fp8 = _engine(kv_cache_gb=gb, kv_cache_dtype="fp8")
    assert fp8.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert (plain.num_gpu_blocks, fp8.num_gpu_blocks) == (26, 104)  # fp32 -> 1 byte: 4x
    e5 = _engine(kv_cache_gb=gb, kv_cache_dtype="fp8_e5m2", dtype="bfloat16")
    assert e5.kv_caches[1][1].dtype == torch.float8_e5m2
    assert e5.num_gpu_blocks == 2 * _engine(kv_cache_gb=gb, dtype="bfloat16").num_gpu_blocks
    assert plain.kv_scales == [] and len(fp8.kv_scales) == CFG.num_hidden_layers
    layers = [m for m in plain.model.modules() if isinstance(m, Attention)]
    assert all(m.kv_scales is None for m in layers)  # "auto": the layers do no extra work


def test_scales_calibrate_on_the_first_step_then_freeze() -> None:
    engine = _engine(num_gpu_blocks=64, kv_cache_dtype="fp8")
    assert all(s.armed for s in engine.kv_scales)
    seen: list[torch.Tensor] = []
    layer0 = next(m for m in engine.model.modules() if isinstance(m, Attention))
    observe = layer0.kv_scales.observe  # type: ignore[union-attr]

    def spy(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        if layer0.kv_scales is not None and layer0.kv_scales.armed:
            seen.append(k.detach().clone())
        observe(k, v, slots)

    layer0.kv_scales.observe = spy  # type: ignore[method-assign, union-attr]
    _run(engine, [[5, 6, 7, 8, 9], [10, 11, 12]])
    assert len(seen) == 1 and seen[0].shape[0] == 8  # the first step: both prompts' 8 tokens
    want = seen[0].abs().max() * 2.0 / 448.0  # per tensor, headroom 2
    k_scale = engine.kv_scales[0].k_scale
    assert torch.allclose(k_scale, want.expand(2), rtol=1e-6)
    frozen = [(s.k_scale.clone(), s.v_scale.clone()) for s in engine.kv_scales]
    _run(engine, [[90, 91, 92, 93] * 8])  # later, other prompts: no change
    assert all(not s.armed for s in engine.kv_scales)
    for s, (k, v) in zip(engine.kv_scales, frozen):
        assert torch.equal(s.k_scale, k) and torch.equal(s.v_scale, v)


def test_per_head_and_given_scales() -> None:
    head = _engine(num_gpu_blocks=64, kv_cache_dtype="fp8", kv_scale_granularity="head")
    _run(head, [[5, 6, 7, 8, 9]])
    assert any(s.k_scale[0] != s.k_scale[1] for s in head.kv_scales)
    given = _engine(num_gpu_blocks=64, kv_cache_dtype="fp8", k_scale=(0.5, 0.25), v_scale=0.125)
    _run(given, [[5, 6, 7]])
    for s in given.kv_scales:
        assert s.k_scale.tolist() == [0.5, 0.25] and s.v_scale.tolist() == [0.125, 0.125]
    one = _engine(num_gpu_blocks=64, kv_cache_dtype="fp8", calculate_kv_scales=False)
    _run(one, [[5, 6, 7]])
    assert all(s.k_scale.tolist() == [1.0, 1.0] for s in one.kv_scales)  # vLLM's default


def _prompt_logprobs(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    engine.add_request("p", prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))
    out = None
    while engine.has_unfinished_requests():
        out = engine.step()[0]
    assert out is not None and out.prompt_logprobs is not None
    return torch.tensor([e[t].logprob for t, e in zip(prompt[1:], out.prompt_logprobs[1:])])


def test_fp8_scores_follow_the_fp32_cache_and_swaps_move_bytes() -> None:
    prompt = [(7 * i + 3) % 96 for i in range(40)]
    ref = _prompt_logprobs(_engine(num_gpu_blocks=64), prompt)
    for kind in ("fp8_e4m3", "fp8_e5m2"):
        got = _prompt_logprobs(_engine(num_gpu_blocks=64, kv_cache_dtype=kind), prompt)
        diff = float((got - ref).abs().max())
        assert 0 < diff < {"fp8_e4m3": 0.05, "fp8_e5m2": 0.1}[kind], (kind, diff)
    prompts = [[3 + i, 7, 11 + i, 2, 40 - i, 5] for i in range(6)]
    # a pool too small for all six: sequences are swapped out and back in as fp8 bytes
    tight = _engine(
        num_gpu_blocks=8,
        max_model_len=64,
        swap_space=0.001,
        preemption_mode="swap",
        kv_cache_dtype="fp8",
        calculate_kv_scales=False,
        enable_prefix_caching=False,
    )
    roomy = _engine(
        num_gpu_blocks=64, max_model_len=64, kv_cache_dtype="fp8", calculate_kv_scales=False
    )
    assert _run(tight, prompts) == _run(roomy, prompts)
    assert tight.stats.swapped_out > 0 and tight.stats.swapped_in > 0


def test_fp8_engine_equals_fp32_engine_over_fake_quantized_kv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the fp8 engine must compute exactly attention over code * scale: an fp32-cache engine
    # whose new K/V are quantized and dequantized (the kernels' own maps) before the write
    # scores the same prompt log-probabilities
    import kernels
    from kernels.fp8 import quantize

    prompt = [(5 * i + 1) % 96 for i in range(30)]
    fixed: dict[str, Any] = dict(kv_cache_dtype="fp8", k_scale=0.05, v_scale=(0.01, 0.02))
    got = _prompt_logprobs(_engine(num_gpu_blocks=64, **fixed), prompt)
    prompts = [[3 + i, 7, 11 + i, 2, 40 - i, 5] for i in range(4)]
    got_tokens = _run(_engine(num_gpu_blocks=64, **fixed), prompts)  # decode steps too
    write = kernels.write_kv
    ks, vs = torch.tensor([0.05, 0.05]), torch.tensor([0.01, 0.02])

    def fake_quant_write(k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any) -> None:
        k = quantize(k, ks, torch.float8_e4m3fn).float() * ks[:, None]  # [T, Hkv, D]
        v = quantize(v, vs, torch.float8_e4m3fn).float() * vs[:, None]
        write(k, v, *args, **kw)

    monkeypatch.setattr(kernels, "write_kv", fake_quant_write)
    want = _prompt_logprobs(_engine(num_gpu_blocks=64), prompt)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert _run(_engine(num_gpu_blocks=64), prompts) == got_tokens
    plain = _prompt_logprobs(_engine(num_gpu_blocks=64), prompt)  # still patched: same again
    monkeypatch.undo()
    unquantized = _prompt_logprobs(_engine(num_gpu_blocks=64), prompt)
    assert torch.equal(plain, want) and float((unquantized - want).abs().max()) > 1e-4


def test_the_cpu_decode_fast_path_is_bypassed_for_fp8() -> None:
    # plan_decode_step (one validation per step, SDPA on the raw cache) cannot read fp8: it
    # declines, and the layers take the checked kernels, whose torch fallback dequantizes
    from fast.model.attention_context import AttentionContext
    from fast.model.step_plan import plan_decode_step

    ctx = AttentionContext.build([[0]], [3], [1], 8)
    fp8 = _engine(num_gpu_blocks=64, kv_cache_dtype="fp8")
    assert plan_decode_step(CFG, ctx, torch.float32, fp8.kv_caches) is None
    plain = _engine(num_gpu_blocks=64)
    assert plan_decode_step(CFG, ctx, torch.float32, plain.kv_caches) is not None


def test_bad_kv_cache_settings_are_refused_by_name() -> None:
    with pytest.raises(InvalidArgumentError, match="fp8_e5m2") as e:
        EngineConfig(kv_cache_dtype="fp8_e4m3fnuz")
    assert e.value.name == "kv_cache_dtype"
    with pytest.raises(InvalidArgumentError, match="give both"):
        EngineConfig(kv_cache_dtype="fp8", k_scale=0.5)
    with pytest.raises(InvalidArgumentError, match="finite and > 0"):
        EngineConfig(kv_cache_dtype="fp8", k_scale=(0.5, -1.0), v_scale=1.0)
    with pytest.raises(InvalidArgumentError, match="kv_scale_granularity"):
        EngineConfig(kv_cache_dtype="fp8", kv_scale_granularity="block")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="2 values, one per KV head") as e:
        _engine(num_gpu_blocks=64, kv_cache_dtype="fp8", k_scale=(1.0, 1.0, 1.0), v_scale=1.0)
    assert (e.value.name, e.value.value) == ("k_scale", (1.0, 1.0, 1.0))
    with pytest.raises(InvalidArgumentError, match="one value per KV head") as e:
        EngineConfig(kv_cache_dtype="fp8", k_scale=1.0, v_scale=())
    assert (e.value.name, e.value.value) == ("v_scale", ())
    with pytest.raises(InvalidArgumentError, match="kv_cache_dtype is 'auto'") as e:
        EngineConfig(kv_scale_granularity="head")  # per-head scales asked, no fp8 cache
    assert e.value.name == "kv_scale_granularity"
    with pytest.raises(InvalidArgumentError, match="finite and > 0") as e:
        EngineConfig(kv_cache_dtype="fp8", k_scale=True, v_scale=True)
    assert (e.value.name, e.value.value) == ("k_scale", True)


@pytest.mark.gpu
def test_gpu_fp8_graphs_replay_with_the_calibrated_scales() -> None:
    # decode graphs are captured before calibration; they must read the calibrated scales
    cfg = replace(CFG, hidden_size=128, head_dim=32)  # the Triton kernels take D >= 32

    def run(eager: bool) -> tuple[list[list[int]], list[float]]:
        model = random_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
        engine = LLMEngine(
            model,
            device="cuda",
            dtype="bfloat16",
            block_size=16,
            num_gpu_blocks=64,
            max_model_len=128,
            max_num_seqs=8,
            kv_cache_dtype="fp8",
            enforce_eager=eager,
            cuda_graph_batch_sizes=(1, 2, 4, 8),
        )
        out = _run(engine, [[5, 6, 7, 8, 9], [10, 11, 12], [1, 2, 3, 4, 5, 6, 7]])
        return out, [float(s.k_scale[0]) for s in engine.kv_scales]

    graphs, scales = run(eager=False)
    eager, eager_scales = run(eager=True)
    assert scales == eager_scales and all(s != 1.0 for s in scales)
    assert graphs == eager


def test_the_command_line_takes_the_kv_cache_dtype() -> None:
    from fast.api.cli import KV_CACHE_DTYPES, SERVE_ENGINE_OPTIONS, build_parser
    from spec.kv_quant import KV_CACHE_DTYPES as SPEC_NAMES

    assert KV_CACHE_DTYPES == tuple(SPEC_NAMES) and "kv_cache_dtype" in SERVE_ENGINE_OPTIONS
    args = build_parser().parse_args(["generate", "hi", "--kv-cache-dtype", "fp8_e5m2"])
    assert args.kv_cache_dtype == "fp8_e5m2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--kv-cache-dtype", "int8"])
