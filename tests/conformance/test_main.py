"""``python -m conformance``: names, exit statuses, not-run suites, and the public API."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conformance.__main__ import EXIT_NOT_RUN, EXIT_USAGE, main
from conformance.registry import _BLOCK_MANAGERS, register_block_manager
from spec.block_manager import BlockManager

ROOT = Path(__file__).resolve().parents[2]


def test_attention_suite_passes_on_torch_fallback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--suite", "attention", "--impl", "torch"]) == 0
    out = capsys.readouterr().out
    assert "paged_decode (30 cases)" in out and "PASSED" in out
    assert "backend checked: torch fallback" in out


def test_attention_suite_says_which_backend_it_checked(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    assert main(["--suite", "attention", "--impl", "fast", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "backend checked: triton on cuda" in out
    else:
        assert "torch fallback on cpu (no CUDA device: the Triton kernels were not checked)" in out


def test_triton_without_gpu_is_not_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the triton backend runs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--suite", "attention", "--impl", "triton"]) == EXIT_NOT_RUN
    out = capsys.readouterr().out
    assert "NOT RUN" in out and "PASSED" not in out


def test_scheduler_suite_passes_on_fast(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--suite", "scheduler", "--impl", "fast", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "scheduler: fast vs spec: PASSED" in out and "freed_while_in_flight" in out


def test_a_suite_without_the_name_is_not_run_and_not_passed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # "torch" names an attention implementation only: the block suite cannot run for it
    assert main(["--suite", "blocks", "--impl", "torch"]) == EXIT_NOT_RUN
    out = capsys.readouterr().out
    assert "blocks: torch vs spec: NOT RUN" in out and "PASSED" not in out


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


def test_unknown_implementation_is_an_error_naming_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--suite", "scheduler", "--impl", "nonexistent"]) == EXIT_USAGE
    err = capsys.readouterr()
    assert "unknown implementation 'nonexistent'" in err.err
    assert "fast" in err.err and "spec" in err.err and "PASSED" not in err.out


def _python(*args: str, cwd: Path = ROOT, path: str = "") -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(ROOT)) if p)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_misspelled_impl_exits_2_naming_the_choices() -> None:
    done = _python("-m", "conformance", "--impl", "fsat")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unknown implementation 'fsat'" in done.stderr
    for name in ("fast", "spec", "torch", "triton", "package.module:factory"):
        assert name in done.stderr
    assert "PASSED" not in done.stdout


def test_without_hypothesis_it_says_how_to_install(tmp_path: Path) -> None:
    # a stand-in "hypothesis" that fails to import, first on the path
    (tmp_path / "hypothesis").mkdir()
    (tmp_path / "hypothesis" / "__init__.py").write_text("raise ImportError('not installed')\n")
    done = _python("-m", "conformance", "--impl", "fast", path=str(tmp_path))
    assert done.returncode == 2
    assert "pip install pagedkv[conformance]" in done.stderr


_SUBTLE = '''
"""A block manager outside the package, wrong in a subtle way: freeing a sequence gives its
blocks back in logical order instead of reverse logical order (the prefix root is reused
first), so the free queue's order differs from the spec's."""
from spec.block_manager import BlockManager


class Subtle(BlockManager):
    def free(self, seq_id):
        table = self._seqs.get(seq_id)
        if table is not None and not table.swapped:
            table.blocks.reverse()
        super().free(seq_id)


def factory(config, **kwargs):
    return Subtle(config, **kwargs)


def fine(config, **kwargs):
    return BlockManager(config, **kwargs)
'''


def test_an_implementation_outside_the_package_fails_with_a_counterexample(
    tmp_path: Path,
) -> None:
    (tmp_path / "tmpmod.py").write_text(textwrap.dedent(_SUBTLE))
    done = _python(
        "-m",
        "conformance",
        "--impl",
        "tmpmod:factory",
        "--steps",
        "1000",
        "--no-properties",
        "--shrink-seconds",
        "5",
        cwd=tmp_path,
        path=str(tmp_path),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "blocks: tmpmod:factory vs spec: FAILED" in out
    assert "free_block_order" in out  # what differed
    assert "counterexample:" in out and "bm.free(" in out  # the script that shows it
    ok = _python(
        "-m",
        "conformance",
        "--impl",
        "tmpmod:fine",
        "--steps",
        "100",
        "--no-properties",
        cwd=tmp_path,
        path=str(tmp_path),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASSED" in ok.stdout


def test_a_bad_module_path_is_a_usage_error(tmp_path: Path) -> None:
    done = _python("-m", "conformance", "--impl", "no_such_module_xyz:factory")
    assert done.returncode == 2 and "cannot import" in done.stderr
