"""The attention implementation protocol, its adapters, and the checks against the spec.

An attention implementation offers ``kernels``' five operations. Adapters are tiny: ``"torch"``
and ``"triton"`` call :mod:`kernels` with that backend. A third party registers its own with
:func:`register_attention`. :func:`check_decode` and :func:`check_prefill` run an implementation
on a built case with a NaN-poisoned ``out`` and compare with the float64 spec by relative
Frobenius error, against ``spec.tolerances.TOLERANCES`` for the case's dtype.
:func:`check_mixed` runs a prefill case as an engine runs a mixed step: decode on the
single-token sequences, prefill on the others, each into its rows of one ``out``.

On an fp8 case they also pass the scales, and check the output against exact float64 attention
over the *unquantized* K/V: per element within ``spec.kv_quant_bound.attention_error_bound``
plus the dtype's allowance ``TOLERANCES[dtype] * ||ref||_F`` (what the comparison with the spec
over the dequantized cache already grants the kernel's own rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import NDArray

from conformance.attention.cases import BuiltCase
from spec.attention import AttentionParams, attention
from spec.kv_cache import gather_kv
from spec.kv_quant_bound import attention_error_bound
from spec.paged_decode import paged_decode as spec_paged_decode
from spec.paged_prefill import paged_prefill as spec_paged_prefill
from spec.paged_prefill import query_positions
from spec.tolerances import TOLERANCES, relative_error

__all__ = [
    "AttentionImpl",
    "KernelsAttention",
    "register_attention",
    "attention_impl",
    "attention_names",
    "check_decode",
    "check_prefill",
    "check_mixed",
    "fp8_bound_check",
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
        k_scale: float | torch.Tensor = 1.0,
        v_scale: float | torch.Tensor = 1.0,
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
        k_scale: float | torch.Tensor = 1.0,
        v_scale: float | torch.Tensor = 1.0,
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
        k_scale: float | torch.Tensor = 1.0,
        v_scale: float | torch.Tensor = 1.0,
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
            k_scale=k_scale,
            v_scale=v_scale,
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
        k_scale: float | torch.Tensor = 1.0,
        v_scale: float | torch.Tensor = 1.0,
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
            k_scale=k_scale,
            v_scale=v_scale,
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


def _kernel_scales(built: BuiltCase) -> dict[str, torch.Tensor]:
    """The fp8 case's scales as [Hkv] float32 tensors on its device (no keywords otherwise)."""
    if built.k_scale is None or built.v_scale is None:
        return {}
    dev = built.q.device
    return {
        "k_scale": torch.tensor(built.k_scale, dtype=torch.float32, device=dev),
        "v_scale": torch.tensor(built.v_scale, dtype=torch.float32, device=dev),
    }


def _spec_scales(built: BuiltCase) -> dict[str, NDArray[np.float64]]:
    if built.k_scale is None or built.v_scale is None:
        return {}
    return {"k_scale": built.k_scale, "v_scale": built.v_scale}


def fp8_bound_check(
    out: torch.Tensor, ref: NDArray[np.float64], built: BuiltCase, cu_seqlens_q: list[int]
) -> float:
    """Assert ``|out - exact| <= bound + TOLERANCES[dtype] * ||ref||_F`` per element, where
    ``exact`` is float64 attention over the unquantized K/V; return the largest
    ``|out - exact| / (bound + allowance)``. ``cu_seqlens_q`` [B+1] (decode: 0, 1, ..., B)."""
    c = built.case
    assert built.raw_k is not None and built.raw_v is not None
    assert built.k_scale is not None and built.v_scale is not None
    params = AttentionParams(c.scale, c.sliding_window, c.softcap)
    got = out.double().cpu().numpy()
    allowance = TOLERANCES[c.dtype] * float(np.linalg.norm(ref.ravel()))
    worst = 0.0
    for b, seq_len in enumerate(c.seq_lens):
        lo, hi = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        if hi == lo:
            continue
        k, v = gather_kv(built.raw_k, built.raw_v, built.spec_tables[b], seq_len)  # [L, Hkv, D]
        q = built.spec_q[lo:hi]
        pos = query_positions(seq_len, hi - lo)
        exact = attention(q, k, v, params, q_positions=pos)[0]
        bound = attention_error_bound(
            q,
            k,
            v,
            params,
            k_scale=built.k_scale,
            v_scale=built.v_scale,
            kv_cache_dtype=c.kv_cache_dtype,
            q_positions=pos,
        )
        err = np.abs(got[lo:hi] - exact)
        limit = bound + allowance
        if not np.all(err <= limit):
            i = np.unravel_index(int(np.argmax(err - limit)), err.shape)
            raise AssertionError(
                f"fp8 bound: |out - exact| = {err[i]:.3g} > bound {bound[i]:.3g} + "
                f"allowance {allowance:.3g} at sequence {b}, row {i} on {c}"
            )
        if limit.size:
            worst = max(worst, float((err / np.where(limit > 0, limit, 1.0)).max()))
    return worst


