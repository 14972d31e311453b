"""GGUF files of the architectures beyond Llama: Qwen3, Gemma 2, Gemma 3 (text) and Phi-3.

A tiny random transformers model (its own config class, as in
``tests/fast/model/test_architectures.py``) is written as GGUF the way llama.cpp's converter
writes that architecture (:func:`write_gguf`: tensor names from the ``gguf`` package's own
HF -> GGUF name map, Gemma's norms stored as ``1 + w``, Phi-3's fused ``attn_qkv`` / ``ffn_up``
and LongRoPE factor tensors, the converter's metadata keys). Then, in float32 on the CPU:

* **Q4_K_M against transformers' GGUF loader.** The matrices are random K-quant blocks mixed
  as llama.cpp's Q4_K_M mixes them (Q4_K; Q6_K for ``output``, ``attn_v``, ``ffn_down``; Q5_K
  for Phi-3's ``attn_qkv``); the norms F32. ``AutoModelForCausalLM.from_pretrained(dir,
  gguf_file=...)`` loads the same file; the dequantized weights must be identical (norms
  included, after Gemma's shift) and the greedy tokens equal. transformers' GGUF loader reads
  fewer keys than llama.cpp (no Qwen3 ``key_length``, no soft-caps, no Gemma 3 local rope base,
  no rope scaling, no Phi-3 window or LongRoPE), so these models use the values transformers
  assumes for what it does not read (Qwen3 ``head_dim`` 128, Gemma ``head_dim`` and
  ``query_pre_attn_scalar`` 256, caps 50 / 30, ...).
* **What transformers cannot read from GGUF, against the checkpoint the file was written
  from.** Models with the features transformers' GGUF loader drops (Qwen3 ``head_dim`` 32 and
  linear rope scaling; Gemma 2 soft-caps 5 / 3 and window 8; Gemma 3 local rope base 100, linear
  x2 rope scaling and window 8 over six layers; Phi-3 LongRoPE, partial rotary and window 8) are
  written in F32 / F16 / Q8_0 and the transformers model is given the values the file holds
  (rounded through the same encodings); pagedkv's greedy tokens from the file must equal that
  transformers model's (= transformers loading the Hugging Face directory the file was written
  from).

Every reference is checked to have no near-tie (top-1 minus top-2 logit >= 1e-3 along the
greedy path) and to be non-degenerate.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # hf_reference
from hf_reference import greedy_reference, reference_margin  # noqa: E402
from offline import no_network  # noqa: E402, F401 - a fixture
from test_loader_gguf import MERGES, SPECIAL, vocabulary  # noqa: E402
from test_loader_kquants import random_blocks  # noqa: E402

from fast.api.llm import LLM  # noqa: E402
from fast.engine.sampling_params import SamplingParams  # noqa: E402
from fast.loader import load_model  # noqa: E402
from fast.loader.gguf import (  # noqa: E402
    UnsupportedGGUFArchitectureError,
    UnsupportedGGUFError,
)
from fast.loader.gguf_arch import CONVENTIONS, config_from_gguf  # noqa: E402
from fast.loader.gguf_file import GGUFTensor  # noqa: E402
from fast.model.config import (  # noqa: E402
    InvalidModelConfigError,
    LinearRopeScaling,
    LongRopeScaling,
)
from fast.model.registry import ARCHITECTURES, UnsupportedArchitectureError  # noqa: E402

T = gguf.GGMLQuantizationType
VOCAB = len(vocabulary())  # 268: the byte-level BPE vocabulary of test_loader_gguf
MAX_TOKENS, MIN_MARGIN = 8, 1e-3
ARCH = {"Qwen3Config": "qwen3", "Gemma2Config": "gemma2", "Gemma3TextConfig": "gemma3"}
ARCH["Phi3Config"] = "phi3"

#: ``encode(gguf name, float32 values) -> (data, raw ggml type or None for float32)``
Encoder = Callable[[str, np.ndarray], tuple[np.ndarray, Any]]


def build_hf(kind: str, overrides: dict[str, Any], seed: int, embedding_std: float = 0.3) -> Any:
    """A seeded transformers model: weights N(0, 0.3^2) (embeddings N(0, embedding_std^2)),
    norms perturbed around neutral."""
    torch.manual_seed(seed)
    config = getattr(transformers, kind)(**copy.deepcopy({"vocab_size": VOCAB, **overrides}))
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # around 1 (Qwen, Phi) or 0 (Gemma's 1 + w)
            else:
                p.normal_(0.0, embedding_std if "embed_tokens" in name else 0.3)
    return model


def _rope(config: Any) -> dict[str, Any]:
    """transformers 5's rope parameters of the global layers."""
    params = dict(config.rope_parameters or {})
    return dict(params.get("full_attention", params))


