"""pagedkv's suites on torch's experimental PagedAttention and FlexAttention (issue 14).

Each test runs a short, derandomized budget and asserts the outcome recorded in
docs/conformance-others.md: the block suite finds the stale ``physical_to_logical`` defect (and
passes once the adapter clears the row itself); the attention suite passes on eager
FlexAttention over PagedAttention's pages; a NaN in an unwritten slot reaches every output of
eager FlexAttention. A torch release that changes any of these fails here with the message to
update the docs. torch's experimental modules are imported inside the tests (through the
adapters), never at collection: they pull in the compiler stack, and with it triton.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest

from conformance.blocks.runner import shrink_time_limit

UPDATE = "update docs/conformance-others.md and this test"


@pytest.fixture(autouse=True, scope="module")
def _library() -> None:
    pytest.importorskip("torch.nn.attention.experimental._paged_attention")
    pytest.importorskip("torch.nn.attention.flex_attention")


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def test_block_suite_finds_that_erase_leaves_physical_to_logical_stale() -> None:
    from conformance.adapters.semantic import check_semantic
    from conformance.adapters.torch_paged import STALE_MAPPING, make_factory, versions

    with shrink_time_limit(3):
        report = check_semantic(make_factory(), versions(), max_examples=300)
    print(report.summary())
    assert report.status == "failed", (
        f"torch {_torch_version()}: 300 programs found no stale mapping after erase; the "
        f"defect looks fixed: {UPDATE}"
    )
    assert report.defect.startswith("readback:") and STALE_MAPPING in report.defect, report.defect
    script = report.counterexample.splitlines()
    # the shape of every counterexample: a slot is freed, then a shorter sequence takes it
    frees = [i for i, line in enumerate(script) if line.startswith("free(")]
    assert frees and any(line.startswith("allocate(") for line in script[frees[0] :]), script
    assert len(script) <= 20, report.counterexample


def test_block_suite_passes_once_the_stale_row_is_cleared() -> None:
    from conformance.adapters.semantic import check_semantic
    from conformance.adapters.torch_paged import make_factory, versions

    report = check_semantic(make_factory(clear_stale_mapping=True), versions(), max_examples=150)
    print(report.summary())
    assert report.ok, f"torch {_torch_version()}: {report.summary()}\n{UPDATE}"
    assert report.programs == 150
    assert all(n > 0 for n in report.steps.values()), report.steps
    assert report.observations.no_room > 0  # the programs reached a full pool
    assert set(report.steps) == {
        "readback",
        "no_double_hold",
        "free_accounting",
        "no_leak_after_free",
    }
    assert "refcounts" in report.skipped and "prefix_hit_content" in report.skipped


def test_checker_catches_a_page_handed_to_two_sequences() -> None:
    """A mutant that gives a new sequence a page another one holds (and frees its own)."""
    from conformance.adapters.semantic import check_semantic
    from conformance.adapters.torch_paged import TorchPagedAdapter, versions

    class _Alias(TorchPagedAdapter):
        def allocate(self, seq_id: int, token_ids: Any) -> int:
            cached = super().allocate(seq_id, token_ids)
            other = next((s for s in self.lengths if s != seq_id), None)
            if other is not None:
                theirs, mine = int(self.pa.page_table[other, 0]), int(self.pa.page_table[seq_id, 0])
                self.pa.page_table[seq_id, 0] = theirs
                self.pa.physical_to_logical[seq_id, mine] = -1
                self.pa.physical_to_logical[seq_id, theirs] = 0
                self.pa.empty_pages.append(mine)
            return cached

    report = check_semantic(
        lambda: _Alias(clear_stale_mapping=True), versions(), max_examples=60, shrink=False
    )
    assert report.status == "failed"
    assert report.defect.startswith("no_double_hold: blocks"), report.defect


def _stale_mapping_attention() -> list[float]:
    """The reproduction in docs/conformance-others.md: FlexAttention on a reused slot."""
    import torch
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pa = PagedAttention(n_pages=4, page_size=2, max_batch_size=2, device="cpu")
    k_cache, v_cache = torch.zeros(1, 1, 8, 1), torch.zeros(1, 1, 8, 1)
    zero, one = torch.tensor([0]), torch.tensor([1])
    pa.reserve(one, torch.tensor([4]))
    pa.erase(one)
    pa.reserve(zero, torch.tensor([4]))
    k0, v0 = torch.zeros(1, 1, 4, 1), torch.full((1, 1, 4, 1), 100.0)
    pa.assign(zero, torch.arange(4)[None], k0, v0, k_cache, v_cache)
    pa.reserve(one, torch.tensor([2]))
    k1, v1 = torch.zeros(1, 1, 2, 1), torch.ones(1, 1, 2, 1)
    pa.assign(one, torch.arange(2)[None], k1, v1, k_cache, v_cache)
    kv_len = torch.tensor([4, 2])

    def within(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return kv < kv_len[b]

    logical = create_block_mask(within, 2, None, 1, 4, device="cpu", BLOCK_SIZE=(1, 2))
    paged = pa.convert_logical_block_mask(logical, torch.arange(2))  # every release takes this
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(torch.zeros(2, 1, 1, 1), k_cache, v_cache, block_mask=paged)
    return [float(x) for x in out.flatten().tolist()]


def test_stale_mapping_makes_eager_flex_attention_read_another_sequence() -> None:
    got = _stale_mapping_attention()
    assert got[0] == 100.0
    assert got[1] != 1.0, f"torch {_torch_version()}: slot 1 now reads only its own KV: {UPDATE}"
    assert got[1] == 50.5, got  # its own two slots (V=1) and slot 0's two (V=100)


def test_flex_attention_over_paged_attention_passes_the_attention_suite_on_cpu() -> None:
    from conformance.adapters.torch_paged import TorchFlexAttention
    from conformance.attention.suite import run_attention_suite

    impl = TorchFlexAttention()
    result = run_attention_suite(impl, device="cpu", max_examples=4)
    detail = "\n".join(result.failures + result.counterexamples)
    assert result.ok, f"torch {_torch_version()}: {detail}\n{UPDATE}"
    assert result.cases == {"paged_decode": 4, "paged_prefill": 4}
    assert "NaN poison in unwritten KV slots" in result.skipped
    assert "eager" in impl.backend_on("cpu")


def test_one_nan_in_an_unwritten_slot_reaches_every_output_of_eager_flex() -> None:
    """The documented difference: eager FlexAttention scores every slot of the cache."""
    import torch

    from conformance.adapters.torch_paged import TorchFlexAttention
    from conformance.attention.cases import AttentionCase, build_case
    from conformance.attention.impl import check_decode

    case = AttentionCase(
        num_kv_heads=1, group=2, head_dim=64, block_size=8, seq_lens=(8, 5), q_lens=None,
        dtype="float32",
    )  # fmt: skip
    built = build_case(case)
    assert check_decode(TorchFlexAttention(), built) < 1e-5  # zero-filled pages: exact
    poisoned = TorchFlexAttention(fill=math.nan)
    out = torch.full_like(built.q, math.nan)
    poisoned.paged_decode(
        built.q, built.k_cache, built.v_cache, built.block_tables, built.seq_lens,
        scale=case.scale, sliding_window=None, softcap=None, out=out,
    )  # fmt: skip
    assert bool(out.isnan().all()), (
        f"torch {_torch_version()}: eager FlexAttention no longer reads unwritten slots "
        f"({int(out.isnan().sum())} of {out.numel()} outputs NaN): {UPDATE}"
    )


def test_cli_runs_both_torch_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    from conformance.__main__ import EXIT_FAILED, EXIT_PASSED, main

    argv = ["--impl", "torch-flex", "--suite", "attention", "--steps", "1"]
    assert main(argv) == EXIT_PASSED
    out = capsys.readouterr().out
    assert "eager FlexAttention over PagedAttention pages on cpu" in out
    assert "skipped: NaN poison in unwritten KV slots" in out
    argv = ["--impl", "torch-paged", "--suite", "blocks", "--steps", "20"]
    code = main(argv)  # a short budget: the defect needs about 100 programs (see above)
    out = capsys.readouterr().out
    assert code in (EXIT_PASSED, EXIT_FAILED), out
    assert "blocks: torch-paged vs spec" in out and "semantic mode: torch.PagedAttention" in out
    assert "skipped: refcounts (no observable reference count)" in out
    assert code == EXIT_FAILED or "semantic mode: policies are not compared" in out


@pytest.mark.gpu
def test_compiled_flex_attention_over_paged_attention_on_cuda() -> None:
    """The attention suite on torch.compile'd FlexAttention (GPU limits, page sizes 64-256)."""
    import os

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from conformance.adapters.torch_paged import TorchFlexAttention
    from conformance.attention.suite import run_attention_suite

    impl = TorchFlexAttention()
    examples = int(os.environ.get("PAGEDKV_TORCH_FLEX_EXAMPLES", "8"))
    result = run_attention_suite(impl, device="cuda", max_examples=examples)
    print(impl.backend_on("cuda"), result.cases, result.max_error, f"{result.seconds:.0f} s")
    detail = "\n".join(result.failures + result.counterexamples)
    assert result.ok, f"torch {_torch_version()} on {torch.cuda.get_device_name()}: {detail}"
    assert result.cases == {"paged_decode": examples, "paged_prefill": examples}
    assert "compile" in impl.backend_on("cuda")
    assert "page sizes below 64 when compiled" in result.skipped
