"""Run the GPU tests (``pytest -m gpu``) and record their outcomes as a result.

On the GPU machine, from the repository root::

    PAGEDKV_GIT_DESCRIBE=<describe> PYTHONPATH=. python3 benchmarks/gpu_tests.py \
        [--budget-s SECONDS] [PYTEST ARGS] [tests/... FILES OR TEST IDS]

writes ``$OUT/gpu_tests.json`` (or ``benchmarks/results/gpu_tests.json`` without ``$OUT``):
passed / failed / skipped, each failure's test id and the head of its report, every test's
outcome and duration, the tests started and never finished, the commit, GPU and versions.

Each test's outcome is appended to a log the moment pytest reports it (this file is also the
pytest plugin that does it, loaded with ``-p gpu_tests``), so a run stopped by ``--budget-s``
still records every test it finished and names the ones it was in the middle of and the ones it
never started (against the collected list); the whole
process group (pytest-xdist's workers included) is killed then, so no orphan keeps the GPU. A
test running longer than ``--hang-s`` has its stacks dumped into the output (pytest's
``faulthandler_timeout``). The exit status is pytest's (124 when the budget ran out).
``-x`` / ``--maxfail`` are refused: a record of a run that stopped early cannot say which tests
passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, provenance  # noqa: E402

#: Environment variable naming the JSON-lines log the plugin appends to.
LOG_ENV = "PAGEDKV_GPU_TEST_LOG"


# ---- the pytest plugin (runs in the pytest controller; with xdist, reports arrive there) ----


def _append(record: dict[str, Any]) -> None:
    path = os.environ.get(LOG_ENV)
    if path and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller records once
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_finish(session: Any) -> None:
    if session.items:  # without xdist the controller collects (with it, the hook below)
        _append({"event": "collected", "ids": [item.nodeid for item in session.items]})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    _append({"event": "collected", "ids": list(ids)})  # every worker collects the same list


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _append({"nodeid": nodeid, "event": "start"})


def pytest_runtest_logreport(report: Any) -> None:
    failed = report.outcome == "failed"
    if report.when != "call" and not failed and report.outcome != "skipped":
        return  # setup / teardown that passed say nothing
    _append(
        {
            "nodeid": report.nodeid,
            "event": report.when,
            "outcome": report.outcome,
            "seconds": round(float(report.duration), 2),
            "report": report.longreprtext[-1500:] if failed else "",
        }
    )


# ---- the runner ----


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every test's outcome from the plugin's records: a failure in any phase fails the test."""
    outcomes: dict[str, str] = {}
    seconds: dict[str, float] = {}
    reports: dict[str, str] = {}
    started: list[str] = []
    collected: dict[str, None] = {}
    for r in records:
        if r["event"] == "collected":
            collected.update(dict.fromkeys(r["ids"]))
            continue
        node = r["nodeid"]
        if r["event"] == "start":
            started.append(node)
            continue
        seconds[node] = seconds.get(node, 0.0) + r["seconds"]
        if r["outcome"] == "failed":
            outcomes[node] = "failed"
            reports.setdefault(node, f"[{r['event']}] {r['report']}")
        elif outcomes.get(node) != "failed":
            outcomes[node] = r["outcome"]
    unfinished = [n for n in started if n not in outcomes]
    never_started = [n for n in collected if n not in outcomes and n not in unfinished]
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    return {
        **counts,
        "collected": len(collected),
        "unfinished": unfinished,
        "never_started": never_started,
        "failures": sorted(n for n, v in outcomes.items() if v == "failed"),
        "failure_reports": reports,
        "outcomes": outcomes,
        "slowest": sorted(seconds.items(), key=lambda kv: -kv[1])[:15],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=None, help="kill the run past this")
    parser.add_argument("--hang-s", type=float, default=150.0, help="dump stacks of a test past")
    args, extra = parser.parse_known_args(argv)
    stops = sorted(a for a in extra if a in ("-x", "--exitfirst") or a.startswith("--maxfail"))
    if stops:  # a record of a run cut short says nothing about the tests it never reached
        sys.exit(f"gpu_tests.py: {stops} would stop the run early; run every gpu test")
    if args.budget_s is not None and not args.budget_s > 0:
        sys.exit(f"gpu_tests.py: --budget-s must be > 0, got {args.budget_s}")
    here = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "tests.jsonl"
        log.touch()
        env = {
            **os.environ,
            LOG_ENV: str(log),
            "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
        }
        named = any(a.startswith("tests/") for a in extra)  # test files or ids: only those
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *([] if named else ["tests"])]
        cmd += ["-p", "gpu_tests"]
        cmd += ["-o", f"faulthandler_timeout={args.hang_s:g}", *extra]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            status = proc.wait(timeout=args.budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and every xdist worker with it
            proc.wait()
            status = 124
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    result = {
        "benchmark": "GPU tests (pytest -m gpu)",
        **provenance(),
        **summarize(records),
        "budget_s": args.budget_s,
        "budget_ran_out": status == 124,
        "pytest_exit_status": status,
        "pytest_extra_args": extra,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks/results"
    (out_dir / "gpu_tests.json").write_text(json.dumps(result, indent=2) + "\n")
    brief = ("collected", "passed", "failed", "skipped", "unfinished", "never_started", "failures")
    print(json.dumps({k: result[k] for k in brief}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
