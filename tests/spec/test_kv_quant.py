"""spec.kv_quant and spec.kv_quant_bound: the fp8 grid, quantize/dequantize, scales, the bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spec.attention import AttentionParams, AttentionShapeError, attention
from spec.errors import InvalidArgumentError
from spec.kv_cache import write_kv
from spec.kv_quant import (
    FP8_FORMATS,
    calibrated_scales,
    dequantize,
    element_error_bound,
    fp8_format,
    grid_values,
    head_scales,
    quantize,
    round_to_grid,
)
from spec.kv_quant_bound import attention_error_bound
from spec.paged_decode import paged_decode

CI = settings(
    deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
NAMES = ("fp8_e4m3", "fp8_e5m2")


@pytest.mark.parametrize("name", NAMES)
def test_grid_points_are_fixed_and_midpoints_round_to_even(name: str) -> None:
    fmt = FP8_FORMATS[name]
    g = grid_values(fmt)
    assert len(g) == {"fp8_e4m3": 127, "fp8_e5m2": 124}[name]  # + 1 sign bit = 254 / 248 codes
    assert g[-1] == fmt.max_value and g[1] == fmt.subnormal_spacing
    both = np.concatenate([-g[::-1], g])
    assert np.array_equal(round_to_grid(both, fmt), both)
    mid = (g[:-1] + g[1:]) / 2  # exactly between neighbours: the one with an even mantissa
    got = round_to_grid(mid, fmt)
    low_is_even = (np.arange(len(g) - 1) % 2) == 0  # grid index parity = mantissa parity
    assert np.array_equal(got, np.where(low_is_even, g[:-1], g[1:]))
    nudge = round_to_grid(np.nextafter(mid, np.inf), fmt)  # just above: always up
    assert np.array_equal(nudge, g[1:])


@pytest.mark.parametrize("name", NAMES)
def test_saturation_signs_and_nan(name: str) -> None:
    fmt = FP8_FORMATS[name]
    m = fmt.max_value
    x = np.array([m * 1.01, -m * 7, np.inf, -np.inf, -0.0, np.nan, 1e-30])
    got = round_to_grid(x, fmt)
    assert got[:4].tolist() == [m, -m, m, -m]
    assert got[4] == 0.0 and np.signbit(got[4])
    assert np.isnan(got[5]) and got[6] == 0.0
    finite = np.isfinite(x)
    assert np.all(np.isfinite(got[finite]))


@settings(CI, max_examples=200)
@given(
    name=st.sampled_from(NAMES),
    exp=st.floats(-30, 30),
    scale_exp=st.floats(-12, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantization_error_within_the_element_bound(
    name: str, exp: float, scale_exp: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(5, 2, 16)) * 2.0**exp  # [T, Hkv, D], magnitudes from subnormal to >M
    scale = np.array([2.0**scale_exp, 2.0 ** (scale_exp + rng.normal())])
    back = dequantize(quantize(x, scale, name), scale)
    bound = element_error_bound(x, scale, name)
    assert np.all(np.abs(back - x) <= bound * (1 + 1e-12))  # float64 evaluation
    codes = quantize(x, scale, name)
    assert np.array_equal(round_to_grid(codes, FP8_FORMATS[name]), codes)  # on the grid


@pytest.mark.parametrize("name", NAMES)
def test_element_bound_is_attained_at_midpoints(name: str) -> None:
    g = grid_values(FP8_FORMATS[name])
    mid = (g[:-1] + g[1:]) / 2
    x = mid.reshape(-1, 1, 1) * 3.0  # scale 3
    err = np.abs(dequantize(quantize(x, 3.0, name), 3.0) - x)
    assert np.allclose(err, element_error_bound(x, 3.0, name), rtol=1e-12, atol=0)


def test_calibrated_scales_map_the_absmax_onto_max_without_saturating() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3, 8)) * np.array([1.0, 50.0, 0.01])[None, :, None]
    for per_head in (False, True):
        s = calibrated_scales(x, "fp8", per_head=per_head)
        codes = quantize(x, s, "fp8")
        assert np.abs(codes).max() == 448.0
        assert np.all(np.abs(x / s[:, None]) <= 448.0 * (1 + 1e-15))
    assert calibrated_scales(x, "auto").tolist() == [1.0, 1.0, 1.0]
    assert calibrated_scales(np.zeros((2, 3, 8)), "fp8").tolist() == [1.0, 1.0, 1.0]
    per_tensor = calibrated_scales(x, "fp8_e5m2")
    assert np.all(per_tensor == np.abs(x).max() / 57344.0)


def test_names_and_scale_validation() -> None:
    assert fp8_format("fp8") is FP8_FORMATS["fp8_e4m3"] and fp8_format("auto") is None
    with pytest.raises(InvalidArgumentError, match="fp8_e5m2") as e:
        fp8_format("fp8_e4m3fnuz")
    assert e.value.value == "fp8_e4m3fnuz"
    with pytest.raises(AttentionShapeError, match="one per KV head"):
        head_scales([1.0, 2.0, 3.0], 2)
    with pytest.raises(AttentionShapeError, match="finite and > 0") as e2:
        head_scales([1.0, -2.0], 2)
    assert e2.value.numbers == {"head": 1, "value": -2.0}


def test_write_kv_quantizes_and_checks_before_writing() -> None:
    kc, vc = np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 3))
    k = np.array([[[1.0, 2.0, 1000.0], [0.3, -0.3, 0.0]]])  # [T=1, Hkv=2, D=3]
    write_kv(k, -k, kc, vc, [3], kv_cache_dtype="fp8", k_scale=[1.0, 0.1], v_scale=2.0)
    assert kc[1, 1].tolist() == [[1.0, 2.0, 448.0], [3.0, -3.0, 0.0]]
    assert vc[1, 1].tolist() == [[-0.5, -1.0, -448.0], [-0.15625, 0.15625, -0.0]]
    before = kc.copy()
    with pytest.raises(InvalidArgumentError):
        write_kv(k, k, kc, vc, [0], kv_cache_dtype="int4")
    with pytest.raises(AttentionShapeError):
        write_kv(k, k, kc, vc, [0], kv_cache_dtype="fp8", k_scale=[1.0, 0.0])
    assert np.array_equal(kc, before)
    plain_k, plain_v = np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 3))
    write_kv(k, k, plain_k, plain_v, [3])  # defaults: stored as they are
    assert np.array_equal(plain_k[1, 1], k[0])


def test_paged_decode_dequantizes_with_the_scales() -> None:
    rng = np.random.default_rng(0)
    codes_k, codes_v = rng.normal(size=(3, 4, 2, 8)), rng.normal(size=(3, 4, 2, 8))
    q = rng.normal(size=(1, 4, 8))
    ks, vs = np.array([0.5, 3.0]), 0.25
    got = paged_decode(q, codes_k, codes_v, [[2, 0]], [7], scale=0.3, k_scale=ks, v_scale=vs)
    direct = paged_decode(
        q, codes_k * ks[:, None], codes_v * vs, [[2, 0]], [7], scale=0.3
    )  # the cache holding the dequantized values
    assert np.allclose(got, direct, rtol=1e-13, atol=1e-15)
    assert not np.allclose(got, paged_decode(q, codes_k, codes_v, [[2, 0]], [7], scale=0.3))


@settings(CI, max_examples=80)
@given(
    name=st.sampled_from(NAMES),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    num_q=st.integers(1, 6),
    num_k=st.integers(1, 40),
    window=st.one_of(st.none(), st.integers(1, 20)),
    softcap=st.one_of(st.none(), st.sampled_from([2.0, 30.0])),
    magnitude=st.floats(-4, 4),
    under=st.sampled_from([1.0, 0.2]),  # 0.2: scales below calibration, values saturate
    per_head=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_error_bound_holds(
    name: str,
    kv_heads: int,
    group: int,
    num_q: int,
    num_k: int,
    window: int | None,
    softcap: float | None,
    magnitude: float,
    under: float,
    per_head: bool,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    d = 16
    q = rng.normal(size=(num_q, kv_heads * group, d))
    k = rng.normal(size=(num_k, kv_heads, d)) * 2.0**magnitude
    v = rng.normal(size=(num_k, kv_heads, d)) * rng.uniform(0.1, 10, size=(1, kv_heads, 1))
    ks = calibrated_scales(k, name, per_head) * under
    vs = calibrated_scales(v, name, per_head) * under
    params = AttentionParams(scale=d**-0.5, sliding_window=window, softcap=softcap)
    qp = np.sort(rng.integers(-2, num_k + 2, size=num_q))  # some rows see nothing
    exact = attention(q, k, v, params, q_positions=qp)[0]
    kq, vq = dequantize(quantize(k, ks, name), ks), dequantize(quantize(v, vs, name), vs)
    read = attention(q, kq, vq, params, q_positions=qp)[0]
    bound = attention_error_bound(
        q, k, v, params, k_scale=ks, v_scale=vs, kv_cache_dtype=name, q_positions=qp
    )
    assert np.all(np.abs(read - exact) <= bound * (1 + 1e-9) + 1e-300)
    assert np.all(bound[qp < 0] == 0.0)  # rows that see no key are exact


def test_attention_bound_is_tight_for_a_zero_query() -> None:
    # q = 0: equal weights, p^ = p, so the error is the mean of the value errors, and with every
    # value on a midpoint (rounded in the same direction) the bound is met with equality
    g = grid_values(FP8_FORMATS["fp8_e4m3"])
    v = np.full((4, 1, 2), (g[40] + g[41]) / 2)  # [K, Hkv, D], one midpoint, rounds down (even)
    k = np.ones((4, 1, 2))
    q = np.zeros((1, 1, 2))
    p = AttentionParams(scale=1.0)
    bound = attention_error_bound(q, k, v, p, k_scale=1.0, v_scale=1.0, kv_cache_dtype="fp8")
    read = attention(q, k, dequantize(quantize(v, 1.0, "fp8"), 1.0), p)[0]
    err = np.abs(read - attention(q, k, v, p)[0])
    assert np.allclose(err, bound, rtol=1e-12) and bound.max() > 0
    none = attention_error_bound(q, k, v, p, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    assert not none.any()


def test_headroom_scales_leave_room_above_the_calibration_maximum() -> None:
    x = np.array([[[3.0, -448.0]]])  # max |x| 448
    assert calibrated_scales(x, "fp8", headroom=2.0).tolist() == [2.0]
    s = calibrated_scales(x, "fp8", headroom=2.0)
    assert quantize(2 * x, s, "fp8").tolist() == [[[3.0, -448.0]]]  # 2x the max: not saturated
    with pytest.raises(AttentionShapeError, match="headroom"):
        calibrated_scales(x, "fp8", headroom=0.0)
