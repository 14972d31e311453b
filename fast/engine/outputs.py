"""What generation returns, with vLLM's field names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    Attributes:
        index: the sequence's index within its request (0 when ``n == 1``).
        text: the generated text; with a stop string, the text before it.
        token_ids: the generated token ids (a stop token included).
        cumulative_logprob: sum of the log-probabilities of the sampled tokens.
        logprobs: when asked for, one ``{token_id: logprob}`` dict per generated token.
        finish_reason: ``"stop"`` (eos, stop token or stop string), ``"length"`` (max_tokens or
            max_model_len), ``"abort"``, or None while running.
        stop_reason: the stop string or stop token id that ended it; None for eos or length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
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
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
