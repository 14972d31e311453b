"""Per-request sampling parameters, with vLLM's names and defaults.

>>> from fast.engine.sampling_params import SamplingParams
>>> SamplingParams(temperature=0.0, max_tokens=8).is_greedy
True
>>> SamplingParams(stop="###").stop
['###']
>>> SamplingParams(top_p=1.5)
Traceback (most recent call last):
...
fast.engine.sampling_params.InvalidSamplingParamsError: invalid top_p=1.5: must be in (0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from spec.errors import InvalidArgumentError

GREEDY_EPS = 1e-5  # a temperature below this is greedy (vLLM's convention)


class InvalidSamplingParamsError(InvalidArgumentError):
    """A sampling parameter is out of its domain; ``name``, ``value`` and ``reason`` say which."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    Attributes:
        n: number of completions for the prompt.
        temperature: softmax temperature; 0 (or below 1e-5) is greedy (argmax).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``.
        top_k: keep the ``top_k`` most likely tokens; 0 or -1 turns it off.
        seed: per-request seed; the same seed gives the same tokens whatever else is batched.
        max_tokens: most tokens to generate (None: until the model's length limit).
        min_tokens: tokens to generate before EOS or stop token ids may end the request.
        stop: string(s) that end generation (not included in the text by default).
        stop_token_ids: token ids that end generation (in addition to EOS).
        ignore_eos: keep generating after EOS.
        logprobs: return the log-probabilities of this many most likely tokens at each step,
            plus the sampled token's (None: none; 0: only the sampled token's).
        detokenize, skip_special_tokens, include_stop_str_in_output: output text options.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(name, getattr(self, name), reason)

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an int >= 1")
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an int >= 1, or 0 / -1 for no limit")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an int or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an int >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError(
                "min_tokens", self.min_tokens, f"must be <= max_tokens={self.max_tokens}"
            )
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be an int >= 0 or None")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None:
            stop = list(stop)
            if not all(isinstance(s, str) and s for s in stop):
                raise bad("stop", "must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise bad("stop_token_ids", "must be a list of ints >= 0")
            object.__setattr__(self, "stop_token_ids", ids)

    @property
    def is_greedy(self) -> bool:
        """True when the temperature makes sampling an argmax."""
        return self.temperature < GREEDY_EPS

    @property
    def top_k_or_none(self) -> int | None:
        """``top_k`` when it limits anything, else None."""
        return self.top_k if self.top_k > 0 else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
