"""Gemma's and Phi-3's SentencePiece vocabularies in GGUF files tokenize as transformers does.

Small GGUF files are written with the ``gguf`` package, shaped as llama.cpp's converter writes
these models' vocabularies: control tokens, ``<unk>``, user-defined tokens (chat markers, Gemma's
whitespace runs, stored with real spaces), the 256 byte-fallback tokens ``<0x00>`` to ``<0xFF>``
and a few hundred scored pieces, no merges. pagedkv's tokenizer built from the file must give the
same ids as ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)`` on a fixed set of
strings (leading, trailing and repeated spaces, newlines, tabs, byte fallback, special-token
strings, the empty string), with and without special tokens, decode the same text with and
without ``skip_special_tokens`` (every id alone, and each encoding), and have the same pipeline
(normalizer, pre-tokenizer, model, decoder, post-processor and added tokens, as serialized).

The Gemma vocabulary's scores run against its file order ("yz" comes before "xy" in the file but
scores lower), so merges ranked by score tokenize "xyz" differently from merges in file order.
Each style is also built the Llama 2 way (``general.architecture = "llama"``, what pagedkv did for
every file before) and must then differ from transformers on these strings: the test sees the
conventions. Offline: ``HF_HUB_OFFLINE`` is set and any network connection fails the test.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loader"))
from offline import no_network  # noqa: E402, F401 - a fixture

from fast.loader.gguf_file import read_gguf  # noqa: E402
from fast.tokenizer.gguf import UnsupportedGGUFTokenizerError, tokenizer_from_gguf  # noqa: E402
from fast.tokenizer.tokenizer import Tokenizer  # noqa: E402

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # llama.cpp token types
BYTES = [f"<0x{b:02X}>" for b in range(256)]
WORDS = [
    "hello", "world", "the", "token", "space", "gemma", "phi", "line", "tab", "end", "user",
    "model", "is", "a", "of", "to", "and", "in", "at", "on", "it", "éte", "naïve", "über",
]  # fmt: skip
TEXTS = [
    "",
    " ",
    "   ",
    "hello world",
    " hello  world ",
    "  leading and trailing   ",
    "hello\nworld\n\nthe end\n",
    "\tthe\t\ttoken \t line",
    "a\r\nb",
    "naïve über éte 🤖 日本語",
    "\u3000x\xa0y",
    "xyz xy yz",
    "the model is a token of the world",
]


def pieces() -> list[str]:
    """Every prefix (two characters or more) of each word, with and without the U+2581 space
    marker, after the single characters they are built from: merges reach every piece."""
    chars = sorted({c for w in WORDS for c in w} | set("xyz"))
    out = ["\u2581"] + chars
    for word in WORDS:
        for spelled in ("\u2581" + word, word):
            out += [spelled[:k] for k in range(2, len(spelled) + 1)]
    out += ["yz", "xy"]  # file order: "yz" first (Gemma ranks merges by it, not by the scores)
    return list(dict.fromkeys(out))


def gemma_vocabulary() -> tuple[list[str], list[int]]:
    head = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, USER_DEFINED, USER_DEFINED]
    chat = ["<start_of_turn>", "<end_of_turn>"]
    whitespace = ["\n", "\n\n", "\t", "\t\t", "  ", "   ", "    "]
    tokens = head + chat + whitespace + BYTES + pieces()
    types += [USER_DEFINED] * (len(chat) + 3) + [NORMAL, NORMAL] + [USER_DEFINED] * 2
    assert len(types) == len(head + chat + whitespace)
    types += [BYTE] * 256 + [NORMAL] * (len(tokens) - len(types) - 256)
    return tokens, types


def phi3_vocabulary() -> tuple[list[str], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + BYTES + pieces()
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces())
    added = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
    tokens += added
    types += [CONTROL, USER_DEFINED, CONTROL, USER_DEFINED, USER_DEFINED]
    return tokens, types


def write_gguf(path: Path, arch: str, flags: dict[str, Any] | None = None) -> Path:
    """A tokenizer-only GGUF file of ``arch`` with a Gemma- or Phi-3-shaped vocabulary."""
    flags = dict(flags or {})
    gemma = arch.startswith("gemma")
    tokens, types = gemma_vocabulary() if gemma else phi3_vocabulary()
    if gemma:  # scores against the file order: a score-ranked merge list differs
        scores = [0.0] * (len(tokens) - len(pieces())) + [float(i) for i in range(len(pieces()))]
        ids = {"bos": 2, "eos": 1, "unk": 3, "pad": 0}
    else:
        scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
        ids = {"bos": 1, "eos": tokens.index("<|endoftext|>"), "unk": 0, "pad": 2}
    ids.update(flags.pop("ids", {}))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    for name, value in ids.items():
        if value is not None:
            getattr(w, f"add_{name}_token_id")(value)
    if gemma:
        w.add_add_space_prefix(flags.pop("add_space_prefix", False))
    elif "add_space_prefix" in flags:
        w.add_add_space_prefix(flags.pop("add_space_prefix"))
    for key in ("add_bos_token", "add_eos_token"):
        if key in flags:
            getattr(w, f"add_{key}")(flags.pop(key))
    if "merges" in flags:
        w.add_token_merges(flags.pop("merges"))
    assert not flags, flags
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def mismatches(tok: Tokenizer, ref: Any, texts: Sequence[str]) -> list[str]:
    """Every way ``tok`` differs from transformers' ``ref`` on ``texts``, as readable lines."""
    found = []
    for text in texts:
        for special in (True, False):
            ids, want = tok.encode(text, special), ref.encode(text, add_special_tokens=special)
            if ids != want:
                found.append(f"encode({text!r}, {special}): {ids} != {want}")
    encodings = [ref.encode(t) for t in texts]
    singles = [[i] for i in range(len(ref))]
    for ids in encodings + singles + [[i, j] for i, j in zip(range(len(ref)), range(1, 40))]:
        for skip in (True, False):
            text, want = tok.decode(ids, skip), ref.decode(ids, skip_special_tokens=skip)
            if text != want:
                found.append(f"decode({ids}, {skip}): {text!r} != {want!r}")
    return found


