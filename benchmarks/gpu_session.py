"""The GPU runs a session owes, in order of value, fitted into device calls of limited length.

A GPU session has about 30 minutes of device time, in calls of at most 10 minutes each. This
script runs the named steps one after the other, each under its own time limit, stops before the
call's limit (``--limit-s``), and writes every step's results JSON to ``--out`` (``$OUT`` on the
GPU machine) with one ``gpu_session.json`` summary and one combined log, so a call brings back
at most 8 files (the device tool's limit). On the GPU machine, from the repository root::

    PYTHONPATH=. python benchmarks/gpu_session.py --steps tests,fp8 --limit-s 570
    PYTHONPATH=. python benchmarks/gpu_session.py --steps attention,fp8tune --limit-s 570
    PYTHONPATH=. python benchmarks/gpu_session.py --steps serve,fp8engine --limit-s 570
    PYTHONPATH=. python benchmarks/gpu_session.py --steps floor,engine --limit-s 570

The ``serve`` step needs the server's packages on the GPU machine (starlette, uvicorn,
prometheus_client: carried as wheels and installed first, /work/.library/device/README.md).
``--dry-run`` prints the commands without running them (on any machine). The steps:
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _serve_load(results: str, *arrangement: str) -> tuple[list[str], str]:
    """serve_load.py's H200 run (384 requests of the trace at infinite rate, 40 and 48 req/s) with
    the engine in its own process or in a thread of the server (and overlapped scheduling or
    not, in the offline run and the server alike)."""
    args = ["--model", "random-llama3-8b", "--device", "cuda", "--requests", "384"]
    args += ["--rates", "inf,40,48", "--max-num-seqs", "256", *arrangement]
    return ["benchmarks/serve_load.py", *args, "--out", "{out}/" + results], results


#: name -> (seconds it may take, command after ``python``, the results file it writes in OUT)
STEPS: dict[str, tuple[int, list[str], str]] = {
    "tests": (
        420,
        [
            "benchmarks/gpu_tests.py",
            "--budget-s",
            "{budget}",
            "--ignore=tests/fast/api",
            "-n",
            "6",
            "--dist",
            "worksteal",  # an idle worker takes queued tests from one busy with a slow test
            "-p",
            "no:cacheprovider",
        ],
        "gpu_tests.json",
    ),
    "fp8": (
        150,
        ["benchmarks/gpu_fp8.py", "--out", "{out}", "--sections", "decode,capacity"],
        "fp8_h200.json",
    ),
    # In a process of its own: at b4af701 the tune section's first kernel raised an illegal
    # memory access after the decode section (twice), while every config ran alone completed.
    "fp8tune": (
        150,
        [
            "benchmarks/gpu_fp8.py",
            "--out",
            "{out}",
            "--sections",
            "tune",
            "--results-name",
            "fp8_tune_h200.json",
        ],
        "fp8_tune_h200.json",
    ),
    "fp8splits": (
        150,
        [
            "benchmarks/gpu_fp8.py",
            "--out",
            "{out}",
            "--sections",
            "splits",
            "--results-name",
            "fp8_splits_h200.json",
        ],
        "fp8_splits_h200.json",
    ),
    # The end-to-end trace with an fp8 cache at a KV budget where bf16 preempts.
    "fp8engine": (
        240,
        [
            "benchmarks/gpu_fp8.py",
            "--out",
            "{out}",
            "--sections",
            "engine",
            "--results-name",
            "fp8_engine_h200.json",
        ],
        "fp8_engine_h200.json",
    ),
    "floor": (
        200,
        [
            "benchmarks/gpu_step_floor.py",
            "--out",
            "{out}/step_floor_h200.json",
            "--fused-ops",
            "both",
        ],
        "step_floor_h200.json",
    ),
    # the overlapped step by batch size, with a cProfile of its host side
    "floorasync": (
        200,
        [
            "benchmarks/gpu_step_floor.py",
            "--out",
            "{out}/step_floor_async_h200.json",
            "--fused-ops",
            "on",
            "--async-scheduling",
            "--profile",
            "{out}/step_profile_async_h200.txt",
        ],
        "step_floor_async_h200.json",
    ),
    # where the host time of an eager decode call at B = 1 goes
    "decodehost": (
        90,
        ["benchmarks/gpu_decode_host.py", "--out", "{out}/decode_host_h200.json"],
        "decode_host_h200.json",
    ),
    # Nsight Compute's stall reasons of the decode kernel, bf16 and the fp8 dequantizations
    "fp8stall": (
        150,
        ["benchmarks/ncu_fp8_decode.py", "--out", "{out}"],
        "ncu_fp8_decode.json",
    ),
    "engine": (
        330,
        [
            "benchmarks/gpu_engine.py",
            "--out",
            "{out}/engine_gpu.json",
            "--configs",
            "default,unfused",
            "--skip-eager",
            "--peer-requests",
            "32",
        ],
        "engine_gpu.json",
    ),
    # 1,000 requests with up to 256 running, with and without overlapped scheduling (no peers)
    "engine1000": (
        240,
        [
            "benchmarks/gpu_engine.py",
            "--out",
            "{out}/engine_gpu_1000.json",
            "--requests",
            "1000",
            "--max-num-seqs",
            "256",
            "--configs",
            "async,default",
            "--skip-eager",
            "--skip-peers",
        ],
        "engine_gpu_1000.json",
    ),
    # the model alone on mixed steps: eager, issue time, one graph, floor, split attention
    "mixed": (
        200,
        ["benchmarks/gpu_mixed_step.py", "--out", "{out}/mixed_step_h200.json"],
        "mixed_step_h200.json",
    ),
    "serve": (300, *_serve_load("serve_load_h200_engine_process.json", "--engine-process")),
    "serveasync": (
        300,
        *_serve_load(
            "serve_load_h200_engine_process_async.json", "--engine-process", "--async-scheduling"
        ),
    ),
    # The same load on the one-process arrangement (the engine in a thread of the server).
    "servethread": (300, *_serve_load("serve_load_h200.json", "--no-engine-process")),
    "attention": (
        300,
        [
            "benchmarks/gpu_attention.py",
            "--out",
            "{out}/attention_h200.json",
            "--sections",
            "env,decode,prefill,flex",
        ],
        "attention_h200.json",
    ),
}
__doc__ = (__doc__ or "") + "".join(
    f"\n* ``{name}`` (up to {limit} s): ``python {' '.join(cmd)}``"
    for name, (limit, cmd, _) in STEPS.items()
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", required=True, help=f"comma-separated, of {list(STEPS)}")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="results directory")
    parser.add_argument(
        "--limit-s", type=float, default=570.0, help="stop starting steps past this (seconds)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps: unknown {unknown}; known {list(STEPS)}")
    if not args.limit_s > 0:
        parser.error(f"--limit-s must be > 0, got {args.limit_s}")
    args.steps = steps
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    start = time.monotonic()
    summary: dict[str, Any] = {"steps": {}, "limit_s": args.limit_s}
    failed = 0
    log_path = out / "gpu_session.log"
    for name in args.steps:
        limit, cmd, result = STEPS[name]
        left = args.limit_s - (time.monotonic() - start)
        budget = f"{max(min(limit, left) - 20, 10):.0f}"  # a step that stops itself, records
        command = [sys.executable, *(c.format(out=out, budget=budget) for c in cmd)]
        if args.dry_run:
            print(f"{name} (up to {limit} s): {' '.join(command)}")
            continue
        if left < min(limit, 60):  # not enough of the call left to be worth starting
            summary["steps"][name] = {"status": "skipped", "reason": f"{left:.0f} s left"}
            continue
        t0 = time.monotonic()
        with log_path.open("a") as log:
            log.write(f"\n===== {name}: {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, "OUT": str(out)},  # gpu_tests.py writes to $OUT
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a timeout kills all of it
            )
            try:
                code = proc.wait(timeout=min(limit, left))
                status = "ok" if code == 0 else f"exit {code}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {min(limit, left):.0f} s"
            finally:  # no child of a step outlives it to hold GPU memory in the next one
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        failed += status != "ok"
        summary["steps"][name] = {
            "status": status,
            "seconds": round(time.monotonic() - t0, 1),
            "results": result if (out / result).exists() else None,
        }
        print(name, summary["steps"][name], flush=True)
        (out / "gpu_session.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
