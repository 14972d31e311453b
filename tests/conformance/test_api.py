"""The public API of ``conformance``: cheap import, reports, raise_on_failure, not run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import conformance
from conformance import ConformanceFailure, Report, check_attention, check_block_manager
from spec.block_manager import BlockManager

ROOT = Path(__file__).resolve().parents[2]


def test_import_is_cheap() -> None:
    code = (
        "import sys, conformance; "
        "print(sorted(m for m in ('hypothesis', 'torch', 'fast') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_exports() -> None:
    for name in conformance.__all__:
        assert getattr(conformance, name) is not None
    with pytest.raises(AttributeError):
        conformance.nonexistent  # noqa: B018


class _LeaksOnFree(BlockManager):
    """Forgets to release the last block of a freed sequence (refcount stays up)."""

    def free(self, seq_id: int) -> None:
        table = self._seqs.get(seq_id)
        if table is not None and not table.swapped and len(table.blocks) > 1:
            self._gpu.incref(table.blocks[-1])
        super().free(seq_id)

    def check_integrity(self) -> None:
        """Blind."""


def _leaky(config: Any, **kwargs: Any) -> BlockManager:
    return _LeaksOnFree(config, **kwargs)


def test_a_failing_report_carries_the_counterexample() -> None:
    report = check_block_manager(
        _leaky, steps=300, properties=["no_blocks_leaked_on_abort"], shrink_seconds=3
    )
    assert report.status == "failed" and not report.ok
    failure = report.failures[0]
    assert any(w in failure.message for w in ("refcount", "leaked", "free_block_order"))
    assert "bm.free(" in failure.counterexample
    assert "counterexample:" in report.summary()
    with pytest.raises(ConformanceFailure) as err:
        report.raise_for_failure()
    assert err.value.report is report


def test_raise_on_failure() -> None:
    with pytest.raises(ConformanceFailure, match="FAILED"):
        check_block_manager(
            _leaky, steps=300, properties=[], shrink_seconds=1, raise_on_failure=True
        )


def test_unknown_property_is_an_error() -> None:
    with pytest.raises(ValueError, match="no block-manager property"):
        check_block_manager(_leaky, properties=["nope"])


def test_triton_without_a_gpu_is_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    report = check_attention("triton", device="cpu", examples=2)
    assert report.status == "not run" and not report.ok
    assert "CUDA" in report.reason and "NOT RUN" in report.summary()
    with pytest.raises(ConformanceFailure):
        report.raise_for_failure()


def test_report_is_a_dataclass_with_defaults() -> None:
    report = Report("blocks", "x")
    assert report.ok and report.failures == [] and report.checked == []
