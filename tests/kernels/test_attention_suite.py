"""The attention suite passes the torch backend and names a planted bug in a registered one."""

from __future__ import annotations

import torch

import kernels
from conformance.attention.impl import KernelsAttention, register_attention
from conformance.attention.suite import run_attention_suite


class _TopLeftCausal(KernelsAttention):
    """A classic bug: the prefill causal mask aligned top-left (cached prefix ignored)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.name = "top-left"

    def paged_prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        return kernels.paged_prefill(
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_seqlens_q,
            q_lens.to(seq_lens.dtype),
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            out=out,
            backend="torch",
        )


def test_suite_passes_torch_and_catches_top_left_mask() -> None:
    good = run_attention_suite("torch", max_examples=10)
    assert good.ok and good.cases == {"paged_decode": 10, "paged_prefill": 10}
    assert all(err <= 1e-2 for err in good.max_error.values())
    register_attention("top-left", _TopLeftCausal)
    bad = run_attention_suite("top-left", max_examples=20)
    assert not bad.ok
    assert bad.failures[0].startswith("paged_prefill: top-left paged_prefill: relative error")
