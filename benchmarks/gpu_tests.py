"""Run the GPU tests (``pytest -m gpu``) and record their summary as a result.

On the GPU machine, from the repository root::

    PAGEDKV_GIT_DESCRIBE=<describe> PYTHONPATH=. python3 benchmarks/gpu_tests.py [PYTEST ARGS]

writes ``$OUT/gpu_tests.json`` (or ``benchmarks/results/gpu_tests.json`` without ``$OUT``):
passed / failed / skipped / errors, each failure's test id, every test's outcome, the commit, GPU
and versions. The exit status is pytest's. ``-x`` / ``--maxfail`` are refused: a record of a run
that stopped early cannot say which tests passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, provenance  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "gpu.xml"
        extra = sys.argv[1:]  # passed on to pytest (e.g. --ignore=DIR for what cannot import)
        stops = sorted(a for a in extra if a in ("-x", "--exitfirst") or a.startswith("--maxfail"))
        if stops:  # a record of a run cut short says nothing about the tests it never reached
            sys.exit(f"gpu_tests.py: {stops} would stop the run early; run every gpu test")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", f"--junitxml={xml}"]
        cmd += extra
        proc = subprocess.run(cmd, cwd=ROOT, check=False)
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        failed = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
        outcomes = {
            f"{case.get('classname')}::{case.get('name')}": (
                "failed"
                if case.find("failure") is not None or case.find("error") is not None
                else "skipped"
                if case.find("skipped") is not None
                else "passed"
            )
            for case in suite.iter("testcase")
        }
        total = int(suite.get("tests", 0))
        skipped = int(suite.get("skipped", 0))
        result = {
            "benchmark": "GPU tests (pytest -m gpu)",
            **provenance(),
            "passed": total - skipped - int(suite.get("failures", 0)) - int(suite.get("errors", 0)),
            "failed": int(suite.get("failures", 0)),
            "errors": int(suite.get("errors", 0)),
            "skipped": skipped,
            "seconds": float(suite.get("time", 0.0)),
            "failures": failed,
            "outcomes": outcomes,
            "pytest_exit_status": proc.returncode,
            "pytest_extra_args": extra,
        }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks/results"
    (out_dir / "gpu_tests.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("failures", "outcomes")}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
