"""Beam search parameters and outputs, with vLLM's names (``BeamSearchParams``,
``BeamSearchOutput.sequences``, ``BeamSearchSequence.tokens / text / cum_logprob``).

The search itself is :mod:`fast.engine.beam_search`; ``docs/beam-search.md`` defines it.

>>> p = BeamSearchParams(beam_width=4, max_tokens=8)
>>> p.length_penalty, p.early_stopping, p.length_normalization
(1.0, 'never', 'generated')
>>> def error(**kwargs):
...     try:
...         BeamSearchParams(**kwargs)
...     except InvalidBeamSearchParamsError as e:
...         return f"{type(e).__name__}: {e.name}={e.value!r}: {e.reason}"
>>> error(beam_width=True, max_tokens=4)
'InvalidBeamSearchParamsError: beam_width=True: must be an int >= 1, not a bool'
>>> error(beam_width=2, max_tokens=4, early_stopping="sometimes")
"InvalidBeamSearchParamsError: early_stopping='sometimes': must be True, False or 'never'"
>>> error(beam_width=2, max_tokens=4, beam_witdh=3)
'UnknownBeamSearchParamError: beam_witdh=3: not a BeamSearchParams field; did you mean beam_width?'
>>> beam_score(-6.0, num_generated=3, prompt_len=5, ends_with_eos=False, params=p)  # -6 / 3
-2.0
>>> vllm = BeamSearchParams(beam_width=4, max_tokens=8, length_normalization="total")
>>> beam_score(-6.0, num_generated=3, prompt_len=5, ends_with_eos=True, params=vllm)  # -6 / 7
-0.857142857142857
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

from fast.engine.outputs import Logprob
from spec.errors import InvalidArgumentError, PagedKVError

__all__ = [
    "BeamSearchParams",
    "BeamSearchSequence",
    "BeamSearchOutput",
    "BeamBlockStats",
    "InvalidBeamSearchParamsError",
    "UnknownBeamSearchParamError",
    "EngineBusyError",
    "beam_score",
]

#: The values of ``early_stopping`` (transformers' names).
EARLY_STOPPING = (True, False, "never")
#: The values of ``length_normalization``: transformers' (the generated tokens) or vLLM's
#: (prompt and output, without a final EOS).
LENGTH_NORMALIZATION = ("generated", "total")


class InvalidBeamSearchParamsError(InvalidArgumentError):
    """A beam search parameter out of its domain; ``name``, ``value`` and ``reason`` say which."""


class UnknownBeamSearchParamError(InvalidBeamSearchParamsError, TypeError):
    """A keyword that is not a field of :class:`BeamSearchParams`; ``suggestions`` lists the
    close field names."""

    def __init__(self, name: str, value: object, suggestions: list[str]) -> None:
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(name, value, f"not a BeamSearchParams field{hint}")


class EngineBusyError(PagedKVError):
    """Beam search needs the engine to itself: it refuses to start while requests added with
    ``add_request`` (or a ``generate``/``stream`` call) are unfinished.

    Attributes: ``num_unfinished`` (sequences waiting, running or swapped).
    """

    def __init__(self, num_unfinished: int) -> None:
        self.num_unfinished = num_unfinished
        super().__init__(
            f"beam search needs an idle engine: {num_unfinished} sequence(s) of other requests "
            "are unfinished (finish or abort them first)"
        )


@dataclass(frozen=True)
class BeamSearchParams:
    """How to run one beam search (vLLM's fields first, then pagedkv's two options).

    Attributes:
        beam_width: beams kept per prompt, and sequences returned per prompt (``k``).
        max_tokens: most tokens generated per beam (fewer where the prompt is close to
            ``max_model_len``).
        ignore_eos: EOS is an ordinary token (no beam finishes before ``max_tokens``).
        temperature: the log-probabilities are those of ``softmax(logits / temperature)``;
            0 (the default) or 1 leave the model's distribution as it is. The search stays
            deterministic (vLLM also draws one sampled token per beam when it is > 0).
        length_penalty: a finished beam's score is its cumulative log-probability divided by
            ``length ** length_penalty`` (0: no normalization; > 0 favours longer sequences).
        include_stop_str_in_output: the text of a beam that ended with EOS ends with the EOS
            token's text.
        early_stopping: transformers' rule for when a prompt's search ends before
            ``max_tokens``: ``"never"`` (the default) stops only when no live beam can beat the
            worst of the ``k`` finished ones (the result equals running to ``max_tokens``),
            ``False`` uses transformers' default heuristic (the live beam's score at its current
            length), ``True`` stops as soon as ``k`` beams have finished.
        length_normalization: the ``length`` of ``length_penalty``: ``"generated"``
            (transformers: generated tokens, EOS included) or ``"total"`` (vLLM: prompt and
            generated tokens, a final EOS excluded).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = "never"
    length_normalization: str = "generated"

    def __new__(cls, *args: Any, **kwargs: Any) -> BeamSearchParams:
        for name, value in kwargs.items():
            if name not in _FIELDS:
                raise UnknownBeamSearchParamError(
                    name, value, difflib.get_close_matches(name, _FIELDS, n=3, cutoff=0.6)
                )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> InvalidBeamSearchParamsError:
            return InvalidBeamSearchParamsError(name, getattr(self, name), reason)

        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be an int >= 1, not a bool")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0, not a bool")
        if not _is_number(self.length_penalty):
            raise bad("length_penalty", "must be a finite number, not a bool")
        if not any(
            self.early_stopping is v or (isinstance(v, str) and self.early_stopping == v)
            for v in EARLY_STOPPING
        ):
            raise bad("early_stopping", "must be True, False or 'never'")
        if self.length_normalization not in LENGTH_NORMALIZATION:
            raise bad("length_normalization", "must be 'generated' or 'total'")


