"""The engine's scheduler: the decisions of ``spec.scheduler`` over the engine's own sequences.

It keeps :class:`fast.engine.sequence.Sequence` objects (shared with the engine, which appends
sampled
tokens to them) in three arrival-ordered queues and asks the engine's block manager for capacity.
For the same events it returns the same :class:`spec.scheduler.SchedulerOutput` as the spec
(checked step by step by ``conformance.scheduler_machine``). The policy is written down in
``spec.scheduler``'s module docstring and in ``docs/scheduler.md``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

import numpy as np

from fast.engine.sequence import Sequence, SequenceStatus
from spec.errors import (
    InvalidArgumentError,
    SequenceExistsError,
    SequenceStateError,
    SwapOutError,
    UnknownSequenceError,
)
from spec.scheduler import (
    BlockManagerLike,
    ScheduledSequence,
    SchedulerConfig,
    SchedulerOrderError,
    SchedulerOutput,
    StepOutcome,
)

__all__ = ["Scheduler", "SchedulerCheckpoint", "BatchBlockManager", "checkpoint", "restore"]


class BatchBlockManager(BlockManagerLike, Protocol):
    """What the fast scheduler needs: the spec scheduler's calls plus ``append_batch``."""

    def append_batch(self, seq_ids: Any, token_ids: Any) -> tuple[Any, Any]: ...

    def fork(self, parent_id: int, child_id: int) -> None: ...

    def mark_computed_batch(self, seq_ids: Any, num_tokens: Any) -> None: ...


_WAITING, _RUNNING, _SWAPPED = (
    SequenceStatus.WAITING,
    SequenceStatus.RUNNING,
    SequenceStatus.SWAPPED,
)


