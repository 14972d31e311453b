"""The semantic block suite on vLLM's v1 KVCacheManager (issue 14), when vLLM is importable.

vLLM is not in the test extra (it pins its own torch and transformers), so in CI the adapter
tests skip and only the command line's "not run" answer is checked. vLLM is imported inside the
tests, never at collection.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import pytest


def _vllm() -> None:
    pytest.importorskip("vllm.v1.core.kv_cache_manager")


def test_vllm_kv_cache_manager_passes_the_semantic_suite() -> None:
    _vllm()
    from conformance.adapters.semantic import check_semantic
    from conformance.adapters.vllm_kv import make_factory, versions

    report = check_semantic(make_factory(), versions(), max_examples=150)
    print(report.summary())
    assert report.ok, report.summary()
    assert report.programs == 150
    assert all(n > 0 for n in report.steps.values()), report.steps
    assert report.observations.hits > 0 and report.observations.max_refcount >= 2
    assert "fork sharing (machine[fork], beam)" in report.skipped


def test_checker_catches_blocks_cached_before_their_kv_is_written() -> None:
    """A mutant adapter that lets vLLM cache a prompt's blocks before it is computed."""
    _vllm()
    from conformance.adapters.semantic import NoRoom, check_semantic
    from conformance.adapters.vllm_kv import VLLMKVCacheAdapter, versions

    class _CacheAtAllocate(VLLMKVCacheAdapter):
        def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
            request = self._request_cls(
                f"r{seq_id}", list(token_ids), self._params(max_tokens=1 << 20), None,
                block_hasher=self._hasher,
            )  # fmt: skip
            hit, cached, _ = self.manager.get_computed_blocks(request)
            if self.manager.allocate_slots(request, len(token_ids) - cached, cached, hit) is None:
                raise NoRoom
            request.num_computed_tokens = cached
            self.requests[seq_id] = request
            return int(cached)

    report = check_semantic(lambda: _CacheAtAllocate(), versions(), max_examples=150, shrink=False)
    assert report.status == "failed"
    assert report.defect.startswith("prefix_hit_content"), report.defect


def test_cli_says_not_run_without_vllm(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed: the adapter runs")
    from conformance.__main__ import EXIT_NOT_RUN, main

    assert main(["--impl", "vllm-kv", "--suite", "blocks"]) == EXIT_NOT_RUN
    out = capsys.readouterr().out
    assert "blocks: vllm-kv vs spec: NOT RUN (cannot import the library" in out
