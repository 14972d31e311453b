"""What generation returns, with vLLM's field names and shapes.

>>> from fast.engine.outputs import Logprob, RequestMetrics
>>> lp = Logprob(-0.25, rank=1, decoded_token=" Paris")
>>> lp.logprob, lp.rank, lp.decoded_token
(-0.25, 1, ' Paris')
>>> m = RequestMetrics(arrival_time=100.0)
>>> m.scheduled(100.5); m.token(101.0); m.token(101.25); m.finished(101.25)
>>> m.time_in_queue, m.first_token_time, m.last_token_time, m.finished_time
(0.5, 101.0, 101.25, 101.25)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Logprob:
    """One token's log-probability, as vLLM reports it.

    Attributes:
        logprob: natural log of the token's probability under the model (before any sampling
            setting changes the distribution).
        rank: 1 for the most likely token of the vocabulary, 2 for the next, ...; a sampled
            token's rank counts every token at least as likely as it.
        decoded_token: the token alone, decoded (None without a tokenizer).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: One dict per generated token: the sampled id and the top ``logprobs`` ids.
SampleLogprobs = list[dict[int, Logprob]]
#: One entry per prompt token: None for the first (nothing predicts it), then dicts as above.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestMetrics:
    """When things happened to a request, in seconds since the epoch (``time.time()``), as
    vLLM's ``RequestMetrics`` reports them; None until the event happens.

    Attributes:
        arrival_time: the request was added.
        last_token_time: its latest token was sampled (``arrival_time`` before the first).
        first_scheduled_time: a step first scheduled it.
        first_token_time: its first token was sampled.
        time_in_queue: ``first_scheduled_time - arrival_time`` (seconds).
        finished_time: every sequence of the request finished (or it was aborted).
    """

    arrival_time: float
    last_token_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if self.last_token_time is None:
            self.last_token_time = self.arrival_time

    def snapshot(self) -> RequestMetrics:
        """A copy for an output (the engine keeps updating its own): ``copy.copy``'s result,
        made without its generic machinery (one per request per streaming step)."""
        new = object.__new__(RequestMetrics)
        new.__dict__.update(self.__dict__)
        return new

    def scheduled(self, now: float) -> None:
        """A step scheduled the request (only the first time counts)."""
        if self.first_scheduled_time is None:
            self.first_scheduled_time = now
            self.time_in_queue = now - self.arrival_time

    def token(self, now: float) -> None:
        """A token of the request was sampled."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def finished(self, now: float) -> None:
        """The request is done."""
        if self.finished_time is None:
            self.finished_time = now


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    Attributes:
        index: the sequence's index within its request (0 when ``n == 1``).
        text: the generated text; with a stop string, the text before it.
        token_ids: the generated token ids (a stop token included).
        cumulative_logprob: sum of the raw log-probabilities of the sampled tokens (always
            computed, whether or not ``logprobs`` was asked for).
        logprobs: when asked for, one ``{token_id: Logprob}`` dict per generated token, holding
            the sampled token and the ``logprobs`` most likely ones.
        finish_reason: ``"stop"`` (eos, stop token or stop string), ``"length"`` (max_tokens or
            max_model_len), ``"abort"``, or None while running.
        stop_reason: the stop string or stop token id that ended it; None for eos or length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """The sequence has finished."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its completions so far.

    Attributes:
        request_id: the id given to (or made up by) the engine.
        prompt: the prompt text (None when the prompt was given as token ids).
        prompt_token_ids: the prompt's token ids.
        outputs: one :class:`CompletionOutput` per generated sequence.
        finished: every sequence of the request is done.
        prompt_logprobs: with ``SamplingParams(prompt_logprobs=k)``, None for the first prompt
            token then one ``{token_id: Logprob}`` dict per prompt token (the prompt token and
            the ``k`` most likely at its position); else None.
        metrics: the request's :class:`RequestMetrics`.
        num_cached_tokens: prompt tokens found in the prefix cache when the request was first
            scheduled (0 without prefix caching).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def decode_logprobs(entries: Iterable[dict[int, Logprob] | None], tokenizer: _Decoder) -> None:
    """Fill in ``decoded_token`` of every :class:`Logprob`: each token decoded alone, special
    tokens included (as vLLM does)."""
    for entry in entries:
        if entry is None:
            continue
        for token_id, lp in entry.items():
            if lp.decoded_token is None:
                lp.decoded_token = tokenizer.decode([token_id], skip_special_tokens=False)
