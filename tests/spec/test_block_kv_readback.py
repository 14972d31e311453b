"""A fake KV store written only through what the manager returns (slot mappings, copy-on-write
pairs, swap maps): every live sequence must read back exactly its own tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from spec.block_manager import BlockManager, BlockManagerConfig


class Engine:
    """The data movement an engine does around the block manager, with token ids as 'KV'."""

    def __init__(self, bm: BlockManager) -> None:
        c = bm.config
        self.bm, self.bs = bm, c.block_size
        self.gpu = np.full(c.num_gpu_blocks * c.block_size, -1, dtype=np.int64)
        self.cpu = np.full(max(c.num_cpu_blocks, 1) * c.block_size, -1, dtype=np.int64)
        self.apply_cow = True

    def _copy(self, src: np.ndarray, s: int, dst: np.ndarray, d: int) -> None:
        dst[d * self.bs : (d + 1) * self.bs] = src[s * self.bs : (s + 1) * self.bs]

    def prefill(self, seq_id: int, tokens: list[int], extra_key: str | None = None) -> int:
        cached = self.bm.allocate(seq_id, tokens, extra_key)
        self.gpu[self.bm.slot_mapping(seq_id, cached, len(tokens))] = tokens[cached:]
        self.bm.mark_computed(seq_id, len(tokens))  # the step wrote them
        return cached

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> None:
        slots, pairs = self.bm.append_batch(seq_ids, tokens)
        if self.apply_cow:
            for s, d in pairs.tolist():
                self._copy(self.gpu, s, self.gpu, d)
        self.gpu[slots] = tokens
        self.bm.mark_computed_batch(seq_ids, [self.bm.num_tokens(s) for s in seq_ids])

    def swap_out(self, seq_id: int) -> None:
        for g, c in self.bm.swap_out(seq_id):
            self._copy(self.gpu, g, self.cpu, c)

    def swap_in(self, seq_id: int) -> None:
        for c, g in self.bm.swap_in(seq_id):
            self._copy(self.cpu, c, self.gpu, g)

    def read(self, seq_id: int) -> list[int]:
        assert not self.bm.is_swapped(seq_id)
        slots = self.bm.slot_mapping(seq_id, 0, self.bm.num_tokens(seq_id))
        return [int(v) for v in self.gpu[slots]]

    def check_all(self) -> None:
        self.bm.check_integrity()
        for s in self.bm.sequence_ids():
            if not self.bm.is_swapped(s):
                assert self.read(s) == self.bm.token_ids(s), s


def beam_scenario(engine: Engine) -> None:
    """Parallel samples of one prompt diverge, one is swapped out and back, others end."""
    engine.prefill(0, [5, 6, 7, 8, 9])
    for child in (1, 2, 3):
        engine.bm.fork(0, child)
    engine.decode([0, 1, 2, 3], [10, 11, 12, 13])  # three copy-on-writes, one in place
    engine.check_all()
    engine.decode([0, 1, 2, 3], [20, 21, 22, 23])
    engine.swap_out(2)
    engine.bm.free(1)
    engine.prefill(4, [1, 1, 1, 1, 1, 1])  # reuses the freed blocks
    engine.check_all()
    engine.swap_in(2)
    engine.decode([2, 3], [30, 31])
    engine.check_all()
    assert engine.bm.token_ids(2) == [5, 6, 7, 8, 9, 12, 22, 30]


def test_siblings_keep_their_tokens_through_cow_and_swap() -> None:
    bm = BlockManager(BlockManagerConfig(block_size=4, num_gpu_blocks=10, num_cpu_blocks=4))
    beam_scenario(Engine(bm))


def test_the_store_catches_a_skipped_copy_on_write() -> None:
    bm = BlockManager(BlockManagerConfig(block_size=4, num_gpu_blocks=10, num_cpu_blocks=4))
    engine = Engine(bm)
    engine.apply_cow = False  # an engine that forgets the copies: siblings lose tokens
    with pytest.raises(AssertionError):
        beam_scenario(engine)


def test_prefix_hits_hold_the_right_tokens_after_eviction_pressure() -> None:
    bm = BlockManager(
        BlockManagerConfig(block_size=2, num_gpu_blocks=8, enable_prefix_caching=True)
    )
    engine = Engine(bm)
    system = [1, 2, 3, 4]
    assert engine.prefill(0, system + [10]) == 0  # blocks 0, 1, 2
    assert engine.prefill(1, system + [11, 12, 0]) == 4  # 0, 1 shared; 3 = [11, 12]; 4
    bm.free(0)
    bm.free(1)
    assert bm.free_block_order() == [5, 6, 7, 2, 4, 3, 1, 0]
    assert engine.prefill(2, [9] * 9) == 0  # takes 5, 6, 7, 2, 4
    assert engine.prefill(3, system + [13]) == 4  # hits 0, 1, then takes 3: [11, 12] evicted
    assert bm.block_table(3) == [0, 1, 3]
    engine.check_all()
    bm.free(2)
    assert engine.prefill(5, system + [11, 12, 0]) == 4  # [11, 12] is gone from the index
    engine.check_all()
    assert engine.read(5) == system + [11, 12, 0]
