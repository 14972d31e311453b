"""Planted bugs: block managers that are wrong in one way each, for the mutant tests.

Each mutant subclasses the spec's ``BlockManager`` and plants one bug class that a real paged-KV
system shipped (see docs/conformance.md for the story behind each). Its own ``check_integrity``
is made blind (a buggy implementation's self-check does not see its own bug): the conformance
suite has to catch it from the outside, by comparing with the spec and reading tokens back
through the slots. ``MUTANTS`` maps each named property to the mutant it must catch.

These are test material, not part of the ``conformance`` package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spec.block_manager import BlockManager
from spec.block_table import BlockTable, num_blocks_for

__all__ = [
    "MUTANTS",
    "StaleIndexMutant",
    "TouchAfterAllocateMutant",
    "HashOnlyMatchMutant",
    "ForkRefcountMutant",
    "SwapInCapacityMutant",
    "LeakOnAbortMutant",
    "RegisterAtAllocateMutant",
    "mutant_factory",
]


class _Mutant(BlockManager):
    def check_integrity(self) -> None:
        """Blind: the bug must be found by behaviour alone."""


class StaleIndexMutant(_Mutant):
    """Taking a cached free block for new content leaves its old entry in the hash index.

    A later prompt with the old content "hits" the block, which now holds other tokens. (When
    the block is registered again under its new content, the stale entry is overwritten.)
    """

    def _take_gpu(self) -> int:
        return self._gpu.take()  # bug: no eviction from the index

    def _register(self, table: BlockTable, index: int) -> None:
        if self._cache is not None and self._cache.is_cached(table.blocks[index]):
            self._cache.evict(table.blocks[index])
        super()._register(table, index)


class TouchAfterAllocateMutant(_Mutant):
    """``allocate`` takes its new blocks before touching its hits.

    A hit whose block is among the first free blocks is evicted by the very allocation that was
    about to reuse it, so the prompt is recomputed from that block on.
    """

    def allocate(self, seq_id: int, token_ids: Sequence[int], extra_key: str | None = None) -> int:
        if self._cache is not None and isinstance(seq_id, int) and seq_id not in self._seqs:
            try:
                tokens = self._check_tokens(token_ids)
                _, hits = self._match_prefix(tokens, extra_key)
                need = self._allocate_demand(tokens, hits)
            except Exception:  # noqa: BLE001 - the real call below reports it
                hits, need = [], -1
            if 0 <= need <= self._gpu.num_free - self.config.watermark_blocks:
                num_new = num_blocks_for(len(tokens), self._bs) - len(hits)
                for block in self._gpu.peek(num_new):  # bug: evicted before the hits are taken
                    self._cache.evict(block)
        return super().allocate(seq_id, token_ids, extra_key)


class HashOnlyMatchMutant(_Mutant):
    """A prefix-cache hit trusts the hash: the cached block's tokens are never compared."""

    def _match_prefix(
        self, tokens: list[int], extra_key: str | None
    ) -> tuple[list[int], list[int]]:
        hashes, _ = super()._match_prefix(tokens, extra_key)
        if self._cache is None:
            return hashes, []
        hits: list[int] = []
        for i in range((len(tokens) - 1) // self._bs):
            block = self._cache._index.get(hashes[i])  # bug: "same hash, same block"
            if block is None:
                break
            hits.append(block)
        return hashes, hits


class ForkRefcountMutant(_Mutant):
    """``fork`` forgets the reference of the parent's last block (an off-by-one)."""

    def fork(self, parent_id: int, child_id: int) -> None:
        super().fork(parent_id, child_id)
        self._gpu.decref(self._seqs[child_id].blocks[-1])


class SwapInCapacityMutant(_Mutant):
    """``can_swap_in`` ignores the tokens about to be appended after the swap-in."""

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        super().can_swap_in(seq_id, num_new_tokens)  # same errors
        return super().can_swap_in(seq_id, 0)


class LeakOnAbortMutant(_Mutant):
    """``free`` of a swapped-out sequence forgets to give its host blocks back."""

    def free(self, seq_id: int) -> None:
        table = self._seqs.get(seq_id)
        if table is not None and table.swapped:
            del self._seqs[seq_id]
            self._freed.add(seq_id)
            return
        super().free(seq_id)


class RegisterAtAllocateMutant(_Mutant):
    """A block enters the prefix cache when it is allocated or filled, before its KV exists.

    The rule pagedkv had before chunked prefill and prefix caching were combined: a second
    request could hit a prompt block whose chunk a later step had yet to compute.
    """

    def allocate(self, seq_id: int, token_ids: Sequence[int], extra_key: str | None = None) -> int:
        cached = super().allocate(seq_id, token_ids, extra_key)
        table = self._seqs[seq_id]
        for i in range(cached // self._bs, len(table.block_hashes)):
            self._register(table, i)  # bug: registered before any step computed it
        return cached

    def _append_one(self, table: BlockTable, token: int) -> tuple[int, int] | None:
        pair = super()._append_one(table, token)
        if self._cache is not None and table.num_tokens % self._bs == 0:
            self._register(table, table.num_tokens // self._bs - 1)  # bug: at fill time
        return pair


MUTANTS: dict[str, type[BlockManager]] = {
    "evicted_block_not_in_hash_index": StaleIndexMutant,
    "touch_before_allocate": TouchAfterAllocateMutant,
    "hash_collision_never_reuses_block": HashOnlyMatchMutant,
    "fork_free_refcounts_under_beam_search": ForkRefcountMutant,
    "swap_in_reserves_append_capacity": SwapInCapacityMutant,
    "no_blocks_leaked_on_abort": LeakOnAbortMutant,
    "no_hit_before_kv_written": RegisterAtAllocateMutant,
}


def mutant_factory(name: str) -> Any:
    """A block-manager factory building the mutant planted for property ``name``."""
    cls = MUTANTS[name]

    def build(config: Any, **kwargs: Any) -> BlockManager:
        return cls(config, **kwargs)

    build.__name__ = cls.__name__
    return build