class _Step:
    """Accumulates one step's decisions."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.scheduled: list[ScheduledSequence] = []
        self.done: set[int] = set()  # the ids in ``order``
        self.order: list[int] = []  # scheduled ids, in scheduled order
        self.sampling: dict[int, Sequence] = {}  # the scheduled sequences that sample, in order
        self.preempted: list[int] = []
        self.swapped_out: list[int] = []
        self.swapped_in: list[int] = []
        self.swap_out_map: list[tuple[int, int]] = []
        self.swap_in_map: list[tuple[int, int]] = []
        self.copies: list[tuple[int, int]] = []

    def add(self, seq: Sequence, n: int) -> None:
        seq_id = seq.seq_id
        start = seq.num_computed
        seq.num_computed = end = start + n
        self.budget -= n
        self.done.add(seq_id)
        self.order.append(seq_id)
        sample = end == len(seq.token_ids)
        if sample:
            self.sampling[seq_id] = seq
        self.scheduled.append(_scheduled(seq_id, start, n, sample))

    def add_decodes(self, decodes: list[Sequence], ids: list[int]) -> None:
        """``add(seq, 1)`` for each pending sequence of ``decodes`` (``ids``: their ids), whose
        pending token the block manager has taken: one loop, no call per sequence."""
        scheduled, sampling, new = self.scheduled, self.sampling, _scheduled
        for seq in decodes:
            seq.pending = False
            seq_id = seq.seq_id
            start = seq.num_computed
            seq.num_computed = end = start + 1
            sample = end == len(seq.token_ids)
            if sample:
                sampling[seq_id] = seq
            scheduled.append(new(seq_id, start, 1, sample))
        self.budget -= len(ids)
        self.done.update(ids)
        self.order.extend(ids)

    def output(self) -> SchedulerOutput:
        return SchedulerOutput(
            tuple(self.scheduled),
            tuple(self.preempted),
            tuple(self.swapped_out),
            tuple(self.swapped_in),
            tuple(self.swap_out_map),
            tuple(self.swap_in_map),
            tuple(self.copies),
        )


def _scheduled(seq_id: int, start: int, num_tokens: int, sample: bool) -> ScheduledSequence:
    """``ScheduledSequence(seq_id, start, num_tokens, sample)`` without the frozen dataclass's
    generic ``__init__`` (one ``object.__setattr__`` per field; this runs once per sequence per
    step): the same fields, equal and hashed the same."""
    new = object.__new__(ScheduledSequence)
    fields = new.__dict__
    fields["seq_id"] = seq_id
    fields["start"] = start
    fields["num_tokens"] = num_tokens
    fields["sample"] = sample
    return new


class SchedulerCheckpoint(NamedTuple):
    """The scheduler between two steps (see :func:`checkpoint`)."""

    seqs: dict[int, Sequence]
    waiting: list[Sequence]
    running: list[tuple[Sequence, int, bool]]  # (sequence, num_computed, pending)
    swapped: list[tuple[Sequence, int]]  # (sequence, num_computed)
    # a step in flight (the engine's overlapped scheduling saves between schedule() and
    # update()): (sampling sequences, ids using blocks, scheduled order, deferred frees)
    flight: tuple[dict[int, Sequence], set[int], list[int], list[int]] | None = None


class Scheduler:
    """FCFS continuous batching over :class:`Sequence` objects (see ``spec.scheduler``)."""

    def __init__(self, config: SchedulerConfig, block_manager: BatchBlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.seqs: dict[int, Sequence] = {}
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self._in_flight: dict[int, Sequence] | None = None  # sequences that sample this step
        self._in_step: set[int] = set()  # sequences whose blocks the step in flight uses
        self._step_order: list[int] = []  # the step in flight's sequences, scheduled order
        self._deferred: list[int] = []  # aborted during the step: freed at update()
        #: (prompt tokens, cached tokens) of each prompt the last schedule() allocated
        self.allocations: list[tuple[int, int]] = []

    def has_unfinished_requests(self) -> bool:
        """Some sequence is waiting, running or swapped."""
        return bool(self.seqs)

    def add_request(self, seq: Sequence) -> None:
        """Queue a new sequence (validated by the engine before it gets here).

        The spec's ``add_request(seq_id, prompt_token_ids)`` takes the id and the prompt; here
        the engine's :class:`Sequence` carries both (``seq.seq_id``, ``seq.token_ids``) and its
        arrival key.
        """
        if seq.seq_id in self.seqs or seq.seq_id in self._deferred:
            raise SequenceExistsError(seq.seq_id)
        n = len(seq.token_ids)
        if n == 0:
            raise InvalidArgumentError("prompt_token_ids", [], f"empty prompt for {seq.seq_id}")
        if n > self.config.max_model_len:
            raise InvalidArgumentError(
                "len(prompt_token_ids)",
                n,
                f"longer than max_model_len {self.config.max_model_len} (sequence {seq.seq_id})",
            )
        self.seqs[seq.seq_id] = seq
        self._enqueue(self.waiting, seq, _WAITING)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start ``child`` as a running copy of ``parent`` that shares its blocks (n > 1).

        The engine calls it in the step where ``parent`` sampled its first token, before
        :meth:`update`: ``parent``'s prompt is computed and in the pool, its sampled token is not.
        ``child.token_ids`` is the prompt plus the child's own first token, which, like the
        parent's, is appended to the pool (copy-on-write of the shared last block) by the next
        step's decode. Mirrors :meth:`spec.scheduler.Scheduler.fork` (held to it by the lockstep
        conformance driver); from then on the child is a running sequence like any other (the
        engine keeps ``max_num_seqs``, see ``LLMEngine._fork``). Raises SequenceExistsError (child
        id live), UnknownSequenceError
        (parent unknown), SequenceStateError (parent swapped out), InvalidArgumentError (parent not
        running with its blocks in the pool).
        """
        if child.seq_id in self.seqs or child.seq_id in self._deferred:
            raise SequenceExistsError(child.seq_id)
        if self.seqs.get(parent.seq_id) is not parent:
            raise UnknownSequenceError(parent.seq_id)
        if parent.status is _SWAPPED:
            raise SequenceStateError(parent.seq_id, True, "fork")
        if parent.status is not _RUNNING or not parent.in_pool:
            raise InvalidArgumentError(
                "parent.status",
                parent.status.value,
                f"fork needs running sequence {parent.seq_id} in the pool",
            )
        self.block_manager.fork(parent.seq_id, child.seq_id)
        child.num_computed = parent.num_computed
        child.in_pool = child.pending = True
        self.seqs[child.seq_id] = child
        self._enqueue(self.running, child, _RUNNING)
        if self._in_flight is not None:
            self._in_step.add(child.seq_id)
            self._step_order.append(child.seq_id)

    def abort_request(self, seq_id: int) -> None:
        """Remove a sequence from every queue and free its blocks (marked FINISHED_ABORTED).

        During a step that uses its blocks (scheduled in it, swapped out by it, or forked in it)
        the blocks are freed at the next :meth:`update` instead, as in ``spec.scheduler``.
        """
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            raise UnknownSequenceError(seq_id)
        {_WAITING: self.waiting, _RUNNING: self.running, _SWAPPED: self.swapped}[seq.status].remove(
            seq
        )
        if seq.in_pool and self._in_flight is not None and seq_id in self._in_step:
            self._deferred.append(seq_id)  # the step in flight still reads its blocks
        elif seq.in_pool:
            self.block_manager.free(seq_id)
        seq.in_pool = False
        seq.status = SequenceStatus.FINISHED_ABORTED
        if self._in_flight is not None:
            self._in_flight.pop(seq_id, None)

    def in_flight(self) -> dict[int, Sequence] | None:
        """The sequences that sample in the step in flight (scheduled, not yet updated), in
        scheduled order; None between steps. Read it, never change it."""
        return self._in_flight

    def continue_decodes(self, seqs: list[Sequence]) -> SchedulerOutput:
        """Schedule one decode token for each of ``seqs`` (running, pending), whose pending
        token the caller has appended to the block manager already: the engine's overlapped
        scheduling allocates those slots before the tokens are known (``peek_append``) and
        appends them before :meth:`update` of the step that sampled them. The same
        decisions as :meth:`schedule`'s decode fast path for a running queue of ``seqs``."""
        if self._in_flight is not None:
            raise SchedulerOrderError("schedule", "update() of the previous step is missing")
        for seq in seqs:
            if (
                self.seqs.get(seq.seq_id) is not seq
                or seq.status is not _RUNNING
                or not (seq.pending and seq.in_pool)
            ):
                raise InvalidArgumentError(
                    "seqs",
                    seq.seq_id,
                    "continue_decodes needs running sequences with a pending token",
                )
        step = _Step(self.config.max_num_batched_tokens)
        self.allocations = []
        step.add_decodes(seqs, [seq.seq_id for seq in seqs])
        self._in_flight = step.sampling
        self._in_step = step.done
        self._step_order = step.order
        return step.output()

    def schedule(self) -> SchedulerOutput:
        """One step of decisions: running decodes, running prefills, swapped, waiting."""
        if self._in_flight is not None:
            raise SchedulerOrderError("schedule", "update() of the previous step is missing")
        step = _Step(self.config.max_num_batched_tokens)
        self.allocations = []
        self._schedule_running(step)
        if not step.preempted and not step.swapped_out:
            self._schedule_swapped(step)
            if not self.swapped:
                self._schedule_waiting(step)
        self._in_flight = step.sampling
        self._in_step = step.done
        self._in_step.update(step.swapped_out)
        self._step_order = step.order
        return step.output()

    def update(self, outcome: StepOutcome) -> list[Sequence]:
        """Take the step's outcome; the engine has appended the sampled tokens already.

        Frees the finished sequences and returns them in arrival order (their status is set by
        the engine): the spec's ``update`` returns the same sequences as ids, in the same order.
        """
        if self._in_flight is None:
            raise SchedulerOrderError("update", "no step was scheduled")
        in_flight = self._in_flight
        if outcome.sampled.keys() != in_flight.keys():
            raise InvalidArgumentError(
                "outcome.sampled", sorted(outcome.sampled), f"expected {sorted(in_flight)}"
            )
        extra = outcome.finished.difference(in_flight)
        if extra:
            raise InvalidArgumentError("outcome.finished", sorted(extra), "these sampled nothing")
        limit = self.config.max_model_len
        for seq_id, seq in in_flight.items():
            if len(seq.token_ids) > limit and seq_id not in outcome.finished:
                raise InvalidArgumentError(
                    "outcome.finished",
                    sorted(outcome.finished),
                    f"sequence {seq_id} reaches {len(seq.token_ids)} tokens > max_model_len "
                    f"{self.config.max_model_len} unfinished",
                )
        self._in_flight = None
        for seq_id in self._deferred:  # aborted during the step: its blocks are released now
            self.block_manager.free(seq_id)
        self._deferred = []
        # the step wrote the KV of the tokens it scheduled: their completed blocks may enter
        # the prefix cache (finishing sequences too, before they are freed), in step order
        seqs = self.seqs
        done = [
            q for i in self._step_order if (q := seqs.get(i)) is not None and q.status is _RUNNING
        ]
        if done:
            self.block_manager.mark_computed_batch(
                np.array([q.seq_id for q in done], dtype=np.int64),  # [D]
                np.array([q.num_computed for q in done], dtype=np.int64),  # [D]
            )
        self._step_order = []
        self._in_step = set()
        finished = []
        for seq_id, seq in in_flight.items():
            if seq_id in outcome.finished:
                self.running.remove(seq)
                self.block_manager.free(seq_id)
                seq.in_pool = False
                del self.seqs[seq_id]
                finished.append(seq)
            else:
                seq.pending = True
        finished.sort(key=lambda seq: seq.arrival)
        return finished

    # -- the four phases ------------------------------------------------------------------
    def _schedule_running(self, step: _Step) -> None:
        bm = self.block_manager
        decodes = [seq for seq in self.running if seq.pending]
        ids = [seq.seq_id for seq in decodes]
        if decodes and bm.can_append(ids):
            # Every decode fits: no preemption, and one batched append makes the same
            # decisions (same blocks, same copy-on-write pairs, same order) as one by one.
            toks = np.array([seq.token_ids[-1] for seq in decodes], dtype=np.int64)  # [B]
            _, pairs = bm.append_batch(np.array(ids, dtype=np.int64), toks)
            step.copies.extend((int(a), int(b)) for a, b in pairs.tolist())
            step.add_decodes(decodes, ids)
            if len(decodes) == len(self.running):
                return  # every running sequence decodes one token: none has a prefill left
            decodes = []
        for seq in decodes:
            if seq.status is not _RUNNING:
                continue
            while not bm.can_append([seq.seq_id]):
                victim = self._newest_unscheduled(step, exclude=seq)
                self._preempt(step, victim if victim is not None else seq)
                if victim is None:
                    break
            if seq.status is _RUNNING:
                self._append_pending(step, seq)
                step.add(seq, 1)
        for seq in self.running:
            left = len(seq.token_ids) - seq.num_computed
            if left and step.budget and seq.seq_id not in step.done:
                step.add(seq, min(left, step.budget))

    def _schedule_swapped(self, step: _Step) -> None:
        bm = self.block_manager
        while self.swapped and len(self.running) < self.config.max_num_seqs and step.budget:
            seq = self.swapped[0]
            if not bm.can_swap_in(seq.seq_id, 1):
                return
            step.swap_in_map.extend((int(c), int(g)) for c, g in bm.swap_in(seq.seq_id))
            del self.swapped[0]
            self._enqueue(self.running, seq, _RUNNING)
            step.swapped_in.append(seq.seq_id)
            self._append_pending(step, seq)
            step.add(seq, 1)

    def _schedule_waiting(self, step: _Step) -> None:
        cfg, bm = self.config, self.block_manager
        while self.waiting and len(self.running) < cfg.max_num_seqs and step.budget:
            seq = self.waiting[0]
            if not cfg.enable_chunked_prefill and len(seq.token_ids) > step.budget:
                return
            if not bm.can_allocate(seq.token_ids, seq.cache_key):
                return
            cached = bm.allocate(seq.seq_id, seq.token_ids, seq.cache_key)
            self.allocations.append((len(seq.token_ids), cached))
            del self.waiting[0]
            seq.in_pool = True
            seq.num_computed = cached
            self._enqueue(self.running, seq, _RUNNING)
            step.add(seq, min(len(seq.token_ids) - cached, step.budget))

    # -- helpers --------------------------------------------------------------------------
    def _newest_unscheduled(self, step: _Step, exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.running):
            if seq is not exclude and seq.seq_id not in step.done:
                return seq
        return None

    def _preempt(self, step: _Step, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.config.preemption_mode == "swap" and seq.pending:
            try:
                mapping = self.block_manager.swap_out(seq.seq_id)
            except SwapOutError:
                pass
            else:
                step.swap_out_map.extend((int(g), int(c)) for g, c in mapping)
                step.swapped_out.append(seq.seq_id)
                self._enqueue(self.swapped, seq, _SWAPPED)
                return
        self.block_manager.free(seq.seq_id)
        seq.in_pool = seq.pending = False
        seq.num_computed = 0
        step.preempted.append(seq.seq_id)
        self._enqueue(self.waiting, seq, _WAITING)

    def _append_pending(self, step: _Step, seq: Sequence) -> None:
        cow = self.block_manager.append(seq.seq_id, seq.token_ids[-1])
        seq.pending = False
        if cow is not None:
            step.copies.append((int(cow[0]), int(cow[1])))

    @staticmethod
    def _enqueue(queue: list[Sequence], seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        keys: Iterable[int] = (s.arrival for s in queue)
        queue.insert(bisect.bisect(list(keys), seq.arrival), seq)


# -- undoing a step (the engine's rollback) -----------------------------------------------------
def checkpoint(scheduler: Scheduler, allow_in_flight: bool = False) -> SchedulerCheckpoint:
    """What :func:`restore` needs to undo ``scheduler``'s next step (call it between steps).

    Only running and swapped sequences carry fields a step changes and cannot re-derive: a
    waiting sequence always has nothing computed and nothing in the pool. With
    ``allow_in_flight`` (the engine's overlapped scheduling) a step may be in flight: its
    scheduler state is saved too, and :func:`restore` puts it back in flight.
    """
    flight = None
    if scheduler._in_flight is not None:
        if not allow_in_flight:
            raise SchedulerOrderError("checkpoint", "a step is in flight")
        flight = (
            dict(scheduler._in_flight),
            set(scheduler._in_step),
            list(scheduler._step_order),
            list(scheduler._deferred),
        )
    return SchedulerCheckpoint(
        dict(scheduler.seqs),
        list(scheduler.waiting),
        [(seq, seq.num_computed, seq.pending) for seq in scheduler.running],
        [(seq, seq.num_computed) for seq in scheduler.swapped],
        flight,
    )


def restore(scheduler: Scheduler, saved: SchedulerCheckpoint) -> None:
    """Put the queues, the sequences' scheduling fields and the step state back as they
    were at :func:`checkpoint` (the engine restores the block manager itself)."""
    scheduler.seqs = dict(saved.seqs)
    scheduler.waiting = list(saved.waiting)
    for seq in scheduler.waiting:
        seq.status, seq.num_computed, seq.in_pool, seq.pending = _WAITING, 0, False, False
    scheduler.running = []
    for seq, num_computed, pending in saved.running:
        seq.status, seq.num_computed, seq.in_pool, seq.pending = (
            _RUNNING,
            num_computed,
            True,
            pending,
        )
        scheduler.running.append(seq)
    scheduler.swapped = []
    for seq, num_computed in saved.swapped:
        seq.status, seq.num_computed, seq.in_pool, seq.pending = (
            _SWAPPED,
            num_computed,
            True,
            True,
        )
        scheduler.swapped.append(seq)
    if saved.flight is not None:
        in_flight, in_step, order, deferred = saved.flight
        scheduler._in_flight = dict(in_flight)
        scheduler._in_step = set(in_step)
        scheduler._step_order = list(order)
        scheduler._deferred = list(deferred)
        return
    scheduler._in_flight = None
    scheduler._in_step = set()
    scheduler._deferred = []
    scheduler._step_order = []
