"""Where an eager decode call at B = 1 spends its time on the host (one H200).

``kernels.paged_decode`` at B = 1, L = 4096 (Llama-3-8B heads, bf16, page 16) costs about
130 us per call when called back to back (``gpu_attention.py``'s eager column at d2266f8),
against 12 us replayed from a CUDA graph: the host is the bottleneck. This script splits that
call into its parts, each timed as the host time of many back-to-back calls (the GPU queue never
runs dry, so the figure is what the host spends per call), and writes ``decode_host_h200.json``::

    PYTHONPATH=. python benchmarks/gpu_decode_host.py --out $OUT/decode_host_h200.json

Parts: the public call (kernels launched through ``kernels/triton_launch.py``'s kept compiled
kernels, and through Triton's JIT entry point on every call, as before it), each also as issue
time (the host time before waiting for the GPU); SDPA on contiguous K/V, the peer;
``check_decode`` alone; ``triton_paged_decode`` (validation of the
Triton limits, the split choice, two allocations, the decode kernel and the merge kernel);
the same with one split (one launch, no merge, no allocation); the merge kernel's launch alone;
and an empty ``torch.empty`` for the allocator's share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def host_us(fn: Callable[[], Any], calls: int = 2000) -> float:
    """Host microseconds per call over ``calls`` back-to-back calls (synchronized at both ends;
    best of three rounds)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return round(best, 2)


def issue_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Host microseconds per call to issue ``calls`` calls, before waiting for the GPU (too few
    for the launch queue to fill; best of three rounds)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return round(best, 2)


class _NoMemo(dict[Any, Any]):
    """A FastLaunch memo that keeps nothing: every launch goes through Triton's entry point."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "."), "decode_host_h200.json")
    )
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    from provenance import provenance

    import kernels
    from kernels import triton_decode
    from kernels.checks import check_decode
    from kernels.triton_common import padded_head_dim
    from kernels.triton_decode import _merge_kernel, triton_paged_decode

    hq, hkv, d, page, length = 32, 8, 128, 16, args.length
    dev = torch.device("cuda")
    pages = length // page
    q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16)  # [1, Hq, D]
    kc = torch.randn(pages, page, hkv, d, device=dev, dtype=torch.bfloat16)  # [P, page, Hkv, D]
    vc = torch.randn_like(kc)
    bt = torch.arange(pages, device=dev, dtype=torch.int32)[None]  # [1, pages]
    lens = torch.tensor([length], device=dev, dtype=torch.int32)  # [1]
    scale = d**-0.5
    dims = check_decode(q, kc, vc, bt, lens)
    out = torch.empty_like(q)
    splits = 4
    part = torch.empty(1, hq, splits, d, dtype=torch.float32, device=dev)
    lse = torch.empty(1, hq, splits, dtype=torch.float32, device=dev)

    def public() -> Any:
        return kernels.paged_decode(q, kc, vc, bt, lens, scale=scale)

    def direct(num_splits: int | None) -> Callable[[], Any]:
        return lambda: triton_paged_decode(
            q,
            kc,
            vc,
            bt,
            lens,
            dims,
            scale=scale,
            sliding_window=None,
            softcap=None,
            num_splits=num_splits,
            out=None,
        )

    def merge() -> Any:
        _merge_kernel[(hq,)](
            part,
            lse,
            out,
            D=d,
            BLOCK_D=padded_head_dim(d),
            SPLITS=splits,
            S_PAD=splits,
            num_warps=4,
        )

    def through_triton(fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` with every kernel launched through Triton's JIT entry point (as before
        kernels/triton_launch.py)."""

        def call() -> Any:
            saved = triton_decode._DECODE.compiled, triton_decode._MERGE.compiled
            triton_decode._DECODE.compiled, triton_decode._MERGE.compiled = _NoMemo(), _NoMemo()
            try:
                return fn()
            finally:
                triton_decode._DECODE.compiled, triton_decode._MERGE.compiled = saved

        return call

    def contiguous(cache: torch.Tensor) -> torch.Tensor:  # [P, page, Hkv, D] -> [1, Hkv, L, D]
        return cache.reshape(pages * page, hkv, d).transpose(0, 1)[None].contiguous()

    kc_c, vc_c = contiguous(kc), contiguous(vc)
    q4 = q[:, :, None, :]  # [1, Hq, 1, D]

    def sdpa() -> Any:  # the peer: SDPA on contiguous K/V, its default dispatch
        return torch.nn.functional.scaled_dot_product_attention(
            q4, kc_c, vc_c, scale=scale, enable_gqa=True
        )

    timed: dict[str, Callable[[], float]] = {
        "public_paged_decode": lambda: host_us(public),
        "public_paged_decode_issue": lambda: issue_us(public),
        "public_paged_decode_through_triton": lambda: host_us(through_triton(public)),
        "public_paged_decode_through_triton_issue": lambda: issue_us(through_triton(public)),
        "sdpa_contiguous": lambda: host_us(sdpa),
        "sdpa_contiguous_issue": lambda: issue_us(sdpa),
        "check_decode": lambda: host_us(lambda: check_decode(q, kc, vc, bt, lens)),
        "triton_paged_decode_auto_splits": lambda: host_us(direct(None)),
        "triton_paged_decode_1_split": lambda: host_us(direct(1)),
        "merge_kernel_launch": lambda: host_us(merge),
        "torch_empty": lambda: host_us(
            lambda: torch.empty(1, hq, splits, d, dtype=torch.float32, device=dev)
        ),
    }
    # three rounds over every part, the best of each: the host's clocks and caches settle
    # during the first (at 317e940 the first part timed ran 40 us slower than later)
    rounds = [{name: fn() for name, fn in timed.items()} for _ in range(3)]
    rows = {name: min(r[name] for r in rounds) for name in timed}
    spread = {name: [r[name] for r in rounds] for name in timed}
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(1000):
        public()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        public()
    rows["graph_replay"] = host_us(g.replay)
    result = {
        **provenance(),
        "benchmark": "host time per eager decode call, B=1 (benchmarks/gpu_decode_host.py)",
        "shape": {"B": 1, "L": length, "Hq": hq, "Hkv": hkv, "D": d, "page": page},
        "us_per_call": rows,
        "us_per_call_by_round": spread,
        "profile_public_1000_calls": text.getvalue().splitlines()[:60],
    }
    print(json.dumps(result["us_per_call"], indent=1))
    with open(args.out, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
