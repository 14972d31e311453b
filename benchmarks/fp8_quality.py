"""What an fp8 KV cache costs in quality: SmolLM2 on the CPU, float32 compute, cache fp32 vs fp8.

Run from the repository root::

    PYTHONPATH=. python benchmarks/fp8_quality.py [--tokens 32] [--out benchmarks/results/...]

For each cache kind (``auto`` = float32; ``fp8_e4m3`` with per-tensor and per-head calibrated
scales; ``fp8_e5m2`` per tensor; ``fp8_e4m3`` at scale 1.0, vLLM's default without calibration)
one engine (SmolLM2-135M-Instruct, the default model, float32) runs, in this order:

1. greedy decoding of the 8 fixed prompts of :data:`PROMPTS`, ``--tokens`` new tokens each, EOS
   ignored so every output has the same length; the scales are calibrated on this first step
   (the 8 prompts' tokens, ``kv_scale_headroom`` 2) and frozen;
2. the prompt log-probabilities (``prompt_logprobs=0``) of :data:`TEXT`, a fixed ~500-token
   passage: perplexity ``exp(-mean log p)`` over its tokens after the first.

Reported against the float32 cache: greedy agreement (outputs identical, tokens equal before
the first divergence, tokens equal position by position) and the perplexity difference.
Writes ``benchmarks/results/fp8_quality_cpu.json`` (with the commit, via provenance.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "A list of five fruits: apple,",
    "def fibonacci(n):",
    "The three laws of motion, stated simply, are",
    "Translate to French: Good morning, how are you?",
    "Once upon a time, in a small village by the mountains,",
)

#: A fixed passage (written for this benchmark) whose perplexity is measured.
TEXT = (
    "The library stood at the corner of two quiet streets, a low building of red brick with tall "
    "windows that caught the afternoon light. Inside, the shelves ran from the floor almost to "
    "the ceiling, and a narrow ladder on brass rails let the librarian reach the highest rows. "
    "Most visitors came for the newspapers, which were kept on long wooden poles near the "
    "entrance, but a few came every day to read the same old books again. One of them was a "
    "retired teacher who had taught mathematics for forty years. He liked to sit by the window "
    "with a notebook, working through problems he had set his students long ago, as if to "
    "check that the answers were still right. In the winter the reading room was the warmest "
    "place in the town. The radiators ticked and hissed, and the smell of paper and dust mixed "
    "with the smell of wet coats drying on the hooks by the door. Children came after school "
    "to do their homework at the big table in the middle of the room, and the librarian let "
    "them whisper as long as nobody else complained. When the town council proposed to close "
    "the library and move the books to a new building on the edge of town, the people who "
    "used it every day wrote letters, signed petitions and filled the council chamber at the "
    "next meeting. They argued that a library is not only a store of books but a place where "
    "people meet, where strangers share a table and where anyone can sit for an afternoon "
    "without being asked to buy anything. The council listened, and after a long debate it "
    "decided to keep the old building open and to repair its roof, which had leaked for "
    "years. The repairs took a whole summer. Workers replaced the broken tiles, cleaned the "
    "gutters and painted the window frames a dark green. When the library opened again in "
    "September, the teacher was the first to arrive, carrying the same notebook, and he sat "
    "down at his usual place by the window as if nothing had happened. The librarian smiled, "
    "put a new stack of newspapers on the poles and opened the doors a little wider to let in "
    "the cool morning air. Outside, the leaves on the two old trees had just begun to turn "
    "yellow, and the first children of the new school year were already walking past with "
    "their bags, talking loudly about their teachers, their friends and the long summer that "
    "had ended too soon."
)

#: (label, engine keyword arguments) of the caches compared; the first is the reference.
CONFIGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fp32", {"kv_cache_dtype": "auto"}),
    ("fp8_e4m3_per_tensor", {"kv_cache_dtype": "fp8_e4m3"}),
    ("fp8_e4m3_per_head", {"kv_cache_dtype": "fp8_e4m3", "kv_scale_granularity": "head"}),
    ("fp8_e5m2_per_tensor", {"kv_cache_dtype": "fp8_e5m2"}),
    ("fp8_e4m3_scale_1", {"kv_cache_dtype": "fp8_e4m3", "calculate_kv_scales": False}),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--tokens`` (32), ``--threads`` (1), ``--out``, ``--configs`` (all, comma-separated)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--configs", default=",".join(label for label, _ in CONFIGS), help="labels to run"
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "fp8_quality_cpu.json")
    )
    return parser.parse_args(argv)


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    """Greedy agreement of ``got`` with ``ref`` (lists of token lists of one length each).

    >>> agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    {'identical_outputs': 0.5, 'prefix_agreement': 0.6667, 'position_agreement': 0.8333}
    """
    total = sum(len(r) for r in ref)
    prefix = 0
    same = 0
    for r, g in zip(ref, got):
        n = 0
        while n < min(len(r), len(g)) and r[n] == g[n]:
            n += 1
        prefix += n
        same += sum(a == b for a, b in zip(r, g))
    return {
        "identical_outputs": round(sum(r == g for r, g in zip(ref, got)) / len(ref), 4),
        "prefix_agreement": round(prefix / total, 4),
        "position_agreement": round(same / total, 4),
    }


def run_config(kwargs: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Greedy outputs, the perplexity of :data:`TEXT`, and the scales, for one cache kind."""
    from fast.api.llm import LLM
    from fast.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(max_model_len=1024, kv_cache_gb=0.25, enable_prefix_caching=False, **kwargs)
    greedy = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outs = llm.generate(list(PROMPTS), greedy, use_tqdm=False)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    scored = llm.generate(
        [TEXT], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False
    )[0]
    assert scored.prompt_logprobs is not None
    text_ids = list(scored.prompt_token_ids)
    logps = [
        entry[tok].logprob
        for tok, entry in zip(text_ids[1:], scored.prompt_logprobs[1:])
        if entry is not None
    ]
    engine = llm.llm_engine
    scales = [(s.k_scale.tolist(), s.v_scale.tolist()) for s in engine.kv_scales]
    return {
        "tokens": ids,
        "texts": [o.outputs[0].text for o in outs],
        "text_tokens": len(text_ids),
        "perplexity": math.exp(-sum(logps) / len(logps)),
        "num_gpu_blocks": engine.num_gpu_blocks,
        "cache_dtype": str(engine.kv_cache_dtype).replace("torch.", ""),
        "k_scale_range": [min(min(k) for k, _ in scales), max(max(k) for k, _ in scales)]
        if scales
        else None,
        "v_scale_range": [min(min(v) for _, v in scales), max(max(v) for _, v in scales)]
        if scales
        else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = args.configs.split(",")
    runs = {label: run_config(kw, args.tokens) for label, kw in CONFIGS if label in wanted}
    ref_label = next(iter(runs))
    ref = runs[ref_label]
    results: dict[str, Any] = {
        **provenance(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), float32 compute, CPU",
        "prompts": list(PROMPTS),
        "greedy_tokens": args.tokens,
        "reference": ref_label,
        "configs": {},
    }
    for label, run in runs.items():
        entry = {k: v for k, v in run.items() if k != "tokens"}
        entry["perplexity"] = round(run["perplexity"], 4)
        entry["perplexity_diff"] = round(run["perplexity"] - ref["perplexity"], 4)
        entry["perplexity_rel_diff"] = round(run["perplexity"] / ref["perplexity"] - 1, 5)
        entry.update(agreement(ref["tokens"], run["tokens"]))
        results["configs"][label] = entry
        print(
            f"{label:22s} ppl {entry['perplexity']:.4f} ({entry['perplexity_diff']:+.4f})  "
            f"identical {entry['identical_outputs']:.3f}  prefix {entry['prefix_agreement']:.3f}"
            f"  positions {entry['position_agreement']:.3f}  blocks {entry['num_gpu_blocks']}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