def write_gguf(
    path: Path, hf: Any, encode: Encoder, extra: dict[str, np.ndarray] | None = None
) -> None:
    """Write ``hf`` as llama.cpp's ``convert_hf_to_gguf.py`` would (module docstring).

    Each tensor goes through ``encode``; a raw type means ``data`` is ``[rows, row bytes]``.
    ``extra`` tensors are added as they are (F32).
    """
    c = hf.config
    arch = ARCH[type(c).__name__]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = _rope(c)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch != "phi3":  # the converters write the head size where config.json has one
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma3":
        w.add_rope_freq_base_swa(c.rope_parameters["sliding_attention"]["rope_theta"])
        w.add_sliding_window(c.sliding_window)
    extra = dict(extra or {})
    if arch == "phi3":
        head_dim = c.hidden_size // c.num_attention_heads
        rot = int(rope.get("partial_rotary_factor", 1.0) * head_dim)
        w.add_rope_dimension_count(rot)
        w.add_sliding_window(c.sliding_window or 0)
        original = c.original_max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(original)
        if rope.get("rope_type") == "longrope":
            s = c.max_position_embeddings / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(s) / math.log(original)))
            extra["rope_factors_long.weight"] = np.array(rope["long_factor"], np.float32)
            extra["rope_factors_short.weight"] = np.array(rope["short_factor"], np.float32)
    tokens = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for hf_name, tensor in hf.state_dict().items():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(stem)
        if gguf_name is None:  # lm_head of Gemma 2 (tied), rotary buffers
            assert "rotary" in hf_name or (arch == "gemma2" and stem == "lm_head"), hf_name
            continue
        name = f"{gguf_name}.{suffix}"
        values = tensor.float().numpy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            values = values + np.float32(1.0)  # Gemma's norm multiplies by 1 + w
        data, raw = encode(name, values)
        w.add_tensor(name, data, raw_dtype=raw)
    for name, values in extra.items():
        w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def q4_k_m(seed: int, tied: bool, std: float = 0.1, embedding_std: float = 0.1) -> Encoder:
    """Random K-quant matrices in llama.cpp's Q4_K_M mix; 1-D tensors stay F32.

    As in llama.cpp's quantizer, a tied ``token_embd`` is quantized as the output projection
    it also is (Q6_K).
    """
    rng = np.random.default_rng(seed)

    def encode(name: str, values: np.ndarray) -> tuple[np.ndarray, Any]:
        if values.ndim == 1:
            return values, None
        output = name == "output.weight" or (tied and name == "token_embd.weight")
        if output or name.endswith(("attn_v.weight", "ffn_down.weight")):
            qname = "Q6_K"
        elif name.endswith("attn_qkv.weight"):
            qname = "Q5_K"
        else:
            qname = "Q4_K"
        sd = embedding_std if name == "token_embd.weight" else std
        return random_blocks(rng, qname, values.shape, sd), T[qname]

    return encode


def exact_encoder(store: dict[str, np.ndarray]) -> Encoder:
    """F32 / F16 / Q8_0 in turn (1-D tensors F32); ``store`` gets what each tensor decodes to."""
    kinds = ["Q8_0", "F16", "F32"]

    def encode(name: str, values: np.ndarray) -> tuple[np.ndarray, Any]:
        kind = "F32" if values.ndim == 1 else kinds[len(store) % 3]
        if kind == "F32":
            data, raw = values.astype(np.float32), None
            store[name] = data
        elif kind == "F16":
            data, raw = values.astype(np.float16), None
            store[name] = data.astype(np.float32)
        else:
            data, raw = gguf.quants.quantize(values, T.Q8_0), T.Q8_0
            store[name] = gguf.quants.dequantize(data, T.Q8_0).reshape(values.shape)
        return data, raw

    return encode


def adopt_file_values(hf: Any, store: dict[str, np.ndarray]) -> None:
    """Give ``hf`` the values the file holds (what llama.cpp's encodings rounded them to)."""
    arch = ARCH[type(hf.config).__name__]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf.config.num_hidden_layers)
    with torch.no_grad():
        for hf_name, p in hf.named_parameters():
            stem, _, suffix = hf_name.rpartition(".")
            gguf_name = names.get_name(stem)
            if gguf_name is None:
                continue
            values = torch.from_numpy(store[f"{gguf_name}.{suffix}"])
            if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
                values = values - 1.0  # (1 + w) - 1: exact for |w| <= 1, as 1 + that is 1 + w
            p.copy_(values.reshape(p.shape))


