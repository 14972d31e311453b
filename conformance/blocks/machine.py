"""The block-management state machine: every public operation, the spec as the model.

``make_block_machine(factory, preset)`` returns a hypothesis ``RuleBasedStateMachine`` class.
Its rules are the operations of ARCHITECTURE.md's ``BlockManager`` (one rule each, named after
the operation); arguments are drawn so that most calls are legal (live ids, prompts sharing
prefixes) and some are not (unknown ids, double frees, pools too small). Every call goes through
:class:`~conformance.blocks.lockstep.Lockstep`, which compares outcomes and checks that an
error left both sides unchanged. The invariant runs both sides' ``check_integrity()``, compares
every observable and reads every live sequence back from the fake KV store. Each step is
``note()``-d, so a shrunk failure prints as a script of calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conformance.blocks.lockstep import Lockstep
from conformance.blocks.operations import OPERATIONS, Operation, allocate_and_compute
from conformance.blocks.presets import Preset
from conformance.blocks.strategies import prompts
from conformance.protocols import BlockManagerFactory
from spec.prefix_cache import HashFn

__all__ = ["StepCounter", "make_block_machine", "new_lockstep"]


@dataclass
class StepCounter:
    """Counts operations across every run of a machine class (for the suite's summary)."""

    steps: int = 0
    runs: int = 0
    ops: dict[str, int] = field(default_factory=dict)


def new_lockstep(
    factory: BlockManagerFactory, p: Preset, *, log: bool = True, hash_fn: HashFn | None = None
) -> Lockstep:
    """A fresh spec + implementation pair for preset ``p`` (both with ``hash_fn`` if given)."""
    from spec.block_manager import BlockManager as SpecBlockManager

    config = p.config()
    kwargs = {} if hash_fn is None else {"hash_fn": hash_fn}
    return Lockstep(
        SpecBlockManager(config, **kwargs),
        factory(config, **kwargs),
        block_size=p.block_size,
        num_gpu_blocks=p.num_gpu_blocks,
        num_cpu_blocks=p.num_cpu_blocks,
        seq_ids=range(p.num_seq_ids),
        log=note if log else (lambda line: None),
    )


def make_block_machine(
    factory: BlockManagerFactory, p: Preset, counter: StepCounter | None = None
) -> type[RuleBasedStateMachine]:
    """The state machine class testing ``factory``'s block manager against the spec on ``p``."""

    def make_rule(name: str, op: Operation) -> Callable[..., None]:
        def run(self: BlockMachine, data: st.DataObject) -> None:
            if counter is not None:
                counter.steps += 1
                counter.ops[name] = counter.ops.get(name, 0) + 1
            op(self.ls, data, p)

        run.__name__ = name
        return rule(data=st.data())(run)

    class BlockMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.ls = new_lockstep(factory, p)
            if counter is not None:
                counter.runs += 1

        @initialize(data=st.data())
        def start_with_live_sequences(self, data: st.DataObject) -> None:
            # hypothesis turns rules off at random per run (swarm testing): start every run
            # with a few live sequences so that runs without ``allocate`` still go somewhere
            for seq_id in range(data.draw(st.integers(1, 3), label="initial sequences")):
                prompt = data.draw(prompts(p), label="token_ids")
                allocate_and_compute(self.ls, data, p, seq_id, prompt, None)

        @invariant()
        def observables_agree(self) -> None:
            self.ls.check()

    for name, op in OPERATIONS.items():
        setattr(BlockMachine, name, make_rule(name, op))
    BlockMachine.__name__ = f"BlockMachine_{p.name}"
    BlockMachine.__qualname__ = BlockMachine.__name__
    return BlockMachine
