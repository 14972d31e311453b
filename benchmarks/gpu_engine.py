"""End-to-end engine throughput on one GPU: Llama-3-8B-shaped random bf16, ShareGPT-like trace.

Run on the GPU machine from the repository root::

    PYTHONPATH=. python benchmarks/gpu_engine.py          # writes $OUT/engine_gpu.json if $OUT

1. Correctness first: a tiny random float32 Llama on the GPU, greedy, against transformers'
   ``generate`` (CUDA graphs on and off).
2. Throughput: the first ``--requests`` requests of the ShareGPT-like trace of docs/workloads.md
   (seed 0: input ~ round(LogNormal(4.68, 1)), output ~ round(LogNormal(5.76, 1)), both clipped
   to [4, 1024], token ids uniform in [100, 128000)), all queued at t=0, ``ignore_eos`` so each
   produces exactly its drawn length. Output tokens per second of wall time, decode CUDA graphs
   on (default) and off. The loop is ``LLM.generate``'s: ``step(finished_only=True)``, the output
   tokens counted from the finished requests. Engine construction (kernel warm-up, graph
   capture) is reported as ``setup_s``.
3. The peers, measured in the same run on the same requests (benchmarks/hf_peers.py):
   transformers' ``LlamaForCausalLM`` of the same shape (random bf16, SDPA) with ``generate`` on
   static batches of 32, and with its continuous batching. They are slow (about 200 and 400
   output tok/s on the 128-request trace: some 6.5 minutes together), so ``--peer-requests N``
   measures them on the trace's first N requests (the ratios then compare tokens per second on
   different request sets, and the JSON says so), and ``--skip-peers`` leaves them out of a
   quick iteration; a figure for the README must come from a run that measured them.
4. Where the time goes: every timed step's wall time with its kind (prefill or decode) and batch
   size, summarised as time in prefill and decode steps, decode steps by batch size, the slowest
   steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

HF_STATIC_BATCH = 32  # the static peer's batch size


def sharegpt_trace(n: int, seed: int = 0, vocab: int = 128000) -> tuple[list[list[int]], list[int]]:
    """Prompts and output lengths of the ShareGPT-like trace (docs/workloads.md)."""
    rng = np.random.default_rng(seed)
    n_in = np.clip(np.round(rng.lognormal(4.68, 1.0, n)), 4, 1024).astype(int)
    n_out = np.clip(np.round(rng.lognormal(5.76, 1.0, n)), 4, 1024).astype(int)
    prompts = [rng.integers(100, vocab, size=k).tolist() for k in n_in]
    return prompts, [int(k) for k in n_out]


def check_tiny_fp32(enforce_eager: bool) -> dict[str, Any]:
    """Greedy tokens of a tiny fp32 Llama on the GPU vs transformers (same weights)."""
    import tempfile

    import transformers

    from fast.api.llm import LLM
    from fast.engine.sampling_params import SamplingParams

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    hf = hf.cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 33, 70, 3)]
    ref = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p], device="cuda")
            out = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=24,
                min_new_tokens=24,
                eos_token_id=None,
                pad_token_id=None,
            )
            ref.append(out[0, len(p) :].tolist())
    llm = LLM(
        path,
        dtype="float32",
        device="cuda",
        num_gpu_blocks=64,
        block_size=16,
        max_model_len=256,
        max_num_seqs=8,
        enforce_eager=enforce_eager,
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        use_tqdm=False,
    )
    got = [o.outputs[0].token_ids for o in outs]
    same = sum(a == b for a, b in zip(got, ref))
    return {
        "enforce_eager": enforce_eager,
        "prompts": len(prompts),
        "identical": same,
        "leak_free": llm.llm_engine.num_free_gpu_blocks == 64,
    }


#: engine variants: (prefix caching, chunked prefill, fused_ops; None: the engine's default,
#: which is the fused kernels on one GPU)
CONFIGS: dict[str, tuple[bool, bool, bool | None]] = {
    "default": (True, True, None),
    "unfused": (True, True, False),  # the defaults without kernels.fused
    "no_prefix_caching": (False, True, None),
    "neither": (False, False, None),
    "fused": (True, True, True),
    "no_mixed_graphs": (True, True, None),  # the defaults, steps with prefill tokens eager
    "async": (True, True, None),  # the defaults with async_scheduling (overlapped decode)
}
#: further EngineConfig fields of a variant
CONFIG_FIELDS: dict[str, dict[str, Any]] = {
    "no_mixed_graphs": {"cuda_graph_token_sizes": ()},
    "async": {"async_scheduling": True},
}


def throughput(
    model: Any,
    enforce_eager: bool,
    n: int,
    max_num_seqs: int,
    budget: int,
    config: str = "default",
    **engine_overrides: Any,
) -> dict[str, Any]:
    """Run the trace through a fresh engine over ``model``; wall time and tokens per second.

    ``engine_overrides`` are further EngineConfig fields (benchmarks/gpu_fp8.py: the KV cache's
    dtype and a KV budget)."""
    from fast.api.gc_policy import frozen_heap
    from fast.engine.compile_watch import CompileWatch
    from fast.engine.config import EngineConfig
    from fast.engine.engine import LLMEngine
    from fast.engine.sampling_params import SamplingParams

    prompts, n_out = sharegpt_trace(n)
    t0 = time.perf_counter()
    engine = LLMEngine(
        model,
        EngineConfig(
            block_size=16,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=2048,
            gpu_memory_utilization=0.9,
            enforce_eager=enforce_eager,
            enable_prefix_caching=CONFIGS[config][0],
            enable_chunked_prefill=CONFIGS[config][1],
            fused_ops=CONFIGS[config][2],
            **{**CONFIG_FIELDS.get(config, {}), **engine_overrides},
        ),
    )
    setup_s = time.perf_counter() - t0
    with CompileWatch() as watch:  # everything after construction: nothing may compile
        # four requests before the clock starts (not timed; they must compile nothing); prompts
        # share nothing with the trace, so the timed run has no prefix-cache hits (the 0 % case)
        rng = np.random.default_rng(99)
        for i in range(4):
            engine.add_request(
                f"w{i}",
                rng.integers(100, 128000, size=64).tolist(),
                SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
            )
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
        steps0 = engine.stats.steps
        t0 = time.perf_counter()
        for i, (p, k) in enumerate(zip(prompts, n_out)):
            engine.add_request(
                str(i), p, SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)
            )
        produced = 0
        log: list[tuple[float, int, bool]] = []  # (seconds, sampled seqs, decode) per call
        stalls: list[dict[str, Any]] = []  # calls over 50 ms after the first 8: what ran in them
        with frozen_heap(), _GcClock() as gc_clock:  # as LLM.generate runs its steps
            while engine.has_unfinished_requests():
                c0, g0 = engine.stats.computed_tokens, engine.stats.generated_tokens
                gc0 = gc_clock.ms
                s0 = time.perf_counter()
                outs = engine.step(finished_only=True)
                dt = time.perf_counter() - s0
                dc, dg = engine.stats.computed_tokens - c0, engine.stats.generated_tokens - g0
                # decode: no prompt token computed (one per sampled sequence; fewer with
                # async_scheduling when a request finished, since the step the call launched
                # has one row less than the step it processed)
                log.append((dt, dg, 0 < dc <= dg))
                produced += sum(len(o.outputs[0].token_ids) for o in outs)
                if dt > 0.05 and len(log) > 8:  # past the first prefill steps: the collector,
                    # the allocator, or what?
                    stalls.append(_stall(len(log) - 1, dt, gc_clock.ms - gc0, engine, dc, dg))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    expected = sum(n_out)
    step_times = [t for t, _, _ in log]
    return {
        "enforce_eager": enforce_eager,
        "config": config,
        "enable_prefix_caching": CONFIGS[config][0],
        "enable_chunked_prefill": CONFIGS[config][1],
        "fused_ops": engine.fused_ops,  # as the engine resolved it
        "prefix_cache_hits": engine.stats.prefix_cache_hits,
        "prefix_cache_queries": engine.stats.prefix_cache_queries,
        "requests": n,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": budget,
        "setup_s": round(setup_s, 2),
        "num_gpu_blocks": engine.num_gpu_blocks,
        "wall_s": round(wall, 2),
        "output_tokens": produced,
        "expected_output_tokens": expected,
        "out_tok_per_s": round(produced / wall, 1),
        "req_per_s": round(n / wall, 3),
        "steps": engine.stats.steps - steps0,
        "median_step_ms": round(1000 * float(np.median(step_times)), 3),
        "preempted": engine.stats.preempted,
        "leak_free": engine.num_free_gpu_blocks == engine.num_gpu_blocks,
        "compilations_after_warm_up": watch.kernels,
        "mean_step_ms": round(1000 * float(np.mean(step_times)), 3),
        "breakdown": breakdown(log),
        # the 24 slowest, in step order (the first 24 over 50 ms left out step 1467, 256 ms, at
        # 317e940: 24 mixed steps of 51-59 ms came before it)
        "slow_steps": sorted(
            sorted(stalls, key=lambda s: -float(s["ms"]))[:24], key=lambda s: int(s["step"])
        ),
    }


class _GcClock:
    """Milliseconds the cyclic collector ran (``gc.callbacks``) while the block is open."""

    def __init__(self) -> None:
        self.ms = 0.0
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.ms += 1000 * (time.perf_counter() - self._t0)

    def __enter__(self) -> _GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


def _stall(
    step: int, dt: float, gc_ms: float, engine: Any, computed: int, generated: int
) -> dict[str, Any]:
    """One slow step call: its time, the tokens it computed and generated, the collector's
    share, the caching allocator's cumulative counters (a retry frees cached blocks and
    synchronizes), the free blocks."""
    stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    return {
        "step": step,
        "ms": round(1000 * dt, 2),
        "computed_tokens": computed,
        "generated_tokens": generated,
        "gc_ms": round(gc_ms, 2),
        "alloc_retries_so_far": stats.get("num_alloc_retries"),
        "device_allocs_so_far": stats.get("num_device_alloc"),
        "device_frees_so_far": stats.get("num_device_free"),
        "free_blocks": int(engine.num_free_gpu_blocks),
        "running": len(engine.scheduler.running),
    }


def measure_peers(n: int, ours_n: int) -> dict[str, Any]:
    """transformers on the trace's first ``n`` requests: static batches of 32, then continuous
    batching; tokens per second of each, or the error it raised."""
    import hf_peers

    from fast.model.config import ModelConfig

    prompts, n_out = sharegpt_trace(n)
    peers: dict[str, Any] = {
        "model": "transformers LlamaForCausalLM, Llama-3-8B shape, random bf16, sdpa",
        "requests": n,
        "output_tokens": sum(n_out),
        "same_requests_as_ours": n == ours_n,
    }
    t0 = time.perf_counter()
    model = hf_peers.random_llama(ModelConfig.llama3_8b(), torch.bfloat16, "cuda")
    peers["init_s"] = round(time.perf_counter() - t0, 2)
    for key in ("static_bs32", "continuous"):
        try:
            if key == "static_bs32":
                seconds, tokens = hf_peers.static(model, prompts, n_out, HF_STATIC_BATCH)
            else:
                seconds, tokens = hf_peers.continuous(model, prompts, n_out)
            produced = sum(len(t) for t in tokens)
            peers[f"hf_{key}_s"] = round(seconds, 2)
            peers[f"hf_{key}_tok_s"] = round(produced / seconds, 1)
            peers[f"hf_{key}_output_tokens"] = produced
        except Exception as exc:  # record and go on
            peers[f"hf_{key}_error"] = repr(exc)[:300]
        print(key, {k: v for k, v in peers.items() if key in k}, flush=True)
    model = None
    torch.cuda.empty_cache()
    return peers


def breakdown(log: list[tuple[float, int, bool]]) -> dict[str, Any]:
    """Time in prefill and decode steps, decode steps by batch-size bucket, slowest steps."""
    pre = [t for t, _, d in log if not d]
    dec = [(t, b) for t, b, d in log if d]
    buckets: dict[str, Any] = {}
    for lo, hi in ((1, 8), (9, 32), (33, 64), (65, 96), (97, 128), (129, 1 << 20)):
        ts = [t for t, b in dec if lo <= b <= hi]
        if ts:
            buckets[f"{lo}-{hi}"] = {
                "steps": len(ts),
                "total_s": round(sum(ts), 3),
                "median_ms": round(1000 * float(np.median(ts)), 3),
            }
    slow = sorted(range(len(log)), key=lambda i: -log[i][0])[:8]
    return {
        "prefill_steps": len(pre),
        "prefill_s": round(sum(pre), 3),
        "decode_steps": len(dec),
        "decode_s": round(sum(t for t, _ in dec), 3),
        "decode_by_batch": buckets,
        "slowest": [
            {"step": i, "ms": round(1000 * log[i][0], 2), "seqs": log[i][1], "decode": log[i][2]}
            for i in slow
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "."), "engine_gpu.json")
    )
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--budget", type=int, default=8192)
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument("--skip-peers", action="store_true", help="no transformers runs")
    parser.add_argument(
        "--peer-requests",
        type=int,
        default=None,
        help="measure the peers on the trace's first N requests (default: all --requests)",
    )
    parser.add_argument(
        "--configs",
        default="default",
        help=f"comma-separated engine variants, each run with graphs: {', '.join(CONFIGS)}",
    )
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if not configs or set(configs) - set(CONFIGS):
        parser.error(
            f"--configs: unknown {sorted(set(configs) - set(CONFIGS))}; known {list(CONFIGS)}"
        )
    from fast.loader import random_model
    from fast.model.config import ModelConfig

    def commit() -> str:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from provenance import git_describe

        return git_describe()

    import triton

    result: dict[str, Any] = {
        "benchmark": "engine end to end, Llama-3-8B-shaped random bf16, ShareGPT-like trace",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("PAGEDKV_COMMIT", commit()),
        "peers": {},
        "correctness": [],
        "runs": [],
    }

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    for eager in (False, True):
        try:
            result["correctness"].append(check_tiny_fp32(eager))
        except Exception as exc:  # record and go on to the throughput runs
            result["correctness"].append({"enforce_eager": eager, "error": repr(exc)})
        print(result["correctness"][-1], flush=True)
        save()
    t0 = time.perf_counter()
    model = random_model(ModelConfig.llama3_8b(), seed=0, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    result["model_init_s"] = round(time.perf_counter() - t0, 2)
    plan = [(False, c) for c in configs] + ([] if args.skip_eager else [(True, configs[0])])
    for eager, config in plan:
        try:
            run = throughput(model, eager, args.requests, args.max_num_seqs, args.budget, config)
        except Exception as exc:
            run = {"enforce_eager": eager, "config": config, "error": repr(exc)}
        result["runs"].append(run)
        print(run, flush=True)
        save()
        torch.cuda.empty_cache()
    if not args.skip_peers:
        del model
        torch.cuda.empty_cache()
        result["peers"] = measure_peers(args.peer_requests or args.requests, args.requests)
        print(result["peers"], flush=True)
        for r in result["runs"]:
            for key in ("static_bs32", "continuous"):
                tok_s = result["peers"].get(f"hf_{key}_tok_s")
                if "error" not in r and tok_s:
                    r[f"vs_hf_{key}"] = round(r["out_tok_per_s"] / tok_s, 2)
        save()
    print(
        "\n| mode | out tok/s | wall s | setup s | median/mean step ms | prefill s | "
        "vs HF static | vs HF continuous |"
    )
    for r in result["runs"]:
        if "error" not in r:
            mode = ("eager" if r["enforce_eager"] else "CUDA graphs") + f" {r['config']}"
            print(
                f"| {mode} | {r['out_tok_per_s']} | {r['wall_s']} | {r['setup_s']} | "
                f"{r['median_step_ms']}/{r['mean_step_ms']} | {r['breakdown']['prefill_s']} | "
                f"{r.get('vs_hf_static_bs32', '-')}x | {r.get('vs_hf_continuous', '-')}x |"
            )
    sys.stdout.flush()
    compiled = [k for r in result["runs"] for k in r.get("compilations_after_warm_up", [])]
    failed = [r for r in result["runs"] if "error" in r]
    if compiled or failed:
        sys.exit(
            f"FAILED: {len(compiled)} compilation(s) after warm-up, {len(failed)} run error(s)"
        )


if __name__ == "__main__":
    main()
