"""fast.blocks.manager: what the conformance suite does not reach (growth, arrays, extras)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.blocks.lockstep import Lockstep, observables
from fast.blocks import open_addressing
from fast.blocks.manager import BlockManager
from fast.blocks.prefix_ids import MISSING, PrefixIds, intern_one
from fast.blocks.state import live_prefix_ids
from spec.block_manager import BlockManager as SpecBlockManager
from spec.block_manager import BlockManagerConfig
from spec.errors import InvalidArgumentError, UnknownSequenceError


def _pair(**kw: object) -> Lockstep:
    config = BlockManagerConfig(**kw)  # type: ignore[arg-type]
    return Lockstep(
        SpecBlockManager(config),
        BlockManager(config),
        block_size=config.block_size,
        num_gpu_blocks=config.num_gpu_blocks,
        num_cpu_blocks=config.num_cpu_blocks,
        seq_ids=range(40),
    )


def test_rows_and_widths_grow_by_doubling_and_stay_identical_to_spec() -> None:
    ls = _pair(block_size=2, num_gpu_blocks=400, num_cpu_blocks=64, enable_prefix_caching=True)
    for s in range(20):  # more sequences than the 8 initial rows
        ls.call("allocate", s, [s % 3, 1, 2, 3, 4][: 1 + s % 5], None)
    for s in range(20, 40):
        ls.call("fork", s - 20, s)
    for step in range(12):  # past the initial width of 4 blocks
        ls.call("append_batch", list(range(0, 40, 3)), [step % 4] * len(range(0, 40, 3)))
    ls.call("swap_out", 3)
    ls.check()
    impl = ls.impl
    assert isinstance(impl, BlockManager)
    assert impl._a.tables.shape[0] >= 40 and impl._a.tables.shape[1] >= 8
    ls.free_all()


def test_gather_matches_the_spec_block_tables() -> None:
    config = BlockManagerConfig(block_size=4, num_gpu_blocks=200)
    spec, fast = SpecBlockManager(config), BlockManager(config)
    rng = np.random.default_rng(0)
    for s in range(10):
        prompt = rng.integers(0, 50, size=int(rng.integers(1, 30))).tolist()
        spec.allocate(s, prompt)
        fast.allocate(s, np.array(prompt, dtype=np.int64))
    fast.fork(3, 10)
    spec.fork(3, 10)
    ids = np.array([10, 0, 3, 7], dtype=np.int64)
    toks = np.array([1, 2, 3, 4], dtype=np.int64)
    want_slots, want_pairs = spec.append_batch(ids.tolist(), toks.tolist())
    slots, pairs = fast.append_batch(ids, toks)
    assert slots.tolist() == want_slots.tolist() and pairs.tolist() == want_pairs.tolist()
    tables, lens = fast.gather(ids)
    assert tables.dtype == np.int32 and lens.dtype == np.int32
    width = max(len(spec.block_table(int(s))) for s in ids)
    assert tables.shape == (4, width)
    for k, s in enumerate(ids.tolist()):
        row = spec.block_table(s)
        assert tables[k, : len(row)].tolist() == row
        assert not tables[k, len(row) :].any()  # zero padded
        assert lens[k] == spec.num_tokens(s)
    with pytest.raises(UnknownSequenceError) as err:
        fast.gather([0, 99])
    assert err.value.seq_id == 99
    fast.check_integrity()


def test_numpy_inputs_are_validated_like_lists() -> None:
    fast = BlockManager(BlockManagerConfig(block_size=4, num_gpu_blocks=8))
    with pytest.raises(InvalidArgumentError) as err:
        fast.allocate(0, np.array([1, -5, 2], dtype=np.int64))
    assert err.value.value == -5
    with pytest.raises(InvalidArgumentError) as err:  # the token is checked before the key
        fast.allocate(0, np.array([1, -7], dtype=np.int64), 3)  # type: ignore[arg-type]
    assert err.value.name == "token_ids" and err.value.value == -7
    fast.allocate(0, np.array([1, 2], dtype=np.int64))
    with pytest.raises(InvalidArgumentError):
        fast.append_batch(np.array([0], dtype=np.int64), np.array([-1], dtype=np.int64))
    assert fast.token_ids(0) == [1, 2]
    fast.check_integrity()


def test_prefix_ids_are_equal_exactly_for_equal_prefixes_and_survive_collection() -> None:
    ids = PrefixIds(block_size=2, capacity=8)

    def intern(parent: int, block: list[int], extra: int, create: bool = True) -> int:
        arr = np.array(block, dtype=np.int64)
        return int(intern_one(parent, arr, extra, 7, create, ids.arrays))  # one hash: collide

    a = intern(-1, [1, 2], -1)
    b = intern(a, [3, 4], -1)
    assert intern(-1, [1, 2], -1) == a
    assert intern(-1, [1, 2], 0) != a  # another extra key
    c = intern(intern(-1, [9, 9], -1), [3, 4], -1)
    assert c != b  # same block, other parent
    assert len(ids) == 5
    ids.collect(np.array([b], dtype=np.int64))  # b and its ancestor a survive
    assert len(ids) == 2
    assert intern(-1, [1, 2], -1, create=False) == a and intern(a, [3, 4], -1, False) == b
    assert intern(-1, [9, 9], -1, create=False) == MISSING
    ids.reserve(20, None)  # grows by doubling, ids stay valid
    assert ids.capacity >= 22 and intern(a, [3, 4], -1, False) == b


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=120))
def test_open_addressing_table_behaves_like_a_dict(ops: list[tuple[bool, int]]) -> None:
    keys = np.full(64, -1, dtype=np.int64)
    vals = np.full(64, -1, dtype=np.int32)
    model: dict[int, int] = {}
    for insert, key in ops:
        if insert and key not in model:
            open_addressing.insert(keys, vals, key, key + 100)
            model[key] = key + 100
        elif not insert:
            open_addressing.delete(keys, vals, key)
            model.pop(key, None)
        for k in range(41):
            assert open_addressing.find(keys, vals, k) == model.get(k, -1)
    assert int((keys >= 0).sum()) == len(model)


def test_prefix_id_collection_keeps_hits_identical_to_spec() -> None:
    config = BlockManagerConfig(block_size=1, num_gpu_blocks=64, enable_prefix_caching=True)
    ls = Lockstep(
        SpecBlockManager(config), BlockManager(config), block_size=1, num_gpu_blocks=64,
        num_cpu_blocks=0, seq_ids=range(4),
    )  # fmt: skip
    impl = ls.impl
    assert isinstance(impl, BlockManager)
    rng = np.random.default_rng(1)
    for step in range(60):
        s = step % 4
        if ls.model.has_sequence(s):
            ls.call("free", s)
        prompt = rng.integers(0, 3, size=int(rng.integers(1, 12))).tolist()
        ls.call("allocate", s, prompt, None)
        impl._pids.collect(live_prefix_ids(impl._a))  # collect after every allocate
        ls.check()
    # only ids of cached blocks (<= 64) and of the live sequences' blocks (<= 4 * 11) remain
    assert len(impl._pids) <= 64 + 44


@pytest.mark.parametrize("caching", [False, True])
def test_decode_steps_equal_spec_append_batch(caching: bool) -> None:
    """The engine's decode step (append_batch, mark_computed_batch, gather) over many steps:
    blocks fill (hashed and interned inside the append kernel) and are registered once
    computed."""
    config = BlockManagerConfig(block_size=2, num_gpu_blocks=300, enable_prefix_caching=caching)
    spec, fast = SpecBlockManager(config), BlockManager(config)
    prompts = [[1, 2, 3], [1, 2, 3], [4, 5], [1]]
    for i, p in enumerate(prompts):
        spec.allocate(i, p, "k" if i == 2 else None)
        fast.allocate(i, p, "k" if i == 2 else None)
    spec.fork(0, 4)
    fast.fork(0, 4)
    ids = np.array([0, 1, 2, 3, 4], dtype=np.int64)
    for step in range(20):
        toks = np.array([step % 3, 7, step, 1, step % 2], dtype=np.int64)
        want_slots, want_pairs = spec.append_batch(ids.tolist(), toks.tolist())
        slots, pairs = fast.append_batch(ids, toks)
        counts = [spec.num_tokens(s) for s in ids.tolist()]  # the step computed every token
        spec.mark_computed_batch(ids.tolist(), counts)
        fast.mark_computed_batch(ids, np.array(counts, dtype=np.int64))
        tables, lens = fast.gather(ids)
        assert slots.tolist() == want_slots.tolist()
        assert pairs.tolist() == want_pairs.tolist()
        for k, s in enumerate(ids.tolist()):
            assert tables[k, : len(spec.block_table(s))].tolist() == spec.block_table(s)
            assert lens[k] == spec.num_tokens(s)
    assert observables(spec, range(5)) == observables(fast, range(5))
    assert spec.cached_blocks() == fast.cached_blocks()
    assert spec.free_block_order() == fast.free_block_order()
    fast.check_integrity()
    # a prompt equal to sequence 1's tokens now hits every full block but the last token's
    n = spec.num_tokens(1)
    got = fast.allocate(9, spec.token_ids(1))
    assert got == spec.allocate(9, spec.token_ids(1)) == ((n - 1) // 2 * 2 if caching else 0)


@pytest.mark.parametrize(
    "prompt",
    [[1, True], [1, 2**63], [1, -3, -4], [1, 2.0], [], [5, np.int64(7)], [0, 2**63 - 1]],
)
def test_prompt_lists_are_validated_like_the_spec(prompt: list[object]) -> None:
    """Plain int lists take numpy's conversion; anything else the element-by-element path."""
    config = BlockManagerConfig(block_size=2, num_gpu_blocks=8)
    spec, fast = SpecBlockManager(config), BlockManager(config)
    for call in ("can_allocate", "allocate"):
        args = (prompt,) if call == "can_allocate" else (0, prompt)
        try:
            want = getattr(spec, call)(*args)
        except InvalidArgumentError as exc:
            with pytest.raises(InvalidArgumentError) as err:
                getattr(fast, call)(*args)
            assert (err.value.name, err.value.value) == (exc.name, exc.value)
        else:
            assert getattr(fast, call)(*args) == want
    if spec.has_sequence(0):
        assert fast.block_table(0) == spec.block_table(0)
    fast.check_integrity()


def test_deepcopy_is_an_independent_manager_in_the_same_state() -> None:
    import copy

    config = BlockManagerConfig(
        block_size=2, num_gpu_blocks=16, num_cpu_blocks=4, enable_prefix_caching=True
    )
    fast = BlockManager(config)
    fast.allocate(0, [1, 2, 3, 4, 5], "k")
    fast.fork(0, 1)
    clone = copy.deepcopy(fast)
    assert clone._a.pids is clone._pids.arrays and clone._a.tables is not fast._a.tables
    assert observables(clone, range(3), 16) == observables(fast, range(3), 16)
    clone.append_batch([0, 1], [6, 7])  # copy-on-write and a filled block, in the clone only
    clone.swap_out(1)
    assert fast.num_tokens(0) == 5 and not fast.is_swapped(1)
    assert fast.refcount(fast.block_table(0)[-1]) == 2
    fast.check_integrity()
    clone.check_integrity()
    fast.append(0, 6)  # the original goes on alone, to the same state as the clone's sequence 0
    assert fast.block_table(0) == clone.block_table(0)