def prompts(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]


def pagedkv_greedy(path: Path, batch: list[list[int]]) -> tuple[Any, list[list[int]]]:
    lm = load_model(str(path))
    llm = LLM(lm, num_gpu_blocks=32, block_size=4, device="cpu", enforce_eager=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], greedy, use_tqdm=False)
    return lm, [list(o.outputs[0].token_ids) for o in outs]


def check_reference(hf: Any, batch: list[list[int]]) -> list[list[int]]:
    want = greedy_reference(hf, batch, MAX_TOKENS)
    assert all(len(set(w)) >= 3 for w in want), f"degenerate reference {want}"
    margin = reference_margin(hf, batch, want)
    assert margin >= MIN_MARGIN, f"reference has a near-tie ({margin:.1e}): pick another seed"
    return want


# -- Q4_K_M files, against transformers loading the same file

#: what transformers' GGUF loader can represent; K-quant rows are 256-element super-blocks
KQUANT: dict[str, tuple[str, dict[str, Any], int]] = {
    "qwen3": (  # head_dim 128 (Qwen3Config's default, which transformers assumes) != 256 / 4
        "Qwen3Config",
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=128,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
        0,
    ),
    "gemma2": (  # tied, as llama.cpp stores Gemma 2; window 8 on layers 0 and 2
        "Gemma2Config",
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=8,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        ),
        0,
    ),
    "gemma3": (  # window 8 on layers 0-4, global layer 5
        "Gemma3TextConfig",
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=8,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
        0,
    ),
    "phi3": (
        "Phi3Config",
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
        0,
    ),
}
KQUANT_PROMPT_SEED: dict[str, int] = {}  # prompt seeds whose references have no near-tie


@pytest.mark.usefixtures("no_network")  # transformers reads the local file offline
@pytest.mark.parametrize("case", sorted(KQUANT))
def test_q4_k_m_greedy_equals_transformers_gguf_loader(case: str, tmp_path: Path) -> None:
    kind, overrides, seed = KQUANT[case]
    hf = build_hf(kind, overrides, seed)
    path = tmp_path / f"tiny-{case}-Q4_K_M.gguf"
    tied = hf.config.tie_word_embeddings  # tiny tied Gemma: small embeddings, or it repeats
    write_gguf(path, hf, q4_k_m(seed, tied=tied, embedding_std=0.01 if tied else 0.1))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert type(ref).__name__ == type(hf).__name__
    batch = prompts(KQUANT_PROMPT_SEED.get(case, 7), (7, 20))
    want = check_reference(ref, batch)
    lm, got = pagedkv_greedy(path, batch)
    assert lm.config.architecture == type(hf).__name__
    c = ref.config  # windows, score scale and soft-caps as transformers read them
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    assert lm.config.layer_windows == tuple(
        c.sliding_window if t == "sliding_attention" else None for t in types
    )
    assert lm.config.attention_scale == ref.model.layers[0].self_attn.scaling
    caps = (getattr(c, "attn_logit_softcapping", None), getattr(c, "final_logit_softcapping", None))
    assert (lm.config.attn_logit_softcap, lm.config.final_logit_softcap) == caps
    ours, theirs = lm.model.state_dict(), ref.state_dict()
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert torch.equal(ours[norm], theirs[norm])  # Gemma: the file's 1 + w, shifted back alike
    assert torch.equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])
    if case == "phi3":
        fused = "model.layers.1.self_attn.qkv_proj.weight"
        assert torch.equal(ours[fused], theirs[fused])
    else:
        q = ours["model.layers.1.self_attn.qkv_proj.weight"][: lm.config.q_size]
        assert torch.equal(q, theirs["model.layers.1.self_attn.q_proj.weight"])
        if lm.config.qk_norm:
            k_norm = "model.layers.0.self_attn.k_norm.weight"
            assert torch.equal(ours[k_norm], theirs[k_norm])
    assert got == want


# -- what transformers' GGUF loader drops, against the checkpoint the file was written from