def pipeline(backend_json: str) -> dict[str, Any]:
    return dict(json.loads(backend_json))


MERGES = [  # stored merges (llama.cpp writes none for these models; transformers uses them)
    f"{w[:k]} {w[k]}" for w in ("\u2581hello", "\u2581world", "the") for k in range(1, len(w))
]
CASES = {
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "gemma3-eos-no-bos": ("gemma3", {"add_bos_token": False, "add_eos_token": True}),
    "gemma2-no-unk-id": ("gemma2", {"ids": {"unk": None, "pad": None}}),
    "phi3": ("phi3", {}),
    "phi3-no-bos": ("phi3", {"add_bos_token": False, "add_space_prefix": True}),
    "phi3-bos-eos": ("phi3", {"add_bos_token": True, "add_eos_token": True}),
    "phi3-merges": ("phi3", {"merges": MERGES}),
    "gemma2-merges": ("gemma2", {"merges": MERGES}),
}
SPECIAL_TEXTS = {
    "gemma": [
        "<bos>hello",
        "hello<eos> world",
        "<start_of_turn>user\n  hi there<end_of_turn>\n<start_of_turn>model\n",
        "<mask> a <unk>b<pad>",
        "[multimodal]x  <bos>",
    ],
    "phi3": [
        "<s>hello",
        "<|user|>\nhello  world<|end|>\n<|assistant|>",
        "<|system|> x</s> y<|endoftext|>",
        "<unk> a",
        "hi<|end|> ",
    ],
}


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("case", list(CASES))
def test_encode_decode_equal_transformers(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch, flags = CASES[case]
    path = write_gguf(tmp_path / f"{case}.gguf", arch, flags)
    metadata, _ = read_gguf(path)
    tok = tokenizer_from_gguf(metadata, path)
    ref = reference(path)
    texts = TEXTS + SPECIAL_TEXTS["gemma" if arch.startswith("gemma") else "phi3"]
    assert mismatches(tok, ref, texts) == []
    assert tok.vocab_size == len(ref)
    assert pipeline(tok.backend.to_str()) == pipeline(ref.backend_tokenizer.to_str())
    bos = metadata["tokenizer.ggml.bos_token_id"]
    assert tok.bos_token_id == bos and tok.id_to_token(bos) == ref.bos_token
    assert (tok.encode("hello")[:1] == [bos]) == flags.get("add_bos_token", True)
    if arch.startswith("gemma") and "merges" not in flags:  # ranked by file order
        assert tok.encode("xyz", False) == [tok.backend.token_to_id(t) for t in ("x", "yz")]
        assert tok.encode("a  b", False)[1] == metadata["tokenizer.ggml.tokens"].index("  ")


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_llama_conventions_would_differ(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same vocabulary built the Llama 2 way (before this fix) differs from transformers on
    these strings: the comparison above can fail."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_gguf(tmp_path / "t.gguf", arch)
    metadata, _ = read_gguf(path)
    as_llama = tokenizer_from_gguf({**metadata, "general.architecture": "llama"})
    found = mismatches(as_llama, reference(path), TEXTS)
    assert any(line.startswith("encode(' hello  world ',") for line in found)
    if arch.startswith("gemma"):
        assert any(line.startswith("encode('xyz xy yz',") for line in found)


@pytest.mark.parametrize(
    "arch, flags, reason",
    [
        ("gemma2", {"add_space_prefix": True}, "add_space_prefix = True in a Gemma"),
        ("gemma3", {"add_space_prefix": True}, "never prepends a space"),
        ("phi3", {"add_space_prefix": False}, "add_space_prefix = False in a Phi-3"),
        ("phi3", {"merges": ["\u2581 h", "a b c"]}, "merge 'a b c' is not two tokens"),
        ("gemma2", {"ids": {"pad": 100_000}}, "padding_token_id = 100000 is outside"),
    ],
)
def test_unsupported_files_are_refused_by_name(
    arch: str, flags: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    path = write_gguf(tmp_path / "odd.gguf", arch, flags)
    metadata, _ = read_gguf(path)
    with pytest.raises(UnsupportedGGUFTokenizerError, match=reason) as info:
        tokenizer_from_gguf(metadata, path)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_llama_architecture_is_unchanged(tmp_path: Path) -> None:
    """A Llama file with the same vocabulary keeps the Llama 2 pipeline (Metaspace, prefix
    space on the first stretch only, BOS added by the wrapper)."""
    path = write_gguf(tmp_path / "t.gguf", "gemma2")
    metadata, _ = read_gguf(path)
    tok = tokenizer_from_gguf({**metadata, "general.architecture": "llama"})
    assert tok.backend.normalizer is None and tok.backend.post_processor is None
    assert tok.add_bos_token and tok.encode("<bos>hi")[:2] != [2, 2]
