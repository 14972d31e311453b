"""benchmarks/serve_load.py's client bookkeeping: a client process that dies is an error.

The benchmark lives outside the packages: benchmark_module.load_benchmark loads it from its file.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from benchmark_module import load_benchmark


def _report(index: int, out: Any) -> None:
    out.put({"index": index, "results": [], "cpu_s": 0.0})


def _die(index: int, out: Any) -> None:
    raise SystemExit(3)


def test_reports_are_gathered_and_a_dead_client_is_named() -> None:
    serve_load = load_benchmark("serve_load")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_report, args=(i, out)) for i in range(2)]
    for p in procs:
        p.start()
    parts = serve_load.gather_reports(out, procs, poll_s=0.2)
    assert sorted(part["index"] for part in parts) == [0, 1]
    for p in procs:
        p.join()
    procs = [
        ctx.Process(target=_report, args=(0, out)),
        ctx.Process(target=_die, args=(1, out)),
    ]
    for p in procs:
        p.start()
    with pytest.raises(serve_load.ClientDiedError, match="client process 1 exited with status 3"):
        serve_load.gather_reports(out, procs, poll_s=0.2)
    for p in procs:
        p.join()
