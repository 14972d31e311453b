"""fast.blocks: the module graph has no cycle, the state layout is documented, results are named."""

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


def _imports(path: Path) -> set[str]:
    """Every fast.blocks module ``path`` imports, at module level or inside a function, also
    under ``if TYPE_CHECKING:``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if (BLOCKS / f"{n.rsplit('.', 1)[-1]}.py").exists()
                     and n.startswith("fast.blocks."))  # fmt: skip
    return {n.rsplit(".", 1)[-1] for n in found}


def test_fast_blocks_has_no_import_cycle_and_integrity_never_imports_the_manager() -> None:
    graph = {p.stem: _imports(p) - {p.stem} for p in BLOCKS.glob("*.py") if p.stem != "__init__"}
    assert "manager" not in graph["integrity"]
    assert "manager" in graph  # the scan sees the modules
    assert graph["manager"] >= {"kernels", "state", "integrity"}  # and their imports

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            found = cycle_from(nxt, path + [nxt])
            if found:
                return found
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, [m]))]
    assert not cycles, f"import cycles: {cycles}"


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
