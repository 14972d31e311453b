"""spec.tolerances: the error measure and the per-dtype bounds the kernels are held to."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.attention import AttentionParams, AttentionShapeError, attention
from spec.tolerances import TOLERANCES, relative_error, within_tolerance

SETTINGS = settings(max_examples=60, deadline=None)
Measure = Callable[[np.ndarray, np.ndarray], float]


def prop_non_finite_never_passes(seed: int, measure: Measure = relative_error) -> None:
    """A NaN or infinity anywhere in the output makes the error infinite."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(3, 2, 4))
    for bad in (np.nan, np.inf, -np.inf):
        out = ref.copy()
        out[tuple(rng.integers(0, n) for n in out.shape)] = bad
        assert measure(out, ref) == math.inf
        assert not any(measure(out, ref) <= tol for tol in TOLERANCES.values())


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_relative_error_non_finite_is_inf(seed: int) -> None:
    prop_non_finite_never_passes(seed)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.floats(1e-6, 1e6))
def test_relative_error_is_scale_free_and_zero_on_equal(seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    ref, noise = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    assert relative_error(ref, ref) == 0.0
    err = relative_error(ref + 1e-3 * noise, ref)
    assert err == pytest.approx(1e-3 * np.linalg.norm(noise) / np.linalg.norm(ref), rel=1e-6)
    assert relative_error(scale * (ref + 1e-3 * noise), scale * ref) == pytest.approx(err, rel=1e-6)


def test_relative_error_zero_reference_uses_absolute_norm() -> None:
    assert relative_error(np.array([3e-6, 4e-6]), np.zeros(2)) == pytest.approx(5e-6)
    assert within_tolerance(np.zeros((2, 2)), np.zeros((2, 2)), "float32")
    assert not within_tolerance(np.full(2, 1e-3), np.zeros(2), "float32")


def test_tolerance_values_and_errors() -> None:
    assert dict(TOLERANCES) == {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
    with pytest.raises(TypeError):
        TOLERANCES["float8"] = 1.0  # type: ignore[index]
    with pytest.raises(AttentionShapeError, match="dtype_name='float64'"):
        within_tolerance(np.zeros(1), np.zeros(1), "float64")
    with pytest.raises(AttentionShapeError, match=r"out=\(2,\), ref=\(3,\)"):
        relative_error(np.zeros(2), np.zeros(3))


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float64 values to the nearest bfloat16 (ties to even), returned as float64."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(
        0xFFFF0000
    )
    return bits.view(np.float32).astype(np.float64)


@pytest.mark.parametrize(
    ("dtype_name", "round_fn"),
    [
        ("float32", lambda x: x.astype(np.float32).astype(np.float64)),
        ("float16", lambda x: x.astype(np.float16).astype(np.float64)),
        ("bfloat16", round_to_bf16),
    ],
)
def test_bounds_admit_rounding_of_inputs_and_output(
    dtype_name: str, round_fn: Callable[[np.ndarray], np.ndarray]
) -> None:
    """Attention on inputs rounded to the dtype, output rounded too, meets the bound with margin.

    This is the error an exact kernel in that dtype cannot avoid; the bound leaves room (at least
    2x) for accumulation error on top.
    """
    rng = np.random.default_rng(7)
    q, k, v = (
        rng.normal(size=(16, 8, 64)),
        rng.normal(size=(256, 2, 64)),
        rng.normal(size=(256, 2, 64)),
    )
    p = AttentionParams(scale=64**-0.5)
    ref, _ = attention(q, k, v, p)
    out, _ = attention(round_fn(q), round_fn(k), round_fn(v), p)
    err = relative_error(round_fn(out), ref)
    assert 0.0 < err <= TOLERANCES[dtype_name] / 2
