"""fast.blocks: integrity reads the state, the state layout is documented, results are named."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import fast.blocks.state as state_module
from fast.blocks import kernels as K
from fast.blocks.manager import BlockManager
from fast.blocks.state import BlockArrays
from spec.block_manager import BlockManager as SpecBlockManager
from spec.block_manager import BlockManagerConfig
from spec.errors import OutOfBlocksError, SequenceStateError

BLOCKS = Path(state_module.__file__).parent


def test_integrity_checks_the_state_not_the_manager() -> None:
    """The cycle check of the whole tree is tests/test_layout.py; here, the reason it holds."""
    tree = ast.parse((BLOCKS / "integrity.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert "fast.blocks.manager" not in imported
    assert "fast.blocks.state" in imported


def test_every_state_array_is_documented_in_the_state_module() -> None:
    doc = state_module.__doc__ or ""
    missing = [name for name in BlockArrays._fields if f"``{name}``" not in doc]
    assert not missing, f"fields without a description in fast.blocks.state: {missing}"


def test_kernel_results_are_named_and_errors_carry_their_numbers() -> None:
    config = BlockManagerConfig(block_size=2, num_gpu_blocks=3, num_cpu_blocks=4)
    fast = BlockManager(config)
    fast.allocate(0, [1, 2, 3, 4])  # two full blocks
    fast.allocate(1, [4])  # the last free block, with room for one more token
    empty, no_pairs = np.zeros(0, np.int64), np.zeros((0, 2), np.int64)

    def check(ids: list[int]) -> K.AppendResult:
        tokens = np.zeros(len(ids), np.int64)
        return K.append_kernel(fast._s, np.array(ids), tokens, -1, empty, False, empty, no_pairs)

    result = check([0, 1, 0])
    assert isinstance(result, K.AppendResult) and result.status == K.DUPLICATE
    result = check([1])
    assert (result.status, result.needed, result.free) == (K.OK, 0, 0)
    with pytest.raises(OutOfBlocksError) as err:
        fast.append_batch([0, 1], [5, 5])  # sequence 0 needs a block, 1 does not
    assert (err.value.needed, err.value.free) == (1, 0)
    fast.swap_out(1)
    with pytest.raises(SequenceStateError) as state_err:
        fast.append_batch([0, 1], [5, 5])
    assert state_err.value.seq_id == 1
    fast.check_integrity()


@pytest.mark.parametrize("extra_key", [None, "tenant"])
def test_can_allocate_reads_the_memo_and_hashes_nothing(extra_key: str | None) -> None:
    config = BlockManagerConfig(block_size=2, num_gpu_blocks=7, enable_prefix_caching=True)
    spec, fast = SpecBlockManager(config), BlockManager(config)
    for bm in (spec, fast):
        bm.allocate(0, [1, 2, 3, 4, 5], extra_key)
        bm.mark_computed(0, 5)
        bm.free(0)  # blocks 0-1 cached and free, at the tail of the queue
        bm.allocate(1, [9, 9, 9, 9, 9, 9, 9])  # 4 blocks: left free are 2 and the cached 1, 0
    nodes = len(fast._pids)
    for prompt in ([1, 2, 3, 4, 6], [1, 2, 3, 4, 5, 6, 7], [1, 2, 7], [8, 8, 8], [1]):
        for key in (extra_key, "other"):
            assert fast.can_allocate(prompt, key) == spec.can_allocate(prompt, key), (prompt, key)
    assert len(fast._pids) == nodes  # no prefix id was created
    assert fast.allocate(2, [1, 2, 3, 4, 6], extra_key) == spec.allocate(2, [1, 2, 3, 4, 6],
                                                                       extra_key) == 4  # fmt: skip
    fast.check_integrity()