SMALL: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, max_position_embeddings=128)
FEATURES: dict[str, tuple[str, dict[str, Any], int]] = {
    "qwen3": (  # head_dim 32 != 64 / 4, linear x2 rope scaling
        "Qwen3Config",
        dict(
            SMALL,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
        ),
        1,
    ),
    "gemma2": (  # soft-caps 5 and 3, window 8 on layers 0 and 2; llama.cpp's scale head_dim
        "Gemma2Config",
        dict(
            SMALL,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        ),
        1,
    ),
    "gemma3": (  # local rope base 100 (layers 0-4 slide), linear x2 on the global layer 5
        "Gemma3TextConfig",
        dict(
            SMALL,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,
            rope_theta=10000.0,
            rope_local_base_freq=100.0,
            rope_scaling=dict(rope_type="linear", factor=2.0),
            tie_word_embeddings=False,
        ),
        3,
    ),
    "phi3": (  # head_dim 96, half of it rotated, LongRoPE (threshold 16), window 8
        "Phi3Config",
        dict(
            SMALL,
            hidden_size=192,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            sliding_window=8,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            partial_rotary_factor=0.5,
            rope_scaling=dict(
                rope_type="longrope",
                short_factor=[1.0 + 0.05 * i for i in range(24)],
                long_factor=[1.0 + 0.5 * i for i in range(24)],
            ),
            pad_token_id=0,
            eos_token_id=2,
        ),
        4,
    ),
}
#: (windows, (attention, final) soft-caps) the loaded config must have
EXPECTED: dict[str, tuple[tuple[int | None, ...], tuple[float | None, float | None]]] = {
    "qwen3": ((None, None), (None, None)),
    "gemma2": ((8, None, 8), (5.0, 3.0)),
    "gemma3": ((8, 8, 8, 8, 8, None), (None, None)),
    "phi3": ((8, 8), (None, None)),
}
FEATURE_PROMPT_SEED: dict[str, int] = {}


@pytest.mark.parametrize("case", sorted(FEATURES))
def test_features_greedy_equals_source_checkpoint(case: str, tmp_path: Path) -> None:
    kind, overrides, seed = FEATURES[case]
    tied = bool(overrides.get("tie_word_embeddings"))  # tiny tied Gemma: small embeddings
    hf = build_hf(kind, overrides, seed, embedding_std=0.05 if tied else 0.3)
    store: dict[str, np.ndarray] = {}
    path = tmp_path / f"tiny-{case}.gguf"
    write_gguf(path, hf, exact_encoder(store))
    adopt_file_values(hf, store)
    # LongRoPE: 4 + 8 tokens stay within the threshold of 16, 20 start past it
    batch = prompts(FEATURE_PROMPT_SEED.get(case, 7), (4, 20) if case == "phi3" else (7, 20))
    want = check_reference(hf, batch)
    lm, got = pagedkv_greedy(path, batch)
    windows, caps = EXPECTED[case]
    assert lm.config.layer_windows == windows
    assert (lm.config.attn_logit_softcap, lm.config.final_logit_softcap) == caps
    assert lm.config.attention_scale == hf.model.layers[0].self_attn.scaling
    if case == "gemma3":
        assert (lm.config.rope_theta, lm.config.rope_local_theta) == (10000.0, 100.0)
    if case == "phi3":
        scaling = lm.config.rope_scaling
        assert isinstance(scaling, LongRopeScaling) and lm.config.rotary_dimension == 48
        assert scaling.original_max_position_embeddings == 16
        assert abs(scaling.attention_factor - 1.5**0.5) < 1e-6  # sqrt(1 + ln 4 / ln 16)
    assert got == want


# -- refusals and metadata


def test_every_registered_gguf_architecture_has_conventions() -> None:
    registered = {g for a in ARCHITECTURES for g in a.gguf_names}
    assert registered == set(CONVENTIONS) == {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}


def test_unsupported_architecture_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedGGUFArchitectureError) as err:
        load_model(str(path))
    e = err.value
    assert isinstance(e, UnsupportedArchitectureError) and isinstance(e, UnsupportedGGUFError)
    assert isinstance(e, InvalidModelConfigError)  # reported by the CLI as a bad model
    assert e.name == "falcon" and e.path == str(path)
    assert e.supported == ("gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen3")
    assert str(e) == (
        "GGUF architecture 'falcon' is not supported; supported: gemma2, gemma3, llama, phi3, "
        f"qwen2, qwen3 (in {path})"
    )


def _metadata(arch: str, **extra: Any) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    md = {
        "general.architecture": arch,
        f"{arch}.block_count": 2,
        f"{arch}.context_length": 64,
        f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 96,
        f"{arch}.attention.head_count": 2,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        **{f"{arch}.{k}": v for k, v in extra.items()},
    }
    empty = np.zeros(0, np.uint8)
    return md, {"token_embd.weight": GGUFTensor("token_embd.weight", (10, 64), 0, empty)}


