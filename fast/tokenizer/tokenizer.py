"""Text <-> token ids, chat templates, and incremental detokenization for streaming.

:class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (the Rust BPE), built either from
a model directory's ``tokenizer.json`` or from the vocabulary and merges stored in a GGUF file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as Backend


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given files or metadata."""


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Args:
        backend: the ``tokenizers.Tokenizer`` doing BPE.
        bos_token_id: id of the beginning-of-sequence token, if the model has one.
        eos_token_ids: ids that end generation.
        chat_template: a Jinja2 chat template (Hugging Face conventions), or None.
        add_bos_token: prepend ``bos_token_id`` in :meth:`encode` (for backends without a
            post-processor that already does it).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token and bos_token_id is not None

    # -- basic text <-> ids
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int | None:
        """The smallest end-of-sequence id (the primary one), or None."""
        return min(self.eos_token_ids) if self.eos_token_ids else None

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of ``token_id`` (byte-level spelling), or None."""
        token: str | None = self.backend.id_to_token(token_id)
        return token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text stay whole."""
        ids: list[int] = list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    # -- chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's chat template.

        The template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``
        and any extra keyword arguments, in a sandboxed Jinja2 environment configured as
        transformers configures it (``trim_blocks``, ``lstrip_blocks``).
        """
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template")
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos_id = self.eos_token_id
        eos = self.id_to_token(eos_id) if eos_id is not None else ""
        template = _compile(self.chat_template)
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos or "",
            eos_token=eos or "",
            **kwargs,
        )

    # -- constructors
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``)."""
        root = Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json in {root}")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception on a malformed file
            raise TokenizerError(f"{file} cannot be read: {e}") from e
        cfg = _read_json(root / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))

        def token_id(entry: Any) -> int | None:
            if isinstance(entry, Mapping):
                entry = entry.get("content")
            return backend.token_to_id(entry) if isinstance(entry, str) else None

        bos = token_id(cfg.get("bos_token"))
        eos: set[int] = set()
        primary = token_id(cfg.get("eos_token"))
        if primary is not None:
            eos.add(primary)
        for extra in (
            _read_json(root / "generation_config.json"),
            _read_json(root / "config.json"),
        ):
            value = extra.get("eos_token_id")
            eos.update(value if isinstance(value, list) else [value] if value is not None else [])
            if bos is None and isinstance(extra.get("bos_token_id"), int):
                bos = extra["bos_token_id"]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos,
            chat_template=template,
            add_bos_token=False,
        )  # tokenizer.json's post-processor adds BOS if wanted


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas, for streaming and stop strings.

    Byte-level BPE splits multi-byte characters across tokens, and SentencePiece-style decoders
    change a token's text depending on what precedes it. So each delta is computed as
    ``decode(ids[prefix:]) - decode(ids[prefix:read])`` over a short window that starts a few
    tokens back (``prefix``), and nothing is emitted while the window ends in an incomplete
    character (U+FFFD).

    With a byte-level vocabulary where ``é`` takes two tokens (its UTF-8 bytes):

    >>> from fast.tokenizer.gguf import tokenizer_from_gguf
    >>> tok = tokenizer_from_gguf({
    ...     "tokenizer.ggml.model": "gpt2",
    ...     "tokenizer.ggml.tokens": ["<|endoftext|>", "h", "i", "Ġ", "hi", "Ġhi", "Ã", "©"],
    ...     "tokenizer.ggml.merges": ["h i", "Ġ hi"],
    ... })
    >>> tok.decode([6]) == "\\ufffd"  # the first byte of "é" alone: the replacement character
    True
    >>> detok = IncrementalDetokenizer(tok)
    >>> [detok.add(t) for t in tok.encode("hié hi")]
    ['hi', '', 'é', ' hi']
    >>> detok.text
    'hié hi'
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        window: int = 5,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - window)
        self.text = ""

    def add(self, token_ids: int | Sequence[int]) -> str:
        """Append token id(s); return the newly completed text (possibly empty)."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        after = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
