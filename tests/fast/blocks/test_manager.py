"""fast.blocks.manager: what the conformance suite does not reach (growth, arrays, extras)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.lockstep import Lockstep, observables
from fast.blocks import kernels as K
from fast.blocks.manager import BlockManager
from fast.blocks.prefix_ids import MISSING, PrefixIds, intern_one
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
    assert impl._tables.shape[0] >= 40 and impl._tables.shape[1] >= 8
    ls.free_all()


def test_gather_and_decode_step_match_the_spec_block_tables() -> None:
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
    slots, pairs, tables, lens = fast.decode_step(ids, toks)
    assert slots.tolist() == want_slots.tolist() and pairs.tolist() == want_pairs.tolist()
    assert tables.dtype == np.int32 and lens.dtype == np.int32
    width = max(len(spec.block_table(int(s))) for s in ids)
    assert tables.shape == (4, width)
    for k, s in enumerate(ids.tolist()):
        row = spec.block_table(s)
        assert tables[k, : len(row)].tolist() == row
        assert not tables[k, len(row) :].any()  # zero padded
        assert lens[k] == spec.num_tokens(s)
    t2, l2 = fast.gather(ids)
    assert np.array_equal(t2, tables) and np.array_equal(l2, lens)
    with pytest.raises(UnknownSequenceError):
        fast.gather([0, 99])
    with pytest.raises(UnknownSequenceError):
        fast.decode_step(np.array([0, 99], dtype=np.int64), np.array([1, 1], dtype=np.int64))
    fast.check_integrity()


def test_numpy_inputs_are_validated_like_lists() -> None:
    fast = BlockManager(BlockManagerConfig(block_size=4, num_gpu_blocks=8))
    with pytest.raises(InvalidArgumentError) as err:
        fast.allocate(0, np.array([1, -5, 2], dtype=np.int64))
    assert err.value.value == -5
    with pytest.raises(InvalidArgumentError) as err:  # the token is checked before the key
        fast.allocate(0, np.array([1, -7], dtype=np.int64), 3)  # type: ignore[arg-type]
    assert err.value.name == "token_ids" and err.value.value == -7
    with pytest.raises(InvalidArgumentError) as err:
        fast.allocate_batch([1, 2], [np.array([4], dtype=np.int64), np.array([-3], dtype=np.int64)])
    assert err.value.value == -3 and fast.has_sequence(1) and not fast.has_sequence(2)
    fast.free(1)
    fast.allocate(0, np.array([1, 2], dtype=np.int64))
    with pytest.raises(InvalidArgumentError):
        fast.append_batch(np.array([0], dtype=np.int64), np.array([-1], dtype=np.int64))
    assert fast.token_ids(0) == [1, 2]
    fast.check_integrity()


def test_allocate_batch_is_allocate_in_order() -> None:
    config = BlockManagerConfig(block_size=2, num_gpu_blocks=16, enable_prefix_caching=True)
    spec, fast = SpecBlockManager(config), BlockManager(config)
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 9]]
    want = [spec.allocate(i, p) for i, p in enumerate(prompts)]
    assert fast.allocate_batch([0, 1, 2], prompts) == want == [0, 4, 2]
    assert [fast.block_table(i) for i in range(3)] == [spec.block_table(i) for i in range(3)]


def test_prefix_ids_are_equal_exactly_for_equal_prefixes_and_survive_collection() -> None:
    ids = PrefixIds(block_size=2, capacity=8)

    def intern(parent: int, block: list[int], extra: int, create: bool = True) -> int:
        arr = np.array(block, dtype=np.int64)
        return int(intern_one(parent, arr, extra, 7, create, *ids.args()))  # one hash: collide

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
            K.oa_insert(keys, vals, key, key + 100)
            model[key] = key + 100
        elif not insert:
            K.oa_delete(keys, vals, key)
            model.pop(key, None)
        for k in range(41):
            assert K.oa_find(keys, vals, k) == model.get(k, -1)
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
        impl._pids.collect(impl._live_pids())  # collect after every allocate
        ls.check()
    # only ids of cached blocks (<= 64) and of the live sequences' blocks (<= 4 * 11) remain
    assert len(impl._pids) <= 64 + 44


def _each(fn: Any, args: Any) -> None:
    for a in args:
        fn(*a)


def _errors_like_spec(spec_call: object, fast_call: object) -> None:
    import pytest as _pytest

    want: type[BaseException] | None = None
    try:
        spec_call()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001
        want = type(exc)
    if want is None:
        fast_call()  # type: ignore[operator]
    else:
        with _pytest.raises(want):
            fast_call()  # type: ignore[operator]


@pytest.mark.parametrize("caching", [False, True])
def test_batched_allocate_fork_free_are_the_single_calls_in_order(caching: bool) -> None:
    config = BlockManagerConfig(block_size=2, num_gpu_blocks=24, enable_prefix_caching=caching)
    spec, fast = SpecBlockManager(config), BlockManager(config)

    def both(fn_spec: object, fn_fast: object) -> None:
        _errors_like_spec(fn_spec, fn_fast)
        assert observables(spec, range(20)) == observables(fast, range(20))
        assert spec.free_block_order() == fast.free_block_order()
        assert spec.cached_blocks() == fast.cached_blocks()
        fast.check_integrity()

    prompts = [[1, 2, 3], [1, 2, 3, 4, 5], [7], [1, 2]]
    both(lambda: [spec.allocate(i, p) for i, p in enumerate(prompts)],
         lambda: fast.allocate_batch(range(4), prompts))  # fmt: skip
    # an error in the middle: the earlier prompts stay allocated, the error is the same
    both(lambda: [spec.allocate(s, p) for s, p in [(4, [1]), (0, [2]), (5, [3])]],
         lambda: fast.allocate_batch([4, 0, 5], [[1], [2], [3]]))  # fmt: skip
    both(lambda: [spec.allocate(s, p) for s, p in [(6, [1]), (7, [])]],
         lambda: fast.allocate_batch([6, 7], [[1], []]))  # fmt: skip
    both(lambda: [spec.allocate(8, list(range(60)))],
         lambda: fast.allocate_batch([8], [np.arange(60, dtype=np.int64)]))  # fmt: skip
    both(lambda: _each(spec.fork, [(1, 10), (1, 11), (2, 12)]),
         lambda: fast.fork_batch([1, 1, 2], [10, 11, 12]))  # fmt: skip
    both(lambda: _each(spec.fork, [(0, 13), (99, 14)]),
         lambda: fast.fork_batch([0, 99], [13, 14]))  # fmt: skip
    both(lambda: _each(spec.fork, [(0, 15), (0, -1)]),
         lambda: fast.fork_batch([0, 0], [15, -1]))  # fmt: skip
    both(lambda: _each(spec.free, [(x,) for x in [10, 11, 10]]),
         lambda: fast.free_batch([10, 11, 10]))  # fmt: skip
    both(lambda: _each(spec.free, [(x,) for x in [12, 77]]),
         lambda: fast.free_batch(np.array([12, 77], dtype=np.int64)))  # fmt: skip
    live = spec.sequence_ids()
    both(lambda: _each(spec.free, [(x,) for x in live]), lambda: fast.free_batch(live))
    assert fast.num_free_gpu_blocks == 24


@pytest.mark.parametrize("caching", [False, True])
def test_decode_step_over_many_steps_equals_spec_append_batch(caching: bool) -> None:
    """Blocks fill (and get hashed and registered) inside the one decode kernel."""
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
        slots, pairs, tables, lens = fast.decode_step(ids, toks)
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
