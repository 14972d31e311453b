"""Head dims that are not powers of two (every multiple of 16 from 32 to 256) and page sizes below
8 (page 1 included) on the Triton kernels, against the float64 spec within spec.tolerances.

On the CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py) on a few short
sequences per dim; the ``gpu``-marked tests sweep every dim and page size on a CUDA device.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import kernels
from conformance.attention.cases import (
    ALL_HEAD_DIMS,
    GPU_GENERAL_LIMITS,
    GPU_GENERAL_PREFILL_LIMITS,
    INTERPRETER_GENERAL_LIMITS,
    AttentionCase,
    attention_cases,
    build_case,
)
from conformance.attention.impl import attention_impl, check_decode, check_prefill
from kernels.errors import HeadDimError, PageSizeError
from kernels.triton_common import TRITON_HEAD_DIMS, TRITON_PAGE_SIZES, padded_head_dim
from spec.tolerances import TOLERANCES, relative_error

# (head_dim, block_size, group, dtype, window, softcap): the dims named in the issue, each once,
# with page 1 and 2 among them and every dtype, window and soft-cap somewhere
_CI_GRID = [
    (32, 1, 4, "float32", None, None),
    (80, 1, 5, "bfloat16", 7, None),
    (96, 2, 8, "float16", None, 30.0),
    (112, 16, 1, "float32", 5, 5.0),
    (160, 1, 4, "float16", None, None),
    (192, 8, 5, "float32", None, 1.0),
    (256, 1, 1, "bfloat16", 9, None),
]


def _common(head_dim: int, block_size: int, group: int, dtype: str, window: int | None,
            softcap: float | None) -> dict[str, object]:  # fmt: skip
    return dict(
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        sliding_window=window,
        softcap=softcap,
        seed=head_dim * 7 + block_size,
    )


@pytest.mark.parametrize("head_dim,block_size,group,dtype,window,softcap", _CI_GRID)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padded_dims_and_small_pages_match_spec(
    backend: str,
    head_dim: int,
    block_size: int,
    group: int,
    dtype: str,
    window: int | None,
    softcap: float | None,
) -> None:
    common = _common(head_dim, block_size, group, dtype, window, softcap)
    impl = attention_impl(backend)
    decode = AttentionCase(seq_lens=(block_size + 10, 1, 0), q_lens=None, **common)  # type: ignore[arg-type]
    prefill = AttentionCase(seq_lens=(block_size + 11, 6), q_lens=(5, 6), **common)  # type: ignore[arg-type]
    assert check_decode(impl, build_case(decode)) <= TOLERANCES[dtype]
    assert check_prefill(impl, build_case(prefill)) <= TOLERANCES[dtype]


_CI = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
    max_examples=20,
)


@_CI
@given(case=attention_cases(INTERPRETER_GENERAL_LIMITS))
def test_triton_decode_general_drawn(case: AttentionCase) -> None:
    check_decode(attention_impl("triton"), build_case(case))


@_CI
@given(case=attention_cases(INTERPRETER_GENERAL_LIMITS, prefill=True))
def test_triton_prefill_general_drawn(case: AttentionCase) -> None:
    check_prefill(attention_impl("triton"), build_case(case))


@pytest.mark.parametrize("head_dim", [48, 80, 144])
def test_split_decode_merges_padded_dims(head_dim: int) -> None:
    # the merge kernel reads and writes [.., D] partial states with D not a power of two
    built = build_case(
        AttentionCase(
            num_kv_heads=1,
            group=4,
            head_dim=head_dim,
            block_size=1,
            seq_lens=(40, 3),
            q_lens=None,
            dtype="float32",
            seed=head_dim,
        )
    )
    args = (built.q, built.k_cache, built.v_cache, built.block_tables, built.seq_lens)
    ref = kernels.paged_decode(*args, scale=0.1, backend="torch")
    out = torch.full_like(built.q, float("nan"))
    kernels.paged_decode(*args, scale=0.1, num_splits=3, out=out, backend="triton")
    assert relative_error(out.double().numpy(), ref.double().numpy()) < 1e-5


def _surrounded(nb: int, bs: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(store, cache): a zero cache ``[nb, bs, 1, d]`` viewed in a ``[nb, bs + 1, 1, d]`` store
    whose extra row after every block is NaN, so a lane past ``D`` that is read shows up."""
    store = torch.full((nb, bs + 1, 1, d), float("nan"))
    cache = store[:, :bs]  # block stride (bs + 1) * d, inner dims packed
    cache.zero_()
    return store, cache


