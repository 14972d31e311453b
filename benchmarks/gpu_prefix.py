"""Memory sharing on the GPU: prefix caching on and off, parallel sampling and beam search.

Run on the GPU machine from the repository root (issue 11's "shared-prefix throughput")::

    PYTHONPATH=. python benchmarks/gpu_prefix.py      # writes $OUT/prefix_gpu.json if $OUT

Llama-3-8B-shaped random bf16 weights (``max_position_embeddings`` raised to 32k for the long
documents), block size 16, ``max_num_seqs`` 256, 90 % of the GPU for weights + KV, decode CUDA
graphs, chunked prefill (budget 8192). Every request is queued at t = 0 with ``ignore_eos`` so
it produces exactly its length; a fresh engine per configuration, warmed up on a prompt that
hits the cache once (the prefill kernels with and without a prefix) before the clock starts.

Workloads:

1. ``prefix_repetition``: 1,000 requests, each one of 10 distinct 256-token prefixes (drawn
   uniformly) + a unique 256-token suffix, 128 output tokens; caching on and off.
2. ``long_document``: 8 documents of 20,000 tokens, each asked twice (the document + a unique
   16-token question; all first questions queued before all second ones), 10 output tokens;
   caching on and off.
3. ``parallel_sampling``: 64 ShareGPT-like prompts (docs/workloads.md) with ``n = 4``,
   temperature 1, 128 output tokens each, against 256 independent requests (each prompt four
   times) with caching off and on.
4. ``beam_search``: ``LLM.beam_search`` of 32 ShareGPT-like prompts, width 4, 64 tokens,
   ``ignore_eos``, against 128 independent greedy requests (each prompt four times, 64 tokens).

Reported per run: wall time, output tokens per second, prefix-cache queries and hits (tokens)
and hit rate, time to first token (mean, p50, p99, from each request's ``metrics``), and the
peak of device blocks in use (``num_gpu_blocks - num_free_gpu_blocks`` after each step, where
cached blocks nobody uses count as free).

``--tiny`` runs the same code on a tiny random model on the CPU with every workload scaled down
(a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_engine import sharegpt_trace  # noqa: E402
from provenance import git_describe  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Scale:
    """Workload sizes (the full run, or the tiny smoke run)."""

    vocab: int = 128000
    prefix_requests: int = 1000
    prefix_len: int = 256
    suffix_len: int = 256
    prefix_out: int = 128
    num_prefixes: int = 10
    docs: int = 8
    doc_len: int = 20000
    question_len: int = 16
    doc_out: int = 10
    parallel_prompts: int = 64
    parallel_out: int = 128
    beam_prompts: int = 32
    beam_out: int = 64
    max_model_len: int = 20480
    max_input: int = 1024


TINY = Scale(
    vocab=500,
    prefix_requests=40,
    prefix_len=32,
    suffix_len=16,
    prefix_out=8,
    num_prefixes=3,
    docs=2,
    doc_len=300,
    question_len=4,
    doc_out=3,
    parallel_prompts=6,
    parallel_out=8,
    beam_prompts=4,
    beam_out=6,
    max_model_len=512,
    max_input=64,
)


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4) if values else float("nan")


def run_requests(engine: Any, requests: list[tuple[list[int], Any]]) -> dict[str, Any]:
    """Queue every request at once, step to the end; the figures of the module docstring."""
    s0 = dataclasses.replace(engine.stats)
    t0 = time.perf_counter()
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    peak = 0
    ttft: list[float] = []
    produced = 0
    cached: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step(finished_only=True):
            produced += sum(len(c.token_ids) for c in out.outputs)
            m = out.metrics
            if m is not None and m.first_token_time is not None:
                ttft.append(m.first_token_time - m.arrival_time)
            cached.append(out.num_cached_tokens or 0)
        peak = max(peak, engine.num_gpu_blocks - engine.num_free_gpu_blocks)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    st = engine.stats
    queries = st.prefix_cache_queries - s0.prefix_cache_queries
    hits = st.prefix_cache_hits - s0.prefix_cache_hits
    return {
        "requests": len(requests),
        "wall_s": round(wall, 3),
        "output_tokens": produced,
        "out_tok_per_s": round(produced / wall, 1),
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "hit_rate": round(hits / queries, 4) if queries else 0.0,
        "mean_num_cached_tokens": round(float(np.mean(cached)), 1) if cached else 0.0,
        "ttft_mean_s": round(float(np.mean(ttft)), 4) if ttft else float("nan"),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "peak_blocks_in_use": peak,
        "steps": st.steps - s0.steps,
        "computed_tokens": st.computed_tokens - s0.computed_tokens,
        "leak_free": engine.num_free_gpu_blocks == engine.num_gpu_blocks,
    }


def _warm_up(engine: Any, vocab: int) -> None:
    from fast.engine.sampling_params import SamplingParams

    rng = np.random.default_rng(123)
    prompt = rng.integers(100, vocab, size=96).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(2):  # the second hits the cache: the prefill kernel with a prefix
        engine.add_request(f"warm{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefix_repetition(sc: Scale) -> list[tuple[list[int], Any]]:
    from fast.engine.sampling_params import SamplingParams

    rng = np.random.default_rng(11)
    prefixes = [rng.integers(100, sc.vocab, size=sc.prefix_len).tolist() for _ in range(10)]
    prefixes = prefixes[: sc.num_prefixes]
    params = SamplingParams(temperature=0.0, max_tokens=sc.prefix_out, ignore_eos=True)
    out = []
    for _ in range(sc.prefix_requests):
        head = prefixes[int(rng.integers(0, len(prefixes)))]
        out.append((head + rng.integers(100, sc.vocab, size=sc.suffix_len).tolist(), params))
    return out


def long_document(sc: Scale) -> list[tuple[list[int], Any]]:
    from fast.engine.sampling_params import SamplingParams

    rng = np.random.default_rng(12)
    docs = [rng.integers(100, sc.vocab, size=sc.doc_len).tolist() for _ in range(sc.docs)]
    params = SamplingParams(temperature=0.0, max_tokens=sc.doc_out, ignore_eos=True)
    return [
        (doc + rng.integers(100, sc.vocab, size=sc.question_len).tolist(), params)
        for _ in range(2)
        for doc in docs
    ]


def _prompts(n: int, sc: Scale) -> list[list[int]]:
    prompts, _ = sharegpt_trace(n, seed=3, vocab=sc.vocab)
    return [p[: sc.max_input] for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "."), "prefix_gpu.json")
    )
    parser.add_argument("--tiny", action="store_true", help="smoke run on the CPU")
    parser.add_argument("--only", default="", help="comma-separated workloads (default: all four)")
    args = parser.parse_args()
    only = {w for w in args.only.split(",") if w}
    known = {"prefix_repetition", "long_document", "parallel_sampling", "beam_search"}
    if only - known:
        parser.error(f"unknown workloads {sorted(only - known)}; known: {sorted(known)}")

    from fast.api.llm import LLM
    from fast.engine.beam_params import BeamSearchParams
    from fast.engine.config import EngineConfig
    from fast.engine.engine import LLMEngine
    from fast.engine.sampling_params import SamplingParams
    from fast.loader import random_model
    from fast.model.config import ModelConfig

    sc = TINY if args.tiny else Scale()
    if args.tiny:
        cfg = dataclasses.replace(
            ModelConfig.llama3_8b(),
            vocab_size=sc.vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
        )
        device, dtype = "cpu", torch.float32
        pool: dict[str, Any] = {"num_gpu_blocks": 2048}
    else:
        cfg = dataclasses.replace(ModelConfig.llama3_8b(), max_position_embeddings=32768)
        device, dtype = "cuda", torch.bfloat16
        pool = {"gpu_memory_utilization": 0.9}
    result: dict[str, Any] = {
        "benchmark": "memory sharing on the GPU: prefix caching, parallel sampling, beam search",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny smoke run)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_describe(),
        "model": "Llama-3-8B-shaped random bf16" if not args.tiny else "tiny random fp32",
        "workloads": {},
    }

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    t0 = time.perf_counter()
    model = random_model(cfg, seed=0, dtype=dtype, device=device)
    result["model_init_s"] = round(time.perf_counter() - t0, 2)

    def engine(caching: bool) -> Any:
        e = LLMEngine(
            model,
            EngineConfig(
                block_size=16,
                max_num_seqs=256,
                max_model_len=sc.max_model_len,
                enable_prefix_caching=caching,
                device=device,
                **pool,
            ),
        )
        _warm_up(e, sc.vocab)
        return e

    def record(workload: str, name: str, run: dict[str, Any]) -> None:
        result["workloads"].setdefault(workload, {})[name] = run
        print(workload, name, run, flush=True)
        save()

    def release() -> None:
        gc.collect()  # the engine's graphs and caches hold references in cycles
        if device == "cuda":
            torch.cuda.empty_cache()

    for workload, build in (
        ("prefix_repetition", prefix_repetition),
        ("long_document", long_document),
    ):
        if only and workload not in only:
            continue
        requests = build(sc)
        for caching in (True, False):
            e = engine(caching)
            record(workload, "caching_on" if caching else "caching_off", run_requests(e, requests))
            del e
            release()

    if not only or "parallel_sampling" in only:
        prompts = _prompts(sc.parallel_prompts, sc)
        par = SamplingParams(
            n=4, temperature=1.0, seed=7, max_tokens=sc.parallel_out, ignore_eos=True
        )
        one = SamplingParams(temperature=1.0, seed=7, max_tokens=sc.parallel_out, ignore_eos=True)
        for name, caching, reqs in (
            ("n4_forked", False, [(p, par) for p in prompts]),
            ("independent_caching_off", False, [(p, one) for p in prompts for _ in range(4)]),
            ("independent_caching_on", True, [(p, one) for p in prompts for _ in range(4)]),
        ):
            e = engine(caching)
            record("parallel_sampling", name, run_requests(e, reqs))
            del e
            release()

    if not only or "beam_search" in only:
        prompts = _prompts(sc.beam_prompts, sc)
        llm = LLM(
            model,
            block_size=16,
            max_num_seqs=256,
            max_model_len=sc.max_model_len,
            enable_prefix_caching=False,
            device=device,
            **pool,
        )
        _warm_up(llm.llm_engine, sc.vocab)
        bp = BeamSearchParams(beam_width=4, max_tokens=sc.beam_out, ignore_eos=True)
        llm.beam_search([{"prompt_token_ids": prompts[0][:32]}], bp)  # warm-up
        t0 = time.perf_counter()
        outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], bp)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        tokens = sum(len(s.output_token_ids) for o in outs for s in o.sequences)
        phys = sum(o.blocks.peak_physical_blocks for o in outs)
        unshared = sum(o.blocks.peak_unshared_blocks for o in outs)
        record(
            "beam_search",
            "width4",
            {
                "prompts": len(prompts),
                "wall_s": round(wall, 3),
                "output_tokens_all_beams": tokens,
                "out_tok_per_s": round(tokens / wall, 1),
                "sum_peak_physical_blocks": phys,
                "sum_peak_unshared_blocks": unshared,
                "blocks_saved_pct": round(100 * (1 - phys / unshared), 1) if unshared else 0.0,
            },
        )
        greedy = SamplingParams(temperature=0.0, max_tokens=sc.beam_out, ignore_eos=True)
        record(
            "beam_search",
            "independent_greedy_x4",
            run_requests(llm.llm_engine, [(p, greedy) for p in prompts for _ in range(4)]),
        )
        del llm
        release()

    print("\n| workload | run | out tok/s | wall s | hit rate | TTFT p50 / p99 s | peak blocks |")
    for w, runs in result["workloads"].items():
        for name, r in runs.items():
            print(
                f"| {w} | {name} | {r.get('out_tok_per_s')} | {r.get('wall_s')} | "
                f"{r.get('hit_rate', '-')} | {r.get('ttft_p50_s', '-')} / "
                f"{r.get('ttft_p99_s', '-')} | "
                f"{r.get('peak_blocks_in_use', r.get('sum_peak_physical_blocks'))} |"
            )


if __name__ == "__main__":
    main()
