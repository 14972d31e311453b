"""Rebuild a model's tokenizer from the vocabulary stored in GGUF metadata.

A GGUF file has no ``tokenizer.json``: llama.cpp stores the tokens (``tokenizer.ggml.tokens``),
their types (normal, control, user-defined, byte), the merges or scores, and a pre-tokenizer
name. The two BPE flavours are rebuilt here as ``tokenizers`` pipelines equal to the ones
transformers builds for the same file. A SentencePiece vocabulary is not self-describing: Gemma's
and Phi-3's files need conventions of their own, chosen by ``general.architecture`` (as
transformers' and llama.cpp's loaders choose them), see :func:`tokenizer_from_gguf`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from fast.tokenizer.tokenizer import Tokenizer, TokenizerError

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Architectures whose SentencePiece ('llama') vocabulary has its own conventions.
_GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})
_PHI3_ARCHS = frozenset({"phi3"})
# The special tokens transformers' SentencePiece tokenizer classes name by default, in the order
# it registers them (bos, eos, unk, pad, mask): added as special tokens, at a new id when absent.
_GEMMA_DEFAULT_SPECIALS = ("<bos>", "<eos>", "<unk>", "<pad>", "<mask>")
_LLAMA_DEFAULT_SPECIALS = ("<s>", "</s>", "<unk>")
_NAMED_SPECIAL_IDS = (  # the file's named special tokens, in the same order
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
)


class UnsupportedGGUFTokenizerError(TokenizerError):
    """A GGUF file's tokenizer cannot be rebuilt exactly as transformers and llama.cpp build it:
    refused, naming the file (``.path``) and the reason, instead of tokenizing text differently."""

    def __init__(self, path: str | None, reason: str) -> None:
        super().__init__(f"GGUF tokenizer of {path or 'this file'}: {reason}")
        self.path = path
        self.reason = reason


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


def tokenizer_from_gguf(metadata: Mapping[str, Any], path: str | Path | None = None) -> Tokenizer:
    """Build from the ``tokenizer.ggml.*`` metadata of a GGUF file (``path`` names it in errors).

    ``gpt2``: byte-level BPE from the stored tokens and merges (SmolLM2, Llama 3, Qwen2).
    ``llama``: SentencePiece-style BPE with byte fallback (Llama 2, Mistral); when the file
    stores no merges they are recovered from the token scores. Both match what transformers
    builds for the same file. A ``llama`` vocabulary of a Gemma (``gemma``, ``gemma2``,
    ``gemma3``) or Phi-3 (``phi3``) file follows that model's conventions instead:

    * Gemma: no space is prepended to the text (the files say
      ``tokenizer.ggml.add_space_prefix = false``), each space becomes U+2581; tokens made only of
      whitespace with a space in them are stored with real spaces and are looked up as U+2581
      runs; the merges (none are stored) are ranked by the tokens' order in the file, not by
      their scores.
    * Phi-3: the prefix space is prepended to each stretch of text between special tokens, not
      only to the first (so ``" hi"`` starts with two U+2581).

    Both add the file's BOS (``tokenizer.ggml.add_bos_token``, default true) and EOS
    (``add_eos_token``) to every encoding, as transformers does, even to text that already starts
    with BOS. A Gemma file saying ``add_space_prefix = true`` or a Phi-3 file saying ``false``
    (transformers ignores the key, llama.cpp follows it), a stored merge that is not two tokens
    and a special token id outside the vocabulary raise :class:`UnsupportedGGUFTokenizerError`.

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
    arch = metadata.get("general.architecture")
    if kind == "llama" and (arch in _GEMMA_ARCHS or arch in _PHI3_ARCHS):
        where = None if path is None else str(path)
        return _model_sentencepiece(metadata, tokens, types, arch in _GEMMA_ARCHS, where)
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


