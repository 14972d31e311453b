"""Stop conditions and incremental detokenization of the engine's sequences.

After each sampled token, in this order (vLLM's): end of sequence (unless ``ignore_eos``), a
``stop_token_ids`` entry, a ``stop`` string in the new text (the text is cut before it), then
``max_tokens`` and ``max_model_len``. The first three finish with ``"stop"``, the last two with
``"length"``.
"""

from __future__ import annotations

from fast.engine.sequence import Sequence, SequenceStatus, StopPlan
from fast.model.config import ModelConfig
from fast.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["StopChecker", "StopPlan"]


class StopChecker:
    """Decides when a sequence is done; keeps its decoded text up to date."""

    def __init__(self, tokenizer: Tokenizer | None, model: ModelConfig, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        eos: set[int] = set()
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        if model.eos_token_id is not None:
            eos |= (
                {model.eos_token_id}
                if isinstance(model.eos_token_id, int)
                else set(model.eos_token_id)
            )
        self.eos_token_ids = frozenset(eos)
        self._detok: dict[int, IncrementalDetokenizer] = {}

    def start(self, seq: Sequence) -> None:
        """Begin tracking ``seq`` (its prompt primes the detokenizer)."""
        params = seq.sampling_params
        if self.tokenizer is not None and getattr(params, "detokenize", True):
            self._detok[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer,
                seq.prompt_token_ids,
                skip_special_tokens=getattr(params, "skip_special_tokens", True),
            )

    def finish(self, seq: Sequence) -> None:
        """Forget ``seq``."""
        self._detok.pop(seq.seq_id, None)

    def plan(self, seq: Sequence) -> StopPlan:
        """``seq``'s stop rules as :meth:`check` reads them: a function of its prompt length,
        its sampling parameters and ``max_model_len``, none of which change, so it is made once
        per sequence (kept on it) instead of re-read from the parameters every token."""
        params = seq.sampling_params
        prompt_len = len(seq.prompt_token_ids)
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        max_tokens = params.max_tokens
        limit = self.max_model_len
        if max_tokens is not None:
            limit = min(limit, prompt_len + max_tokens)
        return StopPlan(
            prompt_len + (getattr(params, "min_tokens", 0) or 0),
            eos | frozenset(params.stop_token_ids or ()),
            eos,
            bool(params.stop),
            limit,
        )

    def check_all(self, seqs: list[Sequence]) -> list[Sequence]:
        """:meth:`check` each of ``seqs`` (each has one new token), in order; return those
        that stop. Without detokenizers, a sequence whose new token stops nothing and whose
        length is below its limit skips the call (what :meth:`check` would find)."""
        stopped = []
        check = self.check
        fast = not self._detok
        for seq in seqs:
            plan = seq.stop_plan
            if fast and plan is not None:
                n = len(seq.token_ids)
                if n < plan.length and (n < plan.min_len or seq.token_ids[-1] not in plan.stop_ids):
                    continue
            if check(seq):
                stopped.append(seq)
        return stopped

    def check(self, seq: Sequence) -> bool:
        """Account for ``seq``'s newest token; set its status and return True when it stops."""
        plan = seq.stop_plan
        if plan is None:
            plan = seq.stop_plan = self.plan(seq)
        ids = seq.token_ids
        token = ids[-1]
        detok = self._detok.get(seq.seq_id) if self._detok else None
        delta = detok.add(token) if detok is not None else ""
        if delta:
            seq.output_text += delta
        n = len(ids)
        if n >= plan.min_len:
            if token in plan.stop_ids:  # eos first (no stop reason), then stop_token_ids
                reason = None if token in plan.eos else token
                return self._stop(seq, SequenceStatus.FINISHED_STOPPED, reason)
            if delta and plan.stop_strings:
                stop = self._find_stop_string(seq, len(delta))
                if stop is not None:
                    return self._stop(seq, SequenceStatus.FINISHED_STOPPED, stop)
        if n >= plan.length:  # max_tokens, or max_model_len
            return self._stop(seq, SequenceStatus.FINISHED_LENGTH, None)
        return False

    def _find_stop_string(self, seq: Sequence, new_chars: int) -> str | None:
        stops = seq.sampling_params.stop
        if not stops or not new_chars:
            return None
        if isinstance(stops, str):
            stops = [stops]
        text = seq.output_text
        for stop in stops:
            # Only a match that ends inside the new characters is new.
            begin = max(0, len(text) - new_chars - len(stop) + 1)
            at = text.find(stop, begin)
            if at != -1:
                keep = (
                    at + len(stop)
                    if getattr(seq.sampling_params, "include_stop_str_in_output", False)
                    else at
                )
                seq.output_text = text[:keep]
                return str(stop)
        return None

    @staticmethod
    def _stop(seq: Sequence, status: SequenceStatus, reason: int | str | None) -> bool:
        seq.status = status
        seq.stop_reason = reason
        return True
