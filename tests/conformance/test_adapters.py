"""The semantic block-management suite on other libraries' paged-KV caches (issue 14).

Each adapter runs for a short, derandomized budget when its library is installed, so a release
that breaks (or fixes) something shows up in CI. Mutant adapters prove the checker can fail.
"""

from __future__ import annotations

from typing import Any

import pytest

from conformance.adapters.semantic import check_semantic
from conformance.adapters.transformers_cb import (
    TransformersCBAdapter,
    make_factory,
    versions,
)


@pytest.fixture(autouse=True, scope="module")
def _library() -> None:
    # Imported when the tests run, not when they are collected: the library imports triton,
    # and triton's own @jit helpers must be created after tests/kernels/conftest.py has chosen
    # the interpreter (a collection-time import here broke every interpreter test once).
    pytest.importorskip("torch")
    pytest.importorskip("transformers.generation.continuous_batching.cache_allocators")


def test_transformers_cb_passes_the_semantic_suite() -> None:
    report = check_semantic(make_factory(), versions(), max_examples=150)
    print(report.summary())
    assert report.ok, report.summary()
    assert report.programs == 150
    # every enabled property actually ran, and the programs reached sharing and pressure
    assert all(n > 0 for n in report.steps.values()), report.steps
    assert report.observations.hits > 0
    assert report.observations.max_refcount >= 2
    assert report.observations.no_room > 0
    assert "swap_out/swap_in round trip (machine[swap], swap-in capacity)" in report.skipped


class _LeakyFree(TransformersCBAdapter):
    """Forgets to release a freed sequence's first block (a refcount that never reaches 0)."""

    def free(self, seq_id: int) -> None:
        table = self.alloc.block_table[self._rid(seq_id)]
        if len(table) > 1:
            table.pop(0)
        super().free(seq_id)


class _NoCopyFork(TransformersCBAdapter):
    """Forks without copying the partial last block (the child reads unwritten KV)."""

    def fork(self, parent_id: int, child_id: int) -> None:
        src, dst = self._rid(parent_id), self._rid(child_id)
        past = len(self.tokens[parent_id])
        self._reserve_blocks(self.alloc.count_non_shareable_blocks(src, past))
        self.alloc.fork_blocks(src, dst, past)
        self.tokens[child_id] = list(self.tokens[parent_id])


@pytest.mark.parametrize(
    ("mutant", "prop", "shrink"),
    [
        (_LeakyFree, ("free_accounting", "no_leak_after_free"), True),
        (_NoCopyFork, ("readback",), False),
    ],
)
def test_checker_catches_a_broken_adapter(mutant: Any, prop: tuple[str, ...], shrink: bool) -> None:
    """Shrinking is exercised on one mutant only (it dominates the CI time)."""
    report = check_semantic(
        lambda: mutant(),
        versions(),
        max_examples=60 if shrink else 150,
        max_ops=10 if shrink else 40,
        shrink=shrink,
    )
    assert report.status == "failed"
    assert report.defect.startswith(prop), report.defect
    script = report.counterexample.splitlines()
    assert script and len(script) <= (8 if shrink else 60), report.counterexample
