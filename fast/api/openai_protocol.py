"""OpenAI's request and response shapes: bodies checked into engine requests, outputs into JSON.

The server (:mod:`fast.api.server`) reads a JSON body, and this module turns it into prompts and
:class:`~fast.engine.sampling_params.SamplingParams` (or an :class:`OpenAIError` saying which field
is wrong and why), then turns the engine's :class:`~fast.engine.outputs.RequestOutput` objects
into the JSON objects OpenAI's API returns (completions, chat completions, their streamed chunks,
usage, logprobs). Nothing here touches the network or the engine's state: it is plain functions
over dicts, so that the shapes can be tested without a server.

A field is one of: used (its value goes to the engine), accepted (it has no effect here, and its
value does not ask for one: ``user``, ``tools=[]``...), refused unless its value is the one pagedkv
honours (``suffix``, ``tools`` with functions...: a 400 naming the field), or unknown (a 400 naming
the close matches, as a misspelled ``max_token`` would otherwise be silently ignored).

>>> info = ModelInfo("m", tokenizer=None, vocab_size=64, max_model_len=32)
>>> req = parse_completion({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}, info)
>>> [p.token_ids for p in req.prompts], req.params.max_tokens, req.params.temperature
([[1, 2, 3]], 4, 0)
>>> try:
...     parse_completion({"prompt": [1], "max_token": 4}, info)
... except OpenAIError as e:
...     print(e.status, e.param, e.message)
400 max_token unknown field 'max_token' of a completion request; did you mean max_tokens or \
min_tokens?
>>> try:
...     parse_completion({"prompt": [1] * 30, "max_tokens": 8}, info)
... except OpenAIError as e:
...     print(e.status, e.param, e.message)
400 max_tokens this model's context is 32 tokens; the prompt has 30 and max_tokens asks for 8 \
more (38 in all)
"""

from __future__ import annotations

import difflib
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spec.errors import InvalidArgumentError

__all__ = [
    "OpenAIError",
    "ModelInfo",
    "CompletionRequest",
    "ChatRequest",
    "parse_completion",
    "parse_chat",
    "parse_tokenize",
    "parse_detokenize",
    "check_model",
    "error_body",
    "completion_response",
    "completion_chunk",
    "chat_response",
    "chat_chunk",
    "usage",
    "TextStreamer",
    "new_id",
]

#: Most completions per request (``n``), as OpenAI limits it.
MAX_N = 128
#: Longest error message sent back (a huge prompt quoted in full would be a second upload).
MAX_MESSAGE = 1000
#: ``logprobs`` / ``top_logprobs`` limit when the model sets none (vLLM's default).
DEFAULT_MAX_LOGPROBS = 20


class OpenAIError(Exception):
    """A request the server refuses, as OpenAI reports it: HTTP ``status`` and the body
    ``{"error": {"message", "type", "param", "code"}}``; ``headers`` go on the response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 15] + " ...(truncated)"
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``.

    >>> error_body("no such model", "invalid_request_error", "model", "model_not_found")["error"]
    {'message': 'no such model', 'type': 'invalid_request_error', 'param': 'model', \
'code': 'model_not_found'}
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(param: str | None, message: str) -> OpenAIError:
    """A 400 ``invalid_request_error`` about ``param``."""
    return OpenAIError(400, message, param=param)


@dataclass(frozen=True)
class ModelInfo:
    """What request checking needs to know of the served model.

    ``sampling_defaults``: SamplingParams fields from the model's generation config
    (``LLM.default_sampling_fields``); each one a request leaves out takes its value, as in
    vLLM's server (``max_tokens`` included).
    """

    name: str
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)


def new_id(prefix: str) -> str:
    """A fresh response id, ``prefix-`` and 24 hex digits (``cmpl-...``, ``chatcmpl-...``)."""
    return f"{prefix}-{secrets.token_hex(12)}"


# -- field checks ---------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(v: object) -> str:
    """The JSON name of a value's type, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(name, f"'{name}' must be a boolean, not {_kind(v)}")
    return v


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad_request(name, f"'{name}' must be a string, not {_kind(v)}")
    return v


#: fields of both endpoints whose value goes to SamplingParams under the same name
_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)
#: fields of both endpoints that are read by the server itself
_COMMON = ("model", "stream", "stream_options", "user", "logit_bias", "max_tokens")

_ONLY_TEXT = "pagedkv generates text only"


