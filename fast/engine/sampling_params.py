"""Per-request sampling parameters, with vLLM's names and defaults.

>>> from fast.engine.sampling_params import InvalidSamplingParamsError, SamplingParams
>>> SamplingParams(temperature=0.0, max_tokens=8).is_greedy
True
>>> SamplingParams(stop="###").stop
['###']
>>> def error(**kwargs):
...     try:
...         SamplingParams(**kwargs)
...     except InvalidSamplingParamsError as e:
...         return f"{type(e).__name__}: {e.name}={e.value!r}: {e.reason}"
>>> error(top_p=1.5)
'InvalidSamplingParamsError: top_p=1.5: must be a number in (0, 1]'
>>> error(temperature=True)
'InvalidSamplingParamsError: temperature=True: must be a finite number >= 0, not a bool'
>>> try:
...     SamplingParams(max_token=8)  # a typo
... except InvalidSamplingParamsError as e:
...     print(type(e).__name__, e.name, e.suggestions)
UnknownSamplingParamError max_token ['max_tokens', 'min_tokens']
"""

from __future__ import annotations

import difflib
import enum
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from spec.errors import InvalidArgumentError

GREEDY_EPS = 1e-5  # a temperature below this is greedy (vLLM's convention)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

#: ``processor(output_token_ids, logits) -> logits`` or
#: ``processor(prompt_token_ids, output_token_ids, logits) -> logits`` on one row ``[V]``.
LogitsProcessor = Callable[..., Any]


class InvalidSamplingParamsError(InvalidArgumentError):
    """A sampling parameter is out of its domain; ``name``, ``value`` and ``reason`` say which."""


class UnknownSamplingParamError(InvalidSamplingParamsError, TypeError):
    """A keyword that is not a field of :class:`SamplingParams` (a typo, or a vLLM option this
    engine does not have); ``suggestions`` lists the close field names."""

    def __init__(self, name: str, value: object, suggestions: list[str]) -> None:
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(name, value, f"not a SamplingParams field{hint}")


