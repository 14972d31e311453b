"""Random request streams run through a scheduler, and two schedulers run in lockstep.

A :class:`Workload` is a scheduler configuration, a block-manager configuration and a list of
requests (arrival step, prompt, number of tokens to generate, optional abort step, number of
sequences ``n``: the other ``n - 1`` are forked from the first at its first sampled token, the
way ``fast.engine.engine`` does it). :func:`run`
plays it against one implementation with a deterministic fake model (the token sampled for a
sequence is a function of its id and length), checks the limits of every step and that the pool
is whole again at the end. :func:`run_lockstep` plays it against two implementations and
requires equal :class:`~spec.scheduler.SchedulerOutput` at every step. :func:`workloads` is the
hypothesis strategy drawing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from conformance.scheduler.protocol import SchedulerFactory, SchedulerImpl
from spec.scheduler import PreemptionMode, SchedulerConfig, SchedulerOutput, StepOutcome

__all__ = [
    "RequestSpec",
    "Workload",
    "SchedulerConformanceError",
    "run",
    "run_lockstep",
    "workloads",
    "check_scheduler",
    "SCHEDULER_CI_EXAMPLES",
]


class SchedulerConformanceError(AssertionError):
    """A scheduler broke a limit, stalled, leaked blocks, or differs from the reference."""


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload."""

    seq_id: int
    arrival_step: int
    prompt: tuple[int, ...]
    max_tokens: int
    abort_step: int | None = None
    n: int = 1
    abort_in_flight: bool = False  # abort between schedule() and update() of abort_step

    def child_ids(self) -> list[int]:
        """The ids of the ``n - 1`` forked sequences."""
        return [self.seq_id + CHILD_ID_STRIDE * k for k in range(1, self.n)]


#: A request's child ``k`` has id ``seq_id + CHILD_ID_STRIDE * k`` (workload ids stay below it).
CHILD_ID_STRIDE = 10_000


@dataclass(frozen=True)
class Workload:
    """Everything a run needs; ``bm_config`` is a ``spec.block_manager.BlockManagerConfig``."""

    config: SchedulerConfig
    bm_config: Any
    requests: tuple[RequestSpec, ...]
    vocab: int = 50


def _token(seq_id: int, length: int, vocab: int) -> int:
    return (seq_id * 31 + length * 7) % vocab