def _refusals() -> dict[str, tuple[Callable[[Any], bool], str]]:
    """field -> (accepts(value), why other values are refused), for OpenAI fields that ask for
    something pagedkv does not do."""

    def empty(v: Any) -> bool:
        return v is None or v == [] or v == {}

    return {
        "suffix": (lambda v: v is None or v == "", "text after the insertion point (suffix)"),
        "best_of": (lambda v: v is None or v == 1, "best_of other than 1"),
        "tools": (empty, "tool calling"),
        "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling"),
        "functions": (empty, "function calling"),
        "function_call": (lambda v: v in (None, "none", "auto"), "function calling"),
        "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "tool calling"),
        "response_format": (
            lambda v: v is None or v == {"type": "text"},
            "structured output (response_format other than {'type': 'text'})",
        ),
        "modalities": (lambda v: v is None or v == ["text"], _ONLY_TEXT),
        "audio": (lambda v: v is None, _ONLY_TEXT),
        "prediction": (lambda v: v is None, "predicted outputs"),
        "store": (lambda v: v is None or v is False, "stored completions"),
        "metadata": (lambda v: v is None or isinstance(v, dict), "metadata"),
        "service_tier": (lambda v: v in (None, "auto", "default"), "service tiers"),
        "reasoning_effort": (lambda v: v is None, "reasoning models"),
        "web_search_options": (lambda v: v is None, "web search"),
    }


_REFUSED = _refusals()
_COMPLETION_FIELDS = frozenset(
    (*_SAMPLING, *_COMMON, "prompt", "logprobs", "echo", "suffix", "best_of")
)
_CHAT_FIELDS = frozenset(
    (*_SAMPLING, *_COMMON)
    + (
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template_kwargs",
    )
    + tuple(k for k in _REFUSED if k not in ("suffix", "best_of"))
)


def _check_fields(body: Any, known: frozenset[str], what: str) -> dict[str, Any]:
    """``body`` as a dict whose every key is known, and whose refused fields have values that
    ask for nothing pagedkv lacks."""
    if not isinstance(body, dict):
        raise bad_request(None, f"the request body must be a JSON object, not {_kind(body)}")
    for name in body:
        if name not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise bad_request(str(name), f"unknown field {name!r} of {what}{hint}")
    for name, (accepts, what_not) in _REFUSED.items():
        if name in body and not accepts(body[name]):
            raise bad_request(name, f"pagedkv does not support {what_not}: {name}={body[name]!r}")
    return body


