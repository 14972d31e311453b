"""fast.loader.dequant: the gguf package's dequantizers behind the loader's plumbing (chunks,
``out``, shapes), checked against values quantized by the package and a block built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fast.loader import dequant

gguf = pytest.importorskip("gguf")  # a test extra; the GPU machine lacks it

# the types the package can also quantize, so a round trip is checked too
QUANTIZED = {
    name: int(gguf.GGMLQuantizationType[name])
    for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16", "F32"]
}


def _raw(values: np.ndarray, name: str) -> np.ndarray:
    """Encode values as the file would store them: uint8 bytes, one row per tensor row."""
    qtype = gguf.GGMLQuantizationType[name]
    if name == "F32":
        return values.astype(np.float32).view(np.uint8)
    if name == "F16":
        return values.astype(np.float16).view(np.uint8)
    return np.asarray(gguf.quants.quantize(values, qtype)).view(np.uint8)


@pytest.mark.parametrize("name", sorted(QUANTIZED))
@pytest.mark.parametrize("shape", [(3, 64), (17, 96), (5, 2, 32)])
def test_dequantize_equals_gguf_reference(name: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(name) * 100 + shape[0])
    values = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    values.reshape(-1)[:7] = [0.0, -0.0, 1e-8, 65504.0, -3.5, 0.25, 100.0]
    raw = _raw(values, name)
    qtype = gguf.GGMLQuantizationType[name]
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(shape)
    got = dequant.dequantize(raw, QUANTIZED[name], shape, name="t")
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, ref)
    buf = np.full(shape, np.nan, dtype=np.float32)
    assert dequant.dequantize(raw, QUANTIZED[name], shape, out=buf) is buf
    np.testing.assert_array_equal(buf, ref)
    if name in ("F32", "F16"):
        np.testing.assert_array_equal(
            got, values.astype(np.float16).astype(np.float32) if name == "F16" else values
        )
    else:  # a lossy round trip stays close to the original
        scale = np.abs(values).max()
        assert np.abs(got - values).max() <= 0.2 * scale


def test_q4_1_block_layout_by_hand() -> None:
    """One Q4_1 block: d = 0.5, m = -1, nibbles 0..15 low then 15..0 high."""
    d = np.array([0.5], dtype=np.float16).view(np.uint8)
    m = np.array([-1.0], dtype=np.float16).view(np.uint8)
    low, high = np.arange(16, dtype=np.uint8), np.arange(15, -1, -1, dtype=np.uint8)
    block = np.concatenate([d, m, low | (high << 4)])
    got = dequant.dequantize(block, dequant.Q4_1, (32,))
    want = np.concatenate([low, high]).astype(np.float32) * 0.5 - 1.0
    np.testing.assert_array_equal(got, want)


def test_unsupported_type_is_named() -> None:
    q8k = int(gguf.GGMLQuantizationType.Q8_K)  # llama.cpp's dot-product type: never in files
    with pytest.raises(dequant.UnsupportedQuantizationError, match=r"'blk.0.x'.*Q8_K \(15\)") as e:
        dequant.dequantize(np.zeros(292, np.uint8), q8k, (256,), name="blk.0.x")
    assert "Q4_K, " in str(e.value) and "Q6_K" in str(e.value) and "Q8_1" not in str(e.value)


def test_chunks_cover_a_tensor_larger_than_one_chunk() -> None:
    """A tensor of 2.5 chunks: every element is written, in order, by the chunked calls."""
    shape = (5, dequant.CHUNK_ELEMENTS // 2)
    values = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    raw = _raw(values, "Q8_0")
    got = dequant.dequantize(raw, dequant.Q8_0, shape)
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0))
    assert np.abs(got - values).max() < 0.05 * np.abs(values).max()


def test_wrong_byte_count_raises() -> None:
    with pytest.raises(ValueError, match="33 bytes of Q8_0 data, expected 34"):
        dequant.dequantize(np.zeros(33, np.uint8), dequant.Q8_0, (32,))


def test_out_of_wrong_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\(2, 32\)"):
        dequant.dequantize(
            np.zeros(68, np.uint8), dequant.Q8_0, (2, 32), out=np.empty((64,), np.float32)
        )


def test_block_misaligned_count_raises() -> None:
    with pytest.raises(ValueError, match="40 elements"):
        dequant.dequantize(np.zeros(34, np.uint8), dequant.Q8_0, (40,))


@pytest.mark.parametrize("heads,head_dim,cols", [(1, 4, 3), (4, 8, 5), (3, 64, 2)])
def test_qk_permutation_round_trip_and_definition(heads: int, head_dim: int, cols: int) -> None:
    rng = np.random.default_rng(heads)
    w = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
    permuted = dequant.permute_qk(w, heads)
    # llama.cpp's converter: per head, output row 2*i + j comes from input row j*D/2 + i
    for h in range(heads):
        for i in range(head_dim // 2):
            for j in range(2):
                np.testing.assert_array_equal(
                    permuted[h * head_dim + 2 * i + j], w[h * head_dim + j * head_dim // 2 + i]
                )
    np.testing.assert_array_equal(dequant.unpermute_qk(permuted, heads), w)
    bias = rng.standard_normal(heads * head_dim).astype(np.float32)
    np.testing.assert_array_equal(
        dequant.unpermute_qk(dequant.permute_qk(bias, heads), heads), bias
    )
    assert not np.array_equal(permuted, w) or head_dim == 2