_FIELDS = [f.name for f in fields(BeamSearchParams)]


def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalized_length(
    num_generated: int, prompt_len: int, ends_with_eos: bool, params: BeamSearchParams
) -> int:
    """The ``length`` a score divides by (see :attr:`BeamSearchParams.length_normalization`)."""
    if params.length_normalization == "generated":
        return num_generated
    return prompt_len + num_generated - (1 if ends_with_eos else 0)


def beam_score(
    cum_logprob: float,
    *,
    num_generated: int,
    prompt_len: int,
    ends_with_eos: bool,
    params: BeamSearchParams,
) -> float:
    """A finished beam's score: ``cum_logprob / length ** length_penalty``."""
    length = normalized_length(num_generated, prompt_len, ends_with_eos, params)
    return float(cum_logprob / length**params.length_penalty)


@dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's fields; ``score``, ``finish_reason``'s values and
    ``output_token_ids`` as in pagedkv's ``CompletionOutput``).

    Attributes:
        tokens: the prompt's token ids followed by the generated ones (vLLM's layout).
        logprobs: one dict per generated token, ``{token_id: Logprob}`` for the chosen token
            (its log-probability under the search's distribution and its rank there).
        cum_logprob: the sum of the generated tokens' log-probabilities (EOS included).
        text: the generated text (without the prompt; an ending EOS only with
            ``include_stop_str_in_output``); None without a tokenizer.
        finish_reason: ``"stop"`` (ended with EOS) or ``"length"`` (``max_tokens`` or
            ``max_model_len``).
        score: ``cum_logprob`` divided by the normalized length to the ``length_penalty``:
            what the beams are ranked by (transformers' ``sequences_scores``).
        num_prompt_tokens: how many of ``tokens`` are the prompt.
    """

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    score: float = 0.0
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        """The generated token ids (``tokens`` without the prompt)."""
        return self.tokens[self.num_prompt_tokens :]


@dataclass(frozen=True)
class BeamBlockStats:
    """How much sharing saved, for one prompt's search.

    At every step (after the step's appends), ``physical`` is the number of distinct device
    blocks the prompt's live beams hold, and ``unshared`` the number they would hold if no
    block were shared (the sum of each beam's table length). The fields are the maxima over
    the steps, and the totals of both over the steps (block-steps).
    """

    peak_physical_blocks: int = 0
    peak_unshared_blocks: int = 0
    physical_block_steps: int = 0
    unshared_block_steps: int = 0
    copied_blocks: int = 0  # copy-on-write copies (a beam continued on a shared partial block)
    forks: int = 0  # beams started by fork (a beam chosen more than once)
    frees: int = 0  # beams dropped (chosen zero times) or finished, freed at once


@dataclass
class BeamSearchOutput:
    """The beams of one prompt, best first (vLLM's ``sequences``; at most ``beam_width``),
    with pagedkv's figures: the prompt's block sharing (``blocks``) and the prompt tokens
    found in the prefix cache (``num_cached_tokens``, as in ``RequestOutput``)."""

    sequences: list[BeamSearchSequence]
    blocks: BeamBlockStats = field(default_factory=BeamBlockStats)
    num_cached_tokens: int = 0
