"""Torch fallbacks against the float64 spec on fixed small cases (the hypothesis suite is in
test_attention_conformance.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from spec import kv_cache as spec_kv
from spec.paged_decode import paged_decode as spec_decode
from spec.paged_prefill import paged_prefill as spec_prefill
from spec.tolerances import TOLERANCES, relative_error


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().cpu().numpy()


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 3.0), (4, 2.0)])
def test_decode_and_prefill_match_spec(window: int | None, softcap: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, d, hq = 9, 4, 2, 16, 8
    k = torch.randn(nb, bs, hkv, d, generator=g)
    v = torch.randn(nb, bs, hkv, d, generator=g)
    bt = torch.tensor([[7, 2, 5, 0], [1, 8, 3, 6]], dtype=torch.int32)
    lens = torch.tensor([13, 6], dtype=torch.int32)
    params = {"scale": 0.3, "sliding_window": window, "softcap": softcap}
    q = torch.randn(2, hq, d, generator=g)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode(
        q,
        k,
        v,
        bt,
        lens,
        scale=0.3,
        sliding_window=window,
        softcap=softcap,
        out=out,
        backend="torch",
    )
    ref = spec_decode(_np(q), _np(k), _np(v), bt.numpy(), lens.numpy(), **params)
    assert relative_error(_np(out), ref) <= TOLERANCES["float32"]
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    qp = torch.randn(8, hq, d, generator=g)
    o = kernels.paged_prefill(
        qp, k, v, bt, cu, lens, scale=0.3, sliding_window=window, softcap=softcap, backend="torch"
    )
    ref = spec_prefill(_np(qp), _np(k), _np(v), bt.numpy(), cu.numpy(), lens.numpy(), **params)
    assert relative_error(_np(o), ref) <= TOLERANCES["float32"]


def test_cache_ops_match_spec() -> None:
    g = torch.Generator().manual_seed(1)
    k = torch.randn(6, 4, 2, 8, generator=g)
    v = torch.randn(6, 4, 2, 8, generator=g)
    kn, vn = _np(k), _np(v)
    newk, newv = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    slots = torch.tensor([3, -1, 17, 22, -1])
    kernels.write_kv(newk, newv, k, v, slots)
    spec_kv.write_kv(_np(newk), _np(newv), kn, vn, slots.numpy())
    assert np.array_equal(_np(k), kn) and np.array_equal(_np(v), vn)
    pairs = np.array([[0, 5], [0, 2], [3, 1]])
    kernels.copy_blocks(k, v, pairs)
    spec_kv.copy_blocks(kn, vn, pairs)
    assert np.array_equal(_np(k), kn) and np.array_equal(_np(v), vn)
    host = torch.randn(3, 4, 2, 8, generator=g)
    hn = _np(host)
    kernels.swap_blocks(k, host, [[4, 0], [1, 2]])
    spec_kv.swap_blocks(kn, hn, [[4, 0], [1, 2]])
    assert np.array_equal(_np(host), hn)


def test_bad_inputs_raise_named_errors() -> None:
    k = torch.zeros(4, 8, 2, 16)
    q = torch.zeros(1, 3, 16)
    bt = torch.zeros(1, 2, dtype=torch.int32)
    lens = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(kernels.errors.GQARatioError) as e:
        kernels.paged_decode(q, k, k, bt, lens, scale=1.0)
    assert (e.value.num_q_heads, e.value.num_kv_heads) == (3, 2)
    with pytest.raises(kernels.errors.DTypeMismatchError):
        kernels.paged_decode(q.half(), k, k, bt, lens, scale=1.0)
    with pytest.raises(kernels.errors.IndexOutOfRangeError) as e2:
        kernels.paged_decode(
            torch.zeros(1, 4, 16), k, k, bt, torch.tensor([17], dtype=torch.int32), scale=1.0
        )
    assert e2.value.value == 17 and e2.value.high == 16
    with pytest.raises(kernels.errors.IndexOutOfRangeError):
        kernels.write_kv(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), k, k, torch.tensor([32]))
