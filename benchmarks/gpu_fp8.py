"""fp8 KV cache on the GPU: decode attention speed, blocks per GiB, and end-to-end throughput.

Run on the GPU machine from the repository root::

    PYTHONPATH=. python benchmarks/gpu_fp8.py --out $OUT [--sections decode,tune,capacity,engine]

Writes ``DIR/fp8_h200.json`` (``--out DIR``), saved after every section.

* ``decode``: ``kernels.paged_decode`` (Triton) with Llama-3-8B heads (Hq 32, Hkv 8, D 128),
  queries bf16, page 16, random block permutation: the bf16 cache against the fp8 e4m3 cache
  (per-head scales, calibrated on the data) at batch x context from 1 x 4096 to 8 x 65536;
  times are CUDA-graph replays (``gpu_attention.bench_graph_ms``) and plain launches
  (``bench_ms``), inputs rotated as in benchmarks/gpu_attention.py; ``speedup`` = bf16 time /
  fp8 time (the issue's target: at least 1.7x at long context); errors against float32 SDPA on
  the unquantized K/V.
  ``fp8`` runs the default dequantization (``kernels.triton_decode.DEFAULT_FP8_DEQUANT``) at
  its default config; ``fp8f16swap`` the same cache through the opt-in ``"f16_swap"`` (bf16
  queries rounded to fp16) at :data:`F16_SWAP_CONFIG` (``speedup_f16swap``).
* ``tune``: the decode kernel's (BLOCK_N, num_warps, num_stages) at the long shapes and 16 x 2048,
  for the bf16 cache (``bf16_*``) and the fp8 dequantizations that can win (``bits``,
  ``bits_f16`` and the swapped-operand ``bits_swap``, ``bits_f16_swap``, ``f16_swap``), with
  one and two shared buffers per K/V (stages 3 vs 5), each fp8 output checked against
  ``"bits"``. About 90 s on an H200; ``--results-name`` keeps it apart from the full run.
* ``tune2``: :data:`TUNE2`, the configs and launch options that the offline counts say can
  close the rest of the gap to 1.7x (three K/V buffers, 128-key tiles at ``maxnreg`` 128, the
  deferred softmax denominator ``defer_l``, twice the splits) at 64 x 4096 and 8 x 32768,
  against the bf16 kernel and the best so far, each checked against ``"bits"``; under 60 s.
* ``capacity``: KV blocks (16 tokens) per GiB for Llama-3-8B in bf16 and fp8 (from the engine's
  own sizing, ``fast.engine.config.kv_bytes_per_block``).
* ``engine``: benchmarks/gpu_engine.py's ShareGPT-like trace (128 requests, Llama-3-8B-shaped
  random bf16) at a KV budget of ``--kv-gb`` GiB (default 2: 1024 bf16 blocks, where the bf16
  cache preempts; at 4 GiB, 2048 blocks, neither cache preempted at ec5eb27),
  bf16 cache against fp8 (calibrated per tensor on the warm-up requests): output tokens/s,
  preemptions, blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SECTIONS = ("decode", "tune", "tune2", "splits", "capacity", "engine")
DECODE_SHAPES = (
    (1, 4096),
    (16, 2048),
    (64, 4096),
    (128, 1024),
    (32, 16384),
    (8, 32768),
    (4, 65536),
)
LONG_SHAPES = ((64, 4096), (32, 16384), (8, 32768), (16, 2048))
#: (BLOCK_N, warps, stages). Triton 3.6 gives K and V one shared buffer each at stages 2-4 (the
#: block-table load takes a pipeline stage of its own, leaving the K/V copy one stage ahead of
#: its dots and issued after them) and two at stages 5-6; benchmarks/sass_fp8_decode.py shows
#: the buffers, registers and programs per SM of each. The sweeps keep to what can win. Measured
#: before (fp8_tune_h200.json at e79a68b): "convert" and "f16" (0.74x and 0.81x bf16) and the
#: "bits" configs other than 64x4x3 (all slower); they are left out now. The swapped-operand
#: modes (docs/fp8.md, "Swapped operands") run at one buffer (64x4x3) and two (64x4x5: 115-120
#: registers, still 4 programs per SM); 128-key tiles (183 registers, 2 per SM) and 8 warps
#: (the tiles back through shared memory) are ruled out by the offline counts.
BITS_CONFIGS = ((64, 4, 3),)
BITS_F16_CONFIGS = ((64, 4, 3),)
SWAP_CONFIGS = ((64, 4, 3), (64, 4, 5))
#: "f16_swap" (the fewest instructions, 471 per tile) also at 32 keys (5 programs per SM).
F16_SWAP_CONFIGS = ((64, 4, 3), (64, 4, 5), (32, 4, 3))
#: The bf16 kernel's own configs (the reference; its sweep at e79a68b: 64x4x3 and 32x4x5 best).
BF16_CONFIGS = ((64, 4, 3), (32, 4, 5))
#: mode -> (key prefix in the tune rows, configs).
TUNE_MODES = {
    "bits": ("bits_", BITS_CONFIGS),
    "bits_f16": ("bitsf16_", BITS_F16_CONFIGS),
    "bits_swap": ("bitsswap_", SWAP_CONFIGS),
    "bits_f16_swap": ("bitsf16swap_", SWAP_CONFIGS),
    "f16_swap": ("f16swap_", F16_SWAP_CONFIGS),
}
#: The config the decode table's ``fp8f16swap`` column runs (``decode_config``'s for it).
F16_SWAP_CONFIG = (64, 4, 5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--out DIR`` (default ``$OUT`` or .), ``--sections``, ``--kv-gb``, ``--requests``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="output directory")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}"
    )
    parser.add_argument("--kv-gb", type=float, default=2.0, help="KV budget of the engine run")
    parser.add_argument(
        "--results-name", default="fp8_h200.json", help="file name of the results in --out"
    )
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown}; known {list(SECTIONS)}")
    args.sections = sections
    return args


def blocks_per_gib(block_size: int = 16) -> dict[str, Any]:
    """KV blocks per GiB of Llama-3-8B in bf16 and in fp8, as the engine sizes its pool."""
    import torch

    from fast.engine.config import kv_bytes_per_block
    from fast.model.config import ModelConfig

    model = ModelConfig.llama3_8b()
    out: dict[str, Any] = {"model": "Llama-3-8B (32 layers, Hkv 8, D 128)", "block_size": 16}
    for name, dtype in (("bfloat16", torch.bfloat16), ("fp8_e4m3", torch.float8_e4m3fn)):
        per_block = kv_bytes_per_block(model, block_size, dtype)
        out[name] = {"bytes_per_block": per_block, "blocks_per_gib": (1 << 30) // per_block}
    out["ratio"] = out["fp8_e4m3"]["blocks_per_gib"] / out["bfloat16"]["blocks_per_gib"]
    return out


def _fp8_pool(kp: Any, vp: Any, per_head_amax: bool = True) -> tuple[Any, Any, Any, Any]:
    """bf16 pools [P, page, Hkv, D] -> fp8 e4m3 pools and their [Hkv] float32 scales."""
    import torch

    import kernels
    from kernels.fp8 import FP8_MAX

    top = FP8_MAX[torch.float8_e4m3fn]
    out = []
    for pool in (kp, vp):
        amax = pool.float().abs().amax(dim=(0, 1, 3))  # [Hkv]
        scale = (amax / top).clamp_min(1e-12).float()
        q8 = torch.empty(pool.shape, dtype=torch.float8_e4m3fn, device=pool.device)
        flat = pool.view(-1, *pool.shape[2:])  # [P * page, Hkv, D]
        slots = torch.arange(flat.shape[0], device=pool.device)
        kernels.write_kv(flat, flat, q8, torch.empty_like(q8), slots, k_scale=scale, v_scale=scale)
        out += [q8, scale]
    return out[0], out[2], out[1], out[3]


def decode_table(res: dict[str, Any]) -> None:
    """bf16 vs fp8 decode attention, CUDA-graph timed, over :data:`DECODE_SHAPES`."""
    import torch
    import torch.nn.functional as F
    from gpu_attention import (
        DT,
        HKV,
        HQ,
        D,
        bench_graph_ms,
        bench_ms,
        paged_pool,
        rel_err,
        rotating,
    )

    import kernels
    from kernels.checks import check_decode
    from kernels.triton_decode import triton_paged_decode

    rows = []
    for batch, length in DECODE_SHAPES:
        bf16_bytes = 2 * batch * length * HKV * D * 2
        n_rot = max(1, min(8, math.ceil(256e6 / bf16_bytes)))
        row: dict[str, Any] = {"B": batch, "L": length, "bf16_kv_MB": round(bf16_bytes / 1e6, 1)}
        sets = []
        for _ in range(n_rot):
            q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
            k = torch.randn(batch, HKV, length, D, device="cuda", dtype=DT)
            v = torch.randn_like(k)
            kp, vp, bt = paged_pool(k, v, 16)
            del k, v
            k8, v8, ks, vs = _fp8_pool(kp, vp)
            sets.append((q, kp, vp, bt, k8, v8, ks, vs))
        lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        scale = D**-0.5
        q, kp, vp, bt, k8, v8, ks, vs = sets[0]
        kk = kp[bt.long()].reshape(batch, length, HKV, D).transpose(1, 2).float()
        vv = vp[bt.long()].reshape(batch, length, HKV, D).transpose(1, 2).float()
        ref = F.scaled_dot_product_attention(q.float()[:, :, None], kk, vv, enable_gqa=True)
        ref = ref[:, :, 0]
        del kk, vv

        def bf16(s: tuple[Any, ...]) -> Any:
            return lambda: kernels.paged_decode(s[0], s[1], s[2], s[3], lens, scale=scale)

        def fp8(s: tuple[Any, ...]) -> Any:
            return lambda: kernels.paged_decode(
                s[0], s[4], s[5], s[3], lens, scale=scale, k_scale=s[6], v_scale=s[7]
            )

        dims = check_decode(q, k8, v8, bt, lens)

        def fp8f16swap(s: tuple[Any, ...]) -> Any:
            return lambda: triton_paged_decode(
                s[0], s[4], s[5], s[3], lens, dims, scale=scale, sliding_window=None,
                softcap=None, num_splits=None, out=None, config=F16_SWAP_CONFIG,
                kv_scales=(s[6], s[7]), fp8_dequant="f16_swap",
            )  # fmt: skip

        row["bf16_err"] = f"{rel_err(bf16(sets[0])(), ref):.2e}"
        row["fp8_err"] = f"{rel_err(fp8(sets[0])(), ref):.2e}"
        row["fp8f16swap_err"] = f"{rel_err(fp8f16swap(sets[0])(), ref):.2e}"
        for name, make, nbytes in (
            ("bf16", bf16, bf16_bytes),
            ("fp8", fp8, bf16_bytes // 2),
            ("fp8f16swap", fp8f16swap, bf16_bytes // 2),
        ):
            try:
                ms = bench_graph_ms(rotating([make(s) for s in sets]))
                row[f"{name}_graph_us"] = round(ms * 1e3, 1)
                row[f"{name}_graph_TBps"] = round(nbytes / ms / 1e9, 2)
                ms = bench_ms(rotating([make(s) for s in sets]))
                row[f"{name}_us"] = round(ms * 1e3, 1)
            except Exception as e:  # record and go on
                row[name] = repr(e)[:200]
        if "bf16_graph_us" in row and "fp8_graph_us" in row:
            row["speedup"] = round(row["bf16_graph_us"] / row["fp8_graph_us"], 3)
        if "bf16_graph_us" in row and "fp8f16swap_graph_us" in row:
            row["speedup_f16swap"] = round(row["bf16_graph_us"] / row["fp8f16swap_graph_us"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del sets, q, kp, vp, bt, k8, v8, ks, vs, ref
        torch.cuda.empty_cache()
    res["decode"] = rows


class _DecodeShape:
    """One decode shape's inputs on the GPU (Llama-3-8B heads, page 16): the bf16 pool and its
    fp8 copy (per-head scales), and :meth:`time_us` of one kernel variant on either."""

    def __init__(self, batch: int, length: int) -> None:
        import torch
        from gpu_attention import DT, HKV, HQ, D, paged_pool

        from kernels.checks import check_decode

        self.q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
        k = torch.randn(batch, HKV, length, D, device="cuda", dtype=DT)
        self.kp, self.vp, self.bt = paged_pool(k, torch.randn_like(k), 16)
        del k
        self.k8, self.v8, self.ks, self.vs = _fp8_pool(self.kp, self.vp)
        self.lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        self.dims = check_decode(self.q, self.k8, self.v8, self.bt, self.lens)
        self.bdims = check_decode(self.q, self.kp, self.vp, self.bt, self.lens)
        self.name = f"{batch}x{length}"
        self.scale = D**-0.5

    def run(
        self,
        fp8_dequant: str | None,
        config: tuple[int, int, int] | None = None,
        num_splits: int | None = None,
        **options: Any,
    ) -> Any:
        """One call of the decode kernel (``fp8_dequant`` None: the bf16 cache); ``options``:
        the launcher's tuning options (``defer_l``, ``maxnreg``)."""
        from kernels.triton_decode import triton_paged_decode

        fp8 = fp8_dequant is not None
        k, v, dims = (self.k8, self.v8, self.dims) if fp8 else (self.kp, self.vp, self.bdims)
        return triton_paged_decode(
            self.q, k, v, self.bt, self.lens, dims, scale=self.scale, sliding_window=None,
            softcap=None, num_splits=num_splits, out=None, config=config,
            kv_scales=(self.ks, self.vs) if fp8 else None, fp8_dequant=fp8_dequant, **options,
        )  # fmt: skip

    def time_us(
        self,
        fp8_dequant: str | None,
        config: tuple[int, int, int] | None = None,
        num_splits: int | None = None,
        **options: Any,
    ) -> float | str:
        """CUDA-graph time of the decode kernel (``fp8_dequant`` None: the bf16 cache), or the
        error it raised (recorded, not fatal)."""
        from gpu_attention import bench_graph_ms

        try:
            ms = bench_graph_ms(lambda: self.run(fp8_dequant, config, num_splits, **options))
            return round(ms * 1e3, 1)
        except Exception as e:
            return repr(e)[:120]