def check_model(body: Mapping[str, Any], info: ModelInfo) -> None:
    """``model`` is absent (the served one) or the served model's name; else a 404."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad_request("model", f"'model' must be a string, not {_kind(model)}")
    if model != info.name:
        raise OpenAIError(
            404,
            f"the model {model!r} does not exist; this server serves {info.name!r}",
            param="model",
            code="model_not_found",
        )


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    """``include_usage`` of ``stream_options`` (which needs ``stream``)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise bad_request("stream_options", "'stream_options' is only allowed with stream=true")
    if not isinstance(opts, dict):
        raise bad_request(
            "stream_options", f"'stream_options' must be an object, not {_kind(opts)}"
        )
    unknown = sorted(set(opts) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise bad_request("stream_options", f"unknown stream_options {unknown}")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("stream_options.include_usage", "'include_usage' must be a boolean")
    return include


def _logit_bias(body: Mapping[str, Any], vocab: int) -> Callable[..., Any] | None:
    """A logits processor adding OpenAI's ``logit_bias`` ({"token id": bias in [-100, 100]})."""
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict):
        raise bad_request("logit_bias", f"'logit_bias' must be an object, not {_kind(bias)}")
    ids: list[int] = []
    values: list[float] = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request("logit_bias", f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < vocab:
            raise bad_request(
                "logit_bias", f"logit_bias token id {token} is outside the vocabulary [0, {vocab})"
            )
        if not _is_number(value) or not -100 <= value <= 100:
            raise bad_request(
                "logit_bias", f"logit_bias[{key!r}]={value!r}: a bias is a number in [-100, 100]"
            )
        ids.append(token)
        values.append(float(value))

    def add_bias(output_ids: Any, logits: Any) -> Any:
        import torch

        index = torch.tensor(ids, device=logits.device)
        add = torch.tensor(values, device=logits.device, dtype=logits.dtype)
        return logits.index_add(0, index, add)

    return add_bias


def _sampling_params(
    body: Mapping[str, Any],
    info: ModelInfo,
    max_tokens: tuple[str, Any],
    logprobs: tuple[str, int | None],
    defaults: Mapping[str, Any],
    prompt_logprobs: int | None = None,
) -> Any:
    """SamplingParams from the body's sampling fields; a bad value is a 400 naming its field."""
    from fast.engine.sampling_params import SamplingParams

    kwargs: dict[str, Any] = dict(defaults)
    for name in _SAMPLING:
        if body.get(name) is not None:
            kwargs[name] = body[name]
    n = kwargs.get("n", 1)
    if _is_int(n) and n > MAX_N:
        raise bad_request("n", f"n={n}: at most {MAX_N} completions per request")
    max_name, max_value = max_tokens
    kwargs["max_tokens"] = max_value
    logprobs_name, logprobs_value = logprobs
    if logprobs_value is not None:
        if not _is_int(logprobs_value) or logprobs_value < 0:
            raise bad_request(
                logprobs_name, f"'{logprobs_name}' must be an integer >= 0, not {logprobs_value!r}"
            )
        if logprobs_value > info.max_logprobs:
            raise bad_request(
                logprobs_name,
                f"{logprobs_name}={logprobs_value}: at most {info.max_logprobs} on this server",
            )
        kwargs["logprobs"] = logprobs_value
    if prompt_logprobs is not None:
        kwargs["prompt_logprobs"] = prompt_logprobs
    bias = _logit_bias(body, info.vocab_size)
    if bias is not None:
        kwargs["logits_processors"] = [bias]
    names = {"max_tokens": max_name, "logprobs": logprobs_name}
    try:
        params = SamplingParams(**kwargs)
        params.check_vocab_size(info.vocab_size)
    except InvalidArgumentError as e:
        name = names.get(e.name, e.name)
        raise bad_request(name, f"{name}={e.value!r}: {e.reason}") from None
    return params


def _check_context(
    lengths: Sequence[int], max_tokens: int | None, name: str, info: ModelInfo
) -> None:
    """Every prompt leaves room for ``max_tokens`` (or at least one token) in the context."""
    limit = info.max_model_len
    for length in lengths:
        if max_tokens is None:
            if length >= limit:
                raise bad_request(
                    "prompt" if name == "max_tokens" else "messages",
                    f"this model's context is {limit} tokens and the prompt has {length}: "
                    "no room for a completion",
                )
        elif length + max_tokens > limit:
            raise bad_request(
                name,
                f"this model's context is {limit} tokens; the prompt has {length} and {name} "
                f"asks for {max_tokens} more ({length + max_tokens} in all)",
            )


def _max_tokens(body: Mapping[str, Any], name: str, default: int | None) -> tuple[str, Any]:
    v = body.get(name)
    return (name, default if v is None else v)


# -- completions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    """A checked ``POST /v1/completions`` body: one engine request per prompt."""

    prompts: list[Any]  # ParsedPrompt
    params: Any  # SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None


def _prompts(body: Mapping[str, Any], info: ModelInfo) -> list[Any]:
    from fast.engine.inputs import InvalidPromptError, parse_prompts

    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("prompt", "'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if not prompt:
            raise bad_request("prompt", "'prompt' is an empty list")
        for i, p in enumerate(prompt):
            if isinstance(p, list):
                if not all(_is_int(t) for t in p):
                    raise bad_request("prompt", f"prompt[{i}] must be a list of integer token ids")
            elif not isinstance(p, (str, int)) or isinstance(p, bool):
                raise bad_request(
                    "prompt",
                    f"prompt[{i}] is {_kind(p)}: a prompt is a string, an array of strings, "
                    "an array of token ids or an array of such arrays",
                )
    elif not isinstance(prompt, str):
        raise bad_request(
            "prompt",
            f"'prompt' must be a string, an array of strings, an array of token ids or an array "
            f"of such arrays, not {_kind(prompt)}",
        )
    try:
        return parse_prompts(prompt, info.tokenizer, info.vocab_size, info.max_model_len)
    except InvalidPromptError as e:
        raise bad_request("prompt", f"{e.name}: {e.reason}") from None


def parse_completion(body: Any, info: ModelInfo) -> CompletionRequest:
    """Check a completions body; raises :class:`OpenAIError` (400, or 404 for the model)."""
    body = _check_fields(body, _COMPLETION_FIELDS, "a completion request")
    check_model(body, info)
    _optional_str(body, "user")
    stream = _bool(body, "stream", False)
    include_usage = _stream_options(body, stream)
    echo = _bool(body, "echo", False)
    prompts = _prompts(body, info)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or logprobs < 0):
        raise bad_request("logprobs", f"'logprobs' must be an integer >= 0, not {logprobs!r}")
    params = _sampling_params(
        body,
        info,
        _max_tokens(body, "max_tokens", info.sampling_defaults.get("max_tokens", 16)),
        ("logprobs", logprobs),
        info.sampling_defaults,
        prompt_logprobs=logprobs if echo and logprobs is not None else None,
    )
    _check_context([len(p.token_ids) for p in prompts], params.max_tokens, "max_tokens", info)
    return CompletionRequest(prompts, params, stream, include_usage, echo, logprobs)


# -- chat -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    """A checked ``POST /v1/chat/completions`` body: the rendered conversation as one prompt."""

    prompt: Any  # ParsedPrompt
    params: Any  # SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


def _render_chat(body: Mapping[str, Any], info: ModelInfo) -> Any:
    """The conversation rendered with the chat template, as ``LLM.chat`` renders it."""
    import jinja2

    from fast.api.errors import InvalidMessageError
    from fast.api.llm import _message, _open_final_message
    from fast.engine.inputs import ParsedPrompt

    messages = body.get("messages")
    if messages is None:
        raise bad_request("messages", "'messages' is required")
    if not isinstance(messages, list):
        raise bad_request("messages", f"'messages' must be an array, not {_kind(messages)}")
    if not messages:
        raise bad_request("messages", "'messages' is empty: a conversation needs a message")
    add_generation_prompt = _bool(body, "add_generation_prompt", True)
    continue_final = _bool(body, "continue_final_message", False)
    if continue_final and add_generation_prompt:
        raise bad_request(
            "continue_final_message",
            "continue_final_message needs add_generation_prompt=false (the final message is "
            "continued, not answered)",
        )
    extra = body.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise bad_request("chat_template_kwargs", "'chat_template_kwargs' must be an object")
    tok = info.tokenizer
    if tok is None or tok.chat_template is None:
        raise bad_request("messages", "this model has no chat template; use /v1/completions")
    try:
        clean = [_message(i, m, None) for i, m in enumerate(messages)]
    except InvalidMessageError as e:
        raise bad_request(e.name, f"{e.name}: {e.reason}") from None
    try:
        text = tok.apply_chat_template(clean, add_generation_prompt=add_generation_prompt, **extra)
        if continue_final:
            text = _open_final_message(text, clean, None)
    except (jinja2.TemplateError, InvalidArgumentError, TypeError) as e:
        raise bad_request("messages", f"the chat template refused the conversation: {e}") from None
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("messages", "the rendered conversation has no tokens")
    if len(ids) > info.max_model_len:
        raise bad_request(
            "messages",
            f"the conversation is {len(ids)} tokens, longer than this model's context of "
            f"{info.max_model_len} tokens",
        )
    for t in ids:
        if not 0 <= t < info.vocab_size:
            raise bad_request("messages", f"token id {t} is outside the model's vocabulary")
    return ParsedPrompt(text, ids)


def parse_chat(body: Any, info: ModelInfo) -> ChatRequest:
    """Check a chat completions body; raises :class:`OpenAIError` (400, or 404 for the model)."""
    body = _check_fields(body, _CHAT_FIELDS, "a chat completion request")
    check_model(body, info)
    _optional_str(body, "user")
    stream = _bool(body, "stream", False)
    include_usage = _stream_options(body, stream)
    want_logprobs = _bool(body, "logprobs", False)
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or top < 0:
            raise bad_request(
                "top_logprobs", f"'top_logprobs' must be an integer >= 0, not {top!r}"
            )
        if not want_logprobs and top > 0:
            raise bad_request("top_logprobs", "'top_logprobs' needs logprobs=true")
    prompt = _render_chat(body, info)
    default_max = info.sampling_defaults.get("max_tokens")
    if body.get("max_completion_tokens") is not None:
        max_tokens = _max_tokens(body, "max_completion_tokens", default_max)
    else:
        max_tokens = _max_tokens(body, "max_tokens", default_max)
    params = _sampling_params(
        body,
        info,
        max_tokens,
        ("top_logprobs", (top or 0) if want_logprobs else None),
        info.sampling_defaults,
    )
    _check_context([len(prompt.token_ids)], params.max_tokens, max_tokens[0], info)
    return ChatRequest(prompt, params, stream, include_usage, want_logprobs, top or 0)


# -- tokenize / detokenize ------------------------------------------------------------------


def parse_tokenize(body: Any, info: ModelInfo) -> tuple[list[int], str]:
    """``POST /tokenize``: ``{"prompt", "add_special_tokens"}`` or ``{"messages", ...}`` ->
    (token ids, the text tokenized)."""
    body = _check_fields(
        body,
        frozenset(
            (
                "model",
                "prompt",
                "add_special_tokens",
                "messages",
                "add_generation_prompt",
                "continue_final_message",
                "chat_template_kwargs",
            )
        ),
        "a tokenize request",
    )
    check_model(body, info)
    if info.tokenizer is None:
        raise bad_request(None, "this model has no tokenizer")
    if ("prompt" in body) == ("messages" in body):
        raise bad_request("prompt", "give exactly one of 'prompt' and 'messages'")
    if "messages" in body:
        parsed = _render_chat(body, info)
        return list(parsed.token_ids), str(parsed.prompt)
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise bad_request("prompt", f"'prompt' must be a string, not {_kind(prompt)}")
    special = _bool(body, "add_special_tokens", True)
    return list(info.tokenizer.encode(prompt, add_special_tokens=special)), prompt


def parse_detokenize(body: Any, info: ModelInfo) -> list[int]:
    """``POST /detokenize``: ``{"tokens": [ids]}`` -> the ids, checked against the vocabulary."""
    body = _check_fields(body, frozenset(("model", "tokens")), "a detokenize request")
    check_model(body, info)
    if info.tokenizer is None:
        raise bad_request(None, "this model has no tokenizer")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise bad_request("tokens", "'tokens' must be an array of integer token ids")
    for t in tokens:
        if not 0 <= t < info.vocab_size:
            raise bad_request(
                "tokens", f"token id {t} is outside the vocabulary [0, {info.vocab_size})"
            )
    return list(tokens)


# -- responses ------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object.

    >>> usage(5, 3)
    {'prompt_tokens': 5, 'completion_tokens': 3, 'total_tokens': 8}
    """
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_text(token_id: int, entry: Mapping[int, Any] | None, info: ModelInfo) -> str:
    """A token alone as text (``token_id:N`` for a model without a tokenizer, as vLLM)."""
    if entry is not None and token_id in entry and entry[token_id].decoded_token is not None:
        return str(entry[token_id].decoded_token)
    if info.tokenizer is None:
        return f"token_id:{token_id}"
    return str(info.tokenizer.decode([token_id], skip_special_tokens=False))


def _top(entry: Mapping[int, Any], k: int) -> list[tuple[int, Any]]:
    """The ``k`` most likely entries of one position, by rank."""
    ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
    return [kv for kv in ranked if kv[1].rank is not None and kv[1].rank <= k][:k]


def completion_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[Mapping[int, Any] | None],
    k: int,
    info: ModelInfo,
    offset: int,
) -> dict[str, Any]:
    """OpenAI's completions ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the
    ``k`` most likely and the sampled token, by text) and ``text_offset`` (from ``offset``)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, entry in zip(token_ids, entries):
        text = _token_text(tid, entry, info)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:  # the first prompt token: nothing predicts it
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(_finite(entry[tid].logprob) if tid in entry else None)
        top = {_token_text(t, entry, info): _finite(lp.logprob) for t, lp in _top(entry, k)}
        if tid in entry:
            top.setdefault(text, _finite(entry[tid].logprob))
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _finite(x: float) -> float:
    """JSON has no -inf: a probability that underflowed is reported as -9999.0 (as vLLM)."""
    return float(x) if math.isfinite(x) else -9999.0


