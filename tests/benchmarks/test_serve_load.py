"""benchmarks/serve_load.py's client bookkeeping: a client process that dies is an error.

The benchmark lives outside the packages, so it is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    name = "serve_load"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its own imports (provenance)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "serve_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _report(index: int, out: Any) -> None:
    out.put({"index": index, "results": [], "cpu_s": 0.0})


def _die(index: int, out: Any) -> None:
    raise SystemExit(3)


def test_reports_are_gathered_and_a_dead_client_is_named() -> None:
    serve_load = _load()
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
