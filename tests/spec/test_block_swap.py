"""Swap-out / swap-in and the watermark in spec.block_manager."""

from __future__ import annotations

from spec.block_manager import BlockManager, BlockManagerConfig


def make(bs: int = 2, gpu: int = 6, cpu: int = 4, watermark: float = 0.0) -> BlockManager:
    return BlockManager(BlockManagerConfig(bs, gpu, cpu, watermark=watermark))


def test_swap_out_maps_each_block_to_a_fresh_cpu_block() -> None:
    bm = make()
    bm.allocate(0, [1, 2, 3])  # gpu 0, 1
    assert bm.swap_out(0) == [(0, 0), (1, 1)]
    assert bm.is_swapped(0) and bm.block_table(0) == [0, 1]  # now CPU ids
    assert bm.num_free_gpu_blocks == 6 and bm.num_free_cpu_blocks == 2
    assert bm.free_block_order() == [2, 3, 4, 5, 1, 0]  # reverse logical order
    assert bm.token_ids(0) == [1, 2, 3]
    bm.check_integrity()


def test_swap_in_maps_back_to_the_queue_head() -> None:
    bm = make()
    bm.allocate(0, [1, 2, 3])
    bm.swap_out(0)
    assert bm.swap_in(0) == [(0, 2), (1, 3)]
    assert not bm.is_swapped(0) and bm.block_table(0) == [2, 3]
    assert bm.num_free_cpu_blocks == 4
    assert bm.slot_mapping(0, 0, 3) == [4, 5, 6]
    bm.append(0, 4)
    bm.check_integrity()


def test_swap_out_of_a_shared_sequence_copies_and_keeps_the_sibling() -> None:
    bm = make()
    bm.allocate(0, [1, 2, 3])
    bm.fork(0, 1)
    assert bm.swap_out(1) == [(0, 0), (1, 1)]
    assert bm.block_table(0) == [0, 1] and bm.refcount(0) == 1
    assert bm.num_free_gpu_blocks == 4  # nothing came back: the parent still holds both
    assert bm.append(0, 9) is None  # the parent is alone now: no copy-on-write
    bm.swap_in(1)
    assert bm.block_table(1) == [2, 3]  # sharing is not restored
    bm.check_integrity()


def test_freeing_a_swapped_sequence_returns_cpu_blocks_in_reverse_order() -> None:
    bm = make(cpu=3)
    bm.allocate(0, [1, 2, 3])
    bm.swap_out(0)
    bm.free(0)
    assert bm.num_free_cpu_blocks == 3
    bm.allocate(1, [1])
    assert bm.swap_out(1) == [(2, 2)]  # GPU block 2; the CPU queue was [2, 1, 0]
    bm.check_integrity()


def test_can_swap_in_counts_the_tokens_about_to_be_appended() -> None:
    bm = make(bs=2, gpu=4)
    bm.allocate(0, [1, 2, 3, 4])  # 2 full blocks
    bm.swap_out(0)
    bm.allocate(1, [5, 6, 7, 8])  # 2 blocks, 2 free
    assert bm.can_swap_in(0, 0) is True  # the blocks it holds fit ...
    assert bm.can_swap_in(0, 1) is False  # ... but the next token needs a third
    assert bm.can_swap_in(0) is False  # the default counts one new token
    bm.swap_in(0)  # swap_in itself only needs the blocks it holds
    assert bm.can_append([0]) is False


def test_watermark_applies_to_allocate_and_swap_in_not_to_append() -> None:
    bm = make(bs=1, gpu=10, cpu=4, watermark=0.2)  # 2 blocks reserved
    assert bm.config.watermark_blocks == 2
    assert bm.can_allocate([0] * 8) and not bm.can_allocate([0] * 9)
    bm.allocate(0, [0] * 3)
    bm.swap_out(0)
    bm.allocate(1, [0] * 6)
    assert bm.num_free_gpu_blocks == 4
    assert bm.can_swap_in(0, 0) is False  # 4 - 3 < 2
    bm.append(1, 1)
    bm.append(1, 1)
    bm.append(1, 1)
    bm.append(1, 1)  # append spends the reserve down to 0
    assert bm.num_free_gpu_blocks == 0


def test_watermark_blocks_is_the_floor_of_the_product() -> None:
    for watermark, blocks, want in ((0.01, 100, 1), (0.015, 100, 1), (0.1, 7, 0), (0.5, 7, 3)):
        config = BlockManagerConfig(block_size=4, num_gpu_blocks=blocks, watermark=watermark)
        assert config.watermark_blocks == want
