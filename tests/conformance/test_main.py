"""``python -m conformance``: each suite passes on the real implementations, and a mutant fails
it."""

from __future__ import annotations

import pytest

from conformance.__main__ import main
from conformance.registry import _BLOCK_MANAGERS, register_block_manager
from spec.block_manager import BlockManager


def test_attention_suite_passes_on_torch_fallback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--suite", "attention", "--impl", "torch"]) == 0
    out = capsys.readouterr().out
    assert "paged_decode': 30" in out and "PASSED" in out


def test_scheduler_suite_passes_on_fast(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--suite", "scheduler", "--impl", "fast"]) == 0
    assert "same decisions" in capsys.readouterr().out


class _BrokenIntegrity(BlockManager):
    """An implementation whose own integrity check always fails."""

    def check_integrity(self) -> None:
        raise AssertionError("planted: integrity broken")


def test_block_suite_fails_on_a_broken_implementation(capsys: pytest.CaptureFixture[str]) -> None:
    register_block_manager("broken", lambda config, **kw: _BrokenIntegrity(config, **kw))
    try:
        code = main(["--suite", "blocks", "--impl", "broken", "--steps", "50", "--no-properties"])
    finally:
        del _BLOCK_MANAGERS["broken"]
    assert code == 1
    assert "planted: integrity broken" in capsys.readouterr().out


def test_unknown_implementation_is_reported_not_passed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--suite", "scheduler", "--impl", "nonexistent"]) == 0
    assert "skipped" in capsys.readouterr().out