def test_metadata_conventions() -> None:
    # Gemma's score scale: key_length ** -0.5, but hidden / heads at the 27B depths
    md, tensors = _metadata("gemma2", **{"attention.key_length": 16})
    assert config_from_gguf(md, tensors).attention_scale == 16**-0.5
    md["gemma2.block_count"] = 46
    c = config_from_gguf(md, tensors)
    assert c.attention_scale == 32**-0.5 and (c.attn_logit_softcap, c.final_logit_softcap) == (
        50.0,
        30.0,
    )
    assert c.tie_word_embeddings and c.norm_weight_offset == 1.0 and c.sliding_window is None
    md, tensors = _metadata("gemma3", **{"attention.sliding_window": 4, "attention.scale": 0.25})
    c = config_from_gguf(md, tensors)
    assert c.layer_windows == (4, 4) and c.rope_local_theta == 10000.0
    assert c.attention_scale == 0.25 and c.qk_norm and c.final_logit_softcap is None
    md, tensors = _metadata("phi3", **{"rope.dimension_count": 16, "attention.sliding_window": 0})
    c = config_from_gguf(md, tensors)
    assert (c.rotary_dimension, c.sliding_window, c.architecture) == (16, None, "Phi3ForCausalLM")
    # Llama: linear rope scaling (Llama 3's keys are ModelConfig.from_gguf's), a stored scale
    md, tensors = _metadata(
        "llama",
        **{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0, "attention.scale": 0.125},
    )
    c = config_from_gguf(md, tensors)
    assert c.rope_scaling == LinearRopeScaling(4.0) and c.attention_scale == 0.125


@pytest.mark.parametrize(
    ("arch", "extra", "drop", "match"),
    [
        ("qwen3", {"attention.sliding_window": 8}, None, "sliding_window=8"),
        ("qwen3", {"rope.scaling.type": "yarn"}, None, "rope_scaling_type='yarn'"),
        ("qwen2", {"rope.scaling.type": "yarn"}, None, "rope_scaling_type='yarn'"),
        ("qwen3", {"attention.head_count_kv": [1, 2]}, None, r"head_count_kv.*\[1, 2\]"),
        ("gemma3", {"rope.dimension_count": 16}, None, "rope_dimension_count=16"),
        ("gemma2", {"attention.value_length": 16}, None, "value_length=16"),
        ("phi3", {"rope.scaling.type": "longrope"}, None, "without rope_factors"),
        ("phi3", {}, "phi3.attention.layer_norm_rms_epsilon", "layer_norm_rms_epsilon"),
        ("gemma2", {}, "gemma2.context_length", "gemma2.context_length"),
        # values of the wrong kind: named, never a bare TypeError or a silent sign flip
        ("gemma2", {"attention.sliding_window": [4, 4]}, None, r"sliding_window.*\[4, 4\]"),
        ("phi3", {"attention.sliding_window": 2.5}, None, "sliding_window=2.5"),
        ("gemma3", {"attention.layer_norm_rms_epsilon": "x"}, None, "epsilon='x'"),
        ("gemma2", {"attention.layer_norm_rms_epsilon": -1e-6}, None, "epsilon=-1e-06"),
        ("gemma2", {"attn_logit_softcapping": "x"}, None, "softcapping='x'"),
        ("gemma3", {"final_logit_softcapping": -30.0}, None, "softcapping=-30.0"),
        ("gemma2", {"attention.scale": 0.0}, None, "scale=0.0"),
        ("llama", {"attention.scale": -0.125}, None, "scale=-0.125"),
        ("qwen3", {"rope.freq_base": -1.0}, None, "freq_base=-1.0"),
        ("gemma3", {"rope.freq_base_swa": float("nan")}, None, "freq_base_swa=nan"),
        ("qwen3", {"rope.scaling.type": "linear", "rope.scaling.factor": True}, None, "factor"),
    ],
)
def test_metadata_it_cannot_honor_is_refused_by_name(
    arch: str, extra: dict[str, Any], drop: str | None, match: str
) -> None:
    md, tensors = _metadata(arch, **extra)
    md.pop(drop or "", None)
    with pytest.raises(InvalidModelConfigError, match=match):
        config_from_gguf(md, tensors)


def test_unknown_tensor_is_refused_by_name(tmp_path: Path) -> None:
    """A Qwen3-only tensor (per-head norm) in a Gemma 2 file is not silently dropped."""
    kind, overrides, seed = FEATURES["gemma2"]
    hf = build_hf(kind, {**overrides, "num_hidden_layers": 1}, seed)
    path = tmp_path / "extra.gguf"
    extra = {"blk.0.attn_q_norm.weight": np.ones(32, np.float32)}
    write_gguf(path, hf, exact_encoder({}), extra=extra)
    with pytest.raises(UnsupportedGGUFError, match="'blk.0.attn_q_norm.weight'.*gemma2"):
        load_model(str(path))
