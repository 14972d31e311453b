"""The fused kernels (kernels.fused) against the unfused torch chains they replace.

On the CPU the Triton kernels run in the interpreter (tests/kernels/conftest.py); on a GPU the
``gpu`` test repeats the comparison in bf16 at the Llama-3-8B layer shape.
"""

from __future__ import annotations

import pytest
import torch

from kernels.errors import (
    DeviceMismatchError,
    DTypeMismatchError,
    IndexOutOfRangeError,
    KernelInputError,
    ShapeMismatchError,
    UnsupportedDTypeError,
)
from kernels.fused import add_rms_norm, rope_write_kv, silu_mul

# (dtype, absolute tolerance relative to the output's scale): float32 agrees to rounding; bf16
# differs by the roundings the unfused chain makes between its operations
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rope(t: int, r: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))  # [R/2]
    pos = torch.randint(0, 500, (t,)).float()
    emb = torch.cat((pos[:, None] * inv, pos[:, None] * inv), dim=-1)[:, None, :]  # [T, 1, R]
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def rope_case(
    hq: int, hkv: int, d: int, r: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    t, nb, bs = 5, 6, 4
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    cos, sin = _rope(t, r, dtype, device)
    slots = torch.tensor([3, -1, 17, 4, 22], device=device)  # one padding token
    caches = torch.zeros(2, nb, bs, hkv, d, dtype=dtype, device=device)
    return qkv, cos, sin, caches, slots


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "r", "dtype"),
    [
        (4, 2, 32, 32, torch.float32),
        (4, 2, 96, 96, torch.float32),  # D not a power of two
        (2, 2, 64, 32, torch.float32),  # partial rotary
        (8, 2, 128, 128, torch.bfloat16),
    ],
)
def test_rope_write_kv_equals_the_unfused_chain(
    hq: int, hkv: int, d: int, r: int, dtype: torch.dtype
) -> None:
    qkv, cos, sin, caches, slots = rope_case(hq, hkv, d, r, dtype)
    want_caches = caches.clone()
    want = rope_write_kv(qkv, cos, sin, *want_caches, slots, hq, backend="torch")
    got = rope_write_kv(qkv, cos, sin, *caches, slots, hq, backend="triton")
    assert got.shape == (5, hq, d) and got.is_contiguous()
    scale = float(want.abs().max())
    assert (got - want).abs().max() <= TOL[dtype] * scale
    assert (caches - want_caches).abs().max() <= TOL[dtype] * scale
    written = caches.view(2, -1, hkv, d)[:, [3, 17, 4, 22]]
    assert bool((written != 0).any(dim=-1).all())  # every head of every kept token written
    untouched = torch.ones(caches.shape[1] * caches.shape[2], dtype=torch.bool)
    untouched[[3, 17, 4, 22]] = False
    assert bool((caches.view(2, -1, hkv, d)[:, untouched] == 0).all())  # slot -1: nothing
    # values pass through unrotated, keys rotated: v rows equal qkv's value columns exactly
    v_cols = qkv[:, (hq + hkv) * d :].reshape(5, hkv, d)
    assert torch.equal(caches[1].view(-1, hkv, d)[17], v_cols[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm_equals_add_then_norm(dtype: torch.dtype, offset: float) -> None:
    torch.manual_seed(1)
    x, d = torch.randn(3, 96, dtype=dtype), torch.randn(3, 96, dtype=dtype)
    w = torch.randn(96, dtype=dtype)
    want_sum, want = add_rms_norm(x, d, w, 1e-6, offset, backend="torch")
    got_sum, got = add_rms_norm(x, d, w, 1e-6, offset, backend="triton")
    if dtype == torch.float32:
        assert torch.equal(got_sum, want_sum)  # the residual add rounds exactly as torch's
    else:  # the interpreter's float32 -> bf16 conversion truncates: one ulp (the GPU test: equal)
        ulp = 2.0**-7 * want_sum.float().abs()
        assert bool(((got_sum.float() - want_sum.float()).abs() <= ulp).all())
    assert (got - want).abs().max() <= TOL[dtype] * float(want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
def test_silu_mul_equals_act_times_up(dtype: torch.dtype, gelu: bool) -> None:
    torch.manual_seed(2)
    gu = 3 * torch.randn(4, 2 * 80, dtype=dtype)  # F = 80: a masked tail
    want = silu_mul(gu, gelu, backend="torch")
    got = silu_mul(gu, gelu, backend="triton")
    assert got.shape == (4, 80)
    assert (got - want).abs().max() <= TOL[dtype] * float(want.abs().max())


def test_bad_inputs_are_refused_by_name() -> None:
    qkv, cos, sin, caches, slots = rope_case(4, 2, 32, 32, torch.float32)
    with pytest.raises(ShapeMismatchError, match="qkv"):
        rope_write_kv(qkv, cos, sin, *caches, slots, 3)  # Hq 3 does not match the width
    with pytest.raises(ShapeMismatchError, match="slot_mapping"):
        rope_write_kv(qkv, cos, sin, *caches, slots[:4], 4)
    with pytest.raises(DTypeMismatchError, match="v_cache"):  # the pair must agree
        rope_write_kv(qkv, cos, sin, caches[0].half(), caches[1], slots, 4)
    with pytest.raises(DTypeMismatchError, match="k has dtype"):  # and hold qkv's dtype
        rope_write_kv(qkv, cos, sin, caches[0].half(), caches[1].half(), slots, 4)
    with pytest.raises(ShapeMismatchError, match="cos"):
        rope_write_kv(qkv, cos[..., :31], sin[..., :31], *caches, slots, 4)  # odd R
    x = torch.randn(2, 8)
    with pytest.raises(ShapeMismatchError, match="weight"):
        add_rms_norm(x, x, torch.ones(7), 1e-6)
    with pytest.raises(DTypeMismatchError, match="delta"):
        add_rms_norm(x, x.double(), torch.ones(8), 1e-6)
    with pytest.raises(ShapeMismatchError, match="gate_up"):
        silu_mul(torch.randn(2, 7))
    if torch.cuda.is_available():
        with pytest.raises(DeviceMismatchError):
            add_rms_norm(x.cuda(), x.cuda(), torch.ones(8), 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_what_write_kv_refuses_rope_write_kv_refuses(backend: str) -> None:
    # the same checks as the unfused write: slots, caches as a pair, dtypes, shapes
    qkv, cos, sin, (kc, vc), slots = rope_case(4, 2, 32, 32, torch.float32)
    big = torch.zeros(kc.shape[0] + 2, *kc.shape[1:])
    with pytest.raises(IndexOutOfRangeError, match="slot_mapping"):  # past the cache's end
        rope_write_kv(qkv, cos, sin, big[: kc.shape[0]], vc, slots + 24, 4, backend=backend)
    assert bool((big == 0).all())
    with pytest.raises(IndexOutOfRangeError, match="slot_mapping"):  # -5 is not padding
        rope_write_kv(qkv, cos, sin, kc, vc, torch.tensor([3, -5, 17, 4, 22]), 4, backend=backend)
    with pytest.raises(UnsupportedDTypeError, match="slot_mapping"):
        rope_write_kv(qkv, cos, sin, kc, vc, slots.float(), 4, backend=backend)
    odd = torch.zeros(kc.shape[0], kc.shape[2], kc.shape[1], kc.shape[3]).transpose(1, 2)
    with pytest.raises(ShapeMismatchError, match="strides"):  # v laid out unlike k
        rope_write_kv(qkv, cos, sin, kc, odd, slots, 4, backend=backend)
    with pytest.raises(ShapeMismatchError, match="cos"):  # [D, T]: the right count, wrong shape
        rope_write_kv(qkv, cos.reshape(32, 5), sin.reshape(32, 5), kc, vc, slots, 4)
    with pytest.raises(DTypeMismatchError, match="qkv"):
        rope_write_kv(qkv.long(), cos, sin, kc, vc, slots, 4, backend=backend)
    empty = rope_write_kv(qkv[:0], cos[:0], sin[:0], kc, vc, slots[:0], 4, backend=backend)
    assert empty.shape == (0, 4, 32)
    assert bool((kc == 0).all() and (vc == 0).all())  # nothing above wrote anything


def test_non_contiguous_inputs_give_the_contiguous_results() -> None:
    qkv, cos, sin, caches, slots = rope_case(4, 2, 32, 32, torch.float32)
    want_caches = caches.clone()
    want = rope_write_kv(qkv, cos, sin, *want_caches, slots, 4, backend="torch")
    cos_t = cos.reshape(5, 32).t().contiguous().t()  # [T, R] with stride (1, T)
    sin_t = sin.reshape(5, 32).t().contiguous().t()
    got = rope_write_kv(qkv, cos_t, sin_t, *caches, slots, 4, backend="triton")
    assert (got - want).abs().max() <= 1e-5 * float(want.abs().max())
    assert (caches - want_caches).abs().max() <= 1e-5 * float(want.abs().max())
    x, d = torch.randn(3, 16), torch.randn(3, 16)
    w = torch.randn(32)[::2]  # strided weight
    ref = add_rms_norm(x, d, w.contiguous(), 1e-6, backend="torch")[1]
    assert (add_rms_norm(x, d, w, 1e-6, backend="triton")[1] - ref).abs().max() <= 1e-5


def test_norm_and_activation_arguments_are_checked() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(DTypeMismatchError, match="weight"):
        add_rms_norm(x, x, torch.ones(8, dtype=torch.int64), 1e-6)
    for eps in (-1.0, float("nan"), "a", True):
        with pytest.raises(KernelInputError, match="eps"):
            add_rms_norm(x, x, torch.ones(8), eps)  # type: ignore[arg-type]
    with pytest.raises(KernelInputError, match="gelu"):
        silu_mul(torch.randn(2, 8), gelu="no")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_kernels_at_the_llama3_8b_layer_shape() -> None:
    qkv, cos, sin, caches, slots = rope_case(32, 8, 128, 128, torch.bfloat16, "cuda")
    want_caches = caches.clone()
    want = rope_write_kv(qkv, cos, sin, *want_caches, slots, 32, backend="torch")
    got = rope_write_kv(qkv, cos, sin, *caches, slots, 32)
    assert (got - want).abs().max() <= 2e-2 * float(want.abs().max())
    assert (caches - want_caches).abs().max() <= 2e-2 * float(want.abs().max())
    x, d = torch.randn(7, 4096, device="cuda").bfloat16(), torch.randn(7, 4096, device="cuda")
    w = torch.randn(4096, device="cuda").bfloat16()
    want_sum, want_n = add_rms_norm(x, d.bfloat16(), w, 1e-5, backend="torch")
    got_sum, got_n = add_rms_norm(x, d.bfloat16(), w, 1e-5)
    assert torch.equal(got_sum, want_sum)
    assert (got_n - want_n).abs().max() <= 2e-2 * float(want_n.abs().max())
    gu = torch.randn(7, 2 * 14336, device="cuda").bfloat16()
    want_a = silu_mul(gu, backend="torch")
    assert (silu_mul(gu) - want_a).abs().max() <= 2e-2 * float(want_a.abs().max())
