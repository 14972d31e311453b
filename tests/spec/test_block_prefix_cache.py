"""Prefix caching in spec.block_manager: hash chain, hits, the one-token rule, LRU eviction,
touch-before-allocate, collisions, registration once computed (mark_computed), swap-in, reset.

Most tests run each allocation's and append's step at once (``alloc``, ``appended``); the
registration rule itself is tested with the bare calls at the end."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from spec.block_manager import BlockManager, BlockManagerConfig
from spec.prefix_cache import ROOT_PARENT_HASH, chain_hashes, hash_block_tokens


def alloc(bm: BlockManager, seq_id: int, tokens: list[int], extra_key: str | None = None) -> int:
    """``allocate`` and the prefill step: every prompt token's KV is then computed."""
    cached = bm.allocate(seq_id, tokens, extra_key)
    bm.mark_computed(seq_id, len(tokens))
    return cached


def appended(bm: BlockManager, seq_id: int, token: int) -> tuple[int, int] | None:
    """``append`` and the decode step that computes the token's KV."""
    pair = bm.append(seq_id, token)
    bm.mark_computed(seq_id, bm.num_tokens(seq_id))
    return pair


def make(bs: int = 2, gpu: int = 8, cpu: int = 4) -> BlockManager:
    return BlockManager(BlockManagerConfig(bs, gpu, cpu, enable_prefix_caching=True))


def test_hash_follows_the_documented_byte_layout() -> None:
    payload = b"".join(struct.pack("<q", v) for v in (-1, 3, 1, 2, 3, -1))
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    assert hash_block_tokens(ROOT_PARENT_HASH, [1, 2, 3], None) == int.from_bytes(
        digest, "little"
    ) & (2**63 - 1)
    key = b"lora-a"
    payload = b"".join(struct.pack("<q", v) for v in (5, 1, 7)) + struct.pack("<q", len(key)) + key
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    assert hash_block_tokens(5, [7], "lora-a") == int.from_bytes(digest, "little") & (2**63 - 1)


def test_hash_pinned_value() -> None:
    # pinned so any other implementation can check itself against one number
    assert hash_block_tokens(-1, [1, 2, 3], None) == 4812743184360512344


def test_chain_folds_in_the_parent() -> None:
    a = chain_hashes([1, 2, 3, 4], 2, None, hash_block_tokens)
    b = chain_hashes([9, 9, 3, 4], 2, None, hash_block_tokens)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same tokens [3, 4], other parent
    assert chain_hashes([1, 2, 3], 2, None, hash_block_tokens) == a[:1]


def test_allocate_reuses_the_longest_cached_prefix() -> None:
    bm = make(bs=2)
    assert alloc(bm, 0, [1, 2, 3, 4, 5]) == 0
    assert bm.block_table(0) == [0, 1, 2]
    assert bm.cached_blocks() == [0, 1]  # the full blocks; block 2 holds one token
    assert alloc(bm, 1, [1, 2, 3, 4, 6, 7]) == 4
    assert bm.block_table(1) == [0, 1, 3]
    assert bm.refcount(0) == 2 and bm.refcount(1) == 2
    assert alloc(bm, 2, [1, 2, 9, 9, 9]) == 2  # the chain stops at the first miss
    bm.check_integrity()


def test_at_least_one_prompt_token_is_computed() -> None:
    bm = make(bs=2)
    alloc(bm, 0, [1, 2, 3, 4])
    assert alloc(bm, 1, [1, 2, 3, 4]) == 2  # not 4: the last block is computed again
    assert bm.block_table(1) == [0, 2]
    assert alloc(bm, 2, [1, 2]) == 0
    assert alloc(bm, 3, [1]) == 0


def test_extra_key_separates_prefixes() -> None:
    bm = make(bs=2)
    alloc(bm, 0, [1, 2, 3], extra_key="lora-a")
    assert alloc(bm, 1, [1, 2, 3]) == 0
    assert alloc(bm, 2, [1, 2, 3], extra_key="lora-b") == 0
    assert alloc(bm, 3, [1, 2, 3], extra_key="lora-a") == 2


def test_freed_cached_blocks_stay_reusable_and_count_as_free() -> None:
    bm = make(bs=2, gpu=4)
    alloc(bm, 0, [1, 2, 3, 4, 5])
    bm.free(0)
    assert bm.num_free_gpu_blocks == 4
    assert bm.cached_blocks() == [0, 1]
    assert bm.free_block_order() == [3, 2, 1, 0]
    assert alloc(bm, 1, [1, 2, 3, 4, 8]) == 4
    assert bm.block_table(1) == [0, 1, 3]
    assert bm.free_block_order() == [2]  # hits left the queue from its middle


