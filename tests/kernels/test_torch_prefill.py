"""The torch prefill's paths against the float64 spec: the causal fast path (no cached prefix),
the log-sum-exp merge (cached prefix), the chunked masked path (sliding window, or no CPU flash
kernel) and the chunked soft-cap path, for GQA ratios 1/3/4 in float32 and float64.

Lengths cross ``_QUERY_CHUNK`` (set to 48 here) so that the chunked paths run more than one
chunk; cache rows no sequence owns hold NaN, so a read past a length shows up as a NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
import kernels.torch_attention as ta
from spec.paged_prefill import paged_prefill as spec_prefill
from spec.tolerances import TOLERANCES, relative_error

_BOUND = {torch.float32: TOLERANCES["float32"], torch.float64: 1e-12}
_BS = 16
_CHUNK = 48  # small chunks keep the float64 spec quick


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ta, "_QUERY_CHUNK", _CHUNK)


def _case(
    cached: list[int], new: list[int], hq: int, hkv: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """q, caches, block tables, cu_seqlens_q, seq_lens; blocks shuffled, unused rows NaN."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    lens = [c + n for c, n in zip(cached, new)]
    need = [-(-n // _BS) for n in lens]
    nb = sum(need) + 3
    k = torch.full((nb, _BS, hkv, d), float("nan"), dtype=dtype)
    v = torch.full((nb, _BS, hkv, d), float("nan"), dtype=dtype)
    ids = torch.randperm(nb, generator=g).tolist()
    width = max(need)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for b, (n, m) in enumerate(zip(lens, need)):
        blocks, ids = ids[:m], ids[m:]
        tables[b, :m] = torch.tensor(blocks, dtype=torch.int32)
        rows = torch.tensor([blocks[p // _BS] * _BS + p % _BS for p in range(n)])
        k.view(-1, hkv, d)[rows] = torch.randn(n, hkv, d, generator=g, dtype=dtype)
        v.view(-1, hkv, d)[rows] = torch.randn(n, hkv, d, generator=g, dtype=dtype)
    q = torch.randn(sum(new), hq, d, generator=g, dtype=dtype)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(new)]), dtype=torch.int32)
    return q, k, v, tables, cu, torch.tensor(lens, dtype=torch.int32)


def _check(
    cached: list[int],
    new: list[int],
    hq: int,
    hkv: int,
    dtype: torch.dtype,
    window: int | None,
    softcap: float | None,
) -> None:
    q, k, v, tables, cu, lens = _case(cached, new, hq, hkv, dtype)
    out = kernels.paged_prefill(
        q, k, v, tables, cu, lens, scale=0.25, sliding_window=window, softcap=softcap
    )
    assert out.dtype == dtype
    ref = spec_prefill(
        q.double().numpy(),
        torch.nan_to_num(k).double().numpy(),
        torch.nan_to_num(v).double().numpy(),
        tables.numpy(),
        cu.numpy(),
        lens.numpy(),
        scale=0.25,
        sliding_window=window,
        softcap=softcap,
    )
    err = relative_error(out.double().numpy(), ref)
    assert err <= _BOUND[dtype], err


# (cached, new) per sequence: no prefix (longer than a chunk), prefix + long chunk, decode-like
_BATCH = ([0, 140, 60, 0], [130, 100, 1, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2)])
@pytest.mark.parametrize(
    "window,softcap", [(None, None), (17, None), (None, 30.0), (17, 30.0), (5000, None)]
)
def test_prefill_paths_match_spec(
    dtype: torch.dtype, hq: int, hkv: int, window: int | None, softcap: float | None
) -> None:
    _check(*_BATCH, hq, hkv, dtype, window, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefix_without_cpu_flash_kernel(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where torch lacks the CPU flash op with log-sum-exp, the masked chunked path answers."""
    monkeypatch.setattr(ta, "_cpu_flash_with_lse", lambda: None)
    _check(*_BATCH, 6, 2, dtype, None, None)


@pytest.mark.parametrize("hq,hkv", [(3, 3), (9, 3), (4, 1)])
def test_prefix_only_one_new_token_and_exact_chunks(hq: int, hkv: int) -> None:
    """Chunk boundaries exactly at _QUERY_CHUNK, and a prefix longer than the new part."""
    c = ta._QUERY_CHUNK
    _check([0, 2 * c, 1], [c, c, 2 * c], hq, hkv, torch.float32, None, None)
    _check([0, 2 * c, 1], [c, c, 2 * c], hq, hkv, torch.float32, c - 1, None)


def test_logits_far_apart_merge_stably() -> None:
    """The prefix and the new keys' log-sum-exps differ by ~1e3: the merge must not overflow."""
    q, k, v, tables, cu, lens = _case([40], [24], 4, 2, torch.float32, seed=3)
    q = q * 40.0
    out = kernels.paged_prefill(q, k, v, tables, cu, lens, scale=1.0)
    ref = spec_prefill(
        q.double().numpy(),
        torch.nan_to_num(k).double().numpy(),
        torch.nan_to_num(v).double().numpy(),
        tables.numpy(),
        cu.numpy(),
        lens.numpy(),
        scale=1.0,
    )
    assert relative_error(out.double().numpy(), ref) <= TOLERANCES["float32"]
