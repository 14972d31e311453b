"""The executable specification of KV-cache block management.

One :class:`BlockManager` owns a GPU block pool, a CPU block pool (swap space), the block table
of every live sequence, and (optionally) the prefix cache. Every decision is deterministic, so a
second implementation can be required to be observably identical: same block ids, same
copy-on-write pairs, same swap maps, same evictions, same exceptions.

Policy, in full:

* **Free queue** (:mod:`spec.block_pool`): FIFO; starts ``0..N-1``; blocks are taken from the
  head and returned to the tail when their refcount reaches 0. When a sequence is freed (or
  swapped out) its blocks are released in **reverse logical order**, so its last block reaches
  the tail first and its first block last: the prefix root is the last of them to be reused.
* **Prefix cache** (:mod:`spec.prefix_cache`): cached blocks whose refcount is 0 stay in the
  free queue *and* in the index; taking such a block from the head evicts it from the index. So
  eviction is least-recently-released first. An allocation first *touches* its hits (moves them
  out of the queue), then takes its new blocks: it never evicts its own hits.
* **Hits**: ``allocate`` reuses cached blocks for the prompt's leading full blocks while they
  match, at most ``(len(token_ids) - 1) // block_size`` of them; a match compares the stored
  whole-prefix tokens and extra key, so a hash collision is a miss.
* **Computed tokens**: each sequence counts the leading tokens whose KV has been written
  (``num_computed_tokens``): ``allocate`` starts it at the cached-token count, the caller
  raises it with ``mark_computed`` after the step that wrote the KV, ``fork`` copies it.
* **Registration**: a GPU block is offered to the index when it is full *and* its KV is
  computed: ``mark_computed`` offers the full blocks it completes, and ``swap_in`` offers the
  full blocks below the computed count. Allocation and ``append`` never register, so no
  request can hit a block whose KV a later step (a later chunk, the next decode) has yet to
  write. A hash already in the index is not registered again.
* **Swap**: per sequence, one fresh block per logical block, mapped in logical order; blocks
  shared with a live sibling are copied (sharing is not restored on swap-in). ``append``,
  ``fork``, ``slot_mapping`` and ``swap_out`` need a resident sequence, ``swap_in`` a swapped one.
* **Watermark**: ``allocate`` and ``swap_in`` must leave ``watermark_blocks`` GPU blocks free;
  ``append`` may use every free block.
* **Errors**: every operation validates all its arguments, in the order its docstring lists,
  before it changes anything; on an error the state is exactly as before.

>>> bm = BlockManager(BlockManagerConfig(block_size=4, num_gpu_blocks=8))
>>> bm.allocate(seq_id=0, token_ids=[10, 11, 12, 13, 14])
0
>>> bm.block_table(0), bm.slot_mapping(0, 0, 5)
([0, 1], [0, 1, 2, 3, 4])
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from spec.block_pool import BlockPool
from spec.block_table import BlockTable, num_blocks_for, slot_of
from spec.errors import (
    DoubleFreeError,
    InvalidArgumentError,
    OutOfBlocksError,
    SequenceExistsError,
    SequenceStateError,
    SwapInError,
    SwapOutError,
    UnknownSequenceError,
)
from spec.prefix_cache import (
    ROOT_PARENT_HASH,
    HashFn,
    PrefixCache,
    chain_hashes,
    hash_block_tokens,
)

_INT64_MAX = (1 << 63) - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BlockManagerConfig:
    """Sizes and switches of a block manager (validated on construction)."""

    block_size: int  # tokens per block, >= 1
    num_gpu_blocks: int  # physical blocks in the device pool, >= 1
    num_cpu_blocks: int = 0  # blocks in the host pool (swap), >= 0
    watermark: float = 0.0  # fraction of the device pool allocate()/swap_in() leave free
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.block_size) or self.block_size < 1:
            raise InvalidArgumentError("block_size", self.block_size, "must be an int >= 1")
        if not _is_int(self.num_gpu_blocks) or self.num_gpu_blocks < 1:
            raise InvalidArgumentError("num_gpu_blocks", self.num_gpu_blocks, "must be an int >= 1")
        if not _is_int(self.num_cpu_blocks) or self.num_cpu_blocks < 0:
            raise InvalidArgumentError("num_cpu_blocks", self.num_cpu_blocks, "must be an int >= 0")
        w = self.watermark
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w < 1.0:
            raise InvalidArgumentError("watermark", w, "must be a float in [0, 1)")
        if not isinstance(self.enable_prefix_caching, bool):
            raise InvalidArgumentError(
                "enable_prefix_caching", self.enable_prefix_caching, "must be a bool"
            )

    @property
    def watermark_blocks(self) -> int:
        """Blocks allocate()/swap_in() keep free: ``floor(watermark * num_gpu_blocks)``."""
        return math.floor(float(self.watermark) * self.num_gpu_blocks)


class BlockManager:
    """Block tables, refcounts, copy-on-write, swap and prefix caching (the reference).

    ``hash_fn`` (keyword only, default :func:`spec.prefix_cache.hash_block_tokens`) exists so
    tests can plant hash collisions.
    """

    def __init__(self, config: BlockManagerConfig, *, hash_fn: HashFn = hash_block_tokens) -> None:
        if not isinstance(config, BlockManagerConfig):
            raise InvalidArgumentError("config", config, "must be a BlockManagerConfig")
        self.config = config
        self._bs = config.block_size
        self._gpu = BlockPool(config.num_gpu_blocks)
        self._cpu = BlockPool(config.num_cpu_blocks)
        self._cache = PrefixCache(hash_fn) if config.enable_prefix_caching else None
        self._seqs: dict[int, BlockTable] = {}
        self._freed: set[int] = set()

    # ------------------------------------------------------------------ queries
    @property
    def num_free_gpu_blocks(self) -> int:
        """GPU blocks in the free queue (including cached blocks with refcount 0)."""
        return self._gpu.num_free

    @property
    def num_free_cpu_blocks(self) -> int:
        """CPU blocks not holding a swapped-out sequence."""
        return self._cpu.num_free

    def has_sequence(self, seq_id: int) -> bool:
        """True when ``seq_id`` is live (resident or swapped out)."""
        return seq_id in self._seqs

    def num_tokens(self, seq_id: int) -> int:
        """Tokens held by the sequence. Raises UnknownSequenceError."""
        return self._get(seq_id).num_tokens

    def token_ids(self, seq_id: int) -> list[int]:
        """A copy of the sequence's token ids. Raises UnknownSequenceError."""
        return list(self._get(seq_id).token_ids)

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids in logical order (CPU ids while swapped out)."""
        return list(self._get(seq_id).blocks)

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Slots ``block * bs + offset`` of tokens ``start..end-1`` of a resident sequence.

        Checks, in order: UnknownSequenceError, SequenceStateError (swapped out),
        InvalidArgumentError unless ``0 <= start <= end <= num_tokens``.
        """
        table = self._resident(seq_id, "slot_mapping")
        if not (_is_int(start) and _is_int(end) and 0 <= start <= end <= table.num_tokens):
            raise InvalidArgumentError(
                "start, end", (start, end), f"need 0 <= start <= end <= {table.num_tokens}"
            )
        return [slot_of(table.blocks, t, self._bs) for t in range(start, end)]

    def is_swapped(self, seq_id: int) -> bool:
        """True when the sequence lives in the CPU pool. Raises UnknownSequenceError."""
        return self._get(seq_id).swapped

    def refcount(self, block: int) -> int:
        """How many live resident sequences reference GPU ``block``."""
        return self._gpu.refcount(block)

    def free_block_order(self) -> list[int]:
        """The GPU free queue, head (next block to be taken) first."""
        return self._gpu.free_order()

    def cached_blocks(self) -> list[int]:
        """GPU blocks registered in the prefix cache, ascending (empty when it is off)."""
        return [] if self._cache is None else self._cache.cached_blocks()

    def num_computed_tokens(self, seq_id: int) -> int:
        """Leading tokens of the sequence whose KV is written. Raises UnknownSequenceError."""
        return self._get(seq_id).num_computed

    def sequence_ids(self) -> list[int]:
        """Live sequence ids, ascending."""
        return sorted(self._seqs)

    def can_allocate(self, token_ids: Sequence[int], extra_key: str | None = None) -> bool:
        """Whether ``allocate`` of this prompt would succeed now (with the watermark).

        Raises InvalidArgumentError for a bad prompt or extra key.
        """
        tokens = self._check_tokens(token_ids)
        self._check_extra_key(extra_key)
        _, hits = self._match_prefix(tokens, extra_key)
        need = self._allocate_demand(tokens, hits)
        return self._gpu.num_free - need >= self.config.watermark_blocks

    def can_append(self, seq_ids: Sequence[int]) -> bool:
        """Whether ``append_batch`` of one token to each of ``seq_ids`` would succeed now.

        Checks: InvalidArgumentError (repeated id), UnknownSequenceError, SequenceStateError.
        """
        self._check_batch_ids(seq_ids, "can_append")
        return self._append_demand(seq_ids) <= self._gpu.num_free

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        """Whether the swapped-out sequence fits back with ``num_new_tokens`` more tokens.

        Counts ``ceil((num_tokens + num_new_tokens) / bs)`` GPU blocks and keeps the
        watermark: with ``num_new_tokens=0`` it is exactly "``swap_in`` would succeed".
        Checks: UnknownSequenceError, SequenceStateError (resident), InvalidArgumentError.
        """
        table = self._get(seq_id)
        if not table.swapped:
            raise SequenceStateError(seq_id, False, "can_swap_in")
        if not _is_int(num_new_tokens) or num_new_tokens < 0:
            raise InvalidArgumentError("num_new_tokens", num_new_tokens, "must be an int >= 0")
        need = num_blocks_for(table.num_tokens + num_new_tokens, self._bs)
        return self._gpu.num_free - need >= self.config.watermark_blocks

    # ------------------------------------------------------------------ operations
    def allocate(self, seq_id: int, token_ids: Sequence[int], extra_key: str | None = None) -> int:
        """Give a new sequence blocks for its whole prompt; return its cached-token count.

        The count is a multiple of ``block_size`` and at most ``len(token_ids) - 1``: the
        longest run of leading full blocks found in the prefix cache, capped so that at least
        one prompt token is computed. Checks, in order: InvalidArgumentError (seq_id, tokens,
        extra_key), SequenceExistsError, OutOfBlocksError (``needed`` = blocks leaving the free
        queue, hits with refcount 0 included).
        """
        self._check_new_id(seq_id)
        tokens = self._check_tokens(token_ids)
        self._check_extra_key(extra_key)
        if seq_id in self._seqs:
            raise SequenceExistsError(seq_id)
        hashes, hits = self._match_prefix(tokens, extra_key)
        need = self._allocate_demand(tokens, hits)
        free, watermark = self._gpu.num_free, self.config.watermark_blocks
        if free - need < watermark:
            raise OutOfBlocksError(need, free, watermark)
        for block in hits:  # touch before allocate: hits leave the queue first
            if self._gpu.is_free(block):
                self._gpu.remove(block)
            else:
                self._gpu.incref(block)
        num_new = num_blocks_for(len(tokens), self._bs) - len(hits)
        blocks = hits + [self._take_gpu() for _ in range(num_new)]
        table = BlockTable(tokens, blocks, extra_key, hashes, num_computed=len(hits) * self._bs)
        self._seqs[seq_id] = table
        self._freed.discard(seq_id)
        return len(hits) * self._bs

    def mark_computed(self, seq_id: int, num_tokens: int) -> None:
        """The KV of the sequence's first ``num_tokens`` tokens is written (the step ran).

        Raises the computed count to ``num_tokens`` and offers to the prefix cache every full
        block that now lies below it and did not before. Checks, in order:
        UnknownSequenceError, SequenceStateError (swapped out), InvalidArgumentError unless
        ``num_computed_tokens(seq_id) <= num_tokens <= num_tokens(seq_id)``.
        """
        table = self._resident(seq_id, "mark_computed")
        old = table.num_computed
        n = self._check_count(num_tokens, table)
        table.num_computed = n
        for i in range(old // self._bs, n // self._bs):
            self._register(table, i)

    def mark_computed_batch(self, seq_ids: Sequence[int], num_tokens: Sequence[int]) -> None:
        """``mark_computed(seq_ids[i], num_tokens[i])`` in order, all or nothing.

        Checks: InvalidArgumentError (lengths differ, repeated id), then pair by pair the
        checks of ``mark_computed``.
        """
        if len(seq_ids) != len(num_tokens):
            raise InvalidArgumentError(
                "num_tokens", len(num_tokens), f"need one count per sequence ({len(seq_ids)})"
            )
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidArgumentError("seq_ids", list(seq_ids), "a sequence appears twice")
        for seq_id, n in zip(seq_ids, num_tokens):
            self._check_count(n, self._resident(seq_id, "mark_computed"))
        for seq_id, n in zip(seq_ids, num_tokens):
            self.mark_computed(seq_id, n)

    def append(self, seq_id: int, token_id: int) -> tuple[int, int] | None:
        """Append one token; return ``(src, dst)`` when it forced a copy-on-write.

        A new block is taken only when the last block is full. When the last block is partly
        filled and shared (refcount > 1), a fresh block ``dst`` replaces it in this sequence's
        table, ``src`` loses one reference, and the caller must copy ``src`` to ``dst`` before
        writing. Checks: UnknownSequenceError, SequenceStateError, InvalidArgumentError (token),
        OutOfBlocksError(needed=1, free=0).
        """
        table = self._resident(seq_id, "append")
        token = self._check_token(token_id, "token_id")
        need = self._append_demand([seq_id])
        if need > self._gpu.num_free:
            raise OutOfBlocksError(need, self._gpu.num_free)
        return self._append_one(table, token)

    def append_batch(
        self, seq_ids: Sequence[int], token_ids: Sequence[int]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Append ``token_ids[i]`` to ``seq_ids[i]`` in order, all or nothing.

        Returns the slots of the appended tokens ``[N]`` and the copy-on-write pairs ``[M, 2]``
        in the order they happened. Checks: InvalidArgumentError (lengths differ, repeated id),
        UnknownSequenceError, SequenceStateError, InvalidArgumentError (token), OutOfBlocksError.
        """
        if len(seq_ids) != len(token_ids):
            raise InvalidArgumentError(
                "token_ids", len(token_ids), f"need one token per sequence ({len(seq_ids)})"
            )
        self._check_batch_ids(seq_ids, "append_batch")
        tokens = [self._check_token(t, "token_ids") for t in token_ids]
        need = self._append_demand(seq_ids)
        if need > self._gpu.num_free:
            raise OutOfBlocksError(need, self._gpu.num_free)
        slots: list[int] = []
        pairs: list[tuple[int, int]] = []
        for seq_id, token in zip(seq_ids, tokens):
            table = self._seqs[seq_id]
            pair = self._append_one(table, token)
            if pair is not None:
                pairs.append(pair)
            slots.append(slot_of(table.blocks, table.num_tokens - 1, self._bs))
        slot_arr = np.array(slots, dtype=np.int64)  # [N]
        pair_arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)  # [M, 2]
        return slot_arr, pair_arr

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (each refcount rises by one).

        Checks: InvalidArgumentError (child_id), UnknownSequenceError (parent),
        SequenceStateError (parent swapped out), SequenceExistsError (child live).
        """
        self._check_new_id(child_id)
        parent = self._resident(parent_id, "fork")
        if child_id in self._seqs:
            raise SequenceExistsError(child_id)
        for block in parent.blocks:
            self._gpu.incref(block)
        self._seqs[child_id] = parent.copy()
        self._freed.discard(child_id)

    def free(self, seq_id: int) -> None:
        """Drop the sequence; its blocks are released in reverse logical order.

        Works on resident and swapped-out sequences. Raises DoubleFreeError when ``seq_id`` was
        freed before (and not allocated again), UnknownSequenceError when it never existed.
        """
        table = self._seqs.get(seq_id)
        if table is None:
            if seq_id in self._freed:
                raise DoubleFreeError(seq_id)
            raise UnknownSequenceError(seq_id)
        pool = self._cpu if table.swapped else self._gpu
        for block in reversed(table.blocks):
            pool.release(block)
        del self._seqs[seq_id]
        self._freed.add(seq_id)

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]:
        """Move a resident sequence to the CPU pool; return ``(gpu, cpu)`` pairs to copy.

        One fresh CPU block per logical block, taken from the CPU queue head in logical
        order; the GPU blocks then lose this sequence's reference in reverse logical order.
        Blocks shared with another live sequence are allowed: they are copied and stay on the
        GPU for the other sequence (sharing is not restored by swap_in). Checks:
        UnknownSequenceError, SequenceStateError, SwapOutError(needed, free).
        """
        table = self._resident(seq_id, "swap_out")
        need = len(table.blocks)
        if need > self._cpu.num_free:
            raise SwapOutError(need, self._cpu.num_free)
        cpu_blocks = [self._cpu.take() for _ in table.blocks]
        mapping = list(zip(table.blocks, cpu_blocks))
        for block in reversed(table.blocks):
            self._gpu.release(block)
        table.blocks = cpu_blocks
        table.swapped = True
        return mapping

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]:
        """Move a swapped-out sequence back; return ``(cpu, gpu)`` pairs to copy.

        Needs ``len(block_table)`` GPU blocks and keeps the watermark (succeeds exactly when
        ``can_swap_in(seq_id, 0)``). GPU blocks come from the queue head in logical order; the
        CPU blocks are released in reverse logical order; the full blocks below the computed
        count are offered to the prefix cache. Checks: UnknownSequenceError,
        SequenceStateError, SwapInError(needed, free).
        """
        table = self._get(seq_id)
        if not table.swapped:
            raise SequenceStateError(seq_id, False, "swap_in")
        need, free = len(table.blocks), self._gpu.num_free
        if free - need < self.config.watermark_blocks:
            raise SwapInError(need, free, self.config.watermark_blocks)
        gpu_blocks = [self._take_gpu() for _ in table.blocks]
        mapping = list(zip(table.blocks, gpu_blocks))
        for block in reversed(table.blocks):
            self._cpu.release(block)
        table.blocks = gpu_blocks
        table.swapped = False
        for i in range(table.num_computed // self._bs):
            self._register(table, i)
        return mapping

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block whose refcount is 0 from the index.

        Those blocks stay where they are in the free queue, now plain free blocks; cached
        blocks in use stay cached. Returns True when the index is empty afterwards (always
        True with prefix caching off), False when blocks in use remain cached.
        """
        if self._cache is None:
            return True
        for block in self._cache.cached_blocks():
            if self._gpu.refcount(block) == 0:
                self._cache.evict(block)
        return len(self._cache) == 0

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        """Raise AssertionError unless every invariant of the block manager holds."""
        bs = self._bs
        gpu_refs = [0] * self.config.num_gpu_blocks
        cpu_refs = [0] * self.config.num_cpu_blocks
        where: dict[int, tuple[int, list[int]]] = {}  # gpu block -> (logical index, tokens)
        for seq_id, table in self._seqs.items():
            table.check_integrity(bs, hashed=self._cache is not None)
            if seq_id in self._freed:
                raise AssertionError(f"sequence {seq_id} is both live and freed")
            refs = cpu_refs if table.swapped else gpu_refs
            for i, block in enumerate(table.blocks):
                if not 0 <= block < len(refs):
                    raise AssertionError(f"sequence {seq_id} references block {block}")
                refs[block] += 1
                if table.swapped:
                    continue
                here = (i, table.block_tokens(i, bs))
                seen = where.setdefault(block, here)
                if seen != here:
                    raise AssertionError(
                        f"block {block} is shared with different content or position: "
                        f"{seen} vs {here} (sequence {seq_id})"
                    )
            if self._cache is not None:
                want = chain_hashes(table.token_ids, bs, table.extra_key, self._cache.hash_fn)
                if table.block_hashes != want:
                    raise AssertionError(f"sequence {seq_id} has stale block hashes")
        self._gpu.check_integrity(gpu_refs)
        self._cpu.check_integrity(cpu_refs)
        if any(count > 1 for count in cpu_refs):
            raise AssertionError("a CPU block is shared by two swapped-out sequences")
        # (used + free == pool size follows: a block is free exactly when nothing references it)
        if self._cache is not None:
            self._check_cache(where)

    def _check_cache(self, where: dict[int, tuple[int, list[int]]]) -> None:
        assert self._cache is not None
        bs = self._bs
        self._cache.check_integrity(bs)
        for block in self._cache.cached_blocks():
            if not 0 <= block < self.config.num_gpu_blocks:
                raise AssertionError(f"cached block {block} is outside the GPU pool")
            entry = self._cache.entry(block)
            if block not in where:
                continue
            index, tokens = where[block]
            if (index + 1) * bs != len(entry.prefix) or list(entry.prefix[-bs:]) != tokens:
                raise AssertionError(
                    f"cached block {block} stores {entry.prefix} but holds {tokens} at "
                    f"logical index {index}"
                )
        for seq_id, table in self._seqs.items():
            if table.swapped:
                continue
            for block in table.blocks:
                if self._cache.is_cached(block):
                    entry = self._cache.entry(block)
                    n = len(entry.prefix)
                    if tuple(table.token_ids[:n]) != entry.prefix or (
                        entry.extra_key != table.extra_key
                    ):
                        raise AssertionError(
                            f"sequence {seq_id} uses cached block {block} whose stored prefix "
                            "differs from its tokens"
                        )

    # ------------------------------------------------------------------ helpers
    def _get(self, seq_id: int) -> BlockTable:
        table = self._seqs.get(seq_id)
        if table is None:
            raise UnknownSequenceError(seq_id)
        return table

    def _resident(self, seq_id: int, operation: str) -> BlockTable:
        table = self._get(seq_id)
        if table.swapped:
            raise SequenceStateError(seq_id, True, operation)
        return table

    @staticmethod
    def _check_new_id(seq_id: int) -> None:
        if not _is_int(seq_id) or not 0 <= seq_id <= _INT64_MAX:
            raise InvalidArgumentError("seq_id", seq_id, "must be an int in [0, 2**63)")

    @staticmethod
    def _check_token(token: int, name: str) -> int:
        try:
            value = operator.index(token)
        except TypeError:
            raise InvalidArgumentError(name, token, "token ids must be ints") from None
        if isinstance(token, bool) or not 0 <= value <= _INT64_MAX:
            raise InvalidArgumentError(name, token, "token ids must be ints in [0, 2**63)")
        return value

    def _check_tokens(self, token_ids: Sequence[int]) -> list[int]:
        tokens = [self._check_token(t, "token_ids") for t in token_ids]
        if not tokens:
            raise InvalidArgumentError("token_ids", list(token_ids), "the prompt is empty")
        return tokens

    @staticmethod
    def _check_count(num_tokens: int, table: BlockTable) -> int:
        """A ``mark_computed`` count: an int (numpy ints too, never a bool) in
        ``[num_computed, num_tokens]`` of the sequence."""
        lo, hi = table.num_computed, table.num_tokens
        try:
            n = operator.index(num_tokens)
        except TypeError:
            n = -1
        if isinstance(num_tokens, bool) or not lo <= n <= hi:
            raise InvalidArgumentError("num_tokens", num_tokens, f"need {lo} <= num_tokens <= {hi}")
        return n

    @staticmethod
    def _check_extra_key(extra_key: str | None) -> None:
        if extra_key is not None and not isinstance(extra_key, str):
            raise InvalidArgumentError("extra_key", extra_key, "must be a str or None")

    def _check_batch_ids(self, seq_ids: Sequence[int], operation: str) -> None:
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidArgumentError("seq_ids", list(seq_ids), "a sequence appears twice")
        for seq_id in seq_ids:
            self._resident(seq_id, operation)

    def _match_prefix(
        self, tokens: list[int], extra_key: str | None
    ) -> tuple[list[int], list[int]]:
        """(hashes of every full prompt block, cached blocks hit); both empty when off."""
        if self._cache is None:
            return [], []
        bs = self._bs
        hashes = chain_hashes(tokens, bs, extra_key, self._cache.hash_fn)
        hits: list[int] = []
        for i in range((len(tokens) - 1) // bs):  # leave at least one token to compute
            block = self._cache.lookup(hashes[i], tokens[: (i + 1) * bs], extra_key)
            if block is None:
                break
            hits.append(block)
        return hashes, hits

    def _allocate_demand(self, tokens: list[int], hits: list[int]) -> int:
        """Blocks that leave the free queue: new blocks plus hits whose refcount is 0."""
        revived = sum(1 for block in hits if self._gpu.is_free(block))
        return num_blocks_for(len(tokens), self._bs) - len(hits) + revived

    def _append_demand(self, seq_ids: Sequence[int]) -> int:
        """New blocks needed to append one token to each sequence, in order."""
        dropped: dict[int, int] = {}  # shared block -> references moved away by copy-on-write
        need = 0
        for seq_id in seq_ids:
            table = self._seqs[seq_id]
            if table.num_tokens % self._bs == 0:
                need += 1
                continue
            last = table.blocks[-1]
            if self._gpu.refcount(last) - dropped.get(last, 0) > 1:
                need += 1
                dropped[last] = dropped.get(last, 0) + 1
        return need

    def _append_one(self, table: BlockTable, token: int) -> tuple[int, int] | None:
        bs = self._bs
        n = table.num_tokens
        pair: tuple[int, int] | None = None
        if n % bs == 0:
            table.blocks.append(self._take_gpu())
        else:
            last = table.blocks[-1]
            if self._gpu.refcount(last) > 1:  # copy-on-write
                dst = self._take_gpu()
                self._gpu.decref(last)
                table.blocks[-1] = dst
                pair = (last, dst)
        table.token_ids.append(token)
        if self._cache is not None and (n + 1) % bs == 0:
            i = (n + 1) // bs - 1
            parent = table.block_hashes[-1] if i > 0 else ROOT_PARENT_HASH
            block_hash = self._cache.hash_fn(parent, table.block_tokens(i, bs), table.extra_key)
            table.block_hashes.append(block_hash)
        return pair

    def _take_gpu(self) -> int:
        """Pop the free-queue head, evicting it from the prefix cache if it was cached."""
        block = self._gpu.take()
        if self._cache is not None:
            self._cache.evict(block)
        return block

    def _register(self, table: BlockTable, index: int) -> None:
        if self._cache is not None:
            self._cache.register(
                table.blocks[index],
                table.block_hashes[index],
                table.token_ids[: (index + 1) * self._bs],
                table.extra_key,
            )