def test_eviction_is_least_recently_released_first_and_leaves_the_index() -> None:
    bm = make(bs=2, gpu=6)
    alloc(bm, 0, [1, 2])  # block 0, cached
    alloc(bm, 1, [3, 4])  # block 1, cached
    bm.free(1)
    bm.free(0)
    assert bm.free_block_order() == [2, 3, 4, 5, 1, 0]
    alloc(bm, 2, [7] * 9)  # takes 2, 3, 4, 5 and evicts 1 (released before 0)
    assert bm.block_table(2) == [2, 3, 4, 5, 1]
    assert bm.cached_blocks() == [0, 2, 3, 4, 5]  # 1 left the index
    bm.free(2)
    assert bm.free_block_order() == [0, 1, 5, 4, 3, 2]
    assert alloc(bm, 4, [1, 2, 5]) == 2  # [1, 2] is still cached
    assert bm.block_table(4) == [0, 1]
    assert alloc(bm, 3, [3, 4, 5]) == 0  # [3, 4] is not
    bm.check_integrity()


def test_touch_before_allocate_protects_the_hits() -> None:
    bm = make(bs=2, gpu=3)
    alloc(bm, 0, [1, 2, 3, 4])  # blocks 0, 1
    alloc(bm, 1, [8])  # block 2
    bm.free(0)
    bm.free(1)
    assert bm.free_block_order() == [1, 0, 2]  # the hits sit at the head of the queue
    assert bm.can_allocate([1, 2, 3, 4, 5])
    assert alloc(bm, 2, [1, 2, 3, 4, 5]) == 4
    assert bm.block_table(2) == [0, 1, 2]  # the new block is 2, not the evicted hit 1
    bm.check_integrity()


def test_capacity_counts_hits_that_leave_the_free_queue() -> None:
    bm = make(bs=2, gpu=3)
    alloc(bm, 0, [1, 2, 3, 4])
    bm.free(0)
    alloc(bm, 1, [5])  # takes block 2 (the head)
    assert bm.num_free_gpu_blocks == 2
    assert bm.can_allocate([1, 2, 3, 4, 5]) is False  # 2 hits revive + 1 new > 2 free
    assert bm.can_allocate([1, 2, 3]) is True  # 1 hit + 1 new


def test_hash_collision_never_reuses_a_wrong_block() -> None:
    def constant(parent: int, tokens: Sequence[int], extra_key: str | None) -> int:
        return 42

    bm = BlockManager(BlockManagerConfig(2, 8, enable_prefix_caching=True), hash_fn=constant)
    alloc(bm, 0, [1, 2, 3])
    assert bm.cached_blocks() == [0]
    assert alloc(bm, 1, [5, 6, 7]) == 0  # same hash, other tokens: a miss
    assert bm.block_table(1) == [2, 3]
    assert bm.cached_blocks() == [0]  # the first block under a hash stays
    assert alloc(bm, 2, [1, 2, 9]) == 2
    bm.check_integrity()


def test_collision_in_an_ancestor_is_caught_by_the_whole_prefix() -> None:
    def parentless(parent: int, tokens: Sequence[int], extra_key: str | None) -> int:
        return hash_block_tokens(-1, tokens, extra_key)  # forgets the parent on purpose

    bm = BlockManager(BlockManagerConfig(2, 8, enable_prefix_caching=True), hash_fn=parentless)
    alloc(bm, 0, [1, 2, 3, 4, 5])
    alloc(bm, 1, [3, 4, 5])  # [3, 4] at position 0 hashes like block 1 of seq 0
    assert bm.block_table(1)[0] != bm.block_table(0)[1]


def test_blocks_filled_by_append_are_registered() -> None:
    bm = make(bs=2)
    alloc(bm, 0, [1, 2, 3])
    assert bm.cached_blocks() == [0]
    appended(bm, 0, 4)
    assert bm.cached_blocks() == [0, 1]
    assert alloc(bm, 1, [1, 2, 3, 4, 5]) == 4


def test_copy_on_write_blocks_never_enter_the_cache_half_full() -> None:
    bm = make(bs=2)
    alloc(bm, 0, [1, 2, 3])
    bm.fork(0, 1)
    assert appended(bm, 1, 4) == (1, 2)
    assert bm.cached_blocks() == [0, 2]  # the child's now-full copy
    appended(bm, 0, 4)  # same content in block 1: the hash is taken, 1 is not registered
    assert bm.cached_blocks() == [0, 2]
    bm.check_integrity()


