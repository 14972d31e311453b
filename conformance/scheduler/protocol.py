"""The scheduler under test: its protocol and the two built-in adapters (spec, fast).

A scheduler implementation is driven by five events: ``add_request``, ``abort_request``,
``schedule`` (returns a ``spec.scheduler.SchedulerOutput``), ``fork`` (between ``schedule`` and
``update``, as ``spec.scheduler.Scheduler.fork``) and ``update`` (a
``spec.scheduler.StepOutcome``, which carries a forked child's first token). Two implementations
conform when, for the same events, they
return equal outputs at every step. Factories take a ``SchedulerConfig`` and a
``BlockManagerConfig`` and return a fresh implementation with its own block manager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from spec.scheduler import SchedulerConfig, SchedulerOutput, StepOutcome

__all__ = [
    "SchedulerImpl",
    "SchedulerFactory",
    "SpecSchedulerAdapter",
    "FastSchedulerAdapter",
    "scheduler_factory",
    "scheduler_names",
    "register_scheduler",
]


@runtime_checkable
class SchedulerImpl(Protocol):
    """The event interface of ``spec.scheduler.Scheduler``."""

    def has_unfinished_requests(self) -> bool: ...

    @property
    def num_free_gpu_blocks(self) -> int: ...

    def add_request(self, seq_id: int, prompt_token_ids: Sequence[int]) -> None: ...

    def abort_request(self, seq_id: int) -> None: ...

    def schedule(self) -> SchedulerOutput: ...

    def fork(self, parent_id: int, child_id: int) -> bool:
        """Fork as the engine does; False (nothing done) when the running queue is full."""
        ...

    def update(self, outcome: StepOutcome) -> None: ...


#: Builds a fresh implementation from a ``SchedulerConfig`` and a ``BlockManagerConfig``.
SchedulerFactory = Callable[[SchedulerConfig, Any], SchedulerImpl]


def _block_manager(config: Any, name: str) -> Any:
    """A fresh block manager from the block-manager registry (``"spec"`` or ``"fast"``)."""
    from conformance.registry import block_manager_factory

    return block_manager_factory(name)(config)


class SpecSchedulerAdapter:
    """``spec.scheduler.Scheduler`` over ``spec.block_manager.BlockManager``."""

    def __init__(self, config: SchedulerConfig, bm_config: Any) -> None:
        from spec.scheduler import Scheduler

        self.block_manager = _block_manager(bm_config, "spec")
        self.scheduler = Scheduler(config, self.block_manager)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def num_free_gpu_blocks(self) -> int:
        return int(self.block_manager.num_free_gpu_blocks)

    def add_request(self, seq_id: int, prompt_token_ids: Sequence[int]) -> None:
        self.scheduler.add_request(seq_id, prompt_token_ids)

    def abort_request(self, seq_id: int) -> None:
        self.scheduler.abort_request(seq_id)

    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def fork(self, parent_id: int, child_id: int) -> bool:
        if len(self.scheduler.running) >= self.scheduler.config.max_num_seqs:
            return False
        self.scheduler.fork(parent_id, child_id)
        return True

    def update(self, outcome: StepOutcome) -> None:
        self.scheduler.update(outcome)


class FastSchedulerAdapter:
    """``fast.engine.scheduler.Scheduler`` over the fast block manager and ``fast.engine.sequence``
    state.

    The engine appends sampled tokens to its sequences itself; this adapter does the same before
    handing the outcome on. Forks are done the engine's way (``LLMEngine.step``): after the
    tokens are appended and before ``update``, with the child's first token already in its
    ``token_ids`` and the child left out of the outcome. A request's sequences get consecutive
    arrivals in the engine; here a request's arrival is spaced by ``_FORK_SPAN`` for its
    children. ``block_manager_name`` picks the block manager from
    ``conformance.registry`` (the numba one by default).
    """

    block_manager_name = "fast"

    def __init__(self, config: SchedulerConfig, bm_config: Any) -> None:
        from fast.engine.scheduler import Scheduler

        self.block_manager = _block_manager(bm_config, self.block_manager_name)
        self.scheduler = Scheduler(config, self.block_manager)
        self._arrivals = 0
        self._forks: list[tuple[int, int]] = []  # (parent, child) of the step in flight
        self._num_forks: dict[int, int] = {}  # parent -> children forked so far

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def num_free_gpu_blocks(self) -> int:
        return int(self.block_manager.num_free_gpu_blocks)

    def add_request(self, seq_id: int, prompt_token_ids: Sequence[int]) -> None:
        from fast.engine.sequence import Sequence as Seq

        seq = Seq(
            seq_id, str(seq_id), self._arrivals * _FORK_SPAN, [int(t) for t in prompt_token_ids]
        )
        self.scheduler.add_request(seq)
        self._arrivals += 1

    def abort_request(self, seq_id: int) -> None:
        pending = [f for f in self._forks if f[1] == seq_id]
        if pending:  # a child the engine would fork at update(): it never starts
            self._forks.remove(pending[0])
            return
        self.scheduler.abort_request(seq_id)

    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def fork(self, parent_id: int, child_id: int) -> bool:
        running = len(self.scheduler.running) + len(self._forks)
        if running >= self.scheduler.config.max_num_seqs:
            return False
        self._forks.append((parent_id, child_id))
        return True

    def update(self, outcome: StepOutcome) -> None:
        from fast.engine.sequence import Sequence as Seq

        children = {child for _, child in self._forks}
        for seq_id, token in outcome.sampled.items():
            seq = self.scheduler.seqs.get(seq_id)
            if seq is not None and seq_id not in children:
                seq.append_token(token)
        for parent_id, child_id in self._forks:
            parent = self.scheduler.seqs[parent_id]
            k = self._num_forks.get(parent_id, 0) + 1
            self._num_forks[parent_id] = k
            tokens = parent.token_ids[:-1] + [int(outcome.sampled[child_id])]
            child = Seq(child_id, parent.request_id, parent.arrival + k, tokens)
            self.scheduler.fork(parent, child)
        self._forks = []
        self.scheduler.update(
            StepOutcome(
                {s: t for s, t in outcome.sampled.items() if s not in children},
                outcome.finished - children,
            )
        )
        for child_id in children & outcome.finished:
            self.scheduler.abort_request(child_id)


#: Arrival spacing of requests in the fast adapter: room for a request's forked children.
_FORK_SPAN = 1 << 16


_SCHEDULERS: dict[str, SchedulerFactory] = {
    "spec": SpecSchedulerAdapter,
    "fast": FastSchedulerAdapter,
}


def register_scheduler(name: str, factory: SchedulerFactory) -> None:
    """Make ``factory`` testable under ``name`` (re-registering replaces)."""
    _SCHEDULERS[name] = factory


def scheduler_factory(name: str) -> SchedulerFactory:
    """The factory registered under ``name``; raises ``KeyError`` naming the known ones."""
    try:
        return _SCHEDULERS[name]
    except KeyError:
        raise KeyError(f"no scheduler registered as {name!r}; known: {scheduler_names()}") from None


def scheduler_names() -> list[str]:
    """Every registered scheduler name, sorted."""
    return sorted(_SCHEDULERS)
