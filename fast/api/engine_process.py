"""The engine in a process of its own, so the server's HTTP work and the engine's steps run at once.

In one process the server's event loop (building and writing one SSE chunk per running request per
step) and the engine thread (whose decode steps are host-bound on a GPU) take turns on the one
interpreter lock, so every chunk written lengthens the next step: on an H200 the server made 0.69x
the tokens per second of offline ``LLM.generate`` (docs/serving.md). vLLM's V1 engine splits the
two the same way: the engine core runs in its own process and the API server process talks to it.

:class:`EngineProcess` starts a child process that builds ``LLM(model, **kwargs)`` and serves
commands over a pipe: ``add`` (a request; the engine's refusal comes back as the same
exception) and ``abort``, each answered, taken between steps. The engine runs ahead: whenever
it has unfinished requests it steps and sends that step's outputs unasked, so the server's work
on one step overlaps the engine's next (a parent that asked for each step left the engine idle
while it handled the last one: 0.56x of offline throughput on the H200, worse than one process).
:meth:`EngineProcess.step` returns what arrived since its last call. It offers the parent the
part of :class:`~fast.engine.engine.LLMEngine` that :class:`~fast.api.async_engine.AsyncEngine`
uses, and the part of :class:`~fast.api.llm.LLM` the server reads (``llm_engine``, ``max_logprobs``,
``default_sampling_fields``), so ``build_app`` takes either.

Outputs cross as deltas: :class:`DeltaEncoder` (child) sends each request's new tokens, new text
and new logprobs; :class:`DeltaDecoder` (parent) rebuilds the cumulative
:class:`~fast.engine.outputs.RequestOutput` the server expects, equal to the child's. The child
steps with :meth:`~fast.engine.engine.LLMEngine.step_compact`: the common report (a running
request with one sequence and no logprobs, after its first output) is a plain
``(request_id, new_token_ids, new_text, cumulative_logprob)`` tuple the engine builds from the
sequence, and the step's time (those requests' ``last_token_time``) crosses once per step, not
once per request; first outputs, finishes, aborts, logprobs and ``n > 1`` cross as full deltas.
At 256 running requests of the Llama-3-8B-shaped stub engine that took the engine process's
host time per step from 7.77 to 5.53 ms against offline's 3.70 (CPU, medians,
``benchmarks/bench_engine_process_host.py``; docs/serving.md).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fast.distributed.spawn import start_ignoring_sigint
from fast.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fast.engine.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from fast.engine.engine import CompactReport, LLMEngine

__all__ = [
    "DeltaDecoder",
    "DeltaEncoder",
    "EngineProcess",
    "EngineProcessError",
    "engine_counts",
    "step_deltas",
]


class EngineProcessError(RuntimeError):
    """The engine process failed to start, died, or stopped answering."""


#: One completion's news, as it crosses the pipe: ``(index, new_token_ids, new text,
#: new_logprobs, cumulative_logprob, finish_reason, stop_reason)``; the engine never takes back
#: text it reported. Plain tuples, not dataclasses: pickle writes a tuple of builtins directly but
#: an object through its class and ``__reduce_ex__``; for a step of 200 outputs, making, pickling
#: and unpickling the deltas took 0.5 ms as tuples against 2.6 ms as frozen dataclasses (CPU).
_CompletionDelta = tuple[int, list[int], str, Any, "float | None", "str | None", "int | str | None"]
#: One request's news: ``(request_id, completions, finished, metrics, num_cached_tokens,
#: prompt, prompt_logprobs, prompt_logprobs_len)``: ``metrics`` the fields of its
#: :class:`~fast.engine.outputs.RequestMetrics` in order (or None); ``prompt`` ``(text,
#: token_ids)`` the first time only; ``prompt_logprobs`` when changed since the last delta;
#: ``prompt_logprobs_len`` -1 when the request has none.
_OutputDelta = tuple[
    str, list[_CompletionDelta], bool, "tuple[Any, ...] | None", "int | None", Any, Any, int
]


def _metrics_fields(m: RequestMetrics | None) -> tuple[Any, ...] | None:
    if m is None:
        return None
    return (
        m.arrival_time,
        m.last_token_time,
        m.first_scheduled_time,
        m.first_token_time,
        m.time_in_queue,
        m.finished_time,
    )


class DeltaEncoder:
    """Turns the engine's own ``DELTA`` outputs (what the child asks its engine for) into
    deltas, as they are (the child's side; one per engine)."""

    def __init__(self) -> None:
        # DELTA requests that reported: request id -> length of its prompt logprobs (-1: none)
        self._prompt_lps: dict[str, int] = {}

    def encode_delta(self, out: RequestOutput) -> _OutputDelta:
        """A ``RequestOutputKind.DELTA`` output (only what is new) -> its delta, in O(new)."""
        rid = out.request_id
        known = self._prompt_lps.get(rid)
        first = known is None
        plp = out.prompt_logprobs
        plp_len = (-1 if plp is None else len(plp)) if known is None else known
        if out.finished:
            self._prompt_lps.pop(rid, None)
        elif first:
            self._prompt_lps[rid] = plp_len
        return (
            rid,
            [
                (
                    c.index,
                    c.token_ids,
                    c.text,
                    c.logprobs,
                    c.cumulative_logprob,
                    c.finish_reason,
                    c.stop_reason,
                )
                for c in out.outputs
            ],
            out.finished,
            _metrics_fields(out.metrics),
            out.num_cached_tokens,
            (out.prompt, out.prompt_token_ids) if first else None,
            plp if first else None,
            plp_len,
        )

    def forget(self, request_id: str) -> None:
        """Drop a request the engine no longer knows."""
        self._prompt_lps.pop(request_id, None)


def abort_answer(engine: LLMEngine, encoder: DeltaEncoder, request_id: str) -> _OutputDelta | None:
    """The child's answer to an abort: the request's final output as a delta (None when the
    engine no longer knew it). Encoded before the encoder forgets the request, so a request
    that already reported keeps what it sent then (its prompt and prompt logprobs)."""
    final = engine.abort_request(request_id)
    delta = None if final is None else encoder.encode_delta(final)
    encoder.forget(request_id)  # (a finished delta forgets its request itself)
    return delta


def step_deltas(
    engine: LLMEngine, encoder: DeltaEncoder
) -> tuple[float, list[_OutputDelta | CompactReport]]:
    """One step of the child's engine as it crosses the pipe: ``(time, reports)``, each
    report a compact one as the engine made it or a full output encoded
    (:meth:`~fast.engine.engine.LLMEngine.step_compact`); :meth:`DeltaDecoder.decode_step`
    takes it back."""
    now, outputs = engine.step_compact()
    encode = encoder.encode_delta
    return now, [o if type(o) is tuple else encode(o) for o in outputs]  # type: ignore[arg-type]


def _merged(p: CompletionOutput | None, cd: _CompletionDelta) -> CompletionOutput:
    """Completion ``p`` so far (None: its first delta) extended by its delta ``cd``."""
    index, new_ids, text, new_lps, cum, reason, stop = cd
    if p is not None:
        text = p.text + text
        new_ids = p.token_ids + new_ids
        if new_lps is not None and p.logprobs is not None:
            new_lps = p.logprobs + new_lps
    return CompletionOutput(index, text, new_ids, cum, new_lps, reason, stop)


class DeltaDecoder:
    """Rebuilds cumulative outputs from deltas (the parent's side)."""

    def __init__(self) -> None:
        self._last: dict[str, RequestOutput] = {}

    def decode(self, d: _OutputDelta) -> RequestOutput:
        rid, completions, finished, metrics, num_cached, prompt_ids, new_plp, plp_len = d
        prev = self._last.get(rid)
        if prev is None and prompt_ids is None:
            raise EngineProcessError(f"a delta for unknown request {rid!r}")
        before = prev.outputs if prev is not None else []
        if len(completions) == 1 and (
            not before or (len(before) == 1 and before[0].index == completions[0][0])
        ):  # the common case, n = 1, without the dict (0.5 vs 0.75 ms per 200 outputs, CPU)
            outputs = [_merged(before[0] if before else None, completions[0])]
        else:  # a delta carries only the completions with something new
            merged = {c.index: c for c in before}
            for cd in completions:
                merged[cd[0]] = _merged(merged.get(cd[0]), cd)
            outputs = [merged[i] for i in sorted(merged)]
        if prev is None:
            assert prompt_ids is not None
            prompt, ids = prompt_ids
            old_plp = None
        else:
            prompt, ids, old_plp = prev.prompt, prev.prompt_token_ids, prev.prompt_logprobs
        out = RequestOutput(
            rid,
            prompt,
            ids,
            outputs,
            finished,
            None if plp_len < 0 else (new_plp if new_plp is not None else old_plp),
            None if metrics is None else RequestMetrics(*metrics),
            num_cached,
        )
        if finished:
            self._last.pop(rid, None)
        else:
            self._last[rid] = out
        return out

    def decode_compact(self, report: CompactReport, now: float) -> RequestOutput:
        """A :data:`~fast.engine.engine.CompactReport` of a step at ``now`` -> the request's
        cumulative output: its last one extended by the new ids and text, with the new
        cumulative logprob and ``last_token_time = now`` (what a full delta would carry)."""
        rid, new_ids, text, cum = report
        prev = self._last.get(rid)
        if prev is None or len(prev.outputs) != 1 or prev.metrics is None:
            raise EngineProcessError(f"a compact report for request {rid!r} with no full one")
        (p,) = prev.outputs
        metrics = prev.metrics.snapshot()
        metrics.last_token_time = now
        out = RequestOutput(  # positional: the dataclasses' __init__ takes keywords slower
            rid,
            prev.prompt,
            prev.prompt_token_ids,
            [
                CompletionOutput(
                    p.index, p.text + text, p.token_ids + new_ids, cum, p.logprobs, None, None
                )
            ],
            False,
            prev.prompt_logprobs,
            metrics,
            prev.num_cached_tokens,
        )
        self._last[rid] = out
        return out

    def decode_step(
        self, now: float, deltas: list[_OutputDelta | CompactReport]
    ) -> list[RequestOutput]:
        """A step's message (its time, then full deltas and compact reports in the engine's
        order; a compact report is the 4-tuple) -> its cumulative outputs, in order."""
        return [self.decode_compact(d, now) if len(d) == 4 else self.decode(d) for d in deltas]

    def forget(self, request_id: str) -> None:
        """Drop a request the engine no longer knows (aborted with nothing to report)."""
        self._last.pop(request_id, None)


@dataclass(frozen=True)
class _Info:
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    max_logprobs: int | None
    default_sampling_fields: dict[str, Any]


def engine_counts(engine: LLMEngine) -> dict[str, int]:
    """The engine's queue sizes, block counts and statistics (what the server's snapshot and
    metrics show), plus ``unfinished`` (0 or 1)."""
    s, stats = engine.scheduler, engine.stats
    return {
        "running": len(s.running),
        "waiting": len(s.waiting),
        "swapped": len(s.swapped),
        "num_gpu_blocks": int(engine.num_gpu_blocks),
        "num_free_gpu_blocks": int(engine.num_free_gpu_blocks),
        "steps": stats.steps,
        "generated_tokens": stats.generated_tokens,
        "preempted": stats.preempted,
        "swapped_out": stats.swapped_out,
        "copied_blocks": stats.copied_blocks,
        "prefix_cache_queries": int(stats.prefix_cache_queries),
        "prefix_cache_hits": int(stats.prefix_cache_hits),
        "unfinished": int(engine.has_unfinished_requests()),
    }


def _portable(exc: BaseException) -> tuple[str, str, str, dict[str, Any]]:
    """An exception as (module, class, message, attributes): pagedkv's errors take their
    numbers as constructor arguments, which pickle cannot always replay."""
    attrs = {}
    for k, v in vars(exc).items():
        try:
            multiprocessing.reduction.ForkingPickler.dumps(v)
        except Exception:
            continue
        attrs[k] = v
    return type(exc).__module__, type(exc).__qualname__, str(exc), attrs


def _rebuild(module: str, name: str, message: str, attrs: dict[str, Any]) -> BaseException:
    import importlib

    try:
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise TypeError(name)
        exc: BaseException = cls.__new__(cls)
        Exception.__init__(exc, message)
        exc.__dict__.update(attrs)
        return exc
    except Exception:
        return EngineProcessError(f"{module}.{name}: {message}")


def _as_delta(request_id: str, prompt: Any, params: Any = None) -> tuple[str, Any, Any]:
    """The child's engine reports ``DELTA`` outputs (only what is new each step: the host
    work of a step grows with the new tokens, not with every running request's length); the
    parent rebuilds the cumulative ones (:class:`DeltaDecoder`)."""
    if params is None:
        params = SamplingParams()  # the engine's default, as add_request would take it
    if isinstance(params, SamplingParams):  # anything else: add_request refuses it by name
        params = replace(params, output_kind=RequestOutputKind.DELTA)
    return request_id, prompt, params


def _child_main(
    conn: multiprocessing.connection.Connection, model: Any, kwargs: Any, threads: int
) -> None:
    """The engine process: build the LLM, then answer commands until told to stop."""
    import signal

    import torch

    torch.set_num_threads(threads)  # the parent's setting (a spawned process starts afresh)

    # Ctrl-C reaches the whole process group; the server process decides when to stop (it
    # aborts the running requests, then sends "stop"), so the engine must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from fast.api.gc_policy import freeze_startup_heap
        from fast.api.llm import LLM

        llm = LLM(model() if callable(model) else model, **kwargs)
        engine = llm.llm_engine
        info = _Info(
            engine.tokenizer,
            engine.model_config.vocab_size,
            engine.max_model_len,
            llm.max_logprobs,
            llm.default_sampling_fields,
        )
        freeze_startup_heap()  # this process holds this engine for its life (gc_policy)
        conn.send(("ready", info, engine_counts(engine)))
    except BaseException as exc:
        conn.send(("raise", _portable(exc), traceback.format_exc()))
        return
    encoder = DeltaEncoder()
    sender = _Sender(conn)
    try:
        _serve_commands(engine, encoder, conn, sender.send)
    finally:
        sender.close()


class _Sender:
    """The child's messages go out through one thread, in order: the engine steps on while a
    server busy with HTTP work leaves the pipe full (a step's outputs for 200 requests are
    about 26 KB; a Linux pipe holds 64 KB), instead of blocking in ``send`` until it reads."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        import queue
        import threading

        self._conn = conn
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pagedkv-sender", daemon=True)
        self._thread.start()

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the parent is gone (BrokenPipeError is an OSError)
                return

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)


def _serve_commands(
    engine: LLMEngine,
    encoder: DeltaEncoder,
    conn: multiprocessing.connection.Connection,
    send: Callable[[Any], None],
) -> None:
    """The child's loop: take the server's commands between steps, step while there is work."""
    # The engine runs ahead: it steps whenever it has work and sends each step's outputs
    # without waiting to be asked, taking the server's commands between steps (vLLM's engine
    # core loop), so the server's processing of one step overlaps the engine's next.
    while True:
        try:
            while conn.poll(0) or not engine.has_unfinished_requests():
                cmd, ident, calls = conn.recv()  # blocks only when there is nothing to step
                if cmd == "stop":  # the server's engine thread has aborted every request
                    send(("reply", ident, None, engine_counts(engine)))
                    return
                # one message of commands, one message of answers: answering each command on
                # its own could fill the pipe towards a server still sending the rest
                answers: list[tuple[bool, Any]] = []
                for name, arg in calls:
                    try:
                        if name == "add":
                            engine.add_request(*_as_delta(*arg))
                            answers.append((True, None))
                        elif name == "abort":
                            answers.append((True, abort_answer(engine, encoder, arg)))
                        else:
                            raise EngineProcessError(f"unknown command {name!r}")
                    except Exception as exc:
                        answers.append((False, _portable(exc)))
                send(("reply", ident, answers, engine_counts(engine)))
            try:
                step = step_deltas(engine, encoder)
            except Exception as exc:  # rolled back by the engine; the server aborts the rest
                send(("error", None, _portable(exc), engine_counts(engine)))
                continue
            send(("step", None, step, engine_counts(engine)))
        except (EOFError, OSError, BrokenPipeError):  # the parent is gone
            return


@dataclass(frozen=True)
class _ModelFacts:
    """What the server reads of the model's config."""

    vocab_size: int


class EngineProcess:
    """An :class:`~fast.engine.engine.LLMEngine` in a child process, driven over a pipe.

    ``EngineProcess(model, **llm_kwargs)`` starts the child (``spawn``: safe with CUDA) and
    waits until its ``LLM`` is built (raising what the child raised, e.g. a model that is not
    there). ``model`` is what ``LLM`` takes, or a picklable factory the child calls to make it
    (random weights built where they are used, not sent through the pipe). Not thread-safe: one
    thread (the server's engine thread) issues the commands.
    """

    def __init__(self, model: Any = None, *, start_timeout: float = 1800.0, **kwargs: Any):
        import torch

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main,
            args=(child, model, kwargs, torch.get_num_threads()),
            name="pagedkv-engine",
            daemon=True,
        )
        start_ignoring_sigint(self._proc)  # the server decides what a Ctrl-C stops
        child.close()
        self._decoder = DeltaDecoder()
        self._closed = False
        self._ident = 0  # the last command's number
        self._ready: dict[str, RequestOutput] = {}  # step outputs not yet taken by step()
        self._error: BaseException | None = None  # a step's failure, raised by step()
        if not self._conn.poll(start_timeout):
            self.close()
            raise EngineProcessError(f"the engine process did not start in {start_timeout} s")
        kind, payload, extra = self._receive()
        if kind != "ready":
            self.close()
            error = _rebuild(*payload)
            raise error from EngineProcessError(f"in the engine process:\n{extra}")
        info: _Info = payload
        self._apply(extra)
        self.tokenizer = info.tokenizer
        self.model_config = _ModelFacts(info.vocab_size)
        self.max_model_len = info.max_model_len
        self.max_logprobs = info.max_logprobs
        self.default_sampling_fields = info.default_sampling_fields

    # -- the LLM face: what the server reads
    @property
    def llm_engine(self) -> EngineProcess:
        return self

    # -- the LLMEngine face: what AsyncEngine calls
    def add_request(self, request_id: str, prompt: Any, params: Any = None) -> None:
        ((ok, error),) = self.call_many([("add", (request_id, prompt, params))])
        if not ok:
            raise error

    def abort_request(self, request_id: str) -> RequestOutput | None:
        ((ok, result),) = self.call_many([("abort", request_id)])
        if not ok:
            raise result
        final: RequestOutput | None = result
        return final

    def call_many(self, calls: list[tuple[str, Any]]) -> list[tuple[bool, Any]]:
        """``("add", (request_id, prompt, params))`` and ``("abort", request_id)`` sent as one
        message, answered by one, in order: ``(True, result)`` or ``(False, exception)`` each
        (an abort's result is the request's final output or None)."""
        answers = self._call("batch", calls)
        results: list[tuple[bool, Any]] = []
        for (name, arg), (ok, payload) in zip(calls, answers):
            if not ok:
                results.append((False, _rebuild(*payload)))
            elif name == "abort" and payload is None:
                self._decoder.forget(arg)
                results.append((True, None))
            elif name == "abort":
                results.append((True, self._decoder.decode(payload)))
            else:
                results.append((True, payload))
        return results

    def step(self) -> list[RequestOutput]:
        """The outputs of every step the engine process finished since the last call (each
        request's newest; outputs are cumulative), waiting for one if none has arrived."""
        if self._closed:
            raise EngineProcessError("the engine process was closed")
        if not self._ready:
            self._take(self._receive())
        while self._conn.poll(0):
            self._take(self._receive())
        ready, self._ready = self._ready, {}
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return list(ready.values())

    def has_unfinished_requests(self) -> bool:
        return bool(self._snap["unfinished"]) or bool(self._ready) or self._error is not None

    @property
    def num_gpu_blocks(self) -> int:
        return self._snap["num_gpu_blocks"]

    @property
    def num_free_gpu_blocks(self) -> int:
        return self._snap["num_free_gpu_blocks"]

    def counts(self) -> dict[str, int]:
        """:func:`engine_counts` of the child's engine, as of the last reply."""
        return dict(self._snap)

    # -- the pipe
    def _apply(self, snap: dict[str, int]) -> None:
        self._snap = snap

    def _receive(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            code = self._proc.exitcode
            raise EngineProcessError(f"the engine process died (exit code {code})") from exc

    def _take(self, message: Any) -> Any:
        """Apply one message from the child in order: keep a step's outputs (or its error)
        for :meth:`step`; return the answer to the command in flight."""
        kind, ident, payload, snap = message
        self._apply(snap)
        if kind == "step":
            for out in self._decoder.decode_step(*payload):
                self._ready.pop(out.request_id, None)  # re-inserted: newest last
                self._ready[out.request_id] = out
        elif kind == "error":  # a step failed (and was rolled back)
            self._error = _rebuild(*payload)
        elif ident != self._ident:
            raise EngineProcessError(f"an answer to command {ident}, expected {self._ident}")
        return payload

    def _call(self, cmd: str, arg: Any) -> Any:
        if self._closed:
            raise EngineProcessError("the engine process was closed")
        self._ident += 1
        try:
            self._conn.send((cmd, self._ident, arg))
        except (OSError, ValueError) as exc:
            raise EngineProcessError(f"the engine process is gone ({exc})") from exc
        while True:  # steps finished before the answer are kept, in order, for step()
            message = self._receive()
            answer = self._take(message)
            if message[0] == "reply":
                return answer

    def close(self, timeout: float = 30.0) -> None:
        """Abort what still runs, stop the child and wait for it (idempotent)."""
        if self._closed:
            return
        try:
            if self._proc.is_alive():
                self._ident += 1
                self._conn.send(("stop", self._ident, None))
                deadline = time.monotonic() + timeout
                while self._conn.poll(max(0.0, deadline - time.monotonic())):
                    kind, ident, _, snap = self._conn.recv()
                    self._apply(snap)
                    if ident == self._ident:
                        break
        except (EOFError, OSError, ValueError):
            pass
        self._closed = True
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
