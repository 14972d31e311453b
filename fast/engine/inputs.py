"""Prompts at the door: every form vLLM accepts, and a named error for anything else.

``parse_prompts`` takes what a caller passed to ``generate`` (one prompt or a list of them) and
returns one :class:`ParsedPrompt` per prompt, or raises :class:`InvalidPromptError` saying which
prompt (by index) is wrong and why, before anything is queued. The forms:

- a string (tokenized with the model's tokenizer);
- a list of token ids (ints, not bools; numpy integers are ints);
- ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}`` (a ``"prompt"`` next to the ids is
  kept as the prompt's text);
- a list or tuple of any of the above (a list of ints alone is one prompt of ids).

Every prompt must have at least one token, at most ``max_model_len``, each inside the
vocabulary.

>>> from fast.engine.inputs import parse_prompts
>>> [p.token_ids for p in parse_prompts([[1, 2], {"prompt_token_ids": (3,)}], None, 10, 8)]
[[1, 2], [3]]
>>> parse_prompts(["Hi", 5], None, 10, 8)
Traceback (most recent call last):
...
fast.engine.inputs.InvalidPromptError: invalid prompts[0]='Hi': text needs a tokenizer; \
this model has none
>>> parse_prompts([[1, 2], 5], None, 10, 8)
Traceback (most recent call last):
...
fast.engine.inputs.InvalidPromptError: invalid prompts[1]=5: a bare token id among prompts; \
a prompt of token ids is one list of ints
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spec.errors import InvalidArgumentError

__all__ = ["InvalidPromptError", "ParsedPrompt", "parse_prompts", "parse_prompt"]

_KEYS = frozenset({"prompt", "prompt_token_ids"})


class InvalidPromptError(InvalidArgumentError):
    """Prompt ``index`` of the call (None: a single prompt given alone) cannot run.

    Attributes: ``index``, and as every :class:`InvalidArgumentError` ``name``
    (``"prompts[i]"``), ``value`` (the prompt, or the offending part) and ``reason``.
    """

    def __init__(self, index: int | None, value: object, reason: str) -> None:
        self.index = index
        super().__init__("prompt" if index is None else f"prompts[{index}]", value, reason)


@dataclass(frozen=True)
class ParsedPrompt:
    """A checked prompt: its text (None when given as ids) and its token ids."""

    prompt: str | None
    token_ids: list[int]


_PROMPT_LIKE = (str, bytes, bytearray, Mapping, list, tuple, ParsedPrompt)


def _is_token(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def parse_prompts(
    prompts: Any, tokenizer: Any, vocab_size: int, max_model_len: int
) -> list[ParsedPrompt]:
    """One prompt or a list of prompts -> the checked prompts, in order (see the module)."""
    if isinstance(prompts, (str, Mapping)):
        return [parse_prompt(prompts, tokenizer, vocab_size, max_model_len, 0)]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidPromptError(
            None, prompts, f"{type(prompts).__name__} is not a prompt or a list of prompts"
        )
    if prompts and not any(isinstance(p, _PROMPT_LIKE) for p in prompts):
        # no element looks like a prompt: one prompt of token ids (its bad ids are named)
        return [parse_prompt(list(prompts), tokenizer, vocab_size, max_model_len, 0)]
    return [parse_prompt(p, tokenizer, vocab_size, max_model_len, i) for i, p in enumerate(prompts)]


def parse_prompt(
    prompt: Any, tokenizer: Any, vocab_size: int, max_model_len: int, index: int | None = None
) -> ParsedPrompt:
    """One prompt -> a :class:`ParsedPrompt`, or :class:`InvalidPromptError` naming ``index``."""

    def bad(value: object, reason: str) -> InvalidPromptError:
        return InvalidPromptError(index, value, reason)

    text: str | None = None
    if isinstance(prompt, ParsedPrompt):
        text, ids = prompt.prompt, list(prompt.token_ids)
    elif isinstance(prompt, str):
        if tokenizer is None:
            raise bad(prompt, "text needs a tokenizer; this model has none")
        text, ids = prompt, list(tokenizer.encode(prompt))
    elif isinstance(prompt, Mapping):
        extra = sorted(str(k) for k in prompt if k not in _KEYS)
        if extra:
            raise bad(
                dict(prompt), f"unknown keys {extra}; a prompt has 'prompt' or 'prompt_token_ids'"
            )
        if "prompt_token_ids" in prompt:
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise bad(text, "'prompt' next to 'prompt_token_ids' must be a string")
            ids = _token_list(prompt["prompt_token_ids"], bad)
        elif "prompt" in prompt:
            inner = prompt["prompt"]
            if not isinstance(inner, str):
                raise bad(inner, f"'prompt' must be a string, not {type(inner).__name__}")
            return parse_prompt(inner, tokenizer, vocab_size, max_model_len, index)
        else:
            raise bad(dict(prompt), "needs 'prompt' or 'prompt_token_ids'")
    elif isinstance(prompt, (list, tuple)):
        ids = _token_list(prompt, bad)
    elif _is_token(prompt):
        raise bad(
            prompt, "a bare token id among prompts; a prompt of token ids is one list of ints"
        )
    else:
        raise bad(
            prompt,
            f"a {type(prompt).__name__} is not a prompt (a str, a list of token ids, or a dict "
            "with 'prompt' or 'prompt_token_ids')",
        )
    if not ids:
        raise bad(prompt, "empty prompt: it needs at least one token")
    if len(ids) > max_model_len:
        raise bad(len(ids), f"{len(ids)} tokens, longer than max_model_len {max_model_len}")
    for at, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise bad(
                t, f"token id {t} at position {at} is outside the vocabulary [0, {vocab_size})"
            )
    return ParsedPrompt(text, ids)


def _token_list(value: Any, bad: Any) -> list[int]:
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, (list, tuple)):
        raise bad(value, f"token ids must be a list of ints, not a {type(value).__name__}")
    for at, t in enumerate(value):
        if not _is_token(t):
            raise bad(t, f"token id at position {at} is a {type(t).__name__}, not an int")
    return [int(t) for t in value]
