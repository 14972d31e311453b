"""Request and sequence state of the engine.

A :class:`Sequence` is one stream of tokens: its prompt, the tokens generated so far, how many of
them have their KV computed, where it sits in the scheduler's queues, and the text decoded so far.
The engine appends sampled tokens; the scheduler moves it between queues.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fast.engine.outputs import Logprob


class SequenceStatus(enum.Enum):
    """Where a sequence is: in one of the scheduler's queues, or finished (and why)."""

    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        """The sequence produces no more tokens."""
        return self._value_ in _FINISHED


#: the FINISHED_* members' values (compared by value: str hashes are cached, Enum's are not)
_FINISHED = frozenset(s.value for s in SequenceStatus if s.name.startswith("FINISHED_"))


class StopPlan(NamedTuple):
    """One sequence's stop rules in the terms of its total length (prompt + output tokens)."""

    min_len: int  # below this length (min_tokens not reached) no token or string stops it
    stop_ids: frozenset[int]  # ids that stop it: EOS (unless ignore_eos), stop_token_ids
    eos: frozenset[int]  # those of stop_ids that are EOS (stop_reason None); empty: ignore_eos
    stop_strings: bool  # it has stop strings to look for in the new text
    length: int  # at this length it stops with "length" (max_tokens or max_model_len)


@dataclass(eq=False)
class Sequence:
    """The mutable state of one generated sequence.

    Attributes:
        seq_id: the block manager's id of the sequence.
        request_id: the user's id of the request it belongs to.
        arrival: arrival index (first come, first served); smaller is older.
        prompt_token_ids: the prompt.
        token_ids: prompt followed by every generated token.
        num_computed: tokens whose KV is computed (or computed by the step in flight).
        in_pool: the block manager holds blocks of this sequence (device or host).
        pending: the last token was sampled and is not yet in the block manager.
        index: the sequence's index among its request's ``n`` samples.
        cache_key: the prefix cache's extra key; only sequences with equal keys share cached
            blocks (None for almost every request).
    """

    seq_id: int
    request_id: str
    arrival: int
    prompt_token_ids: list[int]
    sampling_params: Any = None
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    in_pool: bool = False
    pending: bool = False
    status: SequenceStatus = SequenceStatus.WAITING
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per output token
    output_text: str = ""
    stop_reason: int | str | None = None
    index: int = 0  # which of the request's n sequences this is
    cache_key: str | None = None  # the block manager's extra key (None: shared prefix cache)
    stop_plan: StopPlan | None = None  # StopChecker.plan(self), made by the first check

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens."""
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        """The sequence is done."""
        return self.status._value_ in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """``"stop"`` or ``"length"`` (``"abort"`` when aborted) once finished, else None."""
        value = self.status._value_
        return value if value in _FINISHED else None

    def append_token(self, token_id: int, logprob: float | None = None) -> None:
        """Record one sampled token (the scheduler learns of it through ``update``)."""
        self.token_ids.append(int(token_id))
        if logprob is not None:
            self.cumulative_logprob += float(logprob)


def all_finished(group: list[Sequence]) -> bool:
    """Every sequence of ``group`` is finished: ``all(seq.is_finished for seq in group)``
    without a property call per sequence (the engine asks once per request per step)."""
    for seq in group:
        if seq.status._value_ not in _FINISHED:
            return False
    return True
