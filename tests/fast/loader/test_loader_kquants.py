"""GGUF K-quants (and every other type the gguf package dequantizes) through the loader.

gguf-py cannot quantize to the K-quants, so the tensors are built from random bytes: every byte
string is a valid K-quant encoding once its float16 super-block scales are finite, and
:func:`random_blocks` writes small finite ones at the offsets of ggml's block layouts
(``SCALE_FIELDS``). A tiny Llama stored the way llama.cpp's Q4_K_M stores it (Q4_K, with Q6_K
for ``output``, ``attn_v`` and ``ffn_down``) must then generate the same greedy tokens in
pagedkv as in transformers, which dequantizes the same file to float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fast.loader import load_model
from fast.loader.dequant import UnsupportedQuantizationError, dequantize, supported_types
from fast.loader.gguf_file import read_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from offline import no_network  # noqa: E402, F401 - a fixture
from test_loader_gguf import write_tiny_gguf  # noqa: E402 - after the importorskip

T = gguf.GGMLQuantizationType
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
#: K-quant -> (byte offset of a float16 scale field, its size relative to the first): ggml's
#: block layouts. The minimum scales ``dmin`` are sized so that the weights are about zero-mean.
SCALE_FIELDS = {
    "Q2_K": [(80, 1.0), (82, 1.5)],  # scales[16] qs[64] d dmin
    "Q3_K": [(108, 1.0)],  # hmask[32] qs[64] scales[12] d
    "Q4_K": [(0, 1.0), (2, 7.5)],  # d dmin scales[12] qs[128]
    "Q5_K": [(0, 1.0), (2, 15.5)],  # d dmin scales[12] qh[32] qs[128]
    "Q6_K": [(208, 1.0)],  # ql[128] qh[64] scales[16] d
}
HIDDEN, FFN = 256, 512  # K-quant rows are whole 256-element super-blocks


def random_blocks(
    rng: np.random.Generator, qname: str, shape: tuple[int, ...], std: float = 0.1
) -> np.ndarray:
    """Random ``qname`` blocks for a float tensor of ``shape``, as uint8 ``[rows, row bytes]``,
    whose dequantized values have about ``std`` standard deviation."""
    elements, nbytes = gguf.GGML_QUANT_SIZES[T[qname]]
    rows, blocks = int(np.prod(shape[:-1])), shape[-1] // elements
    raw = rng.integers(0, 256, (rows, blocks, nbytes), dtype=np.uint8)
    jitter = rng.uniform(0.5, 1.0, (rows, blocks, 1)).astype(np.float32)

    def set_scales(unit: float) -> None:
        for offset, ratio in SCALE_FIELDS[qname]:
            field = (jitter * unit * ratio).astype(np.float16)
            raw[:, :, offset : offset + 2] = field.view(np.uint8)

    set_scales(1.0)
    first = gguf.quants.dequantize(raw.reshape(rows, -1), T[qname])
    set_scales(std / float(first.std()))  # the values are linear in the scales
    return raw.reshape(rows, blocks * nbytes)


def q4_k_m(rng: np.random.Generator) -> Any:
    """llama.cpp's Q4_K_M choice for a 2-layer model: Q6_K where more bits matter."""

    def encode(name: str, values: np.ndarray, index: int) -> tuple[np.ndarray, Any]:
        wide = name == "output.weight" or name.endswith(("attn_v.weight", "ffn_down.weight"))
        qname = "Q6_K" if wide else "Q4_K"
        return random_blocks(rng, qname, values.shape), T[qname]

    return encode


def cycle(rng: np.random.Generator, names: list[str]) -> Any:
    def encode(name: str, values: np.ndarray, index: int) -> tuple[np.ndarray, Any]:
        qname = names[index % len(names)]
        return random_blocks(rng, qname, values.shape), T[qname]

    return encode


@pytest.fixture(scope="module", params=["Q4_K_M", "Q2_K+Q3_K+Q5_K"])
def kquant_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(17)
    encode = q4_k_m(rng) if request.param == "Q4_K_M" else cycle(rng, ["Q2_K", "Q3_K", "Q5_K"])
    path = tmp_path_factory.mktemp("kquants") / f"tiny-{request.param}.gguf"
    write_tiny_gguf(
        path, tied=False, seed=3, hidden_size=HIDDEN, intermediate_size=FFN, encode=encode
    )
    return path


