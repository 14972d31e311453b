"""Every named error of spec.errors: raised by the misuse it names, carrying its numbers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from spec.block_manager import BlockManager, BlockManagerConfig
from spec.errors import (
    DoubleFreeError,
    InvalidArgumentError,
    OutOfBlocksError,
    PagedKVError,
    SequenceExistsError,
    SequenceStateError,
    SwapInError,
    SwapOutError,
    UnknownSequenceError,
)


def make(**kw: Any) -> BlockManager:
    args: dict[str, Any] = {"block_size": 2, "num_gpu_blocks": 4, "num_cpu_blocks": 2}
    args.update(kw)
    return BlockManager(BlockManagerConfig(**args))


def unchanged_after(bm: BlockManager, error: type[Exception], fn: Callable[[], object]) -> Any:
    """Call ``fn``; it must raise ``error`` and leave every internal field of ``bm`` as it was."""
    before = copy.deepcopy(bm.__dict__)
    with pytest.raises(error) as info:
        fn()
    after = bm.__dict__
    assert before.keys() == after.keys()
    for key in before:
        if key == "_cache" and before[key] is not None:
            assert before[key].__dict__ == after[key].__dict__
        elif key in ("_gpu", "_cpu"):
            assert before[key].__dict__ == after[key].__dict__, key
            assert before[key].free_order() == after[key].free_order(), key  # dict == ignores order
        else:
            assert before[key] == after[key], key
    return info.value


def test_all_errors_derive_from_pagedkv_error() -> None:
    for cls in (
        DoubleFreeError,
        InvalidArgumentError,
        OutOfBlocksError,
        SequenceExistsError,
        SequenceStateError,
        SwapInError,
        SwapOutError,
        UnknownSequenceError,
    ):
        assert issubclass(cls, PagedKVError)


def test_unknown_sequence() -> None:
    bm = make()
    err = unchanged_after(bm, UnknownSequenceError, lambda: bm.append(7, 1))
    assert err.seq_id == 7 and "7" in str(err)
    for fn in (
        bm.num_tokens,
        bm.token_ids,
        bm.block_table,
        bm.is_swapped,
        bm.swap_out,
        bm.swap_in,
        bm.can_swap_in,
        bm.free,
    ):
        unchanged_after(bm, UnknownSequenceError, lambda fn=fn: fn(7))  # type: ignore[misc]
    unchanged_after(bm, UnknownSequenceError, lambda: bm.slot_mapping(7, 0, 0))
    unchanged_after(bm, UnknownSequenceError, lambda: bm.can_append([7]))
    unchanged_after(bm, UnknownSequenceError, lambda: bm.fork(7, 8))


def test_sequence_exists_on_allocate_and_fork() -> None:
    bm = make()
    bm.allocate(0, [1, 2, 3])
    bm.allocate(1, [4])
    err = unchanged_after(bm, SequenceExistsError, lambda: bm.allocate(0, [5]))
    assert err.seq_id == 0 and "0 already exists" in str(err)
    err = unchanged_after(bm, SequenceExistsError, lambda: bm.fork(0, 1))
    assert err.seq_id == 1
    unchanged_after(bm, SequenceExistsError, lambda: bm.fork(0, 0))


def test_double_free() -> None:
    bm = make()
    bm.allocate(3, [1])
    bm.free(3)
    err = unchanged_after(bm, DoubleFreeError, lambda: bm.free(3))
    assert err.seq_id == 3 and "already freed" in str(err)
    bm.allocate(3, [1])  # the id may be used again, and then freed once more
    bm.free(3)


def test_out_of_blocks_carries_needed_free_and_watermark() -> None:
    bm = make(num_gpu_blocks=4, watermark=0.25)  # one block reserved
    bm.allocate(0, [1, 2, 3, 4])  # 2 blocks, 2 free
    err = unchanged_after(bm, OutOfBlocksError, lambda: bm.allocate(1, [1, 2, 3]))
    assert (err.needed, err.free, err.watermark) == (2, 2, 1)
    assert "need 2, 2 free" in str(err)
    bm.allocate(1, [9])  # 1 block: leaves exactly the watermark
    err = unchanged_after(bm, OutOfBlocksError, lambda: bm.allocate(2, [9]))
    assert (err.needed, err.free, err.watermark) == (1, 1, 1)
    assert bm.append(0, 5) is None  # append may use the reserved block (allocate may not)
    bm.append(0, 6)
    assert bm.num_free_gpu_blocks == 0
    err = unchanged_after(bm, OutOfBlocksError, lambda: bm.append(0, 7))
    assert (err.needed, err.free, err.watermark) == (1, 0, 0)
    err = unchanged_after(bm, OutOfBlocksError, lambda: bm.append_batch([1, 0], [5, 6]))
    assert (err.needed, err.free) == (1, 0)
    assert bm.token_ids(1) == [9]  # all or nothing: sequence 1 did not get its token


def test_sequence_state_error_both_ways() -> None:
    bm = make()
    bm.allocate(0, [1, 2, 3])
    err = unchanged_after(bm, SequenceStateError, lambda: bm.swap_in(0))
    assert err.swapped is False and err.operation == "swap_in"
    unchanged_after(bm, SequenceStateError, lambda: bm.can_swap_in(0))
    bm.swap_out(0)
    for call in (
        lambda: bm.append(0, 1),
        lambda: bm.fork(0, 1),
        lambda: bm.swap_out(0),
        lambda: bm.slot_mapping(0, 0, 1),
        lambda: bm.can_append([0]),
        lambda: bm.append_batch([0], [1]),
    ):
        err = unchanged_after(bm, SequenceStateError, call)
        assert err.seq_id == 0 and err.swapped is True and "swapped out" in str(err)


def test_swap_out_error_counts_cpu_blocks() -> None:
    bm = make(num_cpu_blocks=1)
    bm.allocate(0, [1, 2, 3])
    err = unchanged_after(bm, SwapOutError, lambda: bm.swap_out(0))
    assert (err.needed, err.free) == (2, 1)


def test_swap_in_error_counts_gpu_blocks() -> None:
    bm = make(num_gpu_blocks=3, num_cpu_blocks=2)
    bm.allocate(0, [1, 2, 3])
    bm.swap_out(0)
    bm.allocate(1, [1, 2, 3])
    bm.allocate(2, [1])
    err = unchanged_after(bm, SwapInError, lambda: bm.swap_in(0))
    assert (err.needed, err.free, err.watermark) == (2, 0, 0)
    assert "need 2 GPU blocks, 0 free" in str(err)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 2.0}, "block_size"),
        ({"num_gpu_blocks": 0}, "num_gpu_blocks"),
        ({"num_cpu_blocks": -1}, "num_cpu_blocks"),
        ({"watermark": 1.0}, "watermark"),
        ({"watermark": -0.1}, "watermark"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching"),
    ],
)
def test_invalid_config(kwargs: dict[str, Any], name: str) -> None:
    args: dict[str, Any] = {"block_size": 2, "num_gpu_blocks": 4}
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError) as info:
        BlockManagerConfig(**args)
    assert info.value.name == name and info.value.value == kwargs[name]
    assert name in str(info.value)


def test_invalid_arguments_leave_state_unchanged() -> None:
    bm = make()
    bm.allocate(0, [1, 2, 3])
    cases: list[Callable[[], object]] = [
        lambda: bm.allocate(1, []),
        lambda: bm.allocate(1, [1, -1]),
        lambda: bm.allocate(1, [1, 2**63]),
        lambda: bm.allocate(1, [1.5]),  # type: ignore[list-item]
        lambda: bm.allocate(-1, [1]),
        lambda: bm.allocate(1, [1], extra_key=3),  # type: ignore[arg-type]
        lambda: bm.append(0, -5),
        lambda: bm.append_batch([0], [1, 2]),
        lambda: bm.append_batch([0, 0], [1, 2]),
        lambda: bm.fork(0, -3),
        lambda: bm.slot_mapping(0, 2, 1),
        lambda: bm.slot_mapping(0, 0, 4),
        lambda: bm.slot_mapping(0, -1, 1),
        lambda: bm.can_allocate([]),
    ]
    for case in cases:
        unchanged_after(bm, InvalidArgumentError, case)
    bm.swap_out(0)
    unchanged_after(bm, InvalidArgumentError, lambda: bm.can_swap_in(0, -1))


def test_check_order_when_several_things_are_wrong() -> None:
    """The documented order decides which error wins (an implementation must match it)."""
    bm = make()
    bm.allocate(0, [1])
    unchanged_after(bm, InvalidArgumentError, lambda: bm.allocate(0, []))  # args before exists
    unchanged_after(bm, InvalidArgumentError, lambda: bm.fork(99, -1))  # child id first
    unchanged_after(bm, UnknownSequenceError, lambda: bm.fork(99, 0))  # parent before child
    unchanged_after(bm, UnknownSequenceError, lambda: bm.append(99, -1))  # sequence before token
    unchanged_after(bm, InvalidArgumentError, lambda: bm.append_batch([99], [1, 2]))
