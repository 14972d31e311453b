"""The GGUF loader on small synthetic files written with gguf.GGUFWriter.

A random tiny Llama is written the way llama.cpp's converter writes it (Q/K rows permuted, each
weight in one of F32/F16/BF16/Q8_0/Q4_0/Q4_1, a byte-level BPE vocabulary); our loader and
transformers' GGUF loader must then give the same logits, and our reader the same metadata and
bytes as gguf.GGUFReader.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fast.loader import ModelNotFoundError, load_model
from fast.loader.dequant import permute_qk
from fast.loader.gguf_file import GGUFFormatError, read_gguf
from fast.model import allocate_kv_caches
from fast.model.attention_context import AttentionContext
from fast.tokenizer.gguf import byte_spelling, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")  # a test extra; the GPU machine lacks it

transformers = pytest.importorskip("transformers")

TYPES = ["Q8_0", "Q4_0", "Q4_1", "BF16", "F16", "F32"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def vocabulary() -> list[str]:
    spelled = byte_spelling()
    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIAL + [spelled[b] for b in range(256)] + merged


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    leaf = ".".join(parts[3:])
    if leaf.endswith(".bias"):
        return f"blk.{parts[2]}.{GGUF_NAMES[leaf[:-5] + '.weight'][:-7]}.bias"
    return f"blk.{parts[2]}.{GGUF_NAMES[leaf]}"


#: ``encode(gguf_name, float32 values, index) -> (tensor, raw ggml type or None)``
Encoder = Callable[[str, np.ndarray, int], tuple[np.ndarray, Any]]


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool,
    seed: int,
    arch: str = "llama",
    rope_freqs: np.ndarray | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    encode: Encoder | None = None,
) -> dict[str, Any]:
    """Write a random tiny Llama (or Qwen2, with Q/K/V biases) as GGUF; return its config.

    Matrices are stored in the types of ``TYPES`` in turn, or as ``encode`` returns them
    (values already Q/K-permuted; a raw type means a uint8 ``[rows, row bytes]`` tensor).
    """
    tokens = vocabulary()
    cfg = dict(
        vocab_size=len(tokens),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        layers=2,
        heads=4,
        kv_heads=2,
        theta=10000.0,
        eps=1e-5,
    )
    rng = np.random.default_rng(seed)
    head_dim = cfg["hidden_size"] // cfg["heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_layer_norm_rms_eps(cfg["eps"])
    w.add_rope_freq_base(cfg["theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (len(tokens), h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (len(tokens), h)
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (cfg["kv_heads"] * head_dim, h),
                p + "self_attn.v_proj.weight": (cfg["kv_heads"] * head_dim, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
        if arch == "qwen2":
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (h,),
                    p + "self_attn.k_proj.bias": (cfg["kv_heads"] * head_dim,),
                    p + "self_attn.v_proj.bias": (cfg["kv_heads"] * head_dim,),
                }
            )
    for k, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            if name.endswith(".bias"):
                values -= 1.0
            w.add_tensor(gguf_name(name), values)
            continue
        values = (0.15 * rng.standard_normal(shape)).astype(np.float32)
        if "q_proj" in name and arch == "llama":
            values = permute_qk(values, cfg["heads"])
        elif "k_proj" in name and arch == "llama":
            values = permute_qk(values, cfg["kv_heads"])
        if encode is not None:
            data, raw_type = encode(gguf_name(name), values, k)
            w.add_tensor(gguf_name(name), data, raw_dtype=raw_type)
            continue
        qname = TYPES[k % len(TYPES)]
        qtype = gguf.GGMLQuantizationType[qname]
        if qname == "F32":
            w.add_tensor(gguf_name(name), values)
        elif qname == "F16":
            w.add_tensor(gguf_name(name), values.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg


@pytest.fixture(
    scope="module",
    params=[("llama", False), ("llama", True), ("qwen2", False)],
    ids=["llama-untied", "llama-tied", "qwen2-bias"],
)
def tiny_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, tied = request.param
    path = tmp_path_factory.mktemp(f"gguf-{arch}") / "tiny.gguf"
    write_tiny_gguf(path, tied=tied, seed=7, arch=arch)
    return path


def test_reader_equals_gguf_reader(tiny_gguf: Path) -> None:
    metadata, tensors = read_gguf(tiny_gguf)
    reader = gguf.GGUFReader(str(tiny_gguf))
    ref = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert metadata == ref
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert ours.type_id == int(theirs.tensor_type)
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape.tolist()))
        np.testing.assert_array_equal(ours.data, np.asarray(theirs.data).reshape(-1).view(np.uint8))
    assert {t.type_id for t in tensors} >= {0, 1, 2, 3, 8, 30}


def test_logits_and_greedy_equal_transformers_gguf_loader(tiny_gguf: Path) -> None:
    lm = load_model(str(tiny_gguf))
    assert lm.config.num_key_value_heads == 2 and lm.config.head_dim == 16
    assert lm.config.attention_bias == ("qwen2" in str(tiny_gguf.parent))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([1, 80, 40, 200, 5, 33, 261, 262, 7, 100, 12])
    n, bs = len(ids), 4
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
        caches = allocate_kv_caches(lm.config, 8, bs, torch.float32, "cpu")
        ctx = AttentionContext.build([[3, 1, 7, 0, 5, 2]], [0], [n], bs)
        got = lm.model.compute_logits(lm.model(ids, torch.arange(n), ctx, caches))
        assert (got - want).abs().max().item() < 1e-4
        seq, tok = ids.tolist(), int(got[-1].argmax())
        for step in range(6):  # paged decode vs full recomputation
            seq.append(tok)
            ctx = AttentionContext.build([[3, 1, 7, 0, 5, 2]], [n + step], [1], bs)
            h = lm.model(torch.tensor([tok]), torch.tensor([n + step]), ctx, caches)
            tok = int(lm.model.compute_logits(h).argmax())
            assert tok == int(ref(torch.tensor(seq)[None]).logits[0, -1].argmax())


def test_tokenizer_equals_transformers_gguf_tokenizer(tiny_gguf: Path) -> None:
    lm = load_model(str(tiny_gguf))
    assert lm.tokenizer is not None
    ref = transformers.AutoTokenizer.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name
    )
    for text in ["hello world", "hello  world\n", "<|im_start|>user\nhello<|im_end|>", "é 1 2", ""]:
        ids = lm.tokenizer.encode(text)
        assert ids == ref.encode(text)
        assert lm.tokenizer.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert lm.tokenizer.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert lm.tokenizer.encode("hello world") == [3 + 256 + 3, 3 + 256 + 8]
    assert lm.tokenizer.bos_token_id == 1 and lm.tokenizer.eos_token_ids == {2}
    messages = [{"role": "user", "content": "hi"}]
    assert lm.tokenizer.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_missing_path_raises_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="nope.gguf") as info:
        load_model(str(missing))
    assert info.value.path == str(missing)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="weights.bin"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_not_a_gguf_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(GGUFFormatError, match="magic"):
        load_model(str(bad))


def write_sentencepiece_gguf(path: Path, with_merges: bool) -> list[str]:
    """Tokenizer-only metadata of a Llama-2 style ('llama') vocabulary: specials, 256 byte
    tokens, then scored pieces; merges stored or left to be recovered from the scores."""
    pieces = [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "▁h",
        "he",
        "ll",
        "llo",
        "▁he",
        "▁hello",
        "▁w",
        "or",
        "▁wor",
        "▁world",
        "ld",
        "▁t",
        "t",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    if with_merges:
        w.add_token_merges(
            [
                "▁ h",
                "h e",
                "l l",
                "ll o",
                "▁h e",
                "▁he llo",
                "▁ w",
                "o r",
                "▁w or",
                "l d",
                "▁wor ld",
                "▁ t",
            ]
        )
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@pytest.mark.parametrize("with_merges", [False, True])
def test_sentencepiece_tokenizer_equals_transformers(tmp_path: Path, with_merges: bool) -> None:

    path = tmp_path / "sp.gguf"
    tokens = write_sentencepiece_gguf(path, with_merges)
    metadata, _ = read_gguf(path)
    tok = tokenizer_from_gguf(metadata)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello world", " hello  world", "héllo wörld 🤖", "the world", "", "\n\t"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert ids[:1] == [1] or text == ""  # BOS by default for SentencePiece vocabularies
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.encode("hello world", add_special_tokens=False) == [
        tokens.index("▁hello"),
        tokens.index("▁world"),
    ]
    assert tok.decode(tok.encode("héllo 🤖")) == "héllo 🤖"  # byte fallback round trip


def test_rope_freqs_tensor_equals_llama3_scaling(tmp_path: Path) -> None:
    """Llama-3.1 GGUF files carry rope scaling as per-frequency divisors (rope_freqs.weight)."""
    from dataclasses import replace

    from fast.model import LlamaForCausalLM
    from fast.model.config import RopeScaling
    from fast.model.rope import inverse_frequencies

    scaling = RopeScaling(8.0, 1.0, 4.0, 32)
    factors = inverse_frequencies(16, 10000.0) / inverse_frequencies(16, 10000.0, scaling)
    assert (factors > 1.5).any() and (factors == 1).any()
    path = tmp_path / "rf.gguf"
    write_tiny_gguf(path, tied=True, seed=9, rope_freqs=factors.numpy())
    lm = load_model(str(path))
    assert lm.config.rope_freq_factors is not None and len(lm.config.rope_freq_factors) == 8
    twin = LlamaForCausalLM(replace(lm.config, rope_freq_factors=None, rope_scaling=scaling))
    twin.load_state_dict(lm.model.state_dict())
    plain = LlamaForCausalLM(replace(lm.config, rope_freq_factors=None))
    plain.load_state_dict(lm.model.state_dict())
    ids = torch.arange(3, 40)
    outs = []
    with torch.no_grad():
        for model in (lm.model, twin, plain):
            caches = allocate_kv_caches(lm.config, 10, 4, torch.float32, "cpu")
            ctx = AttentionContext.build([list(range(10))], [0], [len(ids)], 4)
            outs.append(model.compute_logits(model(ids, torch.arange(len(ids)), ctx, caches)))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4
    assert (outs[0] - outs[2]).abs().max().item() > 1e-3  # the factors matter
