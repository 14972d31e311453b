"""Rebuild a model's tokenizer from the vocabulary stored in GGUF metadata.

A GGUF file has no ``tokenizer.json``: llama.cpp stores the tokens (``tokenizer.ggml.tokens``),
their types (normal, control, user-defined, byte), the merges or scores, and a pre-tokenizer
name. The two BPE flavours are rebuilt here as ``tokenizers`` pipelines equal to the ones
transformers builds for the same file.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from fast.tokenizer.tokenizer import Tokenizer, TokenizerError

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Pre-tokenizer split patterns for the GGUF ``tokenizer.ggml.pre`` names whose merges were learned
# on a split other than GPT-2's (the default). Same patterns transformers uses for these files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """Build from the ``tokenizer.ggml.*`` metadata of a GGUF file.

    ``gpt2``: byte-level BPE from the stored tokens and merges (SmolLM2, Llama 3, Qwen2).
    ``llama``: SentencePiece-style BPE with byte fallback (Llama 2, Mistral); when the file
    stores no merges they are recovered from the token scores. Both match what transformers
    builds for the same file.

    A byte-level vocabulary of eight tokens (``Ġ`` spells the space byte) with two merges:

    >>> tok = tokenizer_from_gguf({
    ...     "tokenizer.ggml.model": "gpt2",
    ...     "tokenizer.ggml.tokens": ["<|endoftext|>", "h", "i", "Ġ", "hi", "Ġhi", "Ã", "©"],
    ...     "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1, 1, 1],  # 3: control token
    ...     "tokenizer.ggml.merges": ["h i", "Ġ hi"],
    ...     "tokenizer.ggml.eos_token_id": 0,
    ... })
    >>> tok.encode("hi hi"), tok.encode("hi<|endoftext|>"), tok.encode("é")
    ([4, 5], [4, 0], [6, 7])
    >>> tok.decode([4, 5, 0]), tok.decode([4, 5, 0], skip_special_tokens=False)
    ('hi hi', 'hi hi<|endoftext|>')
    >>> tok.eos_token_id, tok.vocab_size
    (0, 8)
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(
            f"GGUF tokenizer model {kind!r} is not supported ('gpt2' "
            f"byte-level BPE or 'llama' SentencePiece BPE)"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    backend = (
        _byte_level_bpe(metadata, tokens)
        if kind == "gpt2"
        else _sentencepiece_bpe(metadata, tokens)
    )
    alphabet = set(byte_spelling().values())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, k in zip(tokens, types)
        if k == _CONTROL and (kind != "gpt2" or set(t) <= alphabet)
    ]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED and t in vocab
    ]
    backend.add_tokens(user)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eos_ids = {int(eos)} if eos is not None else set()
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        eos_ids.add(int(eot))
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
    return Tokenizer(
        backend,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=bool(add_bos),
    )


def _byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> Backend:
    """GPT-2 style: tokens spelled in the 256-character byte alphabet, ByteLevel pre/decoder."""
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    spelling = byte_spelling()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _PRE_SPLITS.get(str(metadata.get("tokenizer.ggml.pre", "")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> Backend:
    """SentencePiece style: spaces as U+2581 with one prepended, unknown bytes as <0xXX>."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        scores = list(metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return backend


def _merges_from_scores(
    vocab: Mapping[str, int], scores: Mapping[str, float]
) -> list[tuple[str, str]]:
    """Every split of a token into two tokens is a merge, ranked by the merged token's score
    (highest first; ties: longer left part, then longer right part, then vocabulary order)."""
    found: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


@lru_cache(maxsize=1)
def byte_spelling() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable bytes spell themselves; the others (space, control bytes, ...) are moved up to
    U+0100 and beyond, so every byte string has a spelling without whitespace:

    >>> spelling = byte_spelling()
    >>> spelling[ord("a")], spelling[ord(" ")], spelling[ord("\\n")]
    ('a', 'Ġ', 'Ċ')
    >>> [spelling[b] for b in "é".encode("utf-8")]
    ['Ã', '©']
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    spelled = dict(zip(printable, map(chr, printable)))
    extra = 0
    for byte in range(256):
        if byte not in spelled:
            spelled[byte] = chr(256 + extra)
            extra += 1
    return spelled
