"""spec.attention: the dense reference against a loop-by-loop definition, and its properties.

Property functions (``prop_*``) take one drawn case and assert; the tests run them under
hypothesis, and tests/spec/test_mutations_attention.py runs them against planted errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spec.attention
from spec.attention import AttentionParams, AttentionShapeError, attention, kv_head_map

SETTINGS = settings(max_examples=80, deadline=None)


@dataclass(frozen=True)
class DenseCase:
    """Queries [Q, Hq, D] at ``q_positions``, keys/values [K, Hkv, D] at positions 0..K-1."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    q_positions: np.ndarray
    params: AttentionParams


@st.composite
def dense_cases(draw: st.DrawFn, min_kv_heads: int = 1, min_group: int = 1) -> DenseCase:
    hkv = draw(st.integers(min_kv_heads, 3))
    group = draw(st.integers(min_group, 3))
    d = draw(st.sampled_from([1, 2, 4]))
    num_k = draw(st.integers(0, 9))
    num_q = draw(st.integers(0, num_k))
    window = draw(st.none() | st.integers(1, 10))
    softcap = draw(st.none() | st.sampled_from([0.3, 1.0, 5.0]))
    scale = draw(st.sampled_from([0.25, 1.0, 2.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return DenseCase(
        q=rng.normal(size=(num_q, hkv * group, d)),
        k=rng.normal(size=(num_k, hkv, d)),
        v=rng.normal(size=(num_k, hkv, d)),
        q_positions=np.arange(num_k - num_q, num_k),
        params=AttentionParams(scale=scale, sliding_window=window, softcap=softcap),
    )


def loop_attention(case: DenseCase) -> tuple[np.ndarray, np.ndarray]:
    """The definition written as plain loops over scalars: the oracle for spec.attention."""
    num_q, hq, d = case.q.shape
    hkv = case.k.shape[1]
    p = case.params
    out = np.zeros((num_q, hq, d))
    lse = np.full((num_q, hq), -math.inf)
    for i in range(num_q):
        pos = int(case.q_positions[i])
        for h in range(hq):
            kvh = h // (hq // hkv)
            scores: list[tuple[float, int]] = []
            for j in range(case.k.shape[0]):
                if j > pos or (p.sliding_window is not None and j <= pos - p.sliding_window):
                    continue
                s = p.scale * sum(
                    float(case.q[i, h, x]) * float(case.k[j, kvh, x]) for x in range(d)
                )
                if p.softcap is not None:
                    s = p.softcap * math.tanh(s / p.softcap)
                scores.append((s, j))
            if not scores:
                continue
            top = max(s for s, _ in scores)
            weights = [(math.exp(s - top), j) for s, j in scores]
            total = sum(w for w, _ in weights)
            lse[i, h] = top + math.log(total)
            for w, j in weights:
                out[i, h] += w / total * case.v[j, kvh]
    return out, lse


def run(case: DenseCase) -> tuple[np.ndarray, np.ndarray]:
    return attention(case.q, case.k, case.v, case.params, q_positions=case.q_positions)


def assert_states_close(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    rtol: float = 1e-9,
    atol: float = 1e-12,
) -> None:
    """Outputs and log-sum-exps equal to float64 rounding (by default), -inf where -inf."""
    np.testing.assert_allclose(a[0], b[0], rtol=rtol, atol=atol)
    np.testing.assert_array_equal(np.isneginf(a[1]), np.isneginf(b[1]))
    finite = np.isfinite(b[1])
    np.testing.assert_allclose(a[1][finite], b[1][finite], rtol=rtol, atol=atol)


def prop_dense_matches_loops(case: DenseCase) -> None:
    assert_states_close(run(case), loop_attention(case))


def prop_gqa_equals_mha(case: DenseCase) -> None:
    """Grouped heads equal multi-head attention whose KV heads are repeated group times."""
    group = case.q.shape[1] // case.k.shape[1]
    mha = replace(case, k=np.repeat(case.k, group, axis=1), v=np.repeat(case.v, group, axis=1))
    assert_states_close(run(case), run(mha))


def prop_window_at_limit_is_plain(case: DenseCase) -> None:
    """A window at least as long as the sequence masks nothing."""
    wide = replace(case, params=replace(case.params, sliding_window=max(1, case.k.shape[0])))
    plain = replace(case, params=replace(case.params, sliding_window=None))
    assert_states_close(run(wide), run(plain))


def prop_window_is_recent_keys(case: DenseCase) -> None:
    """With window w, query at position p equals plain attention over keys p-w+1..p alone."""
    w = case.params.sliding_window
    if w is None:
        return
    o, lse = run(case)
    plain = replace(case.params, sliding_window=None)
    for i, pos in enumerate(case.q_positions.tolist()):
        lo = max(0, pos - w + 1)
        ref = attention(case.q[i : i + 1], case.k[lo : pos + 1], case.v[lo : pos + 1], plain)
        assert_states_close((o[i : i + 1], lse[i : i + 1]), ref)


def prop_softcap_large_is_plain(case: DenseCase) -> None:
    """c * tanh(s / c) = s - s^3 / (3 c^2) + ...: for |s| <= 100 and c = 1e6 a logit moves <
    4e-7."""
    capped = replace(case, params=replace(case.params, softcap=1e6))
    plain = replace(case, params=replace(case.params, softcap=None))
    assert_states_close(run(capped), run(plain), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(dense_cases())
def test_attention_matches_loops(case: DenseCase) -> None:
    prop_dense_matches_loops(case)


@SETTINGS
@given(dense_cases(), st.integers(1, 40))
def test_attention_row_chunks_match_loops(case: DenseCase, budget: int) -> None:
    # A tiny logits budget makes attention() work a few query rows at a time.
    with mock.patch.object(spec.attention, "LOGITS_BUDGET", budget):
        prop_dense_matches_loops(case)


@SETTINGS
@given(dense_cases())
def test_attention_gqa_equals_mha(case: DenseCase) -> None:
    prop_gqa_equals_mha(case)


@SETTINGS
@given(dense_cases())
def test_attention_window_at_limit(case: DenseCase) -> None:
    prop_window_at_limit_is_plain(case)


@SETTINGS
@given(dense_cases())
def test_attention_window_is_recent_keys(case: DenseCase) -> None:
    prop_window_is_recent_keys(case)


@SETTINGS
@given(dense_cases())
def test_attention_softcap_limit(case: DenseCase) -> None:
    prop_softcap_large_is_plain(case)


def test_attention_fully_masked_row_is_zero_with_lse_minus_inf() -> None:
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(2, 2, 3)), rng.normal(size=(4, 1, 3)), rng.normal(size=(4, 1, 3))
    o, lse = attention(q, k, v, AttentionParams(scale=1.0), q_positions=[-1, 2])
    assert np.array_equal(o[0], np.zeros((2, 3))) and np.all(np.isneginf(lse[0]))
    assert np.all(np.isfinite(lse[1])) and np.any(o[1] != 0)


def test_attention_no_keys_gives_empty_state() -> None:
    o, lse = attention(
        np.ones((1, 1, 2)),
        np.zeros((0, 1, 2)),
        np.zeros((0, 1, 2)),
        AttentionParams(scale=1.0),
        q_positions=[0],
    )
    assert o.shape == (1, 1, 2) and not o.any() and np.isneginf(lse).all()


def test_attention_softcap_bounds_logits() -> None:
    # Huge logits capped at c = 2: every logit lies in (-2, 2), so weights differ by < e^4.
    q, k = np.full((1, 1, 1), 100.0), np.array([[[1.0]], [[-1.0]]])
    v = np.array([[[1.0]], [[0.0]]])
    o, _ = attention(q, k, v, AttentionParams(scale=1.0, softcap=2.0))
    assert o[0, 0, 0] == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(-2)), rel=1e-12)


def test_kv_head_map_groups_consecutive_heads() -> None:
    assert kv_head_map(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert kv_head_map(4, 1).tolist() == [0, 0, 0, 0]  # MQA
    assert kv_head_map(4, 4).tolist() == [0, 1, 2, 3]  # MHA


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"scale": 0.0}, "scale"),
        ({"scale": math.nan}, "scale"),
        ({"scale": 1.0, "sliding_window": 0}, "sliding_window=0"),
        ({"scale": 1.0, "sliding_window": 2.5}, "sliding_window=2.5"),
        ({"scale": 1.0, "sliding_window": True}, "sliding_window=True"),
        ({"scale": 1.0, "softcap": -1.0}, "softcap=-1.0"),
        ({"scale": 1.0, "softcap": math.inf}, "softcap=inf"),
    ],
)
def test_attention_params_rejects(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(AttentionShapeError, match=needle):
        AttentionParams(**kwargs)  # type: ignore[arg-type]


def test_attention_rejects_bad_shapes_with_numbers() -> None:
    p = AttentionParams(scale=1.0)
    with pytest.raises(AttentionShapeError, match="num_q_heads=3, num_kv_heads=2") as err:
        attention(np.zeros((1, 3, 2)), np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), p)
    assert err.value.numbers == {"num_q_heads": 3, "num_kv_heads": 2}
    with pytest.raises(AttentionShapeError, match="q_len=3, num_keys=2"):
        attention(np.zeros((3, 1, 2)), np.zeros((2, 1, 2)), np.zeros((2, 1, 2)), p)
    with pytest.raises(AttentionShapeError, match="q_head_dim=2, k_head_dim=3"):
        attention(np.zeros((1, 1, 2)), np.zeros((2, 1, 3)), np.zeros((2, 1, 3)), p)
    with pytest.raises(AttentionShapeError, match="non-finite"):
        attention(np.full((1, 1, 2), np.nan), np.zeros((2, 1, 2)), np.zeros((2, 1, 2)), p)
    with pytest.raises(AttentionShapeError, match="k and v"):
        attention(np.zeros((1, 1, 2)), np.zeros((2, 1, 2)), np.zeros((3, 1, 2)), p)
    with pytest.raises(AttentionShapeError, match="integers"):
        attention(
            np.zeros((1, 1, 2)), np.zeros((2, 1, 2)), np.zeros((2, 1, 2)), p, q_positions=[0.5]
        )


def test_attention_error_is_an_invalid_argument_error() -> None:
    from spec.errors import InvalidArgumentError, PagedKVError

    err = AttentionShapeError("seq_len must be >= 0", sequence=2, seq_len=-1)
    assert isinstance(err, InvalidArgumentError) and isinstance(err, PagedKVError)
    assert isinstance(err, ValueError)
    assert (err.name, err.value, err.reason) == ("sequence", 2, "seq_len must be >= 0")
    assert str(err) == "seq_len must be >= 0 (sequence=2, seq_len=-1)"
