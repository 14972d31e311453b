"""The server's Prometheus metrics, with vLLM's names where vLLM has the metric.

Gauges and the engine's own counters are read from the engine thread's latest
:class:`~fast.api.async_engine.EngineSnapshot` when Prometheus scrapes (a collector, so nothing
is copied per step); per-request figures (time to first token, inter-token latency, end-to-end
latency, queue time, finished requests by reason, prompt tokens) are observed by the engine
thread as they happen (:class:`ServerMetrics` is its :class:`~fast.api.async_engine.Observer`).

Each server has its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fast.api.async_engine import EngineSnapshot
from fast.engine.outputs import RequestOutput

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds)
_TTFT: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75)
_TTFT += (1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75)
_ITL += (1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E: tuple[float, ...] = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0)
_E2E += (40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _SnapshotCollector(Collector):
    """Gauges and engine counters from the latest snapshot, at scrape time."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], model: str) -> None:
        self._snapshot = snapshot
        self._model = model

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        labels = ["model_name"]
        value = [self._model]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        used = 1.0 - s.num_free_gpu_blocks / s.num_gpu_blocks if s.num_gpu_blocks else 0.0
        yield gauge("vllm:num_requests_running", "Sequences in the running batch.", s.running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.waiting)
        yield gauge("vllm:num_requests_swapped", "Sequences swapped out to the CPU.", s.swapped)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", used)
        yield counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_queries,
        )  # fmt: skip
        yield counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
            s.prefix_cache_hits,
        )  # fmt: skip
        yield counter("vllm:generation_tokens", "Tokens generated.", s.generated_tokens)
        yield counter("vllm:num_preemptions", "Recompute preemptions.", s.preempted)
        yield gauge("pagedkv:num_gpu_blocks", "KV-cache blocks on the device.", s.num_gpu_blocks)
        yield gauge(
            "pagedkv:num_free_gpu_blocks", "Free KV-cache blocks on the device.",
            s.num_free_gpu_blocks,
        )  # fmt: skip
        yield counter("pagedkv:preemptions", "Recompute preemptions.", s.preempted)
        yield counter("pagedkv:swapped_out", "Sequences swapped out.", s.swapped_out)
        yield counter(
            "pagedkv:copy_on_write_blocks", "Copy-on-write block copies.", s.copied_blocks
        )
        yield counter("pagedkv:engine_steps", "Engine steps run.", s.steps)


class ServerMetrics:
    """The registry of one server and the engine thread's observer."""

    def __init__(self, model: str, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.model = model
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created (as vLLM)
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(snapshot, model))
        reg: Any = self.registry
        lbl = ["model_name"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens prefilled.", lbl, registry=reg
        ).labels(model)
        self.success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from arrival to the first token.",
            lbl,
            buckets=_TTFT,
            registry=reg,
        ).labels(model)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between two tokens of a request.",
            lbl,
            buckets=_ITL,
            registry=reg,
        ).labels(model)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            lbl,
            buckets=_E2E,
            registry=reg,
        ).labels(model)
        self.queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Time from arrival to the first schedule.",
            lbl,
            buckets=_E2E,
            registry=reg,
        ).labels(model)

    # -- Observer -------------------------------------------------------------------------
    def first_token(self, ttft: float, prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(prompt_tokens)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(
        self, out: RequestOutput, e2e: float, queue_time: float | None, aborted: bool
    ) -> None:
        if queue_time is not None:
            self.queue.observe(queue_time)
        if aborted:
            self.success.labels(self.model, "abort").inc()
            return
        self.e2e.observe(e2e)
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.success.labels(self.model, reason or "abort").inc()

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return bytes(generate_latest(self.registry))
