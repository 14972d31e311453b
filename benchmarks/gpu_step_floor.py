"""Decode step time against its floor, by batch size: where each millisecond of a step goes.

Run on the GPU machine from the repository root::

    PYTHONPATH=. python benchmarks/gpu_step_floor.py --out $OUT/step_floor_h200.json

Llama-3-8B-shaped random bf16 weights. For each batch size ``b`` it measures, in one run:

1. ``floor_ms``: the model's weight matmuls alone for ``b`` tokens (per layer the fused QKV,
   output, fused gate/up and down projections, then the LM head), captured in one CUDA graph and
   replayed: what a decode step cannot go below, since every weight is read once.
2. ``forward_ms``: the engine's captured decode forward for that batch (the graph the engine
   replays: the matmuls plus norms, rotary embedding, KV write, attention), replayed alone.
3. ``step_ms``: a whole ``LLMEngine.step()`` with ``b`` sequences decoding at about 512 tokens of
   context: scheduling, block bookkeeping, input upload, the graph replay, logits, sampling and
   the outputs, as the engine runs it.

4. ``layers_floor_ms`` (the floor without the LM head) and ``logits_ms`` (the engine's
   ``compute_logits``, the LM head with float32 logits, in a graph).

The captured forward holds the layers but not the LM head, so ``forward_ms - layers_floor_ms`` is
the layers' device work other than the weight matmuls (norms, rotary embedding, KV write,
attention, activation), and ``step_ms - forward_ms - logits_ms`` is what is left: sampling, the
host work and the synchronizations the GPU does not overlap. (Results before this split, such
as step_floor_h200.json at d44c413, computed ``other_device_ms = forward - floor`` and ``host_ms
= step - forward``, so their LM head, about 0.2 ms, sits in ``host_ms``.) Medians over the timed
repetitions; graph replays timed with CUDA events.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 30) -> float:
    """Median milliseconds of one replay of ``graph`` (CUDA events around each)."""
    graph.replay()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def capture(run: Any) -> torch.cuda.CUDAGraph:
    """``run`` once on a side stream (warm-up), then captured in a CUDA graph."""
    from fast.engine.cuda_graphs import capture_graph

    return capture_graph(run)


def logits_graph(model: Any, b: int) -> torch.cuda.CUDAGraph:
    """The engine's ``compute_logits`` (LM head, float32 logits) for ``b`` rows, in a graph."""
    hidden = torch.randn(b, model.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    return capture(lambda: model.compute_logits(hidden))  # [b, H] -> [b, V]


def matmul_floor_graph(model: Any, b: int, head: bool = True) -> torch.cuda.CUDAGraph:
    """A CUDA graph of the model's weight matmuls for ``b`` tokens, and nothing else (the
    layers' four projections; the LM head too unless ``head`` is False)."""
    h = model.config.hidden_size
    x = torch.randn(b, h, dtype=torch.bfloat16, device="cuda")  # [b, H]
    layers = model.model.layers
    mids = [
        torch.randn(b, w.shape[1], dtype=torch.bfloat16, device="cuda")  # [b, in]
        for w in (layers[0].self_attn.o_proj.weight, layers[0].mlp.down_proj.weight)
    ]
    lm_head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight

    def run() -> None:
        for layer in layers:
            torch.nn.functional.linear(x, layer.self_attn.qkv_proj.weight)  # [b, Q + 2 KV]
            torch.nn.functional.linear(mids[0], layer.self_attn.o_proj.weight)  # [b, H]
            torch.nn.functional.linear(x, layer.mlp.gate_up_proj.weight)  # [b, 2F]
            torch.nn.functional.linear(mids[1], layer.mlp.down_proj.weight)  # [b, H]
        if head:
            torch.nn.functional.linear(x, lm_head)  # [b, V]

    return capture(run)


def measure(
    model: Any,
    b: int,
    context: int,
    steps: int,
    fused_ops: bool = False,
    profile: str | None = None,
    async_scheduling: bool = False,
) -> dict[str, Any]:
    """floor, captured forward and whole step for ``b`` sequences decoding.

    With ``async_scheduling`` the steps run back to back with one synchronization before and
    after (a per-step synchronization would serialize what the overlap hides): ``step_ms`` is
    their mean, ``step_min_ms`` the same number."""
    from fast.engine.config import EngineConfig
    from fast.engine.engine import LLMEngine
    from fast.engine.sampling_params import SamplingParams

    floor = replay_ms(matmul_floor_graph(model.model, b))
    layers_floor = replay_ms(matmul_floor_graph(model.model, b, head=False))
    logits = replay_ms(logits_graph(model.model, b))
    engine = LLMEngine(
        model,
        EngineConfig(
            block_size=16,
            max_num_seqs=max(b, 8),
            max_model_len=2048,
            gpu_memory_utilization=0.85,
            cuda_graph_batch_sizes=(b,),
            fused_ops=fused_ops,
            async_scheduling=async_scheduling,
        ),
    )
    rng = np.random.default_rng(b)
    for i in range(b):
        engine.add_request(
            str(i),
            rng.integers(100, 128000, size=context).tolist(),
            SamplingParams(
                temperature=0.0, max_tokens=(3 if profile else 1) * steps + 8, ignore_eos=True
            ),
        )
    # every prompt in, every sequence decoding: three steps in a row of b tokens each (at 128+
    # sequences "2 b tokens generated" came before the last prompts, and the overlapped run's
    # mean then held prefill steps: 22 / 69 ms at 128 / 256 at 28b23a9)
    streak = 0
    while streak < 3:
        before = engine.stats.computed_tokens
        engine.step()
        streak = streak + 1 if engine.stats.computed_tokens - before == b else 0
    times = []
    if async_scheduling:  # back to back: the overlap is what is measured
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0) / steps)
    for _ in range(0 if async_scheduling else steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    forward = replay_ms(engine._graphs.graphs[b])  # the same inputs as the last step
    if profile is not None:  # cProfile of further steps, each path: where the host time goes
        import cProfile
        import io
        import pstats

        report = io.StringIO()
        for finished_only in (False, True):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(steps):
                engine.step(finished_only=finished_only)
            torch.cuda.synchronize()
            prof.disable()
            report.write(f"\n===== batch {b}, {steps} steps, finished_only={finished_only}\n")
            pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(35)
        with open(profile, "a") as f:
            f.write(report.getvalue())
    while engine.has_unfinished_requests():
        engine.step()
    row = {
        "batch": b,
        "context": context,
        "fused_ops": fused_ops,
        "async_scheduling": async_scheduling,
        "floor_ms": round(floor, 3),
        "forward_ms": round(forward, 3),
        "step_ms": round(float(np.median(times)), 3),
        "step_min_ms": round(float(np.min(times)), 3),
    }
    row["step_over_floor"] = round(row["step_ms"] / row["floor_ms"], 3)
    row["layers_floor_ms"] = round(layers_floor, 3)
    row["logits_ms"] = round(logits, 3)
    # the captured forward holds the layers, not the LM head: compare it with the layers' floor
    row["other_device_ms"] = round(forward - layers_floor, 3)
    row["host_ms"] = round(row["step_ms"] - forward - logits, 3)  # host work, sampling, syncs
    del engine
    return row


#: bytes of K and V per token of context, Llama-3-8B in bf16: 32 layers x (K, V) x 8 heads x 128
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
#: the decode kernel's bandwidth at large batch on the H200 (attention_h200.json: 4.45 TB/s)
KV_TBPS = 4.45


def kv_floor_ms(batch: int, context: int) -> float:
    """Milliseconds to read ``batch`` sequences' K/V of ``context`` tokens at :data:`KV_TBPS`."""
    return batch * context * KV_BYTES_PER_TOKEN / (KV_TBPS * 1e9)


def svg(result: dict[str, Any], width: int = 640, height: int = 360) -> str:
    """Step time by batch size against the floors, as an SVG for the docs (no blank lines):
    x = batch (log2), y = ms; the weights' floor, weights + KV floor, captured forward, step."""
    rows = [r for r in result["rows"] if not r.get("fused_ops")]
    fused = {r["batch"]: r for r in result["rows"] if r.get("fused_ops")}
    xs = [math.log2(r["batch"]) for r in rows]
    series = [
        ("weights floor", "#7f7f7f", [r["floor_ms"] for r in rows]),
        (
            "floor + KV read",
            "#1f77b4",
            [r["floor_ms"] + kv_floor_ms(r["batch"], r["context"]) for r in rows],
        ),
        ("captured forward", "#2ca02c", [r["forward_ms"] for r in rows]),
        ("engine step", "#d62728", [r["step_ms"] for r in rows]),
    ]
    if all(r["batch"] in fused for r in rows) and fused:
        series.append(("step, fused ops", "#9467bd", [fused[r["batch"]]["step_ms"] for r in rows]))
    left, right, top, bottom = 60, 20, 40, 50
    x_hi = max(xs) or 1.0
    y_hi = math.ceil(max(max(v) for _, _, v in series) / 5) * 5

    def px(x: float) -> float:
        return left + (width - left - right) * x / x_hi

    def py(y: float) -> float:
        return top + (height - top - bottom) * (1 - y / y_hi)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="{width / 2}" y="16" text-anchor="middle">Decode step vs its floor, '
        f"Llama-3-8B shape, {result['gpu']}, commit {result.get('git_describe', '?')}</text>",
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
        'stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">'
        "sequences in the step</text>",
        f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {(top + height - bottom) / 2})">ms per step</text>',
    ]
    for k in range(6):
        y = y_hi * k / 5
        out.append(
            f'<line x1="{left}" y1="{py(y):.1f}" x2="{width - right}" y2="{py(y):.1f}" '
            'stroke="#ddd"/>'
        )
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for r, x in zip(rows, xs):
        out.append(
            f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
            f"{r['batch']}</text>"
        )
    for i, (label, color, vals) in enumerate(series):
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, vals))
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in zip(xs, vals):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        lx = left + 10 + (width - left - right) // len(series) * i
        out.append(f'<rect x="{lx}" y="{top - 14}" width="12" height="4" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{top - 8}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results JSON path")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--svg-from", default=None, help="print the SVG plot of a results JSON")
    parser.add_argument(
        "--profile",
        default=None,
        help="append a cProfile of further steps (generate and streaming paths) to this file",
    )
    parser.add_argument(
        "--fused-ops",
        choices=("off", "on", "both"),
        default="both",
        help="the engine's fused_ops (kernels.fused): both measures each batch size with and "
        "without, one after the other",
    )
    parser.add_argument(
        "--async-scheduling",
        action="store_true",
        help="the engine's async_scheduling (overlapped decode steps; steps timed back to back)",
    )
    args = parser.parse_args()
    if args.svg_from:
        with open(args.svg_from) as f:
            print(svg(json.load(f)))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes: positive batch sizes, got {args.sizes!r}")
    import gc

    from provenance import provenance

    from fast.loader import random_model
    from fast.model.config import ModelConfig

    loaded = random_model(ModelConfig.llama3_8b(), seed=0, dtype=torch.bfloat16, device="cuda")
    rows = []
    for b in sizes:
        for fused in {"off": (False,), "on": (True,), "both": (False, True)}[args.fused_ops]:
            rows.append(
                measure(
                    loaded, b, args.context, args.steps, fused, args.profile, args.async_scheduling
                )
            )
            print(rows[-1], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    result = {
        "benchmark": "decode step vs its matmul floor, Llama-3-8B-shaped random bf16",
        **provenance(),
        "gpu": torch.cuda.get_device_name(),
        "rows": rows,
    }
    print(
        "\n| batch | floor ms | forward ms | step ms | step / floor | other device ms | host ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['floor_ms']} | {r['forward_ms']} | {r['step_ms']} | "
            f"{r['step_over_floor']} | {r['other_device_ms']} | {r['host_ms']} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
