"""A hypothesis state machine over every operation of spec.block_manager.BlockManager.

Legal calls are checked against independent expectations (block counts, the cached-token rule,
the watermark formula) and a fake KV store written through the manager's slot mappings,
copy-on-write pairs and swap maps: every live sequence must read back exactly its own tokens.
Illegal calls must raise the named error and leave the whole internal state unchanged.
``check_integrity()`` runs after every step. Presets: block size 1-4, 8-32 blocks, prefix
caching on and off, one preset whose hash function collides all the time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spec.block_manager import BlockManager, BlockManagerConfig
from spec.block_table import num_blocks_for
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

SEQ_IDS = range(6)
BASES = ([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], [1, 2, 3, 0, 0, 1, 1, 2, 2, 3, 3, 0])


def weak_hash(parent: int, tokens: Sequence[int], extra_key: str | None) -> int:
    """A hash with constant collisions: only the token sum modulo 3 (and nothing else)."""
    return sum(tokens) % 3


def snapshot(bm: BlockManager) -> Any:
    """The whole internal state, for 'an error changed nothing' checks."""
    seqs = {
        s: (list(t.token_ids), list(t.blocks), t.extra_key, list(t.block_hashes), t.swapped)
        for s, t in bm._seqs.items()
    }
    cache = None
    if bm._cache is not None:
        cache = (dict(bm._cache._index), dict(bm._cache._entries))
    gpu, cpu = bm._gpu, bm._cpu
    return (
        seqs,
        sorted(bm._freed),
        (gpu.free_order(), list(gpu._refcount)),
        (cpu.free_order(), list(cpu._refcount)),
        cache,
    )


class FakeKV:
    """One token id per slot in each pool, standing in for the K/V vectors."""

    def __init__(self, config: BlockManagerConfig) -> None:
        bs = config.block_size
        self.bs = bs
        self.gpu = np.full(config.num_gpu_blocks * bs, -1, dtype=np.int64)
        self.cpu = np.full(max(config.num_cpu_blocks, 1) * bs, -1, dtype=np.int64)

    def copy(self, src: Any, s: int, dst: Any, d: int) -> None:
        bs = self.bs
        dst[d * bs : (d + 1) * bs] = src[s * bs : (s + 1) * bs]

    def read_cpu(self, blocks: list[int], n: int) -> list[int]:
        slots = [blocks[t // self.bs] * self.bs + t % self.bs for t in range(n)]
        return [int(v) for v in self.cpu[slots]]


class BlockMachine(RuleBasedStateMachine):
    """Subclasses set ``config`` (and optionally ``hash_fn``)."""

    config = BlockManagerConfig(block_size=2, num_gpu_blocks=8)
    hash_fn: Any = None  # a HashFn, or None for the default

    def __init__(self) -> None:
        super().__init__()
        if self.hash_fn is None:
            self.bm = BlockManager(self.config)
        else:
            self.bm = BlockManager(self.config, hash_fn=type(self).hash_fn)
        self.kv = FakeKV(self.config)
        self.ever: set[int] = set()

    # ---------------------------------------------------------------- helpers
    def live(self) -> list[int]:
        return [s for s in SEQ_IDS if self.bm.has_sequence(s)]

    def resident(self) -> list[int]:
        return [s for s in self.live() if not self.bm.is_swapped(s)]

    def swapped(self) -> list[int]:
        return [s for s in self.live() if self.bm.is_swapped(s)]

    def expect_error(self, error: type[PagedKVError], fn: Callable[..., Any], *args: Any) -> None:
        before = snapshot(self.bm)
        try:
            fn(*args)
        except error as exc:
            note(f"  raised {type(exc).__name__}: {exc}")
        else:
            raise AssertionError(f"{fn.__name__}{args} did not raise {error.__name__}")
        if snapshot(self.bm) != before:
            raise AssertionError(f"{fn.__name__}{args} raised but changed the state")

    def write(self, seq_id: int, start: int, tokens: Sequence[int]) -> None:
        slots = self.bm.slot_mapping(seq_id, start, start + len(tokens))
        self.kv.gpu[slots] = tokens

    # ---------------------------------------------------------------- legal operations
    def pick(self, data: st.DataObject, preferred: list[int]) -> int:
        """Mostly an id from ``preferred`` (when there is one), sometimes any id."""
        if preferred and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(preferred))
        return data.draw(st.sampled_from(SEQ_IDS))

    @rule(
        data=st.data(),
        base=st.sampled_from(BASES),
        length=st.integers(1, 12),
        tail=st.lists(st.integers(0, 3), max_size=3),
        extra_key=st.sampled_from([None, None, "lora-a"]),
    )
    def allocate(
        self,
        data: st.DataObject,
        base: list[int],
        length: int,
        tail: list[int],
        extra_key: str | None,
    ) -> None:
        seq_id = self.pick(data, [s for s in SEQ_IDS if not self.bm.has_sequence(s)])
        tokens = base[:length] + tail
        bs = self.config.block_size
        note(f"bm.allocate({seq_id}, {tokens}, {extra_key!r})")
        if self.bm.has_sequence(seq_id):
            self.expect_error(SequenceExistsError, self.bm.allocate, seq_id, tokens, extra_key)
            return
        free = self.bm.num_free_gpu_blocks
        can = self.bm.can_allocate(tokens, extra_key)
        if not self.config.enable_prefix_caching:
            want = free - num_blocks_for(len(tokens), bs) >= self.config.watermark_blocks
            assert can == want, (can, want, free)
        if not can:
            self.expect_error(OutOfBlocksError, self.bm.allocate, seq_id, tokens, extra_key)
            return
        cached = self.bm.allocate(seq_id, tokens, extra_key)
        note(f"  -> {cached} cached, table {self.bm.block_table(seq_id)}")
        assert cached % bs == 0 and 0 <= cached <= len(tokens) - 1
        if not self.config.enable_prefix_caching:
            assert cached == 0
            assert self.bm.num_free_gpu_blocks == free - num_blocks_for(len(tokens), bs)
        assert self.bm.num_free_gpu_blocks >= self.config.watermark_blocks
        # the prefix-cache hit already holds the right tokens
        hit = self.kv.gpu[self.bm.slot_mapping(seq_id, 0, cached)].tolist()
        assert hit == tokens[:cached], (hit, tokens[:cached])
        self.write(seq_id, cached, tokens[cached:])
        assert self.bm.num_computed_tokens(seq_id) == cached
        self.bm.mark_computed(seq_id, len(tokens))  # the prefill step ran
        self.ever.add(seq_id)

    @precondition(lambda self: bool(self.resident()))
    @rule(data=st.data(), token=st.integers(0, 3))
    def append(self, data: st.DataObject, token: int) -> None:
        seq_id = data.draw(st.sampled_from(self.resident()))
        note(f"bm.append({seq_id}, {token})")
        n = self.bm.num_tokens(seq_id)
        if not self.bm.can_append([seq_id]):
            self.expect_error(OutOfBlocksError, self.bm.append, seq_id, token)
            return
        table = self.bm.block_table(seq_id)
        pair = self.bm.append(seq_id, token)
        note(f"  -> {pair}")
        if pair is not None:
            src, dst = pair
            assert src == table[-1] and n % self.config.block_size != 0
            assert self.bm.block_table(seq_id) == table[:-1] + [dst]
            self.kv.copy(self.kv.gpu, src, self.kv.gpu, dst)
        want_len = num_blocks_for(n + 1, self.config.block_size)
        assert len(self.bm.block_table(seq_id)) == want_len
        self.write(seq_id, n, [token])
        self.bm.mark_computed(seq_id, n + 1)  # the decode step ran

    @precondition(lambda self: bool(self.resident()))
    @rule(data=st.data())
    def append_batch(self, data: st.DataObject) -> None:
        seq_ids = data.draw(st.lists(st.sampled_from(self.resident()), unique=True))
        tokens = data.draw(
            st.lists(st.integers(0, 3), min_size=len(seq_ids), max_size=len(seq_ids))
        )
        note(f"bm.append_batch({seq_ids}, {tokens})")
        if not self.bm.can_append(seq_ids):
            self.expect_error(OutOfBlocksError, self.bm.append_batch, seq_ids, tokens)
            return
        free = self.bm.num_free_gpu_blocks
        slots, pairs = self.bm.append_batch(seq_ids, tokens)
        note(f"  -> slots {slots.tolist()}, copy-on-write {pairs.tolist()}")
        assert slots.shape == (len(seq_ids),) and pairs.shape[1] == 2
        grown = sum(1 for s in seq_ids if (self.bm.num_tokens(s) - 1) % self.config.block_size == 0)
        assert self.bm.num_free_gpu_blocks == free - grown - len(pairs)
        for src, dst in pairs.tolist():  # the engine copies before the forward pass writes
            self.kv.copy(self.kv.gpu, src, self.kv.gpu, dst)
        self.kv.gpu[slots] = tokens
        self.bm.mark_computed_batch(seq_ids, [self.bm.num_tokens(s) for s in seq_ids])
        self.bm.mark_computed_batch(seq_ids, [self.bm.num_tokens(s) for s in seq_ids])

    @precondition(lambda self: bool(self.resident()))
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self.resident()))
        child = self.pick(data, [s for s in SEQ_IDS if not self.bm.has_sequence(s)])
        note(f"bm.fork({parent}, {child})")
        if self.bm.has_sequence(child):
            self.expect_error(SequenceExistsError, self.bm.fork, parent, child)
            return
        free = self.bm.num_free_gpu_blocks
        self.bm.fork(parent, child)
        assert self.bm.block_table(child) == self.bm.block_table(parent)
        assert self.bm.token_ids(child) == self.bm.token_ids(parent)
        assert self.bm.num_computed_tokens(child) == self.bm.num_computed_tokens(parent)
        assert self.bm.num_free_gpu_blocks == free
        self.ever.add(child)

    @precondition(lambda self: bool(self.ever))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        live = self.live()
        if live and data.draw(st.integers(0, 3)) > 0:
            seq_id = data.draw(st.sampled_from(live))
        else:  # an id used before: a free, or a double free
            seq_id = data.draw(st.sampled_from(sorted(self.ever)))
        note(f"bm.free({seq_id})")
        if not self.bm.has_sequence(seq_id):
            error = DoubleFreeError if seq_id in self.ever else UnknownSequenceError
            self.expect_error(error, self.bm.free, seq_id)
            return
        swapped = self.bm.is_swapped(seq_id)
        table = self.bm.block_table(seq_id)
        sole = [b for b in table if swapped or self.bm.refcount(b) == 1]
        gpu_free, cpu_free = self.bm.num_free_gpu_blocks, self.bm.num_free_cpu_blocks
        self.bm.free(seq_id)
        if swapped:
            assert self.bm.num_free_cpu_blocks == cpu_free + len(table)
        else:
            assert self.bm.num_free_gpu_blocks == gpu_free + len(sole)
            assert (
                self.bm.free_block_order()[len(self.bm.free_block_order()) - len(sole) :]
                == sole[::-1]
            )
        assert not self.bm.has_sequence(seq_id)

    @precondition(lambda self: bool(self.resident()))
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(self.resident()))
        note(f"bm.swap_out({seq_id})")
        table = self.bm.block_table(seq_id)
        if len(table) > self.bm.num_free_cpu_blocks:
            self.expect_error(SwapOutError, self.bm.swap_out, seq_id)
            return
        mapping = self.bm.swap_out(seq_id)
        note(f"  -> {mapping}")
        assert [g for g, _ in mapping] == table
        assert [c for _, c in mapping] == self.bm.block_table(seq_id)
        assert self.bm.is_swapped(seq_id)
        for g, c in mapping:
            self.kv.copy(self.kv.gpu, g, self.kv.cpu, c)

    @precondition(lambda self: bool(self.swapped()))
    @rule(data=st.data(), extra=st.integers(0, 5))
    def swap_in(self, data: st.DataObject, extra: int) -> None:
        seq_id = data.draw(st.sampled_from(self.swapped()))
        note(f"bm.swap_in({seq_id})")
        n, bs = self.bm.num_tokens(seq_id), self.config.block_size
        free, wm = self.bm.num_free_gpu_blocks, self.config.watermark_blocks
        assert self.bm.can_swap_in(seq_id, extra) == (free - num_blocks_for(n + extra, bs) >= wm)
        if not self.bm.can_swap_in(seq_id, 0):
            self.expect_error(SwapInError, self.bm.swap_in, seq_id)
            return
        cpu_table = self.bm.block_table(seq_id)
        mapping = self.bm.swap_in(seq_id)
        note(f"  -> {mapping}")
        assert [c for c, _ in mapping] == cpu_table
        assert [g for _, g in mapping] == self.bm.block_table(seq_id)
        for c, g in mapping:
            self.kv.copy(self.kv.cpu, c, self.kv.gpu, g)

    @precondition(lambda self: bool(self.bm.cached_blocks()))
    @rule()
    def reset_prefix_cache(self) -> None:
        note("bm.reset_prefix_cache()")
        free = self.bm.free_block_order()
        in_use = [b for b in self.bm.cached_blocks() if self.bm.refcount(b) > 0]
        ok = self.bm.reset_prefix_cache()
        note(f"  -> {ok}")
        assert self.bm.free_block_order() == free
        assert all(self.bm.refcount(b) > 0 for b in self.bm.cached_blocks())
        assert self.bm.cached_blocks() == in_use
        assert ok == (not self.bm.cached_blocks())

    # ---------------------------------------------------------------- illegal operations
    @rule(data=st.data(), kind=st.integers(0, 11))
    def misuse(self, data: st.DataObject, kind: int) -> None:
        bm = self.bm
        unknown = 100 + kind
        resident, swapped = self.resident(), self.swapped()
        note(f"misuse kind {kind}")
        if kind == 0:
            self.expect_error(UnknownSequenceError, bm.append, unknown, 1)
        elif kind == 1:
            self.expect_error(UnknownSequenceError, bm.fork, unknown, 0)
        elif kind == 2:
            self.expect_error(InvalidArgumentError, bm.allocate, unknown, [])
        elif kind == 3:
            self.expect_error(InvalidArgumentError, bm.allocate, unknown, [1, -2])
        elif kind == 4:
            self.expect_error(InvalidArgumentError, bm.fork, 0, -1)
        elif kind == 5 and resident:
            s = data.draw(st.sampled_from(resident))
            self.expect_error(SequenceStateError, bm.swap_in, s)
            self.expect_error(InvalidArgumentError, bm.slot_mapping, s, 0, bm.num_tokens(s) + 1)
        elif kind == 6 and swapped:
            s = data.draw(st.sampled_from(swapped))
            for fn, args in (
                (bm.append, (s, 1)),
                (bm.swap_out, (s,)),
                (bm.fork, (s, 99)),
                (bm.slot_mapping, (s, 0, 1)),
                (bm.append_batch, ([s], [1])),
            ):
                self.expect_error(SequenceStateError, fn, *args)
        elif kind == 7 and resident:
            s = data.draw(st.sampled_from(resident))
            self.expect_error(InvalidArgumentError, bm.append_batch, [s, s], [1, 2])
            self.expect_error(InvalidArgumentError, bm.append_batch, [s], [1, 2])
            self.expect_error(InvalidArgumentError, bm.append, s, -1)
        elif kind == 8 and swapped:
            s = data.draw(st.sampled_from(swapped))
            self.expect_error(InvalidArgumentError, bm.can_swap_in, s, -1)
        elif kind == 9 and resident:
            # an unknown id anywhere in a batch spoils the whole batch
            self.expect_error(
                UnknownSequenceError,
                bm.append_batch,
                resident + [unknown],
                [0] * (len(resident) + 1),
            )
        elif kind == 10:
            self.expect_error(UnknownSequenceError, bm.swap_in, unknown)
            self.expect_error(UnknownSequenceError, bm.swap_out, unknown)
            self.expect_error(UnknownSequenceError, bm.free, unknown)
        elif kind == 11:
            self.expect_error(InvalidArgumentError, bm.allocate, unknown, [1], 7)

    # ---------------------------------------------------------------- invariants
    @invariant()
    def integrity(self) -> None:
        self.bm.check_integrity()

    @invariant()
    def every_sequence_reads_back_its_tokens(self) -> None:
        for s in self.live():
            n = self.bm.num_tokens(s)
            tokens = self.bm.token_ids(s)
            if self.bm.is_swapped(s):
                stored = self.kv.read_cpu(self.bm.block_table(s), n)
            else:
                stored = self.kv.gpu[self.bm.slot_mapping(s, 0, n)].tolist()
            assert stored == tokens, f"sequence {s} reads {stored}, holds {tokens}"

    @invariant()
    def counts_add_up(self) -> None:
        used = {b for s in self.resident() for b in self.bm.block_table(s)}
        assert len(used) + self.bm.num_free_gpu_blocks == self.config.num_gpu_blocks
        cpu_used = sum(len(self.bm.block_table(s)) for s in self.swapped())
        assert cpu_used + self.bm.num_free_cpu_blocks == self.config.num_cpu_blocks


SETTINGS = settings(
    max_examples=30,
    stateful_step_count=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def machine(name: str, config: BlockManagerConfig, hash_fn: Any = None) -> Any:
    cls: Any = type(name, (BlockMachine,), {"config": config, "hash_fn": hash_fn})
    cls.TestCase.settings = SETTINGS
    return cls.TestCase


TestPlain = machine("Plain", BlockManagerConfig(block_size=2, num_gpu_blocks=8, num_cpu_blocks=8))
TestSwapWatermark = machine(
    "SwapWatermark",
    BlockManagerConfig(block_size=3, num_gpu_blocks=12, num_cpu_blocks=6, watermark=0.2),
)
TestPrefix = machine(
    "Prefix",
    BlockManagerConfig(
        block_size=2, num_gpu_blocks=10, num_cpu_blocks=6, enable_prefix_caching=True
    ),
)
TestPrefixBs4 = machine(
    "PrefixBs4",
    BlockManagerConfig(
        block_size=4, num_gpu_blocks=32, num_cpu_blocks=8, watermark=0.1, enable_prefix_caching=True
    ),
)
TestPrefixBs1 = machine(
    "PrefixBs1",
    BlockManagerConfig(
        block_size=1, num_gpu_blocks=16, num_cpu_blocks=8, enable_prefix_caching=True
    ),
)
TestPrefixCollisions = machine(
    "PrefixCollisions",
    BlockManagerConfig(
        block_size=2, num_gpu_blocks=12, num_cpu_blocks=4, enable_prefix_caching=True
    ),
    hash_fn=weak_hash,
)
