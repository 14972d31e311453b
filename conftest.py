"""Shared pytest configuration.

* GPU tests are skipped where there is no CUDA device.
* The conformance suite's seed: derived from the commit (``git rev-parse HEAD``), so every
  commit explores other programs, and printed in the pytest header so that a failure reproduces
  with ``python -m conformance --seed S`` (or ``PAGEDKV_CONFORMANCE_SEED=S pytest ...``). An
  explicit ``$PAGEDKV_CONFORMANCE_SEED`` wins; outside a git checkout the seed is fixed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SEED_ENV = "PAGEDKV_CONFORMANCE_SEED"  # read by conformance.blocks.runner.ci_seed
FALLBACK_SEED = 20240601  # outside git: still a fixed, printed seed


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    return head if len(head) >= 8 else None


def conformance_seed() -> tuple[int, str]:
    """(seed, where it came from)."""
    given = os.environ.get(SEED_ENV, "").strip()
    if given:
        return int(given), f"${SEED_ENV}"
    commit = _commit()
    if commit is None:
        return FALLBACK_SEED, "fixed: not a git checkout"
    return int(commit[:8], 16), f"commit {commit[:12]}"


_CHOSEN: list[tuple[int, str]] = []  # the seed of this session, chosen once


def pytest_configure(config: pytest.Config) -> None:
    if not _CHOSEN:
        _CHOSEN.append(conformance_seed())
    os.environ[SEED_ENV] = str(_CHOSEN[0][0])


def pytest_report_header(config: pytest.Config) -> str:
    seed, source = _CHOSEN[0] if _CHOSEN else conformance_seed()
    return (
        f"conformance seed: {seed} ({source}); reproduce: python -m conformance --seed {seed} "
        f"or {SEED_ENV}={seed} pytest ..."
    )


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
