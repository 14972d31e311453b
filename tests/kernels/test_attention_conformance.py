"""Paged decode and prefill against the float64 spec: hypothesis-drawn cases plus a fixed grid
that covers every GQA ratio, page size and head dim at least once (conformance/attention_*)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from conformance.attention.cases import (
    CPU_LIMITS,
    GPU_LIMITS,
    GPU_PREFILL_LIMITS,
    AttentionCase,
    attention_cases,
    build_case,
)
from conformance.attention.impl import attention_impl, check_decode, check_mixed, check_prefill

CI = settings(
    deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)


@settings(CI, max_examples=60)
@given(case=attention_cases(CPU_LIMITS))
def test_torch_decode_matches_spec(case: AttentionCase) -> None:
    check_decode(attention_impl("torch"), build_case(case))


@settings(CI, max_examples=60)
@given(case=attention_cases(CPU_LIMITS, prefill=True))
def test_torch_prefill_matches_spec(case: AttentionCase) -> None:
    check_prefill(attention_impl("torch"), build_case(case))


def _with_single_tokens(case: AttentionCase) -> AttentionCase:
    """Every other sequence with one new token: a mixed step's decodes among its chunks."""
    assert case.q_lens is not None
    q_lens = tuple(
        1 if i % 2 == 0 and n else q for i, (n, q) in enumerate(zip(case.seq_lens, case.q_lens))
    )
    return dataclasses.replace(case, q_lens=q_lens)


@settings(CI, max_examples=40)
@given(case=attention_cases(CPU_LIMITS, prefill=True))
def test_torch_mixed_decode_and_prefill_matches_spec(case: AttentionCase) -> None:
    check_mixed(attention_impl("torch"), build_case(_with_single_tokens(case)))


_SMALL = CPU_LIMITS.__class__(
    max_batch=2,
    max_len=40,
    head_dims=(64,),
    block_sizes=(8, 16, 32),
    kv_heads=(1, 2),
    dtypes=CPU_LIMITS.dtypes,
)


@settings(CI, max_examples=20)
@given(case=attention_cases(_SMALL))
def test_triton_decode_matches_spec(case: AttentionCase) -> None:
    check_decode(attention_impl("triton"), build_case(case))


@settings(CI, max_examples=20)
@given(case=attention_cases(_SMALL, prefill=True))
def test_triton_prefill_matches_spec(case: AttentionCase) -> None:
    check_prefill(attention_impl("triton"), build_case(case))


# every GQA ratio, page size and head dim at least once, with window and soft-cap in some
_GRID = [
    # (group, block_size, head_dim, dtype, window, softcap)
    (1, 8, 64, "float32", None, None),
    (4, 16, 128, "bfloat16", 9, None),
    (5, 32, 256, "float16", None, 5.0),
    (8, 64, 64, "float32", 13, 30.0),
    (4, 128, 128, "float16", None, None),
    (5, 256, 64, "bfloat16", 20, 1.0),
]


@pytest.mark.parametrize("group,block_size,head_dim,dtype,window,softcap", _GRID)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grid_matches_spec(
    backend: str,
    group: int,
    block_size: int,
    head_dim: int,
    dtype: str,
    window: int | None,
    softcap: float | None,
) -> None:
    common = dict(
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        sliding_window=window,
        softcap=softcap,
        seed=group * block_size,
    )
    impl = attention_impl(backend)
    check_decode(
        impl, build_case(AttentionCase(seq_lens=(block_size + 3, 1, 0, 37), q_lens=None, **common))
    )  # type: ignore[arg-type]
    check_prefill(
        impl, build_case(AttentionCase(seq_lens=(block_size + 5, 33), q_lens=(7, 33), **common))
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_triton_decode_any_split_count(num_splits: int) -> None:
    import kernels
    from spec.tolerances import relative_error

    built = build_case(
        AttentionCase(
            num_kv_heads=2,
            group=4,
            head_dim=64,
            block_size=8,
            seq_lens=(50, 3, 17),
            q_lens=None,
            dtype="float32",
        )
    )
    args = (built.q, built.k_cache, built.v_cache, built.block_tables, built.seq_lens)
    ref = kernels.paged_decode(*args, scale=0.1, backend="torch")
    out = torch.full_like(built.q, float("nan"))
    kernels.paged_decode(*args, scale=0.1, num_splits=num_splits, out=out, backend="triton")
    assert relative_error(out.double().numpy(), ref.double().numpy()) < 1e-5


GPU_CI = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
    max_examples=int(os.environ.get("PAGEDKV_GPU_EXAMPLES", "60")),
)


@pytest.mark.gpu
@GPU_CI
@given(case=attention_cases(GPU_LIMITS))
def test_gpu_triton_decode_matches_spec(case: AttentionCase) -> None:
    check_decode(attention_impl("triton"), build_case(case, "cuda"))


@pytest.mark.gpu
@GPU_CI
@given(case=attention_cases(GPU_PREFILL_LIMITS, prefill=True))
def test_gpu_triton_prefill_matches_spec(case: AttentionCase) -> None:
    check_prefill(attention_impl("triton"), build_case(case, "cuda"))


@pytest.mark.gpu
@GPU_CI
@given(case=attention_cases(GPU_PREFILL_LIMITS, prefill=True))
def test_gpu_triton_mixed_decode_and_prefill_matches_spec(case: AttentionCase) -> None:
    check_mixed(attention_impl("triton"), build_case(_with_single_tokens(case), "cuda"))
