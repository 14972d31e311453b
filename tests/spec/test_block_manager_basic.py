"""Example tests of spec.block_manager: allocate, append, fork, copy-on-write, free, slots."""

from __future__ import annotations

import numpy as np

from spec.block_manager import BlockManager, BlockManagerConfig


def make(bs: int = 4, gpu: int = 8, cpu: int = 4, **kw: object) -> BlockManager:
    return BlockManager(BlockManagerConfig(bs, gpu, cpu, **kw))  # type: ignore[arg-type]


def test_allocate_takes_blocks_from_the_queue_head_in_order() -> None:
    bm = make()
    assert bm.allocate(0, list(range(9))) == 0
    assert bm.block_table(0) == [0, 1, 2]
    assert bm.num_free_gpu_blocks == 5
    assert bm.free_block_order() == [3, 4, 5, 6, 7]
    bm.check_integrity()


def test_slot_mapping_is_block_times_size_plus_offset() -> None:
    bm = make(bs=4)
    bm.allocate(0, [1, 2, 3])
    bm.allocate(1, [1, 2, 3, 4, 5, 6])
    assert bm.block_table(1) == [1, 2]
    assert bm.slot_mapping(1, 0, 6) == [4, 5, 6, 7, 8, 9]
    assert bm.slot_mapping(1, 5, 6) == [9]
    assert bm.slot_mapping(1, 3, 3) == []


def test_append_takes_a_new_block_only_when_the_last_is_full() -> None:
    bm = make(bs=2)
    bm.allocate(0, [7])
    assert bm.append(0, 8) is None
    assert bm.block_table(0) == [0]
    assert bm.append(0, 9) is None
    assert bm.block_table(0) == [0, 1]
    assert bm.token_ids(0) == [7, 8, 9]
    bm.check_integrity()


def test_fork_shares_blocks_and_copy_on_write_splits_the_last() -> None:
    bm = make(bs=4)
    bm.allocate(0, [1, 2, 3, 4, 5])  # blocks [0, 1], block 1 holds one token
    bm.fork(0, 1)
    assert bm.refcount(0) == 2 and bm.refcount(1) == 2
    assert bm.append(1, 6) == (1, 2)  # child copies block 1 into fresh block 2
    assert bm.block_table(1) == [0, 2] and bm.block_table(0) == [0, 1]
    assert bm.refcount(1) == 1 and bm.refcount(2) == 1
    assert bm.append(0, 7) is None  # the parent is now alone in block 1
    bm.check_integrity()


def test_append_batch_cow_sequence_when_three_share_one_block() -> None:
    bm = make(bs=4)
    bm.allocate(0, [1, 2])
    bm.fork(0, 1)
    bm.fork(0, 2)
    slots, pairs = bm.append_batch([0, 1, 2], [10, 11, 12])
    # 0 and 1 copy (refcount 3 then 2); 2 is then alone and writes in place
    assert pairs.tolist() == [[0, 1], [0, 2]]
    assert slots.tolist() == [4 + 2, 8 + 2, 0 + 2]
    assert slots.dtype == np.int64 and pairs.dtype == np.int64
    bm.check_integrity()


def test_free_releases_blocks_in_reverse_logical_order() -> None:
    bm = make(bs=2, gpu=6)
    bm.allocate(0, [1, 2, 3, 4, 5])  # blocks 0, 1, 2
    bm.free(0)
    assert bm.free_block_order() == [3, 4, 5, 2, 1, 0]
    assert not bm.has_sequence(0)
    bm.check_integrity()


def test_shared_blocks_return_to_the_queue_only_at_refcount_zero() -> None:
    bm = make(bs=2, gpu=4)
    bm.allocate(0, [1, 2, 3])
    bm.fork(0, 1)
    bm.free(0)
    assert bm.free_block_order() == [2, 3]
    bm.free(1)
    assert bm.free_block_order() == [2, 3, 1, 0]


def test_can_append_counts_copy_on_write_sequentially() -> None:
    bm = make(bs=4, gpu=3)
    bm.allocate(0, [1, 2])
    bm.fork(0, 1)
    bm.fork(0, 2)
    bm.allocate(3, [1, 2, 3, 4, 5, 6])  # blocks 1, 2: nothing free
    assert bm.num_free_gpu_blocks == 0
    assert bm.can_append([]) is True
    assert bm.can_append([0]) is False
    bm.free(3)
    assert bm.can_append([0, 1, 2]) is True  # two copies, the third writes in place
    bm.allocate(4, [9])
    assert bm.can_append([0, 1, 2]) is False
    assert bm.can_append([0]) is True