class _Driver:
    """Feeds one implementation the events of a workload, step by step."""

    def __init__(self, impl: SchedulerImpl, wl: Workload) -> None:
        self.impl, self.wl = impl, wl
        self.length: dict[int, int] = {}  # live seq id -> prompt + generated
        self.generated: dict[int, int] = {}
        self.total_free = impl.num_free_gpu_blocks
        self.step_no = 0
        self.last_arrival = max([r.arrival_step for r in wl.requests], default=0)
        self.by_id = {r.seq_id: r for r in wl.requests}
        for r in wl.requests:
            self.by_id.update((c, r) for c in r.child_ids())
        self.unforked: dict[int, list[int]] = {}  # parent id -> children not forked yet
        self.abort_trace: list[tuple[int, int]] = []  # (seq id, free blocks after) per abort

    def step(self) -> SchedulerOutput:
        wl, cfg = self.wl, self.wl.config
        for r in wl.requests:
            if r.arrival_step == self.step_no:
                self.impl.add_request(r.seq_id, r.prompt)
                self.length[r.seq_id] = len(r.prompt)
                self.generated[r.seq_id] = 0
                if r.n > 1:
                    self.unforked[r.seq_id] = r.child_ids()
        for r in wl.requests:
            if r.abort_step == self.step_no and not r.abort_in_flight:
                # the whole request, as the engine aborts
                self.unforked.pop(r.seq_id, None)
                for sid in [r.seq_id, *r.child_ids()]:
                    if sid in self.length:
                        self.impl.abort_request(sid)
                        del self.length[sid]
        out = self.impl.schedule()
        self._check_limits(out)
        sampled: dict[int, int] = {}
        finished: set[int] = set()
        for s in out.scheduled:
            if s.sample:
                self._sample(s.seq_id, self.length[s.seq_id], sampled, finished)
        forked: set[int] = set()
        for s in out.scheduled:  # children start at their parent's first token
            if not s.sample or s.seq_id not in self.unforked:
                continue
            prompt_len = len(self.by_id[s.seq_id].prompt)  # nothing generated before
            for child in self.unforked.pop(s.seq_id):
                token_finishes = (
                    self.by_id[child].max_tokens <= 1 or prompt_len + 1 >= cfg.max_model_len
                )
                if token_finishes:  # the engine never forks a child finished at once
                    continue
                if self.impl.fork(s.seq_id, child):
                    self._sample(child, prompt_len, sampled, finished)
                    forked.add(child)
        in_step = {s.seq_id for s in out.scheduled} | set(out.swapped_out) | forked
        for r in wl.requests:
            if r.abort_step == self.step_no and r.abort_in_flight:
                self._abort_in_flight(r, in_step, sampled, finished)
        self.impl.update(StepOutcome(sampled, frozenset(finished)))
        self.step_no += 1
        return out

    def _abort_in_flight(
        self, r: RequestSpec, in_step: set[int], sampled: dict[int, int], finished: set[int]
    ) -> None:
        """Abort request ``r`` while the step is in flight (property ``freed_while_in_flight``).

        A sequence the step uses must keep its blocks until ``update()``: the engine is still
        reading and writing them, so the free pool must not grow.
        """
        self.unforked.pop(r.seq_id, None)
        for sid in [r.seq_id, *r.child_ids()]:
            if sid not in self.length and sid not in sampled:
                continue  # not live (never added, finished before, or a child never forked)
            before = self.impl.num_free_gpu_blocks
            self.impl.abort_request(sid)
            after = self.impl.num_free_gpu_blocks
            self.length.pop(sid, None)
            sampled.pop(sid, None)
            finished.discard(sid)
            self.abort_trace.append((sid, after))
            if sid in in_step and after != before:
                raise SchedulerConformanceError(
                    f"freed_while_in_flight: step {self.step_no}: sequence {sid} was aborted "
                    f"while the step in flight uses its blocks, and {after - before} blocks "
                    "went back to the free pool before update()"
                )

    def _sample(self, sid: int, length: int, sampled: dict[int, int], finished: set[int]) -> None:
        sampled[sid] = _token(sid, length, self.wl.vocab)
        self.length[sid] = length + 1
        self.generated[sid] = self.generated.get(sid, 0) + 1
        if (
            self.generated[sid] >= self.by_id[sid].max_tokens
            or self.length[sid] >= self.wl.config.max_model_len
        ):
            finished.add(sid)
            del self.length[sid]

    @property
    def done(self) -> bool:
        return self.step_no > self.last_arrival and not self.impl.has_unfinished_requests()

    def _check_limits(self, out: SchedulerOutput) -> None:
        cfg = self.wl.config
        ids = [s.seq_id for s in out.scheduled]
        if out.num_batched_tokens > cfg.max_num_batched_tokens:
            raise SchedulerConformanceError(
                f"step {self.step_no}: {out.num_batched_tokens} tokens > budget "
                f"{cfg.max_num_batched_tokens}"
            )
        if len(ids) > cfg.max_num_seqs or len(set(ids)) != len(ids):
            raise SchedulerConformanceError(f"step {self.step_no}: scheduled {ids}")
        if any(
            s.num_tokens < 1 or s.start + s.num_tokens > cfg.max_model_len for s in out.scheduled
        ):
            raise SchedulerConformanceError(f"step {self.step_no}: bad shares {out.scheduled}")
        if (
            out.is_empty
            and self.impl.has_unfinished_requests()
            and self.step_no > self.last_arrival
        ):
            raise SchedulerConformanceError(f"step {self.step_no}: stalled with work left")

    def check_end(self) -> None:
        free = self.impl.num_free_gpu_blocks
        if free != self.total_free:
            raise SchedulerConformanceError(
                f"{self.total_free - free} blocks leaked after every request ended"
            )


def run(impl: SchedulerImpl, wl: Workload, max_steps: int = 20_000) -> list[SchedulerOutput]:
    """Play ``wl`` against ``impl``; returns the output of every step."""
    driver = _Driver(impl, wl)
    outputs = []
    while not driver.done:
        if driver.step_no >= max_steps:
            raise SchedulerConformanceError(f"not done after {max_steps} steps")
        outputs.append(driver.step())
    driver.check_end()
    return outputs


def run_lockstep(
    reference: SchedulerFactory, candidate: SchedulerFactory, wl: Workload, max_steps: int = 20_000
) -> int:
    """Play ``wl`` against both; equal outputs at every step. Returns the number of steps."""
    a = _Driver(reference(wl.config, wl.bm_config), wl)
    b = _Driver(candidate(wl.config, wl.bm_config), wl)
    while not (a.done and b.done):
        if a.step_no >= max_steps:
            raise SchedulerConformanceError(f"not done after {max_steps} steps")
        step = a.step_no
        out_a, out_b = a.step(), b.step()
        if a.abort_trace != b.abort_trace:
            raise SchedulerConformanceError(
                f"step {step}: free blocks after each abort differ:\n reference "
                f"{a.abort_trace}\n candidate {b.abort_trace}"
            )
        if out_a != out_b:
            raise SchedulerConformanceError(
                f"step {step} differs:\n reference {out_a}\n candidate {out_b}"
            )
    a.check_end()
    b.check_end()
    return a.step_no


