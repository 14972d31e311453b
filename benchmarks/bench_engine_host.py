"""Host (CPU-side) overhead of one engine step with 128 running sequences.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_engine_host.py [--seqs 128] [--steps 200] [--profile]

On a GPU the model runs asynchronously, so everything else the engine does in a step --
scheduling, block-manager calls, flattening the batch, the attention metadata, sampling's
bookkeeping, stop checks, building outputs -- adds to the step time whenever it exceeds the
GPU's work, and always adds before the first kernel starts. This script measures exactly that
part on the CPU: the engine runs a Llama-3-8B-*shaped* configuration on the CPU whose model is
replaced by a stub (``forward`` returns zeros ``[T, H]``, ``compute_logits`` a fixed ``[N, V]``
block of a small vocabulary), so the step time is the engine's own host work. ``seqs`` requests
with ShareGPT-like prompts (docs/workloads.md, seed 0) and ``steps + 64`` output tokens each are
prefilled; then ``steps`` decode steps of all of them are timed. Both the batch-generation path
(``step(finished_only=True)``, what ``LLM.generate`` uses) and the streaming path (``step()``,
one output per request per step, ``CUMULATIVE`` and ``DELTA`` outputs alternately) are reported.

Writes ``benchmarks/results/engine_host.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

VOCAB_STUB = 512  # logits width of the stub (sampling cost on the host is not the point)


class StubModel(torch.nn.Module):
    """Stands in for the model: zeros for hidden states, a fixed logits block (greedy -> id 7)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.states = torch.zeros(8192, hidden)  # [T_max, H]
        self.logits = torch.zeros(8192, VOCAB_STUB)  # [N_max, V]
        self.logits[:, 7] = 1.0

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Any, kv_caches: Any
    ) -> torch.Tensor:
        return self.states[: input_ids.shape[0]]  # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[: hidden.shape[0]]  # [N, V]


def make_engine(seqs: int, caching: bool = True, overlap: bool = False) -> Any:
    """An engine with the Llama-3-8B shape (no weights: the stub replaces the model)."""
    from fast.engine.config import EngineConfig
    from fast.engine.engine import LLMEngine
    from fast.loader import LoadedModel
    from fast.model.config import ModelConfig

    cfg = ModelConfig.llama3_8b()
    # A shallow KV pool: one layer's worth is enough, the stub never reads it.
    small = type(cfg)(**{**cfg.__dict__, "num_hidden_layers": 1})
    loaded = LoadedModel(StubModel(cfg.hidden_size), None, small)
    return LLMEngine(
        loaded,
        EngineConfig(
            block_size=16,
            max_num_seqs=seqs,
            max_num_batched_tokens=8192,
            max_model_len=2048,
            num_gpu_blocks=seqs * 128,
            device="cpu",
            dtype="float32",
            enforce_eager=True,
            enable_prefix_caching=caching,
            async_scheduling=overlap,
        ),
    )


def run(
    seqs: int,
    steps: int,
    finished_only: bool,
    profile: bool,
    caching: bool = True,
    kind: str = "CUMULATIVE",
    overlap: bool = False,
) -> dict[str, Any]:
    """Prefill ``seqs`` requests, then time ``steps`` decode steps of all of them (streaming
    requests report as ``SamplingParams.output_kind`` ``kind`` says)."""
    from benchmarks.gpu_engine import sharegpt_trace
    from fast.engine.sampling_params import RequestOutputKind, SamplingParams

    engine = make_engine(seqs, caching, overlap)
    prompts, _ = sharegpt_trace(seqs)
    for i, p in enumerate(prompts):
        engine.add_request(
            str(i),
            p,
            SamplingParams(
                temperature=0.0,
                max_tokens=steps + 64,  # the first admitted decode while the rest prefill
                ignore_eos=True,
                output_kind=RequestOutputKind[kind],
            ),
        )
    while engine.scheduler.waiting:  # prefill steps (not timed)
        engine.step(finished_only=finished_only)
    for _ in range(3):
        engine.step(finished_only=finished_only)
    assert len(engine.scheduler.running) == seqs, len(engine.scheduler.running)
    prof = cProfile.Profile() if profile else None
    times = []
    for _ in range(steps):
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        engine.step(finished_only=finished_only)
        times.append(time.perf_counter() - t0)
        if prof is not None:
            prof.disable()
    assert len(engine.scheduler.running) == seqs  # every step was a full decode step
    if overlap:  # every timed call processed one step and launched the next
        assert engine.stats.overlapped >= steps, engine.stats
    if prof is not None:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    ms = 1000 * np.asarray(times)
    return {
        "finished_only": finished_only,
        "output_kind": kind,
        "prefix_caching": caching,
        "async_scheduling": overlap,
        "seqs": seqs,
        "steps": steps,
        "median_ms": round(float(np.median(ms)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--label", default="current")
    parser.add_argument(
        "--prefix-caching",
        choices=("on", "off", "both"),
        default="on",
        help="the engine's prefix caching (both: off and on alternately, generate path only)",
    )
    parser.add_argument(
        "--async-scheduling",
        action="store_true",
        help="the generate path without and with overlapped scheduling, alternately (the "
        "overlapped call's host work: process step n, plan and launch n + 1)",
    )
    parser.add_argument("--out", default="benchmarks/results/engine_host.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    on = args.prefix_caching == "on"
    if args.async_scheduling:
        plan = [(True, on, "CUMULATIVE", o) for _ in range(2) for o in (False, True)]
    elif args.prefix_caching == "both":
        plan = [(True, c, "CUMULATIVE", False) for _ in range(2) for c in (False, True)]
    else:  # generate, then streaming with each output kind, twice alternating
        kinds = ("CUMULATIVE", "DELTA")
        plan = [(True, on, "CUMULATIVE", False)]
        plan += [(False, on, k, False) for _ in range(2) for k in kinds]
    rows = [run(args.seqs, args.steps, fo, args.profile, c, k, o) for fo, c, k, o in plan]
    for r in rows:
        path = (
            "generate (finished_only)"
            if r["finished_only"]
            else f"streaming step(), {r['output_kind']} outputs"
        )
        print(
            f"{args.label}: {path}, prefix caching {r['prefix_caching']}, async_scheduling "
            f"{r['async_scheduling']}: {r['seqs']} seqs, "
            f"median {r['median_ms']} ms/step, mean {r['mean_ms']}, p90 {r['p90_ms']}"
        )
    try:
        with open(args.out) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"benchmark": "engine host overhead per decode step (stub model, CPU)", "runs": {}}
    from benchmarks.provenance import git_describe

    result["runs"][args.label] = {
        "git_describe": git_describe(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