def chat_logprobs(
    token_ids: Sequence[int], entries: Sequence[Mapping[int, Any]], k: int, info: ModelInfo
) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs"}], "refusal": None}``."""

    def item(tid: int, lp: float, entry: Mapping[int, Any]) -> dict[str, Any]:
        text = _token_text(tid, entry, info)
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, entry in zip(token_ids, entries):
        lp = entry[tid].logprob if tid in entry else float("-inf")
        content.append(
            {
                **item(tid, lp, entry),
                "top_logprobs": [item(t, e.logprob, entry) for t, e in _top(entry, k)],
            }
        )
    return {"content": content, "refusal": None}


def _envelope(kind: str, rid: str, created: int, model: str) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": created, "model": model}


def completion_response(
    rid: str,
    created: int,
    model: str,
    outputs: Sequence[Any],
    req: CompletionRequest,
    info: ModelInfo,
) -> dict[str, Any]:
    """The ``text_completion`` object of finished requests (one per prompt, in order); choice
    ``i * n + j`` is completion ``j`` of prompt ``i``, as OpenAI numbers them."""
    choices = []
    prompt_tokens = completion_tokens = 0
    for i, out in enumerate(outputs):
        prompt_tokens += len(out.prompt_token_ids)
        prompt_text = _prompt_text(out, info) if req.echo else ""
        for comp in out.outputs:
            completion_tokens += len(comp.token_ids)
            lps = None
            if req.logprobs is not None:
                lps = _choice_logprobs(out, comp, req, info, prompt_text)
            choices.append(
                {
                    "index": i * req.params.n + comp.index,
                    "text": prompt_text + comp.text,
                    "logprobs": lps,
                    "finish_reason": comp.finish_reason,
                    "stop_reason": comp.stop_reason,
                }
            )
    return {
        **_envelope("text_completion", rid, created, model),
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def _prompt_text(out: Any, info: ModelInfo) -> str:
    if out.prompt is not None:
        return str(out.prompt)
    if info.tokenizer is None:
        return ""
    return str(info.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False))


