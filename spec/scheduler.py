"""The scheduler specification: iteration-level continuous batching over a paged KV pool.

Each engine step the scheduler decides which sequences run and how many of their tokens are
computed. The decision is a pure function of the events seen so far (requests added, aborted,
and the outcome of every previous step) and of the block manager's answers, so two schedulers
fed the same events over equivalent block managers make the same decisions step by step.

Policy (one step, in this order; every queue is kept in arrival order, oldest first):

1. **Running decodes.** Every running sequence whose prompt is computed gets one token (the one
   sampled last step), oldest first. When the pool cannot take that token, the *most recently
   arrived* running sequence that is not yet scheduled in this step is preempted, and the check
   repeats; when no such sequence is left, the sequence itself is preempted.
2. **Running prefills** (chunked prefill only): running sequences whose prompt is still being
   computed get the next chunk, at most the token budget that is left.
3. **Swapped** (only when nothing was preempted in this step): swapped sequences come back, oldest
   first, while the pool can take their blocks *plus* the token about to be appended.
4. **Waiting** (only when nothing was preempted in this step and nothing is swapped): new and
   preempted requests are admitted, oldest first (first come, first served: a request that does
   not fit stops the admission; nobody overtakes it). Without chunked prefill the whole prompt
   must fit the token budget that is left; with it, the prompt's first chunk takes what is left.

Preemption by *recompute* frees the sequence's blocks and puts it back in the waiting queue, in
arrival order (hence at the front); its prompt becomes the prompt plus everything generated so
far. Preemption by *swap* moves the blocks to the host pool (the swapped queue); it applies to
sequences in the decode phase, and falls back to recompute when the host pool is full or the
sequence is still in its prefill.

Fork (``n > 1`` sampling): in the step where a parent samples its first token, a child can be
forked from it (:meth:`Scheduler.fork`): it shares the parent's blocks and computed prefix, samples
its own first token in the same step, and from then on is a running sequence like any other. It
sorts right after its parent (and the parent's earlier children) in every queue.

Abort while a step is in flight (between :meth:`Scheduler.schedule` and
:meth:`Scheduler.update`): the request leaves every queue at once, but when the step in flight
uses its blocks (it is scheduled in the step, swapped out by it, or forked in it) they are *not*
returned to the pool yet: the engine is still reading and writing them. They are freed at the
start of :meth:`Scheduler.update`, in abort order, before the finished sequences; until then the
id stays taken. Any other abort frees at once.

Limits: at most ``max_num_seqs`` sequences hold blocks on the device (the running queue), at
most ``max_num_batched_tokens`` tokens are computed per step.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from spec.errors import (
    InvalidArgumentError,
    PagedKVError,
    SequenceExistsError,
    SequenceStateError,
    SwapOutError,
    UnknownSequenceError,
)

__all__ = [
    "BlockManagerLike",
    "PreemptionMode",
    "ScheduledSequence",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOrderError",
    "SchedulerOutput",
    "StepOutcome",
]

PreemptionMode = Literal["recompute", "swap"]
Status = Literal["waiting", "running", "swapped"]


class SchedulerOrderError(PagedKVError):
    """``schedule`` and ``update`` must alternate: ``call`` came out of turn."""

    def __init__(self, call: str, reason: str) -> None:
        self.call = call
        self.reason = reason
        super().__init__(f"{call}() out of turn: {reason}")


class BlockManagerLike(Protocol):
    """The part of ``spec.block_manager.BlockManager`` the scheduler uses."""

    def can_allocate(self, token_ids: Sequence[int], extra_key: str | None = None) -> bool: ...

    def can_append(self, seq_ids: Sequence[int]) -> bool: ...

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 1) -> bool: ...

    def allocate(
        self, seq_id: int, token_ids: Sequence[int], extra_key: str | None = None
    ) -> int: ...

    def append(self, seq_id: int, token_id: int) -> tuple[int, int] | None: ...

    def free(self, seq_id: int) -> None: ...

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]: ...

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]: ...

    def fork(self, parent_id: int, child_id: int) -> None: ...

    def mark_computed_batch(self, seq_ids: Sequence[int], num_tokens: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits and switches of the scheduler.

    Attributes:
        max_num_seqs: most sequences in the running queue (holding device blocks).
        max_num_batched_tokens: most tokens computed in one step (the token budget).
        max_model_len: longest sequence (prompt + generated) the model serves.
        enable_chunked_prefill: compute a long prompt over several steps.
        preemption_mode: ``"recompute"`` or ``"swap"``.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = False
    preemption_mode: PreemptionMode = "recompute"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if value < 1:
                raise InvalidArgumentError(name, value, "must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidArgumentError(
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                f"must be >= max_num_seqs ({self.max_num_seqs}) so every decode fits a step",
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise InvalidArgumentError(
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                f"without chunked prefill must be >= max_model_len ({self.max_model_len}) "
                "so every prompt fits one step",
            )
        if self.preemption_mode not in ("recompute", "swap"):
            raise InvalidArgumentError(
                "preemption_mode", self.preemption_mode, "must be 'recompute' or 'swap'"
            )


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step.

    Attributes:
        seq_id: the sequence.
        start: tokens of the sequence already computed before this step (its KV is cached).
        num_tokens: tokens computed in this step, positions ``start .. start + num_tokens - 1``.
        sample: the step reaches the last known token, so the engine samples the next one.
    """

    seq_id: int
    start: int
    num_tokens: int
    sample: bool


