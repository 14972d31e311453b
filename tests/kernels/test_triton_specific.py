"""Triton-only behaviour: the sizes it refuses, backend selection, the split heuristic, and
large GPU shapes with pools whose element offsets pass 2^31."""

from __future__ import annotations

import pytest
import torch

import kernels
from conformance.attention.cases import AttentionCase, build_case
from conformance.attention.impl import attention_impl, check_decode, check_prefill
from kernels.backend import resolve_backend
from kernels.errors import BackendUnavailableError, HeadDimError, PageSizeError
from kernels.splits import choose_num_splits


def _decode_args(block_size: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    k = torch.randn(4, block_size, 2, head_dim)
    q = torch.randn(1, 4, head_dim)
    return (
        q,
        k,
        k.clone(),
        torch.zeros(1, 2, dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
    )


@pytest.mark.parametrize("block_size", [3, 12, 512])
def test_triton_refuses_page_sizes_outside_pow2_1_to_256(block_size: int) -> None:
    with pytest.raises(PageSizeError) as e:
        kernels.paged_decode(*_decode_args(block_size, 64), scale=1.0, backend="triton")
    assert e.value.block_size == block_size
    # the torch fallback takes any page size
    out = kernels.paged_decode(*_decode_args(block_size, 64), scale=1.0, backend="torch")
    assert torch.isfinite(out).all()


def test_triton_refuses_head_dim_72() -> None:
    with pytest.raises(HeadDimError) as e:
        kernels.paged_decode(*_decode_args(16, 72), scale=1.0, backend="triton")
    assert e.value.head_dim == 72


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "batch,kv_heads,length,expected",
    [
        (1, 8, 4096, 32),
        (16, 8, 2048, 4),
        (8, 8, 32768, 8),
        (64, 8, 4096, 1),
        (1, 8, 32768, 64),
        (2, 1, 100, 1),
    ],
)
def test_split_heuristic_fills_132_sms(
    batch: int, kv_heads: int, length: int, expected: int
) -> None:
    s = choose_num_splits(batch, kv_heads, length)
    assert s == expected
    assert s == 1 or batch * kv_heads * s >= 132 or length // 128 == s


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_long_decode_with_high_block_ids(dtype: str) -> None:
    case = AttentionCase(
        num_kv_heads=8,
        group=4,
        head_dim=128,
        block_size=16,
        seq_lens=(20000, 777, 1, 4096),
        q_lens=None,
        dtype=dtype,
        high_block_ids=True,
        seed=5,
    )
    check_decode(attention_impl("triton"), build_case(case, "cuda"))


@pytest.mark.gpu
def test_gpu_prefill_after_long_prefix_with_high_block_ids() -> None:
    case = AttentionCase(
        num_kv_heads=8,
        group=4,
        head_dim=128,
        block_size=16,
        seq_lens=(3000, 600),
        q_lens=(512, 600),
        dtype="bfloat16",
        high_block_ids=True,
        sliding_window=1000,
        seed=6,
    )
    check_prefill(attention_impl("triton"), build_case(case, "cuda"))


@pytest.mark.parametrize("group", [1, 5])
def test_prefill_tile_search_over_many_ragged_sequences(group: int) -> None:
    # q_len 0 chunks, chunks shorter and longer than a tile, and a decode-like q_len 1
    q_lens = (0, 1, 33, 0, 5, 16, 17, 2, 40)
    seq_lens = (3, 1, 50, 0, 5, 30, 17, 9, 41)
    case = AttentionCase(
        num_kv_heads=1,
        group=group,
        head_dim=64,
        block_size=8,
        seq_lens=seq_lens,
        q_lens=q_lens,
        dtype="float32",
        seed=11,
    )
    for backend in ("triton", "torch"):
        check_prefill(attention_impl(backend), build_case(case))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_views_as_the_engine_passes_them(backend: str) -> None:
    # q and k are column slices of one fused qkv projection; out is a strided view too
    torch.manual_seed(3)
    hq, hkv, d, t = 8, 2, 64, 5
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    kc = torch.zeros(4, 8, hkv, d)
    vc = torch.zeros(4, 8, hkv, d)
    kernels.write_kv(k, v, kc, vc, torch.tensor([17, 18, 19, 20, 21]), backend=backend)
    assert torch.equal(kc.view(-1, hkv, d)[17:22], k) and torch.equal(vc.view(-1, hkv, d)[17:22], v)
    table = torch.tensor([[0, 1, 2]], dtype=torch.int32)  # tokens 0..21: 17 cached + 5 new
    lens = torch.tensor([22], dtype=torch.int32)
    cu = torch.tensor([0, t], dtype=torch.int32)
    big = torch.full((t, hq, 2 * d), float("nan"))
    out = big[:, :, :d]  # non-contiguous
    kernels.paged_prefill(q, kc, vc, table, cu, lens, scale=0.125, out=out, backend=backend)
    ref = kernels.paged_prefill(
        q.contiguous(), kc, vc, table, cu, lens, scale=0.125, backend="torch"
    )
    assert torch.allclose(out, ref, atol=1e-5) and torch.isnan(big[:, :, d:]).all()
    dec = kernels.paged_decode(q[-1:], kc, vc, table, lens, scale=0.125, backend=backend)
    assert torch.allclose(dec, ref[-1:], atol=1e-5)
