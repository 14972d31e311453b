"""Stall reasons of the decode kernel, bf16 against the fp8 dequantizations, from Nsight Compute.

docs/fp8.md: at long context the fp8 kernels read their bytes at 3.2-3.5 TB/s where bf16 reads
4.4; sweeps of tiles, buffers and register caps did not close it. This asks the hardware
counters why. Run on the GPU machine (Firecracker runtime: ``ncu`` reads the counters; leave the
clocks alone), from the repository root::

    PYTHONPATH=. python benchmarks/ncu_fp8_decode.py --out $OUT

It runs itself under ``ncu`` (``--child`` is the profiled program: one warm-up launch per
variant, then one profiled launch each, 64 x 4096, Hq 32, Hkv 8, D 128, page 16, one split),
writes ncu's raw metrics as CSV (``ncu_fp8_decode.csv``) and a JSON summary
(``ncu_fp8_decode.json``): per variant the duration, DRAM throughput, issue activity, warps
per scheduler, registers, and the average stall cycles per issued instruction by reason.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

#: (name, fp8 dequantization or None for the bf16 cache, (BLOCK_N, warps, stages))
VARIANTS = (
    ("bf16", None, (64, 4, 3)),
    ("fp8 bits_swap", "bits_swap", (64, 4, 5)),
    ("fp8 f16_swap", "f16_swap", (64, 4, 5)),
    ("fp8 bits", "bits", (64, 4, 3)),
)
SECTIONS = (
    "SpeedOfLight",
    "MemoryWorkloadAnalysis",
    "WarpStateStats",
    "SchedulerStats",
    "Occupancy",
    "LaunchStats",
    "InstructionStats",
)
#: ncu's summary metrics kept in the JSON (besides every stall reason)
KEEP = {
    "gpu__time_duration.sum": "duration",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct_of_peak",
    "dram__bytes_read.sum": "dram_bytes_read",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "smsp__warps_active.avg.per_cycle_active": "warps_per_scheduler",
    "smsp__warps_eligible.avg.per_cycle_active": "eligible_warps_per_scheduler",
    "launch__registers_per_thread": "registers",
    "launch__occupancy_limit_registers": "blocks_per_sm_by_registers",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "smsp__inst_executed.sum": "warp_instructions",
}
STALL = "smsp__average_warp_latency_issue_stalled_"
STALL_ALT = "smsp__average_warps_issue_stalled_"


def child() -> None:
    """The profiled program: a warm-up launch of each variant, then one launch each."""
    import torch
    from gpu_attention import DT, HKV, HQ, D, paged_pool
    from gpu_fp8 import _fp8_pool

    from kernels.checks import check_decode
    from kernels.triton_decode import triton_paged_decode

    torch.manual_seed(0)
    batch, length = 64, 4096
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    k = torch.randn(batch, HKV, length, D, device="cuda", dtype=DT)
    kp, vp, bt = paged_pool(k, torch.randn_like(k), 16)
    del k
    k8, v8, ks, vs = _fp8_pool(kp, vp)
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")

    def run(mode: str | None, config: tuple[int, int, int]) -> None:
        kc, vc = (kp, vp) if mode is None else (k8, v8)
        triton_paged_decode(
            q, kc, vc, bt, lens, check_decode(q, kc, vc, bt, lens), scale=D**-0.5,
            sliding_window=None, softcap=None, num_splits=1, out=None, config=config,
            kv_scales=None if mode is None else (ks, vs), fp8_dequant=mode,
        )  # fmt: skip

    for _, mode, config in VARIANTS:  # warm-up: compile, first touch
        run(mode, config)
    torch.cuda.synchronize()
    for _, mode, config in VARIANTS:
        run(mode, config)
    torch.cuda.synchronize()


def summarize(raw_csv: str) -> list[dict[str, Any]]:
    """ncu's ``--page raw --csv`` output -> one dict per profiled launch."""
    lines = [line for line in raw_csv.splitlines() if line.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    header, data = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]  # row 1: units
    out = []
    for values, (name, _, _) in zip(data, VARIANTS, strict=False):
        rec = dict(zip(header, values, strict=True))
        row: dict[str, Any] = {"variant": name}
        for metric, key in KEEP.items():
            if metric in rec:
                row[key] = rec[metric]
        stalls = {}
        for metric, value in rec.items():
            for prefix in (STALL, STALL_ALT):
                if metric.startswith(prefix) and metric.endswith(".ratio"):
                    reason = metric[len(prefix) :].removesuffix(".ratio")
                    try:
                        stalls[reason] = round(float(value.replace(",", "")), 3)
                    except ValueError:
                        pass
        row["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1]))
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--child", action="store_true", help="the profiled program itself")
    parser.add_argument("--ncu", default="ncu")
    args = parser.parse_args()
    if args.child:
        child()
        return
    from provenance import provenance

    n = len(VARIANTS)
    cmd = [args.ncu, "--clock-control", "none", "--target-processes", "all"]
    cmd += ["--kernel-name", "regex:_decode_kernel", "--launch-skip", str(n)]
    cmd += ["--launch-count", str(n), "--csv", "--page", "raw"]
    for section in SECTIONS:
        cmd += ["--section", section]
    cmd += [sys.executable, str(Path(__file__).resolve()), "--child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, check=False)
    out = Path(args.out)
    (out / "ncu_fp8_decode.csv").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"ncu exited {proc.returncode}: {proc.stderr[-3000:]}")
    rows = summarize(proc.stdout)
    result = {
        **provenance(),
        "benchmark": "ncu stall reasons, decode kernel 64x4096 (benchmarks/ncu_fp8_decode.py)",
        "command": " ".join(cmd),
        "rows": rows,
    }
    (out / "ncu_fp8_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        top = list(row["stalls"].items())[:6]
        print(row["variant"], row.get("duration"), row.get("dram_pct_of_peak"), top)


if __name__ == "__main__":
    main()
