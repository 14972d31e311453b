"""JournaledBlockManager: after rollback the manager equals one that never saw the rolled-back
calls; after commit, one that saw them all (spec and fast managers)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fast.blocks.manager import BlockManager as FastBlockManager
from fast.engine.journal import JournaledBlockManager, clone_block_manager
from spec.block_manager import BlockManager as SpecBlockManager
from spec.block_manager import BlockManagerConfig
from spec.errors import PagedKVError

CONFIG = BlockManagerConfig(block_size=2, num_gpu_blocks=12, num_cpu_blocks=6)
CACHING = BlockManagerConfig(
    block_size=2, num_gpu_blocks=12, num_cpu_blocks=6, enable_prefix_caching=True
)


def observed(bm: Any) -> Any:
    ids = bm.sequence_ids()
    return (
        {i: (bm.block_table(i), bm.is_swapped(i), bm.num_tokens(i)) for i in ids},
        bm.free_block_order(),
        bm.cached_blocks(),
        bm.num_free_cpu_blocks,
    )


ops = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "append", "fork", "free", "swap_out", "swap_in"]),
        st.integers(0, 5),
        st.lists(st.integers(0, 3), min_size=1, max_size=5),
    ),
    max_size=12,
)


def apply(bm: Any, op: tuple[str, int, list[int]]) -> None:
    name, seq, tokens = op
    args: tuple[Any, ...] = {
        "allocate": (seq, tokens),
        "append": (seq, tokens[0]),
        "fork": (seq, seq + 1),
    }.get(name, (seq,))
    try:
        getattr(bm, name)(*args)
    except PagedKVError:
        pass  # refused: changed nothing


@pytest.mark.parametrize("make", [SpecBlockManager, FastBlockManager])
@pytest.mark.parametrize("config", [CONFIG, CACHING])
@settings(max_examples=25, deadline=None)
@given(before=ops, step=ops, keep=st.booleans())
def test_rollback_and_commit_are_exact(
    make: Any, config: BlockManagerConfig, before: Any, step: Any, keep: bool
) -> None:
    journal, reference = JournaledBlockManager(make(config)), make(config)
    for op in before:  # outside a transaction: applied to both managers at once
        apply(journal, op)
        apply(reference, op)
    journal.begin()
    for op in step:
        apply(journal, op)
    if keep:
        journal.commit()
        for op in step:
            apply(reference, op)
    else:
        journal.rollback()
    assert observed(journal) == observed(reference)
    journal.check_integrity()
    for op in step:  # and it goes on like the reference
        apply(journal, op)
        apply(reference, op)
    assert observed(journal) == observed(reference)


def test_a_clone_is_independent() -> None:
    bm = FastBlockManager(CACHING)
    bm.allocate(1, [1, 2, 3, 4, 5])
    clone = clone_block_manager(bm)
    bm.append(1, 6)
    bm.free(1)
    assert clone.sequence_ids() == [1] and clone.num_tokens(1) == 5
    clone.check_integrity()
    clone.append(1, 7)
    assert bm.sequence_ids() == []
