"""write_kv, copy_blocks and swap_blocks: both backends against the spec, on CPU and GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from kernels.errors import DTypeMismatchError, ShapeMismatchError
from spec import kv_cache as spec_kv


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().cpu().numpy()


def _write_kv_case(device: str, backend: str, num_blocks: int, high: bool) -> None:
    torch.manual_seed(num_blocks)
    bs, hkv, d, t = 16, 5, 64, 40  # Hkv * D = 320: not a power of two
    kc = torch.randn(num_blocks, bs, hkv, d, device=device).to(torch.bfloat16)
    vc = torch.randn(num_blocks, bs, hkv, d, device=device).to(torch.bfloat16)
    k = torch.randn(t, hkv, d, device=device).to(torch.bfloat16)
    v = torch.randn(t, hkv, d, device=device).to(torch.bfloat16)
    lo = num_blocks * bs - 4 * t if high else 0
    slots = torch.randperm(num_blocks * bs - lo, device=device)[:t] + lo
    slots[::7] = -1
    expect_k, expect_v = kc.clone(), vc.clone()  # reference: plain indexing on the same device
    keep = slots >= 0
    expect_k.view(-1, hkv, d)[slots[keep]] = k[keep]
    expect_v.view(-1, hkv, d)[slots[keep]] = v[keep]
    kernels.write_kv(k, v, kc, vc, slots, backend=backend)
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_write_kv_skips_padding_and_writes_the_rest(backend: str) -> None:
    _write_kv_case("cpu", backend, 12, high=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_write_kv_high_slots(backend: str) -> None:
    # block stride 16*5*64 = 5120 elements: slots of blocks >= 419431 have offsets past 2^31
    _write_kv_case("cuda", backend, 420_000, high=True)


def _copy_swap(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    k = torch.randn(10, 8, 2, 64, generator=g).to(device)
    v = torch.randn(10, 8, 2, 64, generator=g).to(device)
    kn, vn = _np(k), _np(v)
    pairs = np.array([[1, 7], [1, 4], [9, 0]])
    kernels.copy_blocks(k, v, torch.as_tensor(pairs, device=device))
    spec_kv.copy_blocks(kn, vn, pairs)
    assert np.array_equal(_np(k), kn) and np.array_equal(_np(v), vn)
    host = torch.randn(6, 8, 2, 64, generator=g)
    if device == "cuda":
        host = host.pin_memory()
    hn = _np(host)
    out_map = [[3, 5], [0, 2]]
    kernels.swap_blocks(k, host, out_map)
    spec_kv.swap_blocks(kn, hn, out_map)
    if device == "cuda":
        torch.cuda.synchronize()
    assert np.array_equal(_np(host), hn)
    in_map = np.array([[5, 8], [2, 6]])
    kernels.swap_blocks(host, k, in_map)
    spec_kv.swap_blocks(hn, kn, in_map)
    assert np.array_equal(_np(k), kn)


def test_copy_and_swap_blocks() -> None:
    _copy_swap("cpu")


@pytest.mark.gpu
def test_gpu_copy_and_swap_blocks_with_pinned_pool() -> None:
    _copy_swap("cuda")


def test_cache_op_errors_name_the_numbers() -> None:
    kc = torch.zeros(4, 8, 2, 64)
    with pytest.raises(ShapeMismatchError) as e:
        kernels.write_kv(
            torch.zeros(3, 2, 32),
            torch.zeros(3, 2, 32),
            kc,
            kc.clone(),
            torch.zeros(3, dtype=torch.int64),
        )
    assert e.value.shape == (3, 2, 32)
    with pytest.raises(DTypeMismatchError):
        kernels.swap_blocks(kc, torch.zeros(4, 8, 2, 64, dtype=torch.float16), [[0, 1]])
    with pytest.raises(ShapeMismatchError):
        kernels.copy_blocks(kc, kc.clone(), [[0, 1, 2]])