def test_swap_in_registers_full_blocks_again() -> None:
    bm = make(bs=2, gpu=4, cpu=4)
    alloc(bm, 0, [1, 2, 3])
    bm.swap_out(0)
    alloc(bm, 1, [7, 7, 7, 7, 7, 7, 7])  # takes every block: [1, 2] in block 0 is evicted
    assert bm.block_table(1) == [2, 3, 1, 0]
    assert bm.cached_blocks() == [1, 2, 3]
    bm.free(1)
    assert bm.reset_prefix_cache() is True
    bm.swap_in(0)
    assert bm.cached_blocks() == [bm.block_table(0)[0]]
    assert alloc(bm, 2, [1, 2, 9]) == 2


def test_reset_prefix_cache_drops_only_unused_blocks() -> None:
    bm = make(bs=2)
    alloc(bm, 0, [1, 2, 3])
    alloc(bm, 1, [4, 5, 6])
    bm.free(1)
    order = bm.free_block_order()
    assert bm.reset_prefix_cache() is False  # block 0 is in use and stays cached
    assert bm.cached_blocks() == [0]
    assert bm.free_block_order() == order
    assert alloc(bm, 2, [4, 5, 6]) == 0
    bm.free(0)
    bm.free(2)
    assert bm.reset_prefix_cache() is True
    assert bm.cached_blocks() == []
    plain = BlockManager(BlockManagerConfig(2, 4))
    assert plain.reset_prefix_cache() is True


def test_blocks_enter_the_cache_only_once_their_kv_is_computed() -> None:
    bm = make(bs=2)
    assert bm.allocate(0, [1, 2, 3, 4, 5]) == 0
    assert bm.cached_blocks() == [] and bm.num_computed_tokens(0) == 0
    assert bm.allocate(1, [1, 2, 3, 4, 5]) == 0  # nothing computed: no hit
    bm.mark_computed(0, 3)  # a first chunk: block 0 is full and written, block 1 is not
    assert bm.cached_blocks() == [0]
    assert bm.allocate(2, [1, 2, 3, 4, 5]) == 2
    assert bm.num_computed_tokens(2) == 2
    bm.mark_computed(0, 3)  # the same count again: nothing changes
    bm.mark_computed(0, 5)
    assert bm.cached_blocks() == [0, 1]
    bm.append(0, 6)  # fills block 2, whose last token's KV the next step writes
    assert bm.cached_blocks() == [0, 1]
    bm.mark_computed(0, 6)
    assert bm.cached_blocks() == [0, 1, 2]
    bm.check_integrity()


def test_mark_computed_checks_its_arguments_and_changes_nothing_on_error() -> None:
    import pytest

    from spec.errors import (
        InvalidArgumentError,
        SequenceStateError,
        UnknownSequenceError,
    )

    bm = make(bs=2)
    bm.allocate(0, [1, 2, 3])
    bm.mark_computed(0, 2)
    with pytest.raises(UnknownSequenceError):
        bm.mark_computed(7, 1)
    with pytest.raises(InvalidArgumentError, match="need 2 <= num_tokens <= 3"):
        bm.mark_computed(0, 1)  # the count never goes down
    with pytest.raises(InvalidArgumentError, match="need 2 <= num_tokens <= 3"):
        bm.mark_computed(0, 4)
    with pytest.raises(InvalidArgumentError):
        bm.mark_computed(0, True)  # type: ignore[arg-type]
    bm.allocate(1, [5, 6])
    with pytest.raises(InvalidArgumentError, match="appears twice"):
        bm.mark_computed_batch([1, 1], [1, 2])
    with pytest.raises(InvalidArgumentError):  # all or nothing: sequence 1 is not raised
        bm.mark_computed_batch([1, 0], [2, 9])
    assert bm.num_computed_tokens(1) == 0 and bm.cached_blocks() == [0]
    bm.swap_out(1)
    with pytest.raises(SequenceStateError):
        bm.mark_computed(1, 2)
    bm.check_integrity()


def test_fork_copies_and_swap_in_keeps_the_computed_count() -> None:
    bm = make(bs=2, gpu=8, cpu=8)
    bm.allocate(0, [1, 2, 3, 4, 5])
    bm.mark_computed(0, 3)
    bm.fork(0, 1)
    assert bm.num_computed_tokens(1) == 3
    bm.free(0)
    bm.swap_out(1)
    bm.reset_prefix_cache()
    assert bm.cached_blocks() == []
    bm.swap_in(1)  # only the blocks below the computed count come back into the cache
    assert len(bm.cached_blocks()) == 1 and bm.num_computed_tokens(1) == 3
    bm.check_integrity()
