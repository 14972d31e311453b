"""The attention implementation protocol, its adapters, and the checks against the spec.

An attention implementation offers ``kernels``' five operations. Adapters are tiny: ``"torch"``
and ``"triton"`` call :mod:`kernels` with that backend. A third party registers its own with
:func:`register_attention`. :func:`check_decode` and :func:`check_prefill` run an implementation
on a built case with a NaN-poisoned ``out`` and compare with the float64 spec by relative
Frobenius error, against ``spec.tolerances.TOLERANCES`` for the case's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from conformance.attention.cases import BuiltCase
from spec.paged_decode import paged_decode as spec_paged_decode
from spec.paged_prefill import paged_prefill as spec_paged_prefill
from spec.tolerances import TOLERANCES, relative_error

__all__ = [
    "AttentionImpl",
    "KernelsAttention",
    "register_attention",
    "attention_impl",
    "attention_names",
    "check_decode",
    "check_prefill",
]


@runtime_checkable
class AttentionImpl(Protocol):
    """Paged attention with the signatures of ``kernels`` (ARCHITECTURE.md)."""

    name: str

    def paged_decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        out: torch.Tensor,
    ) -> torch.Tensor: ...

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
    ) -> torch.Tensor: ...


class KernelsAttention:
    """``kernels`` with a fixed backend (``"torch"``, ``"triton"`` or ``"auto"``)."""

    def __init__(self, backend: str) -> None:
        self.name = backend
        self.backend = backend

    def paged_decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """``kernels.paged_decode`` on this backend."""
        import kernels

        return kernels.paged_decode(
            q,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            out=out,
            backend=self.backend,
        )

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
        """``kernels.paged_prefill`` on this backend."""
        import kernels

        return kernels.paged_prefill(
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_seqlens_q,
            seq_lens,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            out=out,
            backend=self.backend,
        )


_ATTENTION: dict[str, Callable[[], AttentionImpl]] = {
    "torch": lambda: KernelsAttention("torch"),
    "triton": lambda: KernelsAttention("triton"),
}


def register_attention(name: str, factory: Callable[[], AttentionImpl]) -> None:
    """Make an attention implementation testable under ``name`` (replaces an earlier one)."""
    _ATTENTION[name] = factory


def attention_impl(name: str) -> AttentionImpl:
    """A fresh implementation registered under ``name``; KeyError names the known ones."""
    if name not in _ATTENTION:
        raise KeyError(f"no attention implementation {name!r}; known: {attention_names()}")
    return _ATTENTION[name]()


def attention_names() -> list[str]:
    """Every registered attention implementation, sorted."""
    return sorted(_ATTENTION)


def _compare(out: torch.Tensor, ref: object, built: BuiltCase, what: str) -> float:
    err = relative_error(out.double().cpu().numpy(), ref)  # type: ignore[arg-type]
    bound = TOLERANCES[built.case.dtype]
    if not err <= bound:
        raise AssertionError(f"{what}: relative error {err:.3g} > {bound:g} on {built.case}")
    return err


def check_decode(impl: AttentionImpl, built: BuiltCase) -> float:
    """Run decode into a NaN-filled ``out``; assert it is within tolerance; return the error."""
    c = built.case
    out = torch.full_like(built.q, float("nan"))
    got = impl.paged_decode(
        built.q,
        built.k_cache,
        built.v_cache,
        built.block_tables,
        built.seq_lens,
        scale=c.scale,
        sliding_window=c.sliding_window,
        softcap=c.softcap,
        out=out,
    )
    if got.data_ptr() != out.data_ptr():
        raise AssertionError(f"{impl.name}: paged_decode did not return out")
    ref = spec_paged_decode(
        built.spec_q,
        built.spec_k,
        built.spec_v,
        built.spec_tables,
        list(c.seq_lens),
        scale=c.scale,
        sliding_window=c.sliding_window,
        softcap=c.softcap,
    )
    return _compare(out, ref, built, f"{impl.name} paged_decode")


def check_prefill(impl: AttentionImpl, built: BuiltCase) -> float:
    """Run prefill into a NaN-filled ``out``; assert it is within tolerance; return the error."""
    c = built.case
    out = torch.full_like(built.q, float("nan"))
    got = impl.paged_prefill(
        built.q,
        built.k_cache,
        built.v_cache,
        built.block_tables,
        built.cu_seqlens_q,
        built.seq_lens,
        scale=c.scale,
        sliding_window=c.sliding_window,
        softcap=c.softcap,
        out=out,
    )
    if got.data_ptr() != out.data_ptr():
        raise AssertionError(f"{impl.name}: paged_prefill did not return out")
    ref = spec_paged_prefill(
        built.spec_q,
        built.spec_k,
        built.spec_v,
        built.spec_tables,
        built.cu_seqlens_q.cpu().numpy(),
        list(c.seq_lens),
        scale=c.scale,
        sliding_window=c.sliding_window,
        softcap=c.softcap,
    )
    return _compare(out, ref, built, f"{impl.name} paged_prefill")
