"""Where a mixed step's time goes: decode rows and prefill chunks in one forward.

Run on the GPU machine from the repository root::

    PYTHONPATH=. python benchmarks/gpu_mixed_step.py --out $OUT/mixed_step_h200.json

Llama-3-8B-shaped random bf16 weights, the fused kernels on. For each (decode sequences ``d``
at ``--context`` tokens, prefill tokens ``p`` in prompts of ``--prompt`` tokens) it measures, on
the model alone (no engine):

* ``eager_ms``: the forward as the engine runs a step with prefill tokens today (eager, every
  token through the prefill kernel), CUDA events around it;
* ``host_issue_ms``: the host's time to issue that forward (perf_counter, no sync inside): when
  it is close to ``eager_ms`` the step is bound by launches, and a graph would help;
* ``graph_ms``: the same forward captured in one CUDA graph and replayed (what a mixed step
  from graphs could reach with this attention);
* ``floor_ms``: the layers' weight matmuls alone for ``d + p`` tokens, in a graph;
* ``attn_mixed_ms`` / ``attn_split_ms``: one layer's attention over the whole batch through the
  prefill kernel, against the decode kernel for the decode rows plus the prefill kernel for the
  prefill rows (times the layer count, so comparable with the forward).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def events_ms(run: Any, reps: int = 10) -> float:
    """Median milliseconds of ``run()`` (CUDA events around each call, after one warm call)."""
    run()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def batch(
    d: int, p: int, context: int, prompt: int, block_size: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Host arrays of a step: ``d`` decode rows at ``context``, then ``p`` prefill tokens in
    prompts of ``prompt`` tokens; distinct random blocks per sequence."""
    n_pre = -(-p // prompt) if p else 0
    q_lens = [1] * d + [min(prompt, p - i * prompt) for i in range(n_pre)]
    lens = [context + 1] * d + q_lens[d:]
    need = [-(-n // block_size) for n in lens]
    width = max(need)
    ids = rng.permutation(sum(need)).astype(np.int32)
    tables = np.zeros((len(lens), width), dtype=np.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = ids[at : at + n]
        at += n
    positions = np.concatenate([np.arange(n - q, n) for n, q in zip(lens, q_lens)])
    row = np.repeat(np.arange(len(lens)), q_lens)
    slots = tables[row, positions // block_size].astype(np.int64) * block_size
    slots += positions % block_size
    cu = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=cu[1:])
    return {
        "tokens": rng.integers(100, 128000, size=len(positions)),
        "positions": positions,
        "slots": slots,
        "tables": tables,
        "lens": np.array(lens, dtype=np.int32),
        "cu": cu,
        "num_blocks": sum(need),
        "max_q": max(q_lens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cases", default="32:256,128:256,256:256,256:1024,256:4096,0:2048")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=256)
    args = parser.parse_args()
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",") if c]

    from gpu_step_floor import capture, matmul_floor_graph, replay_ms
    from provenance import provenance

    import kernels
    from fast.loader import random_model
    from fast.model.attention_context import AttentionContext
    from fast.model.config import ModelConfig

    loaded = random_model(ModelConfig.llama3_8b(), seed=0, dtype=torch.bfloat16, device="cuda")
    model = loaded.model
    model.use_fused_ops(True)
    cfg = model.config
    layers = cfg.num_hidden_layers
    rng = np.random.default_rng(0)
    bs = 16
    most = max(batch(d, p, args.context, args.prompt, bs, rng)["num_blocks"] for d, p in cases)
    shape = (most, bs, cfg.num_key_value_heads, cfg.head_dim)
    caches = [
        (
            torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
            torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
        )
        for _ in range(layers)
    ]
    rows = []
    for d, p in cases:
        h = batch(d, p, args.context, args.prompt, bs, rng)
        dev = {
            k: torch.from_numpy(np.ascontiguousarray(v)).cuda()
            for k, v in h.items()
            if isinstance(v, np.ndarray)
        }
        ctx = AttentionContext(
            slot_mapping=dev["slots"],
            block_tables=dev["tables"],
            seq_lens=dev["lens"],
            cu_seqlens_q=dev["cu"],
            max_seqlen_q=int(h["max_q"]),
            is_decode=p == 0,
        )
        t = int(h["positions"].shape[0])

        def forward() -> torch.Tensor:
            with torch.inference_mode():
                out: torch.Tensor = model(dev["tokens"], dev["positions"], ctx, caches)
                return out

        eager = events_ms(forward)
        issue = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            forward()
            issue.append(1000 * (time.perf_counter() - t0))
            torch.cuda.synchronize()
        graph = replay_ms(capture(forward), reps=10)
        floor = replay_ms(matmul_floor_graph(model, t, head=False), reps=10)
        q = torch.randn(t, cfg.num_attention_heads, cfg.head_dim, dtype=torch.bfloat16).cuda()
        k0, v0 = caches[0]
        scale = cfg.attention_scale

        def mixed() -> None:
            kernels.paged_prefill(
                q, k0, v0, ctx.block_tables, ctx.cu_seqlens_q, ctx.seq_lens, scale=scale
            )

        def split() -> None:
            if d:
                kernels.paged_decode(
                    q[:d], k0, v0, ctx.block_tables[:d], ctx.seq_lens[:d], scale=scale
                )
            if p:
                kernels.paged_prefill(
                    q[d:],
                    k0,
                    v0,
                    ctx.block_tables[d:],
                    ctx.cu_seqlens_q[d:] - d,
                    ctx.seq_lens[d:],
                    scale=scale,
                )

        row = {
            "decode_seqs": d,
            "prefill_tokens": p,
            "tokens": t,
            "eager_ms": round(eager, 3),
            "host_issue_ms": round(float(np.median(issue)), 3),
            "graph_ms": round(graph, 3),
            "floor_ms": round(floor, 3),
            "attn_mixed_ms": round(layers * replay_ms(capture(mixed), reps=10), 3),
            "attn_split_ms": round(layers * replay_ms(capture(split), reps=10), 3),
        }
        rows.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache()
    result = {
        "benchmark": "mixed step: eager forward vs graph vs floor, Llama-3-8B-shaped random bf16",
        **provenance(),
        "gpu": torch.cuda.get_device_name(),
        "context": args.context,
        "prompt": args.prompt,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