class RequestOutputKind(enum.IntEnum):
    """What a streaming engine step reports of a request (vLLM's ``RequestOutputKind``).

    ``CUMULATIVE``: everything so far (each output repeats the earlier tokens and text).
    ``DELTA``: only what is new since the request's last output -- the new token ids, the new
    text (minus the last ``len(longest stop string) - 1`` characters while it runs, which a stop
    string found later may still cut), the new logprobs; prompt logprobs in the first output
    only. ``FINAL_ONLY``: one output, when the request finishes.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    Attributes:
        n: number of completions for the prompt.
        presence_penalty: subtracted once from the logit of every token already generated
            (in [-2, 2]; > 0 favours new tokens).
        frequency_penalty: subtracted from a token's logit once per time it was generated
            (in [-2, 2]).
        repetition_penalty: for every token of the prompt or the output, a positive logit is
            divided by it and a negative one multiplied (> 0; 1 is off).
        temperature: softmax temperature; 0 (or below 1e-5) is greedy (argmax).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``.
        top_k: keep the ``top_k`` most likely tokens; 0 or -1 turns it off.
        min_p: drop the tokens whose probability is below ``min_p`` times the most likely
            token's (in [0, 1]; 0 is off).
        seed: per-request seed; the same seed gives the same tokens whatever else is batched.
        max_tokens: most tokens to generate (None: until the model's length limit).
        min_tokens: tokens to generate before EOS or stop token ids may end the request.
        stop: string(s) that end generation (not included in the text by default).
        stop_token_ids: token ids that end generation (in addition to EOS).
        ignore_eos: keep generating after EOS.
        logprobs: return the log-probabilities of this many most likely tokens at each step,
            plus the sampled token's (None: none; 0: only the sampled token's). At most the
            vocabulary size, which the engine checks when the request is added.
        prompt_logprobs: the same for every prompt token after the first (None: none).
        logits_processors: callables applied in order to each row's logits before the
            penalties: ``f(output_token_ids, logits)`` or
            ``f(prompt_token_ids, output_token_ids, logits)``, returning the new logits.
        detokenize, skip_special_tokens, include_stop_str_in_output: output text options.
        output_kind: what ``LLMEngine.step()`` reports of the request each step
            (:class:`RequestOutputKind`: everything so far, only what is new, or only the end).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logits_processors: list[LogitsProcessor] | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __new__(cls, *args: Any, **kwargs: Any) -> SamplingParams:
        # Unknown keywords get a named error with close matches instead of a bare TypeError.
        for name, value in kwargs.items():
            if name not in _FIELDS:
                raise UnknownSamplingParamError(
                    name, value, difflib.get_close_matches(name, _FIELDS, n=3, cutoff=0.6)
                )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(name, getattr(self, name), reason)

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an int >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be a number in [-2, 2]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0, not a bool")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an int >= 1, or 0 / -1 for no limit")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be a number in [0, 1]")
        if self.seed is not None and (
            not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1)
        ):
            raise bad(
                "seed",
                f"must be None or an int in [-2**63, 2**64 - n] (sequence i of n uses seed + i), "
                f"n={self.n}",
            )
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an int >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError(
                "min_tokens", self.min_tokens, f"must be <= max_tokens={self.max_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise bad(name, "must be an int >= 0 or None")
        for name in ("ignore_eos", "detokenize", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad("include_stop_str_in_output", "must be a bool")
        if self.stop and not self.detokenize:  # stop strings are matched in the text (vLLM too)
            raise bad("stop", "stop strings need detokenize=True: they are found in the text")
        if not isinstance(self.output_kind, RequestOutputKind):
            if not _is_int(self.output_kind) or self.output_kind not in set(RequestOutputKind):
                raise bad(
                    "output_kind",
                    "must be a RequestOutputKind (CUMULATIVE, DELTA, FINAL_ONLY) or its value "
                    "0, 1 or 2",
                )
            object.__setattr__(self, "output_kind", RequestOutputKind(self.output_kind))
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None:
            if not isinstance(stop, (list, tuple)):
                raise bad("stop", "must be a non-empty string or a list of them")
            stop = list(stop)
            if not all(isinstance(s, str) and s for s in stop):
                raise bad("stop", "must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise bad("stop_token_ids", "must be a list of ints >= 0")
            ids = list(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise bad("stop_token_ids", "must be a list of ints >= 0")
            object.__setattr__(self, "stop_token_ids", ids)
        if self.logits_processors is not None:
            if callable(self.logits_processors) or not isinstance(
                self.logits_processors, (list, tuple)
            ):
                raise bad("logits_processors", "must be a list of callables")
            procs = list(self.logits_processors)
            if not all(callable(f) for f in procs):
                raise bad("logits_processors", "must be a list of callables")
            object.__setattr__(self, "logits_processors", procs or None)

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raise :class:`InvalidSamplingParamsError` when ``logprobs`` or ``prompt_logprobs``
        asks for more alternatives than the vocabulary has (the engine calls this when the
        request is added, before anything is queued)."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > vocab_size:
                raise InvalidSamplingParamsError(
                    name, value, f"larger than the vocabulary ({vocab_size} tokens)"
                )

    @functools.cached_property
    def is_greedy(self) -> bool:
        """True when the temperature makes sampling an argmax (cached: the engine asks once per
        row per step, and the fields are frozen)."""
        return self.temperature < GREEDY_EPS

    @property
    def top_k_or_none(self) -> int | None:
        """``top_k`` when it limits anything, else None."""
        return self.top_k if self.top_k > 0 else None

    @property
    def has_penalties(self) -> bool:
        """Some presence, frequency or repetition penalty is on."""
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )

    @property
    def text_holdback(self) -> int:
        """Characters at the end of a running sequence's text a stream must withhold:
        ``len(longest stop string) - 1``, since a stop string completed later cuts the text at
        its start and no character sent can be taken back (0 with
        ``include_stop_str_in_output``, where the text is never cut)."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    @functools.cached_property
    def needs_history(self) -> bool:
        """Sampling reads the prompt and output tokens (penalties or logits processors); cached
        as ``is_greedy``."""
        return self.has_penalties or self.logits_processors is not None


_FIELDS = [f.name for f in fields(SamplingParams)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
