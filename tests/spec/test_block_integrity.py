"""Each invariant of check_integrity(): corrupt the state on purpose, see it raise."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from spec.block_manager import BlockManager, BlockManagerConfig
from spec.block_pool import BlockPool
from spec.prefix_cache import CachedBlock, chain_hashes


def healthy(prefix: bool = True) -> BlockManager:
    """Sequence 0 = [1, 2, 3, 4, 5] in blocks [0, 1, 2]; 1 forked from it; 2 swapped out."""
    bm = BlockManager(BlockManagerConfig(2, 8, 4, enable_prefix_caching=prefix))
    bm.allocate(0, [1, 2, 3, 4, 5])
    bm.mark_computed(0, 5)  # blocks 0 and 1 enter the prefix cache
    bm.fork(0, 1)
    bm.allocate(2, [7, 7, 7])
    bm.mark_computed(2, 3)
    bm.swap_out(2)
    bm.allocate(3, [9])
    bm.free(3)
    bm.check_integrity()
    return bm


def rehash(bm: BlockManager, seq_id: int) -> None:
    table = bm._seqs[seq_id]
    assert bm._cache is not None
    table.block_hashes = chain_hashes(table.token_ids, 2, table.extra_key, bm._cache.hash_fn)


def corrupt_refcount(bm: BlockManager) -> None:
    bm._gpu._refcount[0] = 1  # two tables reference block 0


def corrupt_free_but_referenced(bm: BlockManager) -> None:
    bm._gpu._free[2] = None  # block 2 is seq 0's last block


def corrupt_used_but_not_queued(bm: BlockManager) -> None:
    del bm._gpu._free[7]


def corrupt_negative_refcount(bm: BlockManager) -> None:
    bm._gpu._refcount[7] = -1
    del bm._gpu._free[7]


def corrupt_table_length(bm: BlockManager) -> None:
    bm._seqs[0].token_ids.append(6)  # 6 tokens still fit 3 blocks: drop one block instead
    bm._seqs[0].token_ids.append(6)


def corrupt_repeated_block(bm: BlockManager) -> None:
    bm._seqs[1].blocks[1] = 0
    bm._gpu._refcount[0] = 3
    bm._gpu._refcount[1] = 1


def corrupt_hash_count(bm: BlockManager) -> None:
    bm._seqs[0].block_hashes.pop()


def corrupt_stale_hash(bm: BlockManager) -> None:
    bm._seqs[0].block_hashes[1] ^= 1


def corrupt_live_and_freed(bm: BlockManager) -> None:
    bm._freed.add(0)


def corrupt_block_out_of_pool(bm: BlockManager) -> None:
    bm._seqs[2].blocks[0] = 99


def corrupt_shared_content(bm: BlockManager) -> None:
    bm._seqs[1].token_ids[4] = 6  # sibling disagrees about the shared last block
    rehash(bm, 1)


def corrupt_cpu_shared(bm: BlockManager) -> None:
    bm.allocate(5, [1])
    bm.swap_out(5)  # cpu block 2
    bm._cpu._refcount[bm._seqs[5].blocks[0]] = 0
    bm._cpu._free[bm._seqs[5].blocks[0]] = None
    bm._seqs[5].blocks = [bm._seqs[2].blocks[0]]
    bm._cpu._refcount[bm._seqs[2].blocks[0]] = 2


def corrupt_pool_size(bm: BlockManager) -> None:
    bm._gpu._refcount.append(0)


def corrupt_queue_out_of_range(bm: BlockManager) -> None:
    bm._gpu._free[-1] = None


def corrupt_index_size(bm: BlockManager) -> None:
    assert bm._cache is not None
    bm._cache._index[12345] = 0


def corrupt_index_entry(bm: BlockManager) -> None:
    assert bm._cache is not None
    h = bm._cache._entries[0].block_hash
    bm._cache._index[h] = 1
    bm._cache._index[bm._cache._entries[1].block_hash] = 0


def corrupt_entry_length(bm: BlockManager) -> None:
    assert bm._cache is not None
    e = bm._cache._entries[0]
    bm._cache._entries[0] = CachedBlock(e.block_hash, e.prefix + (1,), e.extra_key)


def corrupt_entry_hash(bm: BlockManager) -> None:
    assert bm._cache is not None
    e = bm._cache._entries[0]
    bm._cache._entries[0] = CachedBlock(e.block_hash, (8, 8), e.extra_key)


def corrupt_cached_outside_pool(bm: BlockManager) -> None:
    assert bm._cache is not None
    bm._cache.register(50, bm._cache.hash_fn(-1, [0, 0], None), [0, 0], None)


def corrupt_cached_content_at_index(bm: BlockManager) -> None:
    # both sequences hold [3, 4] in block 1 but the index says block 1 stores [3, 5]
    assert bm._cache is not None
    bm._cache.evict(1)
    h = bm._cache.hash_fn(bm._cache.entry(0).block_hash, [3, 5], None)
    bm._cache.register(1, h, [1, 2, 3, 5], None)


def corrupt_cached_earlier_prefix(bm: BlockManager) -> None:
    # block 1 is cached as the second block of [1, 2, 3, 4], but seq 0 now starts [1, 0]
    assert bm._cache is not None
    bm._cache.evict(0)
    for s in (0, 1):
        bm._seqs[s].token_ids[1] = 0
        rehash(bm, s)


def corrupt_computed_count(bm: BlockManager) -> None:
    bm._seqs[0].num_computed = 6


CORRUPTIONS: list[tuple[Callable[[BlockManager], None], str]] = [
    (corrupt_refcount, "refcount 1 but 2 tables"),
    (corrupt_free_but_referenced, "block 2 has refcount 2 but is_free=True"),
    (corrupt_used_but_not_queued, "has refcount 0 but is_free=False"),
    (corrupt_negative_refcount, "refcount -1 < 0"),
    (corrupt_table_length, "3 blocks for 7 tokens"),
    (corrupt_repeated_block, "repeats a block"),
    (corrupt_hash_count, "1 block hashes for 5 tokens"),
    (corrupt_stale_hash, "stale block hashes"),
    (corrupt_live_and_freed, "both live and freed"),
    (corrupt_block_out_of_pool, "references block 99"),
    (corrupt_shared_content, "shared with different content"),
    (corrupt_cpu_shared, "CPU block is shared"),
    (corrupt_pool_size, "9 refcounts for 8 blocks"),
    (corrupt_queue_out_of_range, "outside the pool"),
    (corrupt_index_size, "hashes but"),
    (corrupt_index_entry, "has no matching entry"),
    (corrupt_entry_length, "not a positive multiple"),
    (corrupt_entry_hash, "its content hashes"),
    (corrupt_cached_outside_pool, "cached block 50 is outside"),
    (corrupt_cached_content_at_index, "stores (1, 2, 3, 5) but holds [3, 4]"),
    (corrupt_cached_earlier_prefix, "whose stored prefix differs"),
    (corrupt_computed_count, "6 computed tokens of 5"),
]


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS])
def test_check_integrity_catches(corrupt: Callable[[BlockManager], None], message: str) -> None:
    bm = healthy()
    corrupt(bm)
    with pytest.raises(
        AssertionError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        bm.check_integrity()


def test_pool_checks_expected_refcounts_only_when_given() -> None:
    pool = BlockPool(3)
    pool.take()
    pool.check_integrity()
    pool.check_integrity([1, 0, 0])
    with pytest.raises(AssertionError, match="block 0 has refcount 1 but 2 tables"):
        pool.check_integrity([2, 0, 0])