@pytest.mark.parametrize("head_dim", [80, 112])
def test_padded_lanes_are_neither_read_nor_written(head_dim: int) -> None:
    # Hkv = 1: lanes D..next_pow2(D) of a page's last row fall in the NaN row after the page, so
    # any unmasked read of them (the prefill's unmasked middle tiles included: 40 cached keys,
    # 6 new) gives NaN; the output sits in a buffer whose NaN tail must stay NaN.
    torch.manual_seed(head_dim)
    bs, d, hq, n, t = 4, head_dim, 4, 46, 6
    assert padded_head_dim(d) > d
    kstore, kc = _surrounded(13, bs, d)
    vstore, vc = _surrounded(13, bs, d)
    k, v = torch.randn(n, 1, d), torch.randn(n, 1, d)
    pages = torch.randperm(13)[:12]  # logical page i -> pool block pages[i]
    slots = pages[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    kernels.write_kv(k, v, kc, vc, slots, backend="triton")
    assert torch.equal(kc[pages[1]], k[4:8]) and torch.equal(vc[pages[11], :2], v[44:])
    assert torch.isnan(kstore[:, bs]).all() and torch.isnan(vstore[:, bs]).all()
    table = pages[None, :].to(torch.int32)
    lens = torch.tensor([n], dtype=torch.int32)
    cu = torch.tensor([0, t], dtype=torch.int32)
    q = torch.randn(t, hq, d)
    buf = torch.full((t * hq * d + 2 * d,), float("nan"))
    out = buf[: t * hq * d].view(t, hq, d)
    kernels.paged_prefill(q, kc, vc, table, cu, lens, scale=0.1, out=out, backend="triton")
    ref = kernels.paged_prefill(q, kc, vc, table, cu, lens, scale=0.1, backend="torch")
    assert relative_error(out.double().numpy(), ref.double().numpy()) < 1e-5
    assert torch.isnan(buf[t * hq * d :]).all()
    dbuf = torch.full((hq * d + 2 * d,), float("nan"))
    dec = dbuf[: hq * d].view(1, hq, d)
    kernels.paged_decode(q[-1:], kc, vc, table, lens, scale=0.1, out=dec, backend="triton")
    assert relative_error(dec.double().numpy(), ref[-1:].double().numpy()) < 1e-5
    assert torch.isnan(dbuf[hq * d :]).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("head_dim,block_size", [(80, 1), (48, 2), (208, 1)])
def test_write_kv_any_dim_and_page_size(backend: str, head_dim: int, block_size: int) -> None:
    torch.manual_seed(1)
    hkv, t = 3, 5
    kc = torch.zeros(8, block_size, hkv, head_dim, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    k = torch.randn(t, hkv, head_dim).half()
    v = torch.randn(t, hkv, head_dim).half()
    slots = torch.tensor([3, -1, 0, 7 * block_size, 2 * block_size + block_size - 1])
    kernels.write_kv(k, v, kc, vc, slots, backend=backend)
    flat_k, flat_v = kc.view(-1, hkv, head_dim), vc.view(-1, hkv, head_dim)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    assert int((flat_k != 0).any(-1).any(-1).sum()) == int(keep.sum())  # nothing else written


def test_supported_sets() -> None:
    assert TRITON_HEAD_DIMS == ALL_HEAD_DIMS == (32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                                 192, 208, 224, 240, 256)  # fmt: skip
    assert TRITON_PAGE_SIZES == (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _decode_args(block_size: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    k = torch.randn(4, block_size, 2, head_dim)
    return (
        torch.randn(1, 4, head_dim),
        k,
        k.clone(),
        torch.zeros(1, 4, dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
    )


@pytest.mark.parametrize("head_dim", [16, 40, 72, 100, 264, 272, 512])
def test_triton_refuses_other_head_dims_naming_the_allowed(head_dim: int) -> None:
    with pytest.raises(HeadDimError) as e:
        kernels.paged_decode(*_decode_args(8, head_dim), scale=1.0, backend="triton")
    assert e.value.head_dim == head_dim
    assert "multiple of 16 in [32, 256]" in str(e.value) and "80, 96, 112" in str(e.value)
    out = kernels.paged_decode(*_decode_args(8, head_dim), scale=1.0, backend="torch")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("block_size", [3, 6, 24, 512])
def test_triton_refuses_other_page_sizes(block_size: int) -> None:
    with pytest.raises(PageSizeError) as e:
        kernels.paged_decode(*_decode_args(block_size, 64), scale=1.0, backend="triton")
    assert e.value.block_size == block_size and "[1, 256]" in str(e.value)


GPU_CI = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
    max_examples=int(os.environ.get("PAGEDKV_GPU_EXAMPLES", "60")),
)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 2, 16, 256])
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
def test_gpu_every_dim_and_page_size(head_dim: int, block_size: int) -> None:
    impl = attention_impl("triton")
    for i, dtype in enumerate(("bfloat16", "float16", "float32")):
        common = dict(
            num_kv_heads=2,
            group=(4, 5, 1)[i],
            head_dim=head_dim,
            block_size=block_size,
            dtype=dtype,
            sliding_window=(None, 300, None)[i],
            softcap=(None, None, 30.0)[i],
            seed=head_dim + block_size + i,
        )
        decode = AttentionCase(seq_lens=(1500, 1, 0, 333), q_lens=None, **common)  # type: ignore[arg-type]
        prefill = AttentionCase(seq_lens=(700, 129), q_lens=(300, 129), **common)  # type: ignore[arg-type]
        assert check_decode(impl, build_case(decode, "cuda")) <= TOLERANCES[dtype]
        assert check_prefill(impl, build_case(prefill, "cuda")) <= TOLERANCES[dtype]


@pytest.mark.gpu
@GPU_CI
@given(case=attention_cases(GPU_GENERAL_LIMITS))
def test_gpu_triton_decode_general_drawn(case: AttentionCase) -> None:
    check_decode(attention_impl("triton"), build_case(case, "cuda"))


@pytest.mark.gpu
@GPU_CI
@given(case=attention_cases(GPU_GENERAL_PREFILL_LIMITS, prefill=True))
def test_gpu_triton_prefill_general_drawn(case: AttentionCase) -> None:
    check_prefill(attention_impl("triton"), build_case(case, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [80, 96, 160])
def test_gpu_page_one_long_decode_with_high_block_ids(head_dim: int) -> None:
    case = AttentionCase(
        num_kv_heads=8,
        group=4,
        head_dim=head_dim,
        block_size=1,
        seq_lens=(9000, 1, 4096),
        q_lens=None,
        dtype="bfloat16",
        high_block_ids=True,
        seed=head_dim,
    )
    check_decode(attention_impl("triton"), build_case(case, "cuda"))
