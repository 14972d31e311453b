"""Deliberately broken variants of the fast block manager, one per named bug class.

Each mutant plants one bug that a real paged-KV system shipped, on top of
:class:`fast.blocks.manager.BlockManager`, and turns its own ``check_integrity`` into a no-op (a
buggy implementation's self-check is blind to its own bug): the named property must catch it
from the outside, by comparing with the spec and reading tokens back through the slots.
``MUTANTS`` maps each property name to the mutant it must catch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fast.blocks import kernels as K
from fast.blocks.manager import BlockManager

Tokens = Sequence[int] | NDArray[np.int64]

__all__ = [
    "MUTANTS",
    "StaleIndexMutant",
    "TouchAfterAllocateMutant",
    "HashOnlyMatchMutant",
    "ForkRefcountMutant",
    "SwapInCapacityMutant",
    "LeakOnAbortMutant",
]


class _Mutant(BlockManager):
    def check_integrity(self) -> None:
        """Blind: the bug must be found by behaviour alone."""


class StaleIndexMutant(_Mutant):
    """Taking a cached free block does not remove it from the hash index.

    After every operation that takes GPU blocks, blocks that were evicted get their old index
    entry (hash -> block, prefix id) back, so a later prompt "hits" a block that now holds
    another sequence's tokens.
    """

    def _restore(self, before: NDArray[np.int64]) -> None:
        evicted = np.flatnonzero((before[1] >= 0) & (self._ent[1] < 0) & (self._gpool[0] > 0))
        for b in evicted.tolist():
            h = int(before[0, b])
            if K.oa_find(self._ikeys, self._ivals, h) < 0:
                K.oa_insert(self._ikeys, self._ivals, h, b)
                self._ent[:, b] = before[:, b]

    def allocate(self, seq_id: int, token_ids: Tokens, extra_key: str | None = None) -> int:
        before = self._ent.copy()
        try:
            return super().allocate(seq_id, token_ids, extra_key)
        finally:
            self._restore(before)

    def append(self, seq_id: int, token_id: int) -> tuple[int, int] | None:
        before = self._ent.copy()
        try:
            return super().append(seq_id, token_id)
        finally:
            self._restore(before)

    def append_batch(
        self, seq_ids: Tokens, token_ids: Tokens
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        before = self._ent.copy()
        try:
            return super().append_batch(seq_ids, token_ids)
        finally:
            self._restore(before)


class TouchAfterAllocateMutant(_Mutant):
    """``allocate`` takes its new blocks before touching its hits.

    A hit whose block sits among the first free blocks is evicted by the very allocation that
    was about to reuse it (so the prompt is recomputed from that block on).
    """

    def allocate(self, seq_id: int, token_ids: Tokens, extra_key: str | None = None) -> int:
        if self._caching and isinstance(seq_id, int) and seq_id not in self._rows:
            try:
                tokens = self._check_prompt(token_ids)
            except Exception:  # noqa: BLE001 - the real call reports it
                tokens = None
            if tokens is not None:
                hashes, pids = self._chain(tokens, extra_key, create=False)
                hits = 0
                for i in range((tokens.shape[0] - 1) // self._bs):
                    b = K.oa_find(self._ikeys, self._ivals, int(hashes[i]))
                    if b < 0 or self._ent[1, b] != pids[i]:
                        break
                    hits += 1
                num_new = -(-tokens.shape[0] // self._bs) - hits
                if self.num_free_gpu_blocks - num_new >= self._wm:
                    for b in self.free_block_order()[:num_new]:
                        if self._ent[1, b] >= 0:
                            K.oa_delete(self._ikeys, self._ivals, int(self._ent[0, b]))
                            self._ent[1, b] = -1
        return super().allocate(seq_id, token_ids, extra_key)


class HashOnlyMatchMutant(_Mutant):
    """A prefix-cache hit trusts the hash: the cached block's tokens are never compared."""

    def _chain(
        self, tokens: NDArray[np.int64], extra_key: str | None, create: bool
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        hashes, pids = super()._chain(tokens, extra_key, create)
        for i in range(hashes.shape[0]):
            b = K.oa_find(self._ikeys, self._ivals, int(hashes[i]))
            if b < 0:
                break
            pids[i] = self._ent[1, b]  # "same hash, same block"
        return hashes, pids


class ForkRefcountMutant(_Mutant):
    """``fork`` forgets the reference of the parent's last block (an off-by-one)."""

    def fork(self, parent_id: int, child_id: int) -> None:
        super().fork(parent_id, child_id)
        row = self._rows[child_id]
        last = int(self._tables[row, self._nblocks(row) - 1])
        self._gpool[0, last] -= 1


class SwapInCapacityMutant(_Mutant):
    """``can_swap_in`` ignores the tokens about to be appended after the swap-in."""

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        super().can_swap_in(seq_id, num_new_tokens)  # same errors
        return super().can_swap_in(seq_id, 0)


class LeakOnAbortMutant(_Mutant):
    """``free`` of a swapped-out sequence forgets to give its CPU blocks back."""

    def free(self, seq_id: int) -> None:
        row = self._rows.get(seq_id)
        if row is not None and self._swapped[row]:
            self._ntok[row] = 0
            self._swapped[row] = 0
            self._drop_row(seq_id, row)
            self._freed.add(seq_id)
            return
        super().free(seq_id)


MUTANTS: dict[str, type[BlockManager]] = {
    "evicted_block_not_in_hash_index": StaleIndexMutant,
    "touch_before_allocate": TouchAfterAllocateMutant,
    "hash_collision_never_reuses_block": HashOnlyMatchMutant,
    "fork_free_refcounts_under_beam_search": ForkRefcountMutant,
    "swap_in_reserves_append_capacity": SwapInCapacityMutant,
    "no_blocks_leaked_on_abort": LeakOnAbortMutant,
}


def mutant_factory(name: str) -> Any:
    """A factory (as registered implementations have) building the mutant for property ``name``."""
    cls = MUTANTS[name]

    def build(config: Any, **kwargs: Any) -> BlockManager:
        return cls(config, **kwargs)

    return build