def _cfg_name(cfg: tuple[int, int, int]) -> str:
    return "x".join(map(str, cfg))


def tune(res: dict[str, Any]) -> None:
    """The decode kernel's (BLOCK_N, warps, stages) at :data:`LONG_SHAPES`: the bf16 cache's
    (``bf16_*``, :data:`BF16_CONFIGS`) and per fp8 dequantization (:data:`TUNE_MODES`):
    ``bits`` (``"bits"``: word loads, prmt to bf16 bits and an exact bf16 scale multiply, bf16
    dots; the default), ``bitsf16`` (``"bits_f16"``: prmt to fp16, fp16 dots), ``bitsswap``,
    ``bitsf16swap`` (the same maps with swapped operands, K and V^T dequantized into wgmma's
    register operand) and ``f16swap`` (swapped, hardware fp8x2 -> fp16x2 conversion).
    ``err_<key>``: the relative difference of that kernel's output from ``"bits"`` at 64x4x3
    (both dequantize exactly: only rounding in the dots and softmax differs, ~1e-3; a wrong map
    would show as O(1)); ``best`` / ``best_speedup``: the fastest fp8 entry against ``bf16_us``."""
    import torch
    from gpu_attention import DT, D, rel_err

    from kernels.triton_decode import decode_config

    rows = []
    for batch, length in LONG_SHAPES:
        shape = _DecodeShape(batch, length)
        row: dict[str, Any] = {"B": batch, "L": length, "default": list(decode_config(D, DT))}
        row["bf16_us"] = shape.time_us(None)
        ref = shape.run("bits", (64, 4, 3)).float()
        plan: list[tuple[str, str | None, tuple[int, int, int]]]
        plan = [("bf16_", None, cfg) for cfg in BF16_CONFIGS]
        plan += [(pre, mode, cfg) for mode, (pre, cfgs) in TUNE_MODES.items() for cfg in cfgs]
        for prefix, mode, cfg in plan:
            key = prefix + _cfg_name(cfg)
            print(f"tune {shape.name} {key}", flush=True)  # the last one a crash reached
            if mode is not None:  # one plain call first: compiles outside the graph capture
                try:
                    row[f"err_{key}"] = f"{rel_err(shape.run(mode, cfg).float(), ref):.1e}"
                except Exception as e:
                    row[f"err_{key}"] = repr(e)[:120]
                    continue
            row[key] = shape.time_us(mode, cfg)
        fp8 = {k: v for k, v in row.items() if isinstance(v, float) and not k.startswith("bf16")}
        if fp8 and isinstance(row["bf16_us"], float):
            best = min(fp8, key=lambda k: fp8[k])
            row["best"] = best
            row["best_speedup"] = round(row["bf16_us"] / fp8[best], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del shape
        torch.cuda.empty_cache()
    res["tune"] = rows


#: The ``tune2`` section (docs/fp8.md, "Closing the gap": the offline counts and the prediction
#: of each): key -> (mode, (BLOCK_N, warps, stages), launcher options, split factor over the
#: launcher's choice). ``deferl``: the denominator summed once after the loop (``defer_l``);
#: ``r128``: ``maxnreg`` 128 (4 programs per SM at 128 keys, 3 buffers with ``defer_l``);
#: 64x4x7 gives K and V three shared buffers each in Triton 3.6 (5-6: two, 3-4: one).
TUNE2: dict[str, tuple[str | None, tuple[int, int, int], dict[str, Any], int]] = {
    "bf16_64x4x3": (None, (64, 4, 3), {}, 1),  # the reference
    "f16swap_64x4x5": ("f16_swap", (64, 4, 5), {}, 1),  # the best so far
    "bitsswap_64x4x5": ("bits_swap", (64, 4, 5), {}, 1),  # the default for bf16 q
    "f16swap_64x4x7_deferl_r128": ("f16_swap", (64, 4, 7), {"defer_l": True, "maxnreg": 128}, 1),
    "f16swap_128x4x3_deferl_r128": ("f16_swap", (128, 4, 3), {"defer_l": True, "maxnreg": 128}, 1),
    "f16swap_64x4x5_deferl": ("f16_swap", (64, 4, 5), {"defer_l": True}, 1),
    "f16swap_64x4x7": ("f16_swap", (64, 4, 7), {}, 1),
    "bitsswap_64x4x7_deferl_r128": ("bits_swap", (64, 4, 7), {"defer_l": True, "maxnreg": 128}, 1),
    "bitsswap_64x4x5_deferl": ("bits_swap", (64, 4, 5), {"defer_l": True}, 1),
    "f16swap_128x4x3_r128": ("f16_swap", (128, 4, 3), {"maxnreg": 128}, 1),
    "bitsswap_64x4x7": ("bits_swap", (64, 4, 7), {}, 1),
    "bitsswap_128x4x3_r128": ("bits_swap", (128, 4, 3), {"maxnreg": 128}, 1),
    "bitsf16swap_64x4x7_deferl_r128": (
        "bits_f16_swap", (64, 4, 7), {"defer_l": True, "maxnreg": 128}, 1,
    ),
    "f16swap_64x4x5_deferl_x2splits": ("f16_swap", (64, 4, 5), {"defer_l": True}, 2),
}  # fmt: skip
TUNE2_SHAPES = ((64, 4096), (8, 32768))
#: The section starts no new timing past this many seconds (the rest are recorded as skipped),
#: so that the whole call, start-up included, stays under 60 s; the keys run in order of
#: priority, both shapes each.
TUNE2_BUDGET_S = 48.0


def tune2(res: dict[str, Any]) -> None:
    """:data:`TUNE2` at :data:`TUNE2_SHAPES`: CUDA-graph us per key; ``err_<key>``: the relative
    difference of the output from ``"bits"`` at 64x4x3 (exact dequantizations: ~1e-3, a wrong
    map would show as O(1)); ``splits_<key>``: the split count run; ``best`` /
    ``best_speedup``: the fastest fp8 entry against ``bf16_64x4x3``; ``speedup_<key>`` each."""
    from gpu_attention import rel_err

    from kernels.splits import choose_num_splits

    t0 = time.perf_counter()
    shapes = [_DecodeShape(b, n) for b, n in TUNE2_SHAPES]  # both resident: ~3.2 GB
    rows: list[dict[str, Any]] = [{"B": b, "L": n} for b, n in TUNE2_SHAPES]
    refs = [shape.run("bits", (64, 4, 3)).float() for shape in shapes]
    for key, (mode, cfg, options, factor) in TUNE2.items():  # in order of priority
        for shape, row, ref, (batch, length) in zip(shapes, rows, refs, TUNE2_SHAPES):
            if time.perf_counter() - t0 > TUNE2_BUDGET_S:
                row[key] = "skipped (time budget)"
                continue
            splits = choose_num_splits(batch, 8, length) * factor
            row[f"splits_{key}"] = splits
            print(f"tune2 {shape.name} {key}", flush=True)
            try:  # one plain call first: compiles outside the graph capture
                out = shape.run(mode, cfg, splits, **options).float()
                if mode is not None:
                    row[f"err_{key}"] = f"{rel_err(out, ref):.1e}"
            except Exception as e:
                row[f"err_{key}"] = repr(e)[:120]
                continue
            row[key] = shape.time_us(mode, cfg, splits, **options)
    for row in rows:
        bf16 = row.get("bf16_64x4x3")
        fp8 = {
            k: v
            for k, v in row.items()
            if k in TUNE2 and k != "bf16_64x4x3" and isinstance(v, float)
        }
        if fp8 and isinstance(bf16, float):
            for k, v in fp8.items():
                row[f"speedup_{k}"] = round(bf16 / v, 3)
            best = min(fp8, key=lambda k: fp8[k])
            row["best"] = best
            row["best_speedup"] = round(bf16 / fp8[best], 3)
        print(json.dumps(row), flush=True)
    res["tune2_elapsed_s"] = round(time.perf_counter() - t0, 1)
    res["tune2"] = rows


#: (BLOCK_N, warps, stages) x split counts of the ``splits`` section. At b4af701's tune the
#: two-buffer configs lost (64x4x5: 323 vs 221 us at 64 x 4096) while fitting 3 programs per SM:
#: 512 programs then take 1.29 waves, the tail running one program per SM. More splits make
#: more, shorter programs and shrink that tail (at the cost of the merge).
SPLIT_CONFIGS = ((64, 4, 3), (64, 4, 5), (32, 4, 5), (128, 8, 5))
SPLIT_COUNTS = {(64, 4096): (1, 2, 3, 4, 6), (32, 16384): (1, 2, 3, 4, 6),
                (8, 32768): (1, 2, 3, 4, 6), (16, 2048): (2, 4, 6, 8)}  # fmt: skip


def splits_sweep(res: dict[str, Any]) -> None:
    """``"bits"`` fp8 decode time per (config, split count) at :data:`SPLIT_COUNTS`' shapes,
    beside the bf16 kernel's default, for the choice of splits per config."""
    import torch

    rows = []
    for (batch, length), counts in SPLIT_COUNTS.items():
        shape = _DecodeShape(batch, length)
        row: dict[str, Any] = {"B": batch, "L": length, "bf16_us": shape.time_us(None)}
        for cfg in SPLIT_CONFIGS:
            for n in counts:
                key = f"bits_{_cfg_name(cfg)}_s{n}"
                print(f"splits {shape.name} {key}", flush=True)
                row[key] = shape.time_us("bits", cfg, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del shape
        torch.cuda.empty_cache()
    res["splits"] = rows


def engine_runs(res: dict[str, Any], args: argparse.Namespace) -> None:
    """The ShareGPT-like trace at a KV budget of ``args.kv_gb`` GiB, bf16 vs fp8 cache."""
    import torch
    from gpu_engine import throughput

    from fast.loader import random_model
    from fast.model.config import ModelConfig

    model = random_model(ModelConfig.llama3_8b(), seed=0, dtype=torch.bfloat16, device="cuda")
    runs = []
    for kv in ("auto", "fp8"):
        try:
            run = throughput(
                model,
                False,
                args.requests,
                args.max_num_seqs,
                8192,
                "default",
                kv_cache_dtype=kv,
                kv_cache_gb=args.kv_gb,
            )
            run["kv_cache_dtype"] = kv
            run["kv_cache_gb"] = args.kv_gb
        except Exception as exc:
            run = {"kv_cache_dtype": kv, "error": repr(exc), "trace": traceback.format_exc()}
        runs.append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "breakdown"}), flush=True)
        torch.cuda.empty_cache()
    if all("error" not in r for r in runs):
        res["engine_fp8_over_bf16"] = round(runs[1]["out_tok_per_s"] / runs[0]["out_tok_per_s"], 3)
    res["engine"] = runs


def main(argv: list[str] | None = None) -> int:
    """Run the sections; non-zero when any failed (each failure is recorded and the next
    section still runs)."""
    args = parse_args(argv)
    import torch
    from provenance import provenance

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / args.results_name
    res: dict[str, Any] = {**provenance(), "sections": args.sections}
    if torch.cuda.is_available():
        res["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))

    def save() -> None:
        path.write_text(json.dumps(res, indent=2) + "\n")

    steps = {
        "decode": lambda: decode_table(res),
        "tune": lambda: tune(res),
        "tune2": lambda: tune2(res),
        "splits": lambda: splits_sweep(res),
        "capacity": lambda: res.__setitem__("capacity", blocks_per_gib()),
        "engine": lambda: engine_runs(res, args),
    }
    for section in args.sections:
        t0 = time.perf_counter()
        try:
            steps[section]()
        except Exception as exc:  # record and go on to the next section
            res[f"{section}_error"] = traceback.format_exc()
            print(f"{section} failed: {exc!r}", flush=True)
        res[f"{section}_s"] = round(time.perf_counter() - t0, 1)
        save()
    print(f"wrote {path}")
    failed = [s for s in args.sections if f"{s}_error" in res]
    if failed:
        print(f"FAILED sections: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