def _model_sentencepiece(
    metadata: Mapping[str, Any],
    tokens: list[str],
    types: list[int],
    gemma: bool,
    path: str | None,
) -> Tokenizer:
    """Gemma's or Phi-3's SentencePiece vocabulary, built as transformers builds it: the BPE
    pipeline of that model, then the added tokens in the order transformers adds them (its
    tokenizer class's default special tokens, the file's control and user-defined tokens, the
    file's named special tokens), which decides their ids and which ones decoding skips."""
    model = "Gemma" if gemma else "Phi-3"
    prefix = metadata.get("tokenizer.ggml.add_space_prefix")
    if prefix is not None and bool(prefix) != (not gemma):
        raise UnsupportedGGUFTokenizerError(
            path,
            f"tokenizer.ggml.add_space_prefix = {bool(prefix)} in a {model} vocabulary, whose "
            f"tokenizer {'never' if gemma else 'always'} prepends a space (transformers ignores "
            f"the key, llama.cpp follows it)",
        )
    if gemma:  # whitespace-only tokens are stored with real spaces: look them up as U+2581
        spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    else:
        spelled = tokens
    vocab = {t: i for i, t in enumerate(spelled)}
    if "tokenizer.ggml.merges" in metadata:
        merges: list[tuple[str, str]] = []
        for merge in metadata["tokenizer.ggml.merges"]:
            parts = merge.split(" ")
            if len(parts) != 2:
                raise UnsupportedGGUFTokenizerError(
                    path, f"the stored merge {merge!r} is not two tokens separated by one space"
                )
            merges.append((parts[0], parts[1]))
    elif gemma:  # the file's order is the merge order; the scores are not
        merges = _merges_from_scores(vocab, {t: -float(i) for i, t in enumerate(spelled)})
    else:
        scores = list(metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
        merges = _merges_from_scores(vocab, dict(zip(spelled, scores)))
    named: list[str] = []
    for key in _NAMED_SPECIAL_IDS:
        value = metadata.get(key)
        if value is None:
            continue
        if not 0 <= int(value) < len(tokens):
            raise UnsupportedGGUFTokenizerError(
                path, f"{key} = {value} is outside the vocabulary of {len(tokens)} tokens"
            )
        named.append(tokens[int(value)])
    defaults: tuple[str, ...]
    decode: list[decoders.Decoder] = [
        decoders.Replace("\u2581", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if gemma:
        backend = Backend(
            models.BPE(
                vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", byte_fallback=True
            )
        )
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        defaults = _GEMMA_DEFAULT_SPECIALS
        named.append("<mask>")
    else:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        decode.append(decoders.Strip(" ", 1, 0))
        defaults = _LLAMA_DEFAULT_SPECIALS
    backend.decoder = decoders.Sequence(decode)
    # The order matters: a token added twice keeps the last flags for encoding, and decoding
    # skips it if it was ever added as special; a token absent from the vocabulary gets a new id.
    backend.add_tokens([AddedToken(t, special=True) for t in defaults])
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, k in zip(tokens, types)
        if k == _CONTROL
    ]
    if control:
        backend.add_special_tokens(control)
    known = backend.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED and t in known
    ]
    if user:
        backend.add_tokens(user)
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for i, t in enumerate(named) if t not in added and t not in named[:i]]
    if missing:
        backend.add_tokens([AddedToken(t, special=True) for t in missing])

    def named_id(key: str) -> tuple[str, int] | None:
        value = metadata.get(key)
        if value is None:
            return None
        token = tokens[int(value)]
        token_id = backend.token_to_id(token)
        return None if token_id is None else (token, int(token_id))

    bos, eos = named_id(_NAMED_SPECIAL_IDS[0]), named_id(_NAMED_SPECIAL_IDS[1])
    add_bos = bos is not None and bool(metadata.get("tokenizer.ggml.add_bos_token", True))
    add_eos = eos is not None and bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    single = " ".join(
        ([f"{bos[0]}:0"] if add_bos and bos else [])
        + ["$A:0"]
        + ([f"{eos[0]}:0"] if add_eos and eos else [])
    )
    pair = " ".join(
        [single]
        + ([f"{bos[0]}:1"] if add_bos and bos else [])
        + ["$B:1"]
        + ([f"{eos[0]}:1"] if add_eos and eos else [])
    )
    special = ([bos] if add_bos and bos else []) + ([eos] if add_eos and eos else [])
    try:
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )
    except Exception as e:  # the Rust library raises a bare Exception on a bad template
        raise UnsupportedGGUFTokenizerError(
            path, f"its BOS/EOS tokens {special} cannot be written as a template ({e})"
        ) from e
    eos_ids = {
        int(metadata[k])
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if k in metadata
    }
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    return Tokenizer(
        backend,
        bos_token_id=int(bos_id) if bos_id is not None else None,
        eos_token_ids=eos_ids,
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=False,  # the post-processor adds BOS (and EOS) as transformers' does
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
