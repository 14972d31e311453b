"""AsyncEngine: the engine behind an asyncio server, stepped by one background thread.

The :class:`~fast.engine.engine.LLMEngine` is not thread-safe and its ``step()`` blocks for the
length of a model forward; an HTTP server's event loop must never wait for one. So one thread
owns the engine: it takes commands (add a group of requests, abort one) from a queue between
steps, steps while anything is unfinished, and hands each step's outputs to the event loop with
one ``call_soon_threadsafe``, where each group's :class:`RequestStream` (an async iterator)
receives them. Nothing else touches the engine, so a request aborted by a client that went away
is aborted by the engine thread before its next step, and its blocks are free from then on.

vLLM's ``AsyncLLMEngine`` has this shape (a background loop, requests in and outputs out through
queues); the names follow it: ``add_requests``, ``abort``, ``start``, ``shutdown``.

If a step raises, the engine has already rolled it back (every step is a transaction); the
thread then aborts every request, ends their streams with the error, and keeps serving new ones.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fast.api.engine_process import EngineProcess, EngineProcessError, engine_counts
from fast.engine.engine import LLMEngine
from fast.engine.outputs import RequestOutput

__all__ = ["AsyncEngine", "RequestStream", "EngineSnapshot", "Observer", "EngineStepError"]

log = logging.getLogger("pagedkv.server")


class EngineStepError(RuntimeError):
    """A step raised (and was rolled back); the requests it was running were aborted."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after its latest step or command, for metrics and back-pressure."""

    running: int = 0
    waiting: int = 0
    swapped: int = 0
    num_gpu_blocks: int = 0
    num_free_gpu_blocks: int = 0
    steps: int = 0
    generated_tokens: int = 0
    preempted: int = 0
    swapped_out: int = 0
    copied_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


_SNAPSHOT_FIELDS = tuple(EngineSnapshot.__dataclass_fields__)


class Observer(Protocol):
    """What the engine thread reports about requests (the Prometheus metrics implement it)."""

    def first_token(self, ttft: float, prompt_tokens: int) -> None: ...

    def token_gap(self, seconds: float) -> None: ...

    def finished(
        self, out: RequestOutput, e2e: float, queue_time: float | None, aborted: bool
    ) -> None: ...


@dataclass
class _Tracked:
    """One request's times, from when the server accepted it (``time.monotonic``)."""

    arrival: float
    wall_arrival: float
    stream: RequestStream
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0


class RequestStream:
    """The outputs of a group of engine requests (one HTTP request's prompts), in step order.

    ``async for out in stream`` yields each cumulative :class:`RequestOutput` as its request
    produces tokens; it ends when every request of the group has finished. :meth:`close` aborts
    the requests that have not finished (a client that disconnected): call it in a ``finally``.
    """

    def __init__(self, front: AsyncEngine, request_ids: Sequence[str]) -> None:
        self.request_ids = list(request_ids)
        self._front = front
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._unfinished = set(self.request_ids)
        self._closed = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            yield item

    @property
    def finished(self) -> bool:
        """Every request of the group has finished."""
        return not self._unfinished

    def close(self) -> None:
        """Abort the group's unfinished requests (idempotent; safe in ``finally``)."""
        if self._closed:
            return
        self._closed = True
        for rid in self._unfinished:
            self._front.abort(rid)


