"""Adapter: transformers' continuous-batching cache allocator under the semantic suite.

What is driven: ``FullAttentionCacheAllocator`` (its ``BlockLedger``: reference counts, content
hashes, cached blocks) over a ``CachePool`` of sectors, in
``transformers.generation.continuous_batching.cache_allocators``. The smallest honest
construction: a ``PretrainedConfig`` with ``head_dim=1``, one KV head, one layer, float32, so a
token's K (and V) is one float the checker can read back exactly; ``blocks_per_sector``
blocks per sector. The allocator's real cache tensor is the KV store: writes go through
``get_write_indices`` + ``update``, reads through ``get_read_indices`` + ``update``, fork copies
through ``copy_blocks``.

The orchestration the engine's ``PagedAttentionCache`` / scheduler does around the allocator
(sector allocation before ``allocate_cache_to_request``, ``match_prefix_blocks`` +
``acquire_prefix_blocks`` before admitting a prompt, ``mark_complete_blocks`` with the count of
blocks a forward pass completed, ``evict_cached_blocks`` + ``try_to_free_sectors`` under memory
pressure) is restated here from its documented behaviour, one method per step, so the adapter
needs no model, no generation config and no device.

Not expressible: swap (its offloading manager moves whole requests through a CPU pool, a
different contract), copy-on-write (a fork copies the partial last block at once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from conformance.adapters.semantic import Capabilities, NoRoom

__all__ = ["TransformersCBAdapter", "versions", "make_factory"]


def versions() -> dict[str, str]:
    """The exact versions the adapter runs against."""
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


class TransformersCBAdapter:
    """One full-attention allocator group with prefix sharing, driven as an engine would."""

    def __init__(self, block_size: int = 2, num_sectors: int = 4, blocks_per_sector: int = 2):
        import torch
        from transformers import PretrainedConfig
        from transformers.generation.continuous_batching.cache_allocators import (
            CachePool,
            FullAttentionCacheAllocator,
        )

        self._torch: Any = torch
        config = PretrainedConfig(head_dim=1)  # type: ignore[call-arg]
        alloc: Any = FullAttentionCacheAllocator(
            index=0,
            config=config,
            num_key_value_heads=1,
            cache_dtype=torch.float32,
            page_size=block_size,
            layer_indices=[0],
            allow_block_sharing=True,
        )
        bytes_per_sector = alloc.bytes_per_block * blocks_per_sector
        non_trash = bytes_per_sector * num_sectors
        tensor = torch.zeros(non_trash + 2 * bytes_per_sector, dtype=torch.int8)
        self.pool: Any = CachePool(num_sectors=num_sectors, num_allocators=1)
        alloc.register_cache_tensor(bytes_per_sector, non_trash, tensor, self.pool)
        self.alloc = alloc
        self.block_size = block_size
        self.bps = blocks_per_sector
        self.num_sectors = num_sectors
        self.tokens: dict[int, list[int]] = {}
        self.capabilities = Capabilities(
            name="transformers.FullAttentionCacheAllocator",
            block_size=block_size,
            num_blocks=num_sectors * blocks_per_sector,
            prefix_caching=True,
            fork=True,
            refcounts=True,
            cached_blocks=True,
            swap=False,
            copy_on_write=False,
            policies=(
                "blocks come from sectors (a sector is handed whole to an allocator); "
                "ids are popped from the highest leaf of the lowest sector down",
                "unreferenced hashed blocks stay cached until memory pressure, then all are "
                "evicted at once (the spec evicts one least-recently-released block at a time)",
                "a completed block whose content is already hashed is de-duplicated on the "
                "spot: the sequence adopts the existing block (the spec keeps its own)",
                "fork shares the parent's full blocks and copies the partial last one at once "
                "(the spec shares all and copies on write)",
            ),
        )

    # -- bookkeeping the engine does around the allocator ------------------------------------
    def _rid(self, seq_id: int) -> str:
        return f"req{seq_id}"

    def _free_capacity(self) -> int:
        return int(self.pool.count_free_blocks(0)) + int(self.pool.num_free_sectors) * self.bps

    def _reserve_blocks(self, needed: int) -> None:
        """Make ``needed`` blocks available (sectors, then eviction) or raise NoRoom."""
        if needed > self._free_capacity():
            self.pool.try_to_free_sectors()
        if needed > self._free_capacity() and self.alloc.ledger.cached_blocks:
            self.pool.free_blocks(0, self.alloc.ledger.evict_cached_blocks())
            self.pool.try_to_free_sectors()
        if needed > self._free_capacity():
            raise NoRoom
        missing = needed - int(self.pool.count_free_blocks(0))
        for _ in range(max(0, math.ceil(missing / self.bps))):
            self.pool.allocate_sector(0)

    def _grow(self, seq_id: int, past: int, query: int) -> None:
        rid = self._rid(seq_id)
        self._reserve_blocks(self.alloc.needs_new_blocks(rid, past, query))
        self.alloc.allocate_cache_to_request(rid, past, query)

    # -- the adapter surface -----------------------------------------------------------------
    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        rid = self._rid(seq_id)
        prompt = list(token_ids)
        matched = self.alloc.match_prefix_blocks(prompt)
        cached = len(matched) * self.block_size
        if matched:
            self.alloc.acquire_prefix_blocks(rid, cached, matched)
        try:
            self._grow(seq_id, cached, len(prompt) - cached)
        except NoRoom:
            self.alloc.free_blocks(rid)  # give the acquired prefix back
            raise
        self.tokens[seq_id] = prompt
        return cached

    def write(self, seq_id: int, start: int, values: Sequence[float]) -> None:
        torch = self._torch
        rid = self._rid(seq_id)
        n = len(values)
        kv = torch.tensor(values, dtype=torch.float32).view(n, 1, 1)
        write = torch.tensor(self.alloc.get_write_indices(rid, start, n), dtype=torch.long)
        empty = torch.zeros(0, dtype=torch.long)
        self.alloc.update(kv, -kv, 0, empty, write)
        # the engine's count_new_complete_blocks, then mark_complete_blocks after the forward
        completed = (start % self.block_size + n) // self.block_size
        if completed:
            self.alloc.mark_complete_blocks(rid, self.tokens[seq_id], completed)

    def read(self, seq_id: int, num_tokens: int) -> list[float]:
        torch = self._torch
        rid = self._rid(seq_id)
        read = torch.tensor(self.alloc.get_read_indices(rid, num_tokens, 0), dtype=torch.long)
        empty_kv = torch.zeros(0, 1, 1, dtype=torch.float32)
        empty = torch.zeros(0, dtype=torch.long)
        k, v = self.alloc.update(empty_kv, empty_kv, 0, read, empty)
        keys = [float(x) for x in k.flatten().tolist()]
        if [float(x) for x in (-v).flatten().tolist()] != keys:
            return [float("nan")] * num_tokens  # K and V disagree: a torn block
        return keys

    def append(self, seq_id: int, token_id: int) -> None:
        tokens = self.tokens[seq_id]
        self._grow(seq_id, len(tokens), 1)
        tokens.append(token_id)

    def fork(self, parent_id: int, child_id: int) -> None:
        src, dst = self._rid(parent_id), self._rid(child_id)
        past = len(self.tokens[parent_id])
        self._reserve_blocks(self.alloc.count_non_shareable_blocks(src, past))
        copy_src, copy_dst = self.alloc.fork_blocks(src, dst, past)
        if copy_src:
            self.alloc.copy_blocks(copy_src, copy_dst)
        self.tokens[child_id] = list(self.tokens[parent_id])

    def free(self, seq_id: int) -> None:
        self.alloc.free_blocks(self._rid(seq_id))
        del self.tokens[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self.alloc.block_table[self._rid(seq_id)])

    def refcount(self, block: int) -> int:
        ledger = self.alloc.ledger
        if block in ledger.cached_blocks:
            return 0
        held = any(block in table for table in self.alloc.block_table.values())
        return int(ledger.shared_ref_counts.get(block, 1 if held else 0))

    def num_free_blocks(self) -> int:
        return self._free_capacity()

    def num_cached_blocks(self) -> int:
        return len(self.alloc.ledger.cached_blocks)

    def evict_all(self) -> None:
        self.pool.free_blocks(0, self.alloc.ledger.evict_cached_blocks())
        self.pool.try_to_free_sectors()


def make_factory(**kwargs: int) -> Any:
    """A zero-argument factory of fresh adapters (what ``check_semantic`` takes)."""
    return lambda: TransformersCBAdapter(**kwargs)