def _choice_logprobs(
    out: Any, comp: Any, req: CompletionRequest, info: ModelInfo, prompt_text: str
) -> dict[str, Any]:
    k = req.logprobs or 0
    gen = completion_logprobs(comp.token_ids, comp.logprobs or [], k, info, len(prompt_text))
    if not req.echo:
        return gen
    prompt = completion_logprobs(out.prompt_token_ids, out.prompt_logprobs or [], k, info, 0)
    return {key: prompt[key] + gen[key] for key in gen}


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk of choice ``index``."""
    return {
        **_envelope("text_completion", rid, created, model),
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }


def chat_response(
    rid: str, created: int, model: str, out: Any, req: ChatRequest, info: ModelInfo
) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished request."""
    choices = []
    completion_tokens = 0
    for comp in out.outputs:
        completion_tokens += len(comp.token_ids)
        lps = None
        if req.logprobs:
            lps = chat_logprobs(comp.token_ids, comp.logprobs or [], req.top_logprobs, info)
        choices.append(
            {
                "index": comp.index,
                "message": {"role": "assistant", "content": comp.text, "refusal": None},
                "logprobs": lps,
                "finish_reason": comp.finish_reason,
                "stop_reason": comp.stop_reason,
            }
        )
    return {
        **_envelope("chat.completion", rid, created, model),
        "choices": choices,
        "usage": usage(len(out.prompt_token_ids), completion_tokens),
        "system_fingerprint": None,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk`` of choice ``index``."""
    return {
        **_envelope("chat.completion.chunk", rid, created, model),
        "choices": [
            {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }


def usage_chunk(kind: str, rid: str, created: int, model: str, u: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the request's usage."""
    return {**_envelope(kind, rid, created, model), "choices": [], "usage": u}


@dataclass
class TextStreamer:
    """What of a completion's text may be sent now: everything but the last
    ``longest stop string - 1`` characters while it runs (a stop string found later cuts the text
    before it, and a prefix of it must not have been sent), everything once it finished. The
    engine's text itself never ends inside a multi-byte character (its incremental detokenizer
    holds those back).

    >>> s = TextStreamer(holdback=2)  # stop="###"
    >>> s.delta("ab#", False), s.delta("ab##", False), s.delta("ab", True)
    ('a', 'b', '')
    >>> s = TextStreamer(holdback=2)
    >>> s.delta("abc#", False), s.delta("abc#d", True)
    ('ab', 'c#d')
    """

    holdback: int
    sent_chars: int = 0
    tokens: int = 0  # output tokens already reported (their logprobs sent)

    def delta(self, text: str, finished: bool) -> str:
        """The text to send now of ``text``, the completion so far."""
        end = len(text) if finished else len(text) - self.holdback
        if end <= self.sent_chars:
            return ""
        piece = text[self.sent_chars : end]
        self.sent_chars = end
        return piece


def now() -> int:
    """``created``: seconds since the epoch."""
    return int(time.time())