@dataclass
class _Add:
    items: list[tuple[str, Any, Any]]  # (request id, ParsedPrompt, SamplingParams)
    stream: RequestStream
    arrival: float
    wall_arrival: float
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """One thread stepping ``engine``; asyncio code adds requests and reads their outputs.

    Args:
        engine: the engine to own (nothing else may call it once :meth:`start` ran).
        max_waiting: most requests waiting to be scheduled (queued in the engine or about to be)
            before :meth:`add_requests` refuses more (:attr:`overloaded`).
        observer: told of first tokens, token gaps and finished requests (metrics).
    """

    def __init__(
        self,
        engine: LLMEngine | EngineProcess,
        max_waiting: int = 256,
        observer: Observer | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer
        self._commands: collections.deque[_Add | _Abort] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._ids = itertools.count()
        self._pending = 0  # requests in add commands not yet taken by the engine thread
        self._lock = threading.Lock()
        self.snapshot = EngineSnapshot()
        self.error: BaseException | None = None  # what killed the thread, if anything
        self._publish()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; outputs go to the running event loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedkv-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The engine thread is running (False before start and after shutdown or a crash)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort every request (their streams end with ``finish_reason="abort"``) and stop the
        thread; every block is free afterwards."""
        thread = self._thread
        self._stopping = True
        self._wake.set()
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)

    # -- requests -------------------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet scheduled (what :attr:`max_waiting` bounds)."""
        return self.snapshot.waiting + self._pending

    @property
    def text_held_back(self) -> bool:
        """The running texts of this front's outputs already lack what a stop string may still
        cut (an engine process sends ``DELTA`` outputs, which hold it back), so a stream must not
        hold the same characters back again."""
        return isinstance(self.engine, EngineProcess)

    @property
    def overloaded(self) -> bool:
        """A new request would exceed :attr:`max_waiting`."""
        return self.num_waiting >= self.max_waiting

    async def add_requests(
        self, items: Sequence[tuple[str, Any, Any]], arrival: float | None = None
    ) -> RequestStream:
        """Queue ``(request_id, prompt, sampling_params)`` items, all or none (the engine's
        refusal of one aborts the others and raises here), and return their stream."""
        if not self.alive:
            raise EngineStepError("the engine is not running")
        stream = RequestStream(self, [rid for rid, _, _ in items])
        arrival_mono = time.monotonic() if arrival is None else arrival
        cmd = _Add(list(items), stream, arrival_mono, time.time())
        with self._lock:
            self._pending += len(items)
        self._commands.append(cmd)
        self._wake.set()
        try:
            await asyncio.wrap_future(cmd.done)
        except asyncio.CancelledError:
            stream.close()  # the add may still happen: the abort follows it in the queue
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request at the engine thread's next turn (unknown ids are ignored)."""
        self._commands.append(_Abort(request_id))
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                self._wake.clear()
                self._drain()
                if self._stopping:
                    break
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except EngineProcessError as exc:  # the engine process is gone
                        log.error("the engine process failed: %s", exc)
                        self.error = exc
                        self._abort_all(EngineStepError(f"the engine process failed: {exc}"))
                        break
                    except Exception as exc:  # rolled back by the engine: fail its requests
                        log.exception("engine step failed; aborting its requests")
                        self._abort_all(EngineStepError(f"the engine step failed: {exc!r}"))
                        continue
                    self._deliver(outputs)
                    self._publish()
                else:
                    self._wake.wait()
        except BaseException as exc:  # pragma: no cover - a bug in this loop
            self.error = exc
            log.exception("the engine thread died")
            raise
        finally:
            self._drain()
            self._abort_all(None)
            with self._lock:
                self._pending = 0
            self._publish()

    def _drain(self) -> None:
        """Run the queued commands (the engine thread's, between steps).

        All queued commands go to the engine as one batch (:meth:`_call_many`): an engine in
        its own process gets them back to back and answers them between two of its steps,
        instead of stepping once per command.
        """
        while self._commands:
            cmds: list[_Add | _Abort] = []
            while self._commands:
                cmds.append(self._commands.popleft())
            calls: list[tuple[str, Any]] = []
            adding: set[str] = set()
            for cmd in cmds:
                if isinstance(cmd, _Abort):
                    if cmd.request_id in self._tracked or cmd.request_id in adding:
                        calls.append(("abort", cmd.request_id))
                elif not self._stopping:
                    calls += [("add", item) for item in cmd.items]
                    adding.update(rid for rid, _, _ in cmd.items)
            results = iter(self._call_many(calls))
            for cmd in cmds:
                if isinstance(cmd, _Abort):
                    if cmd.request_id in self._tracked or cmd.request_id in adding:
                        ok, final = next(results)
                        if ok and final is None and cmd.request_id in self._tracked:
                            # the engine (in its own process, running ahead of this thread)
                            # had finished it: its final output is on its way, behind this
                            # answer, and counts it by its own finish reason then
                            continue
                        self._finish(cmd.request_id, final if ok else None, aborted=True)
                    continue
                try:
                    if self._stopping:
                        raise EngineStepError("the server is shutting down")
                    outcomes = [next(results) for _ in cmd.items]
                    errors = [r for ok, r in outcomes if not ok]
                    added = [item[0] for item, (ok, _) in zip(cmd.items, outcomes) if ok]
                    if errors:  # all or none: take back the ones the engine accepted
                        self._call_many([("abort", rid) for rid in added])
                        raise errors[0]
                    for rid in added:
                        self._tracked[rid] = _Tracked(cmd.arrival, cmd.wall_arrival, cmd.stream)
                    self._set(cmd.done, None)
                except BaseException as exc:
                    self._set(cmd.done, exc)
                finally:
                    with self._lock:
                        self._pending -= len(cmd.items)
        self._publish()

    def _call_many(self, calls: list[tuple[str, Any]]) -> list[tuple[bool, Any]]:
        """``("add", (rid, prompt, params))`` and ``("abort", rid)`` calls, in order; for each
        ``(True, result)`` or ``(False, the exception)``."""
        if isinstance(self.engine, EngineProcess):
            return self.engine.call_many(calls)
        results: list[tuple[bool, Any]] = []
        for name, arg in calls:
            try:
                if name == "add":
                    self.engine.add_request(*arg)
                    results.append((True, None))
                else:
                    results.append((True, self._abort(arg)))
            except Exception as exc:
                results.append((False, exc))
        return results

    def _set(self, fut: concurrent.futures.Future[None], exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batch: list[tuple[RequestStream, RequestOutput | BaseException]] = []
        obs = self.observer
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:
                continue
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            if n > t.tokens:
                if t.first_token is None:
                    t.first_token = now
                    if obs is not None:
                        obs.first_token(now - t.arrival, len(out.prompt_token_ids))
                        for _ in range(n - 1):  # tokens that came with the first one (an
                            obs.token_gap(0.0)  # engine process's merged steps): no time between
                elif obs is not None and t.last_token is not None:
                    gap = (now - t.last_token) / (n - t.tokens)
                    for _ in range(n - t.tokens):
                        obs.token_gap(gap)
                t.last_token = now
                t.tokens = n
            batch.append((t.stream, out))
            if out.finished:
                self._finish(out.request_id, None, aborted=False, out=out)
        self._send(batch)

    def _finish(
        self,
        rid: str,
        final: RequestOutput | None,
        aborted: bool,
        out: RequestOutput | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Forget ``rid``; report it to the observer; end its stream on an abort with an
        error or at shutdown (a client's own abort has no reader left)."""
        t = self._tracked.pop(rid, None)
        if t is None:
            return
        out = out or final
        if self.observer is not None and out is not None:
            m = out.metrics
            queue = None
            if m is not None and m.first_scheduled_time is not None:
                queue = max(0.0, m.first_scheduled_time - t.wall_arrival)
            self.observer.finished(out, time.monotonic() - t.arrival, queue, aborted)
        if error is not None:
            self._send([(t.stream, error)])
        elif aborted and self._stopping and final is not None:
            self._send([(t.stream, final)])

    def _abort(self, request_id: str) -> RequestOutput | None:
        """The engine's abort; None when its process is gone (nothing is left to free)."""
        try:
            return self.engine.abort_request(request_id)
        except EngineProcessError:
            return None

    def _abort_all(self, error: BaseException | None) -> None:
        gone = EngineStepError("the engine stopped before the request finished")
        for rid in list(self._tracked):
            final = self._abort(rid)
            # a stream must end with something: its final output, or an error
            ended = error if error is not None or final is not None else gone
            self._finish(rid, final, aborted=True, error=ended)
        self._publish()

    def _send(self, batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
        if not batch or self._loop is None:
            return

        def put() -> None:
            for stream, item in batch:
                stream._put(item)

        try:
            self._loop.call_soon_threadsafe(put)
        except RuntimeError:  # the event loop is closed: nobody is reading
            pass

    def _publish(self) -> None:
        e = self.engine
        counts = e.counts() if isinstance(e, EngineProcess) else engine_counts(e)
        self.snapshot = EngineSnapshot(**{f: counts[f] for f in _SNAPSHOT_FIELDS})