@dataclass(frozen=True)
class SchedulerOutput:
    """The decisions of one step.

    The engine applies the cache operations in the order swap out, swap in, copy, then runs the
    model over ``scheduled`` and samples in this order (on CUDA the model's batch puts the
    single-token sequences first; the sampled rows are read back in this order).
    """

    scheduled: tuple[ScheduledSequence, ...] = ()
    preempted: tuple[int, ...] = ()
    swapped_out: tuple[int, ...] = ()
    swapped_in: tuple[int, ...] = ()
    blocks_to_swap_out: tuple[tuple[int, int], ...] = ()
    blocks_to_swap_in: tuple[tuple[int, int], ...] = ()
    blocks_to_copy: tuple[tuple[int, int], ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed in this step."""
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Nothing runs in this step."""
        return not self.scheduled


@dataclass(frozen=True)
class StepOutcome:
    """What the engine reports after running a step.

    Attributes:
        sampled: ``seq_id -> token id`` for every scheduled sequence with ``sample`` set.
        finished: sequences that stop after this step (a subset of ``sampled``'s keys).
    """

    sampled: Mapping[int, int] = field(default_factory=dict)
    finished: frozenset[int] = frozenset()


@dataclass
class _Request:
    """The scheduler's state of one sequence."""

    seq_id: int
    arrival: tuple[int, ...]  # a forked child: its parent's key plus its fork number
    token_ids: list[int]
    num_computed: int = 0
    in_pool: bool = False  # holds blocks (device or host)
    pending: bool = False  # last token sampled, not yet in the pool: a decode is due
    status: Status = "waiting"
    forks: int = 0  # children forked from this sequence so far


class Scheduler:
    """First-come-first-served continuous batching with chunked prefill and preemption.

    Drive it with :meth:`add_request` and :meth:`abort_request` at any time between steps, and
    per step with :meth:`schedule` followed by :meth:`update`.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManagerLike) -> None:
        self.config = config
        self.block_manager = block_manager
        self._requests: dict[int, _Request] = {}
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._swapped: list[_Request] = []
        self._arrivals = 0
        self._expected: set[int] | None = None  # sequences that sample in the step in flight
        self._in_step: set[int] = set()  # sequences whose blocks the step in flight uses
        self._step_order: list[int] = []  # the step in flight's sequences, scheduled order
        self._deferred: list[int] = []  # aborted during the step: freed at update()

    # -- queries --------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        """Some request is waiting, running or swapped."""
        return bool(self._requests)

    @property
    def waiting(self) -> tuple[int, ...]:
        """Waiting sequence ids, in arrival order."""
        return tuple(r.seq_id for r in self._waiting)

    @property
    def running(self) -> tuple[int, ...]:
        """Running sequence ids, in arrival order."""
        return tuple(r.seq_id for r in self._running)

    @property
    def swapped(self) -> tuple[int, ...]:
        """Swapped sequence ids, in arrival order."""
        return tuple(r.seq_id for r in self._swapped)

    def token_ids(self, seq_id: int) -> list[int]:
        """Every known token of the sequence: prompt, then generated tokens."""
        return list(self._get(seq_id).token_ids)

    def num_computed(self, seq_id: int) -> int:
        """Tokens of the sequence whose KV is computed (or computed by the step in flight)."""
        return self._get(seq_id).num_computed

    # -- events ---------------------------------------------------------------------------
    def add_request(self, seq_id: int, prompt_token_ids: Sequence[int]) -> None:
        """Queue a new sequence; it arrives after every sequence added before."""
        if seq_id in self._requests or seq_id in self._deferred:
            raise SequenceExistsError(seq_id)
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidArgumentError("prompt_token_ids", [], f"empty prompt for {seq_id}")
        if n > self.config.max_model_len:
            raise InvalidArgumentError(
                "len(prompt_token_ids)",
                n,
                f"longer than max_model_len {self.config.max_model_len} (sequence {seq_id})",
            )
        req = _Request(seq_id, (self._arrivals,), [int(t) for t in prompt_token_ids])
        self._arrivals += 1
        self._requests[seq_id] = req
        self._insert(self._waiting, req, "waiting")

    def fork(self, parent_id: int, child_id: int) -> None:
        """Start ``child_id`` as a running copy of ``parent_id`` that shares its blocks (n > 1).

        Call it between :meth:`schedule` and :meth:`update` of the step in which the parent
        samples (the engine forks at the parent's first sampled token). The child gets the
        parent's known tokens and computed count and the block manager's ``fork`` (shared blocks,
        reference counts raised); it samples in this step too: the step's outcome carries the
        child's first token in ``sampled`` (and may finish it), and its next step decodes that
        token like any running sequence (copy-on-write of the shared last block). The child sorts
        right after the parent and the parent's earlier children in every queue. It does not
        check ``max_num_seqs``: the caller keeps the running queue within it.

        Raises SequenceExistsError (``child_id`` live), UnknownSequenceError (parent unknown),
        SequenceStateError (parent swapped out), InvalidArgumentError (parent not running with
        its blocks in the pool, or not sampling in the step in flight), SchedulerOrderError (no
        step in flight).
        """
        if child_id in self._requests or child_id in self._deferred:
            raise SequenceExistsError(child_id)
        parent = self._get(parent_id)
        if parent.status == "swapped":
            raise SequenceStateError(parent_id, True, "fork")
        if parent.status != "running" or not parent.in_pool:
            raise InvalidArgumentError(
                "parent.status",
                parent.status,
                f"fork needs running sequence {parent_id} in the pool",
            )
        if self._expected is None:
            raise SchedulerOrderError("fork", "no step is in flight")
        if parent_id not in self._expected:
            raise InvalidArgumentError("parent_id", parent_id, "does not sample in this step")
        self.block_manager.fork(parent_id, child_id)
        parent.forks += 1
        child = _Request(
            child_id,
            parent.arrival + (parent.forks,),
            list(parent.token_ids),
            parent.num_computed,
            in_pool=True,
        )
        self._requests[child_id] = child
        self._insert(self._running, child, "running")
        self._expected.add(child_id)
        self._in_step.add(child_id)
        self._step_order.append(child_id)

    def abort_request(self, seq_id: int) -> None:
        """Drop a sequence wherever it is; its blocks go back to the pool.

        During a step that uses its blocks, they go back at the next :meth:`update` instead
        (see the module docstring: the step in flight still reads them).
        """
        req = self._get(seq_id)
        self._queue(req.status).remove(req)
        if req.in_pool and self._expected is not None and seq_id in self._in_step:
            self._deferred.append(seq_id)
        elif req.in_pool:
            self.block_manager.free(seq_id)
        del self._requests[seq_id]
        if self._expected is not None:
            self._expected.discard(seq_id)

    def schedule(self) -> SchedulerOutput:
        """Decide the next step (see the module docstring for the policy)."""
        if self._expected is not None:
            raise SchedulerOrderError("schedule", "update() of the previous step is missing")
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        done: set[int] = set()
        preempted: list[int] = []
        swapped_out: list[int] = []
        swapped_in: list[int] = []
        swap_out_map: list[tuple[int, int]] = []
        swap_in_map: list[tuple[int, int]] = []
        copies: list[tuple[int, int]] = []

        def preempt(victim: _Request) -> None:
            self._running.remove(victim)
            if cfg.preemption_mode == "swap" and victim.pending:
                try:
                    swap_out_map.extend(self.block_manager.swap_out(victim.seq_id))
                except SwapOutError:
                    pass
                else:
                    swapped_out.append(victim.seq_id)
                    self._insert(self._swapped, victim, "swapped")
                    return
            self.block_manager.free(victim.seq_id)
            victim.in_pool = False
            victim.pending = False
            victim.num_computed = 0
            preempted.append(victim.seq_id)
            self._insert(self._waiting, victim, "waiting")

        def add(req: _Request, n: int) -> None:
            nonlocal budget
            start = req.num_computed
            req.num_computed += n
            budget -= n
            done.add(req.seq_id)
            scheduled.append(
                ScheduledSequence(req.seq_id, start, n, req.num_computed == len(req.token_ids))
            )

        def append_pending(req: _Request) -> None:
            cow = self.block_manager.append(req.seq_id, req.token_ids[-1])
            req.pending = False
            if cow is not None:
                copies.append((int(cow[0]), int(cow[1])))

        # 1. running decodes, oldest first; preempt the newest unscheduled one when full.
        for req in list(self._running):
            if req.status != "running" or not req.pending:
                continue
            while not self.block_manager.can_append([req.seq_id]):
                victims = [r for r in self._running if r.seq_id not in done and r is not req]
                preempt(victims[-1] if victims else req)
                if not victims:
                    break
            if req.status != "running":
                continue
            append_pending(req)
            add(req, 1)

        # 2. running prefills (chunked prefill only), oldest first.
        for req in self._running:
            remaining = len(req.token_ids) - req.num_computed
            if req.seq_id in done or remaining == 0 or budget == 0:
                continue
            add(req, min(remaining, budget))

        if not preempted and not swapped_out:
            # 3. swapped sequences come back first, counting the token about to be appended.
            while self._swapped:
                req = self._swapped[0]
                if len(self._running) >= cfg.max_num_seqs or budget < 1:
                    break
                if not self.block_manager.can_swap_in(req.seq_id, 1):
                    break
                swap_in_map.extend(self.block_manager.swap_in(req.seq_id))
                self._swapped.pop(0)
                self._insert(self._running, req, "running")
                swapped_in.append(req.seq_id)
                append_pending(req)
                add(req, 1)

            # 4. waiting requests, first come first served.
            while self._waiting and not self._swapped:
                req = self._waiting[0]
                if len(self._running) >= cfg.max_num_seqs or budget == 0:
                    break
                if not cfg.enable_chunked_prefill and len(req.token_ids) > budget:
                    break
                if not self.block_manager.can_allocate(req.token_ids):
                    break
                cached = self.block_manager.allocate(req.seq_id, req.token_ids)
                self._waiting.pop(0)
                req.in_pool = True
                req.num_computed = cached
                self._insert(self._running, req, "running")
                add(req, min(len(req.token_ids) - cached, budget))

        self._expected = {s.seq_id for s in scheduled if s.sample}
        self._in_step = {s.seq_id for s in scheduled} | set(swapped_out)
        self._step_order = [s.seq_id for s in scheduled]
        return SchedulerOutput(
            scheduled=tuple(scheduled),
            preempted=tuple(preempted),
            swapped_out=tuple(swapped_out),
            swapped_in=tuple(swapped_in),
            blocks_to_swap_out=tuple((int(a), int(b)) for a, b in swap_out_map),
            blocks_to_swap_in=tuple((int(a), int(b)) for a, b in swap_in_map),
            blocks_to_copy=tuple(copies),
        )

    def update(self, outcome: StepOutcome) -> list[int]:
        """Record the step's sampled tokens, free the sequences that finished and return them.

        Returns the ids of the finished sequences in arrival order (``fast.engine.scheduler``
        returns the same sequences as its ``Sequence`` objects, in the same order).
        """
        if self._expected is None:
            raise SchedulerOrderError("update", "no step was scheduled")
        got = set(outcome.sampled)
        if got != self._expected:
            raise InvalidArgumentError(
                "outcome.sampled", sorted(got), f"expected {sorted(self._expected)}"
            )
        if not outcome.finished <= got:
            raise InvalidArgumentError(
                "outcome.finished", sorted(outcome.finished - got), "these sampled nothing"
            )
        limit = self.config.max_model_len
        for seq_id in sorted(got - outcome.finished):
            n = len(self._requests[seq_id].token_ids) + 1
            if n > limit:
                raise InvalidArgumentError(
                    "outcome.finished",
                    sorted(outcome.finished),
                    f"sequence {seq_id} reaches {n} tokens > max_model_len {limit} unfinished",
                )
        self._expected = None
        for seq_id in self._deferred:  # aborted during the step: its blocks are released now
            self.block_manager.free(seq_id)
        self._deferred = []
        # the step wrote the KV of every token it scheduled: the block manager may now offer
        # the blocks those tokens complete to the prefix cache (finishing sequences included,
        # before their blocks are freed), in the order the step scheduled them
        computed = [
            i
            for i in self._step_order
            if i in self._requests and self._requests[i].status == "running"
        ]
        self.block_manager.mark_computed_batch(
            computed, [self._requests[i].num_computed for i in computed]
        )
        self._step_order = []
        self._in_step = set()
        finished = sorted(outcome.finished, key=lambda i: self._requests[i].arrival)
        for seq_id, token in outcome.sampled.items():
            req = self._requests[seq_id]
            if seq_id in outcome.finished:
                self._running.remove(req)
                self.block_manager.free(seq_id)
                del self._requests[seq_id]
            else:
                req.token_ids.append(int(token))
                req.pending = True
        return finished

    # -- internals ------------------------------------------------------------------------
    def _get(self, seq_id: int) -> _Request:
        try:
            return self._requests[seq_id]
        except KeyError:
            raise UnknownSequenceError(seq_id) from None

    def _queue(self, status: Status) -> list[_Request]:
        return {"waiting": self._waiting, "running": self._running, "swapped": self._swapped}[
            status
        ]

    def _insert(self, queue: list[_Request], req: _Request, status: Status) -> None:
        req.status = status
        keys = [r.arrival for r in queue]
        queue.insert(bisect.bisect(keys, req.arrival), req)