@pytest.mark.usefixtures("no_network")  # transformers reads the local file offline
def test_greedy_tokens_equal_transformers(kquant_gguf: Path) -> None:
    from fast import LLM, SamplingParams

    _, tensors = read_gguf(kquant_gguf)
    types = {gguf.GGMLQuantizationType(t.type_id).name for t in tensors if len(t.shape) == 2}
    assert types == ({"Q4_K", "Q6_K"} if "Q4_K_M" in kquant_gguf.name else {"Q2_K", "Q3_K", "Q5_K"})
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(kquant_gguf.parent), gguf_file=kquant_gguf.name, dtype=torch.float32
    ).eval()
    lm = load_model(str(kquant_gguf))
    prompts = [[1, 80, 40, 200, 5, 33, 261], [7, 100, 12, 3]]
    with torch.no_grad():  # the dequantized weights themselves, Q/K un-permuted alike
        ours, theirs = lm.model.state_dict(), ref.state_dict()
        q = ours["model.layers.1.self_attn.qkv_proj.weight"][:HIDDEN]
        assert torch.equal(q, theirs["model.layers.1.self_attn.q_proj.weight"])
        assert torch.equal(ours["lm_head.weight"], theirs["lm_head.weight"])
        want = []
        for p in prompts:
            ids = torch.tensor([p])
            out = ref.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=8,
                min_new_tokens=8,
                eos_token_id=None,
                pad_token_id=None,
            )
            want.append(out[0, len(p) :].tolist())
    llm = LLM(lm, num_gpu_blocks=32, device="cpu")
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == want
    assert len({t for seq in want for t in seq}) > 2  # not a degenerate model


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN scales
@pytest.mark.parametrize("type_id", sorted(supported_types()))
def test_dequantize_equals_gguf_package(type_id: int, tmp_path: Path) -> None:
    """Any bytes (NaN scales included) dequantize as the package does, through our reader."""
    qtype = T(type_id)
    elements, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    shape = (3, 2, 2 * max(elements, 32))
    rng = np.random.default_rng(type_id)
    raw = rng.integers(0, 256, (6, shape[-1] // elements * nbytes), dtype=np.uint8)
    path = tmp_path / "one.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    if qtype in (T.F32, T.F16):  # stored as their numpy dtype, not as raw bytes
        dtype = np.float32 if qtype == T.F32 else np.float16
        w.add_tensor("t", raw.view(dtype).reshape(shape))
    else:
        w.add_tensor("t", raw.reshape(*shape[:-1], -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tensor,) = read_gguf(path)[1]
    assert (tensor.name, tensor.shape, tensor.type_id) == ("t", shape, type_id)
    got = dequantize(tensor.data, tensor.type_id, tensor.shape, tensor.name)
    want = gguf.quants.dequantize(raw, qtype).reshape(shape)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32


def test_kquants_and_iquants_are_accepted() -> None:
    names = set(supported_types().values())
    assert set(K_QUANTS) <= names
    assert {"IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ3_S", "IQ1_M"} <= names  # gguf 0.19's i-quants
    assert not {"Q8_1", "Q8_K", "I8", "I32"} & names  # no dequantizer in the package


def test_q4_k_block_by_hand() -> None:
    """One Q4_K super-block built from ggml's layout: d, dmin, 12 bytes of 6-bit (scale, min)
    pairs for the 8 sub-blocks of 32, then 128 bytes whose low nibbles are sub-block 2c and
    high nibbles sub-block 2c + 1 of each 64-element chunk c."""
    sc = [1, 2, 3, 4, 5, 6, 7, 40]  # 40 and 30 keep their top two bits in bytes 3 and 7
    mn = [0, 2, 4, 6, 8, 10, 12, 30]
    scales = bytearray(12)
    for j in range(4):
        scales[j] = (sc[j] & 63) | (sc[j + 4] >> 4) << 6
        scales[j + 4] = (mn[j] & 63) | (mn[j + 4] >> 4) << 6
        scales[j + 8] = (sc[j + 4] & 15) | (mn[j + 4] & 15) << 4
    i = np.arange(128)
    qs = ((i % 16) | (15 - i % 16) << 4).astype(np.uint8)
    block = np.frombuffer(
        np.float16(0.5).tobytes() + np.float16(0.25).tobytes() + bytes(scales) + qs.tobytes(),
        dtype=np.uint8,
    )
    assert block.size == 144
    got = dequantize(block, int(T.Q4_K), (256,))
    e = np.arange(256)
    sub, within = e // 32, e % 32
    byte = qs[32 * (sub // 2) + within]
    q = np.where(sub % 2 == 0, byte & 15, byte >> 4)
    want = 0.5 * np.array(sc)[sub] * q - 0.25 * np.array(mn)[sub]
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_undequantizable_type_is_refused_before_loading(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def encode(name: str, values: np.ndarray, index: int) -> tuple[np.ndarray, Any]:
        if name == "blk.1.ffn_up.weight":  # a type files never hold
            raw = rng.integers(0, 256, (values.shape[0], values.shape[1] // 256 * 292))
            return raw.astype(np.uint8), T.Q8_K
        return random_blocks(rng, "Q4_K", values.shape), T.Q4_K

    path = tmp_path / "q8k.gguf"
    write_tiny_gguf(
        path, tied=True, seed=1, hidden_size=HIDDEN, intermediate_size=FFN, encode=encode
    )
    with pytest.raises(UnsupportedQuantizationError, match=r"'blk.1.ffn_up.weight'.*Q8_K") as e:
        load_model(str(path))
    assert e.value.type_id == 15 and "Q6_K" in str(e.value)