def _spec_prefill(built: BuiltCase) -> NDArray[np.float64]:
    """The float64 spec's prefill of a built case (over its dequantized cache when fp8)."""
    c = built.case
    ref: NDArray[np.float64] = spec_paged_prefill(
        built.spec_q,
        built.spec_k,
        built.spec_v,
        built.spec_tables,
        built.cu_seqlens_q.cpu().numpy(),
        list(c.seq_lens),
        scale=c.scale,
        sliding_window=c.sliding_window,
        softcap=c.softcap,
        **_spec_scales(built),
    )
    return ref


def check_decode(impl: AttentionImpl, built: BuiltCase) -> float:
    """Run decode into a NaN-filled ``out``; assert it is within tolerance; return the error.

    An fp8 case is also held to the error bound against the unquantized K/V."""
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
        **_kernel_scales(built),
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
        **_spec_scales(built),
    )
    err = _compare(out, ref, built, f"{impl.name} paged_decode")
    if c.fp8:
        fp8_bound_check(out, ref, built, list(range(len(c.seq_lens) + 1)))
    return err


def check_prefill(impl: AttentionImpl, built: BuiltCase) -> float:
    """Run prefill into a NaN-filled ``out``; assert it is within tolerance; return the error.

    An fp8 case is also held to the error bound against the unquantized K/V."""
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
        **_kernel_scales(built),
    )
    if got.data_ptr() != out.data_ptr():
        raise AssertionError(f"{impl.name}: paged_prefill did not return out")
    ref = _spec_prefill(built)
    err = _compare(out, ref, built, f"{impl.name} paged_prefill")
    if c.fp8:
        fp8_bound_check(out, ref, built, built.cu_seqlens_q.cpu().tolist())
    return err


def check_mixed(impl: AttentionImpl, built: BuiltCase) -> float:
    """A prefill case as the engine runs a mixed step: its sequences with one new token first,
    ``paged_decode`` on their rows (the leading slices of the batch's tables and lengths),
    ``paged_prefill`` on the rest (tables, lengths and prefix sums in tensors of their own),
    each writing its slice of one NaN-filled ``out``; held to the spec's prefill over the whole
    batch. Relies on decode being the last row of a prefill chunk (the spec's
    ``prop_decode_is_last_prefill_row``). Returns the relative error."""
    c = built.case
    if c.q_lens is None:
        raise ValueError("check_mixed needs a prefill case (q_lens)")
    cu = built.cu_seqlens_q.cpu().tolist()
    order = [b for b, n in enumerate(c.q_lens) if n == 1]
    n = len(order)
    order += [b for b, q in enumerate(c.q_lens) if q != 1]
    dev = built.q.device
    rows = [r for b in order for r in range(cu[b], cu[b + 1])]  # batch row of each step row
    index = torch.tensor(rows, dtype=torch.int64, device=dev)  # [T]
    pick = torch.tensor(order, dtype=torch.int64, device=dev)  # [B]
    q = built.q.index_select(0, index)  # [T, Hq, D], decode rows first
    tables = built.block_tables.index_select(0, pick)  # [B, W]
    lens = built.seq_lens.index_select(0, pick)  # [B]
    q_lens = [c.q_lens[b] for b in order[n:]]
    sub_cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device=dev)
    out = torch.full_like(q, float("nan"))  # [T, Hq, D]
    scales = _kernel_scales(built)
    window, cap = c.sliding_window, c.softcap
    if n:
        impl.paged_decode(
            q[:n],
            built.k_cache,
            built.v_cache,
            tables[:n],
            lens[:n],
            scale=c.scale,
            sliding_window=window,
            softcap=cap,
            out=out[:n],
            **scales,
        )
    if n < len(order):
        impl.paged_prefill(
            q[n:],
            built.k_cache,
            built.v_cache,
            tables[n:].contiguous(),
            sub_cu,
            lens[n:].contiguous(),
            scale=c.scale,
            sliding_window=window,
            softcap=cap,
            out=out[n:],
            **scales,
        )
    back = torch.empty_like(out)
    back[index] = out  # batch order again
    ref = _spec_prefill(built)
    return _compare(back, ref, built, f"{impl.name} mixed decode + prefill")
