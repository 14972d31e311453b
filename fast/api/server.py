"""The OpenAI-compatible HTTP server behind ``pagedkv serve``: Starlette on uvicorn.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus),
``POST /tokenize``, ``POST /detokenize``. Request bodies are checked by
:mod:`fast.api.openai_protocol`; the engine is driven by :class:`~fast.api.async_engine.AsyncEngine`
(one thread stepping it); the metrics are :mod:`fast.api.metrics`.

Every refusal has OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``: 400
for a bad value, a prompt longer than the context or an unknown field; 401 without the API key
when one is set (``Authorization: Bearer KEY``; ``/health`` and ``/metrics`` are open); 404 for
another model or path; 405 for a wrong method; 413 for a body over ``max_request_bytes``; 503
with ``Retry-After`` when ``max_waiting_requests`` requests are already waiting. A client that
disconnects (mid-stream, or before its response) aborts its requests.

Usage in code (the tests and ``benchmarks/serve_load.py`` run it so)::

    from fast.api.llm import LLM
    from fast.api.server import BackgroundServer, ServerConfig, build_app

    with BackgroundServer(build_app(LLM(), ServerConfig())) as server:
        print(server.url)  # http://127.0.0.1:<a free port>; use it as the OpenAI base_url + /v1
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fast.api import openai_protocol as proto
from fast.api.async_engine import AsyncEngine, EngineStepError, RequestStream
from fast.api.engine_process import EngineProcess, EngineProcessError
from fast.api.llm import LLM
from fast.api.metrics import CONTENT_TYPE, ServerMetrics
from fast.api.openai_protocol import OpenAIError
from fast.engine.outputs import RequestOutput
from spec.errors import InvalidArgumentError

__all__ = ["ServerConfig", "build_app", "BackgroundServer", "serve"]

log = logging.getLogger("pagedkv.server")


@dataclass(frozen=True)
class ServerConfig:
    """The server's settings (the engine's are ``LLM``'s).

    Attributes:
        served_model_name: the ``model`` name clients use (None: ``"pagedkv"``).
        api_key: when set, ``/v1/*``, ``/tokenize`` and ``/detokenize`` need
            ``Authorization: Bearer <api_key>``.
        max_waiting_requests: requests waiting to be scheduled past which new ones get 503.
        max_request_bytes: largest request body (413 above).
        retry_after_s: the ``Retry-After`` of a 503.
        shutdown_timeout_s: on shutdown, how long running requests may finish before they are
            aborted.
    """

    served_model_name: str | None = None
    api_key: str | None = None
    max_waiting_requests: int = 256
    max_request_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    shutdown_timeout_s: float = 10.0


class _State:
    """What the handlers share: the engine front, the model's facts, the metrics."""

    def __init__(self, llm: LLM | EngineProcess, config: ServerConfig) -> None:
        self.llm = llm
        self.config = config
        engine = llm.llm_engine
        self.name = config.served_model_name or "pagedkv"
        self.info = proto.ModelInfo(
            self.name,
            engine.tokenizer,
            engine.model_config.vocab_size,
            engine.max_model_len,
            llm.max_logprobs if llm.max_logprobs is not None else proto.DEFAULT_MAX_LOGPROBS,
            llm.default_sampling_fields,
        )
        self.front = AsyncEngine(engine, config.max_waiting_requests)
        self.metrics = ServerMetrics(self.name, lambda: self.front.snapshot)
        self.front.observer = self.metrics
        self.created = int(time.time())
        self._key = f"Bearer {config.api_key}".encode() if config.api_key else None

    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, self._key):
            raise OpenAIError(
                401,
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    def admit(self) -> None:
        front = self.front
        if not front.alive:
            raise OpenAIError(503, "the engine is not running", type="server_error")
        if front.overloaded:
            raise OpenAIError(
                503,
                f"the server is busy: {front.num_waiting} requests are waiting "
                f"(limit {front.max_waiting}); retry later",
                type="server_error",
                code="overloaded",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )

    async def add(self, items: list[tuple[str, Any, Any]]) -> RequestStream:
        self.admit()
        try:
            return await self.front.add_requests(items)
        except InvalidArgumentError as e:  # the engine's own checks, at add time
            raise proto.bad_request(e.name, str(e)) from None
        except (EngineStepError, EngineProcessError) as e:
            raise OpenAIError(503, str(e), type="server_error") from None


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Response(body, status, headers=headers, media_type="application/json")


def _error(e: OpenAIError) -> Response:
    return _json(e.body(), e.status, e.headers)


Handler = Callable[[Request, _State], Awaitable[Response]]


def _endpoint(handler: Handler, auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """The route: the API key check, then ``handler``; an OpenAIError becomes its response."""

    async def route(request: Request) -> Response:
        state: _State = request.app.state.pagedkv
        try:
            if auth:
                state.authorize(request)
            return await handler(request, state)
        except OpenAIError as e:
            return _error(e)

    return route


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 above ``limit`` bytes, 400 when it is not JSON."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise proto.bad_request(None, f"bad Content-Length {length!r}") from None
        if declared > limit:
            raise OpenAIError(
                413,
                f"the request body is {declared} bytes; this server takes at most {limit}",
                code="request_too_large",
            )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(
                413,
                f"the request body is over {limit} bytes, the most this server takes",
                code="request_too_large",
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise proto.bad_request(None, "the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise proto.bad_request(None, f"the request body is not valid JSON: {e}") from None


async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone (its body already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _finals(stream: RequestStream, request: Request) -> dict[str, RequestOutput] | None:
    """Each request's final output, or None if the client disconnected first (the requests
    are then aborted)."""
    finals: dict[str, RequestOutput] = {}

    async def consume() -> None:
        async for out in stream:
            if out.finished:
                finals[out.request_id] = out

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer in done:
            consumer.result()
            return finals
        return None
    finally:
        for task in (consumer, watcher):
            task.cancel()
        stream.close()


def _step_failed(e: EngineStepError) -> OpenAIError:
    return OpenAIError(500, str(e), type="server_error")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


_DONE = "data: [DONE]\n\n"


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- completions ----------------------------------------------------------------------------


async def completions(request: Request, st: _State) -> Response:
    body = await _read_json(request, st.config.max_request_bytes)
    req = await run_in_threadpool(proto.parse_completion, body, st.info)
    rid = proto.new_id("cmpl")
    created = proto.now()
    items = [(f"{rid}-{i}", p, req.params) for i, p in enumerate(req.prompts)]
    stream = await st.add(items)
    if req.stream:
        return _event_stream(_completion_events(stream, req, rid, created, st))
    try:
        finals = await _finals(stream, request)
    except EngineStepError as e:
        raise _step_failed(e) from None
    if finals is None:
        return Response(status_code=499)  # nobody reads it
    outs = [finals[rid] for rid, _, _ in items]
    return _json(proto.completion_response(rid, created, st.name, outs, req, st.info))


@dataclass
class _Choice:
    """Streaming state of one choice."""

    text: proto.TextStreamer
    offset: int = 0  # text_offset of the next token
    started: bool = False
    done: bool = False


async def _completion_events(
    stream: RequestStream, req: proto.CompletionRequest, rid: str, created: int, st: _State
) -> AsyncIterator[str]:
    n = req.params.n
    index_of = {r: i for i, r in enumerate(stream.request_ids)}
    hold = 0 if st.front.text_held_back else req.params.text_holdback
    choices: dict[int, _Choice] = {}
    prompt_tokens = completion_tokens = 0
    extra = {"usage": None} if req.include_usage else {}
    try:
        async for out in stream:
            i = index_of[out.request_id]
            for comp in out.outputs:
                index = i * n + comp.index
                c = choices.setdefault(index, _Choice(proto.TextStreamer(hold)))
                if c.done:
                    continue
                finished = comp.finish_reason is not None
                head = ""
                lps: dict[str, Any] | None = None
                if not c.started:
                    c.started = True
                    if comp.index == 0:
                        prompt_tokens += len(out.prompt_token_ids)
                    if req.echo:
                        head = proto._prompt_text(out, st.info)
                        if req.logprobs is not None:
                            lps = proto.completion_logprobs(
                                out.prompt_token_ids,
                                out.prompt_logprobs or [],
                                req.logprobs,
                                st.info,
                                0,
                            )
                        c.offset = len(head)
                piece = c.text.delta(comp.text, finished)
                new = comp.token_ids[c.text.tokens :]
                if req.logprobs is not None and new:
                    entries = (comp.logprobs or [])[c.text.tokens : len(comp.token_ids)]
                    gen = proto.completion_logprobs(new, entries, req.logprobs, st.info, c.offset)
                    c.offset = gen["text_offset"][-1] + len(gen["tokens"][-1])
                    lps = gen if lps is None else {k: lps[k] + gen[k] for k in gen}
                c.text.tokens = len(comp.token_ids)
                if finished:
                    c.done = True
                    completion_tokens += len(comp.token_ids)
                if (
                    head
                    or piece
                    or lps is not None
                    or finished
                    or (new and st.info.tokenizer is None)
                ):
                    chunk = proto.completion_chunk(
                        rid,
                        created,
                        st.name,
                        index,
                        head + piece,
                        comp.finish_reason,
                        lps,
                        comp.stop_reason if finished else None,
                    )
                    yield _sse({**chunk, **extra})
        if req.include_usage:
            u = proto.usage(prompt_tokens, completion_tokens)
            yield _sse(proto.usage_chunk("text_completion", rid, created, st.name, u))
    except EngineStepError as e:
        yield _sse(_step_failed(e).body())
    finally:
        stream.close()
    yield _DONE


# -- chat -----------------------------------------------------------------------------------


async def chat_completions(request: Request, st: _State) -> Response:
    body = await _read_json(request, st.config.max_request_bytes)
    req = await run_in_threadpool(proto.parse_chat, body, st.info)
    rid = proto.new_id("chatcmpl")
    created = proto.now()
    stream = await st.add([(rid, req.prompt, req.params)])
    if req.stream:
        return _event_stream(_chat_events(stream, req, rid, created, st))
    try:
        finals = await _finals(stream, request)
    except EngineStepError as e:
        raise _step_failed(e) from None
    if finals is None:
        return Response(status_code=499)
    return _json(proto.chat_response(rid, created, st.name, finals[rid], req, st.info))


async def _chat_events(
    stream: RequestStream, req: proto.ChatRequest, rid: str, created: int, st: _State
) -> AsyncIterator[str]:
    hold = 0 if st.front.text_held_back else req.params.text_holdback
    extra = {"usage": None} if req.include_usage else {}
    choices = {j: _Choice(proto.TextStreamer(hold)) for j in range(req.params.n)}
    prompt_tokens = completion_tokens = 0
    try:
        for j in choices:  # the role first, as OpenAI's streams begin
            role = {"role": "assistant", "content": ""}
            yield _sse({**proto.chat_chunk(rid, created, st.name, j, role, None), **extra})
        async for out in stream:
            prompt_tokens = len(out.prompt_token_ids)
            for comp in out.outputs:
                c = choices[comp.index]
                if c.done:
                    continue
                finished = comp.finish_reason is not None
                piece = c.text.delta(comp.text, finished)
                new = comp.token_ids[c.text.tokens :]
                lps = None
                if req.logprobs and new:
                    entries = (comp.logprobs or [])[c.text.tokens : len(comp.token_ids)]
                    lps = proto.chat_logprobs(new, entries, req.top_logprobs, st.info)
                c.text.tokens = len(comp.token_ids)
                if piece or lps is not None or (new and st.info.tokenizer is None):
                    delta = {"content": piece}
                    chunk = proto.chat_chunk(rid, created, st.name, comp.index, delta, None, lps)
                    yield _sse({**chunk, **extra})
                if finished:
                    c.done = True
                    completion_tokens += len(comp.token_ids)
                    chunk = proto.chat_chunk(
                        rid,
                        created,
                        st.name,
                        comp.index,
                        {},
                        comp.finish_reason,
                        None,
                        comp.stop_reason,
                    )
                    yield _sse({**chunk, **extra})
        if req.include_usage:
            u = proto.usage(prompt_tokens, completion_tokens)
            yield _sse(proto.usage_chunk("chat.completion.chunk", rid, created, st.name, u))
    except EngineStepError as e:
        yield _sse(_step_failed(e).body())
    finally:
        stream.close()
    yield _DONE


# -- the others -----------------------------------------------------------------------------


async def models(request: Request, st: _State) -> Response:
    card = {
        "id": st.name,
        "object": "model",
        "created": st.created,
        "owned_by": "pagedkv",
        "root": st.name,
        "parent": None,
        "max_model_len": st.info.max_model_len,
    }
    return _json({"object": "list", "data": [card]})


async def health(request: Request, st: _State) -> Response:
    if not st.front.alive:
        return _json(proto.error_body("the engine is not running", "server_error"), 503)
    return Response(status_code=200)


async def metrics(request: Request, st: _State) -> Response:
    return Response(st.metrics.render(), media_type=CONTENT_TYPE)


async def tokenize(request: Request, st: _State) -> Response:
    body = await _read_json(request, st.config.max_request_bytes)
    ids, _ = await run_in_threadpool(proto.parse_tokenize, body, st.info)
    return _json({"count": len(ids), "max_model_len": st.info.max_model_len, "tokens": ids})


async def detokenize(request: Request, st: _State) -> Response:
    body = await _read_json(request, st.config.max_request_bytes)
    ids = proto.parse_detokenize(body, st.info)
    text = await run_in_threadpool(st.info.tokenizer.decode, ids)
    return _json({"prompt": text})


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
        code: str | None = "not_found"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        code = "method_not_allowed"
    else:
        message = str(getattr(exc, "detail", "") or "error")
        code = None
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json(proto.error_body(message, kind, None, code), status)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    body = proto.error_body(f"internal server error: {type(exc).__name__}", "server_error")
    return _json(body, 500)


def build_app(llm: LLM | EngineProcess, config: ServerConfig | None = None) -> Starlette:
    """The ASGI application serving ``llm``; its lifespan starts and stops the engine thread
    (stopping aborts whatever still runs, so every block is free after shutdown). ``llm`` may be
    an :class:`~fast.api.engine_process.EngineProcess` (the engine in its own process), which the
    shutdown then stops too."""
    cfg = config or ServerConfig()
    state = _State(llm, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.front.start()
        try:
            yield
        finally:
            await state.front.shutdown()
            if isinstance(llm, EngineProcess):
                llm.close()

    routes = [
        Route("/v1/completions", _endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(chat_completions), methods=["POST"]),
        Route("/v1/models", _endpoint(models), methods=["GET"]),
        Route("/tokenize", _endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", _endpoint(detokenize), methods=["POST"]),
        Route("/health", _endpoint(health, auth=False), methods=["GET"]),
        Route("/metrics", _endpoint(metrics, auth=False), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.pagedkv = state
    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT / SIGTERM end :func:`serve` normally once the
    graceful shutdown is done (uvicorn raises the signal again afterwards, which would turn a
    requested stop into a KeyboardInterrupt or a kill)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if captured is not None:
                    captured.clear()


def _uvicorn(app: Starlette, cfg: ServerConfig, log_level: str) -> uvicorn.Server:
    return _Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            timeout_graceful_shutdown=max(1, round(cfg.shutdown_timeout_s)),
            lifespan="on",
            access_log=log_level == "debug",
        )
    )


class BackgroundServer:
    """``app`` served on ``host`` by uvicorn in a thread (tests, benchmarks); port 0 picks a
    free one. A context manager: leaving it shuts the server (and the engine thread) down."""

    def __init__(
        self, app: Starlette, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self.app = app
        self.host = host
        self._sock = _bind(host, port)
        self.port = int(self._sock.getsockname()[1])
        state: _State = app.state.pagedkv
        self.server = _uvicorn(app, state.config, log_level)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="pagedkv-http"
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running requests finish (up to the configured shutdown timeout),
        abort the rest, stop the engine thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError(f"the server did not stop within {timeout} s")

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    llm: LLM | EngineProcess,
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve in the foreground until SIGINT or SIGTERM (then shut down gracefully)."""
    sock = _bind(host, port)
    bound = int(sock.getsockname()[1])
    server = _uvicorn(build_app(llm, config), config, log_level)

    async def announce() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.02)
        if server.started and on_ready is not None:
            on_ready(f"http://{host}:{bound}")

    async def main() -> None:
        task = asyncio.ensure_future(announce())
        try:
            await server.serve(sockets=[sock])
        finally:
            task.cancel()

    try:
        asyncio.run(main())
    finally:
        sock.close()