@st.composite
def workloads(draw: st.DrawFn, max_requests: int = 8, focus: str | None = None) -> Workload:
    """Small pools, short prompts, both preemption modes, chunked prefill on and off.

    ``focus="swap"``: swap preemption in the tightest pools, with small blocks, many and long
    requests (swap-out and swap-in at the edge of capacity). ``focus="abort_in_flight"``: half
    the requests are aborted, all of them between ``schedule()`` and ``update()``.
    """
    from spec.block_manager import BlockManagerConfig

    swap_focus = focus == "swap"
    block_size = draw(st.sampled_from([1, 2] if swap_focus else [1, 2, 4]))
    max_model_len = draw(st.integers(4, 24))
    min_blocks = -(-max_model_len // block_size)
    # half the pools are as tight as a max_model_len sequence allows: preemption, swap and
    # swap-in at the edge of capacity happen within a few steps
    tight = swap_focus or draw(st.booleans())
    num_gpu_blocks = min_blocks + (
        draw(st.integers(0, 1)) if tight else draw(st.integers(0, min_blocks))
    )
    mode: PreemptionMode = "swap" if swap_focus else draw(st.sampled_from(["recompute", "swap"]))
    num_cpu_blocks = draw(st.integers(0, num_gpu_blocks)) if mode == "swap" else 0
    if mode == "swap" and tight:
        num_cpu_blocks = num_gpu_blocks  # room to swap out, so swap-in decisions follow
    chunked = draw(st.booleans())
    max_num_seqs = draw(st.integers(1, 6))
    low = max_num_seqs if chunked else max(max_num_seqs, max_model_len)
    budget = draw(st.integers(low, low + 16))
    prefix = draw(st.booleans())
    vocab = draw(st.sampled_from([3, 50]))
    config = SchedulerConfig(max_num_seqs, budget, max_model_len, chunked, mode)
    bm_config = BlockManagerConfig(
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        num_cpu_blocks=num_cpu_blocks,
        enable_prefix_caching=prefix,
    )
    n = draw(st.integers(max_requests // 2 if swap_focus else 1, max_requests))
    requests = []
    for i in range(n):
        plen = draw(st.integers(1, max_model_len))
        prompt = tuple(draw(st.lists(st.integers(0, vocab - 1), min_size=plen, max_size=plen)))
        arrival = draw(st.integers(0, 3))
        if focus == "abort_in_flight":
            abort = draw(st.one_of(st.none(), st.integers(arrival, arrival + 8)))
        else:
            abort = draw(st.one_of(st.none(), st.none(), st.integers(arrival, arrival + 12)))
        n_seqs = draw(st.sampled_from([1, 1, 2, 3]))
        in_flight = abort is not None and (focus == "abort_in_flight" or draw(st.booleans()))
        max_tokens = draw(st.integers(8 if swap_focus else 1, 16))
        requests.append(
            RequestSpec(i, arrival, prompt, max_tokens, abort, n_seqs, abort_in_flight=in_flight)
        )
    return Workload(config, bm_config, tuple(requests), vocab)


#: The scheduler's named properties: each searches request streams drawn with a focus.
SCHEDULER_PROPERTIES: dict[str, str | None] = {
    "same_decisions": None,
    "swap_in_reserves_append": "swap",
    "freed_while_in_flight": "abort_in_flight",
}

#: Request streams per scheduler property in CI (``python -m conformance`` and the tests).
SCHEDULER_CI_EXAMPLES = 150


def check_scheduler(
    candidate: SchedulerFactory,
    reference: SchedulerFactory | None = None,
    max_examples: int = SCHEDULER_CI_EXAMPLES,
    shrink: bool = True,
    seed: int | None = None,
    on_workload: Callable[[Workload], None] | None = None,
    focus: str | None = None,
) -> None:
    """Hypothesis property: ``candidate`` makes the reference's decisions on random workloads.

    ``focus`` picks the workloads of one of :data:`SCHEDULER_PROPERTIES` (see :func:`workloads`).

    ``shrink=False`` reports the first failing workload as found (faster, longer to read).
    ``seed`` None is deterministic (``derandomize``); a seed draws other, repeatable streams.
    ``on_workload`` sees every workload before it runs (for counting).
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from conformance.scheduler.protocol import SpecSchedulerAdapter

    ref = reference if reference is not None else SpecSchedulerAdapter

    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.generate)

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=seed is None,
        phases=phases,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(workloads(focus=focus))
    def prop(wl: Workload) -> None:
        if on_workload is not None:
            on_workload(wl)
        run_lockstep(ref, candidate, wl)

    if seed is not None:
        prop = hypothesis_seed(seed)(prop)
    prop()
