"""Named properties, one per bug class that real paged-KV systems shipped.

Each property is a function ``property(factory, settings=None)`` that runs a hypothesis search
for a program (over a subset of the operations, on a preset that makes the bug reachable in a
few steps) and raises :class:`~conformance.blocks.lockstep.ConformanceError` (after shrinking)
when the implementation differs from the spec, fails its integrity check or reads back a wrong
token.
``tests/conformance/test_mutants.py`` shows that each property catches its planted mutant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from hypothesis import HealthCheck, given, note
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as Settings
from hypothesis import strategies as st

from conformance.blocks.lockstep import ConformanceError, Lockstep
from conformance.blocks.machine import new_lockstep
from conformance.blocks.operations import OPERATIONS, allocate_and_compute
from conformance.blocks.presets import Preset
from conformance.blocks.strategies import filling_prompts, prompts
from conformance.protocols import BlockManagerFactory
from spec.prefix_cache import HashFn, hash_block_tokens

__all__ = [
    "PROPERTIES",
    "Property",
    "default_settings",
    "evicted_block_not_in_hash_index",
    "touch_before_allocate",
    "hash_collision_never_reuses_block",
    "fork_free_refcounts_under_beam_search",
    "swap_in_reserves_append_capacity",
    "no_blocks_leaked_on_abort",
    "no_hit_before_kv_written",
    "colliding_hash",
    "ConformanceError",
]


class Property(Protocol):
    """A named property: searches programs against ``factory``; raises on a divergence."""

    __name__: str

    def __call__(
        self,
        factory: BlockManagerFactory,
        settings: Settings | None = None,
        *,
        seed: int | None = None,
    ) -> None: ...


def default_settings(max_examples: int = 200) -> Settings:
    """Deterministic, no example database, no deadline, one bug reported."""
    return Settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )


def _program(
    factory: BlockManagerFactory,
    p: Preset,
    ops: dict[str, int],
    settings: Settings | None,
    *,
    max_steps: int = 30,
    finish: Callable[[Lockstep, st.DataObject], None] | None = None,
    hash_fn: HashFn | None = None,
    seed: int | None = None,
) -> None:
    """Search random programs over ``ops`` (name -> weight), checking after every step.

    With ``seed``, the search is random but repeatable (``derandomize`` is turned off).
    """
    names = [name for name, weight in ops.items() for _ in range(weight)]
    chosen = settings or default_settings()
    if seed is not None:
        chosen = Settings(chosen, derandomize=False)

    @chosen
    @given(st.data())
    def search(data: st.DataObject) -> None:
        ls = new_lockstep(factory, p, hash_fn=hash_fn)
        for seq_id in range(data.draw(st.integers(0, 2), label="initial sequences")):
            allocate_and_compute(
                ls, data, p, seq_id, data.draw(prompts(p), label="token_ids"), None
            )
        n = data.draw(st.integers(1, max_steps), label="steps")
        for _ in range(n):
            OPERATIONS[data.draw(st.sampled_from(names), label="op")](ls, data, p)
            ls.check()
        if finish is not None:
            finish(ls, data)

    if seed is not None:
        search = hypothesis_seed(seed)(search)
    search()


def evicted_block_not_in_hash_index(
    factory: BlockManagerFactory,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> None:
    """A cached block that is evicted (reused for other content) must leave the hash index.

    Tiny pool, prompts sharing prefixes, allocate/free churn: blocks are cached, evicted and
    reused; a stale index entry makes a later prompt "hit" a block holding other tokens.
    """
    p = Preset("evict", block_size=2, num_gpu_blocks=6, enable_prefix_caching=True, vocab=2)
    _program(factory, p, {"allocate": 3, "free": 2, "append": 1}, settings, seed=seed)


def touch_before_allocate(
    factory: BlockManagerFactory,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> None:
    """An allocation that hits cached free blocks must take them before evicting for new ones.

    After a random program, every sequence is freed in a drawn order (so the pool is all
    cached-and-free, in an order that depends on who was freed first), then prompts that share a
    cached prefix and fill most of the pool are allocated: each needs nearly every free block,
    so its hits sit among the blocks it takes new, and taking new blocks first would evict them.
    """
    p = Preset("touch", block_size=2, num_gpu_blocks=5, enable_prefix_caching=True, vocab=2)

    def finish(ls: Lockstep, data: st.DataObject) -> None:
        live = ls.live()
        order = data.draw(st.permutations(live), label="free order") if live else []
        for seq_id in order:
            ls.call("free", seq_id)
            ls.check()
        for seq_id in range(data.draw(st.integers(1, 3), label="final allocations")):
            prompt = data.draw(filling_prompts(p), label="token_ids")
            if ls.call("allocate", seq_id, prompt, None).error is None:
                ls.check()
                ls.call("free", seq_id)
            ls.check()

    ops = {"allocate": 3, "free": 2, "can_allocate": 1}
    _program(factory, p, ops, settings, seed=seed, finish=finish)


def hash_collision_never_reuses_block(
    factory: BlockManagerFactory,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> None:
    """Blocks whose content hashes collide must not be shared: a hit compares stored tokens.

    Both sides run with :func:`colliding_hash`, which maps every block to one of 3 values.
    """
    p = Preset("collide", block_size=2, num_gpu_blocks=8, enable_prefix_caching=True, vocab=3)
    ops = {"allocate": 3, "free": 2, "append": 1, "can_allocate": 1}
    _program(factory, p, ops, settings, seed=seed, hash_fn=colliding_hash)


def fork_free_refcounts_under_beam_search(
    factory: BlockManagerFactory,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> None:
    """Beam-search churn: fork many, free some, append to all, fork again; refcounts stay exact.

    A refcount off by one frees a block a sibling still reads (its tokens change underneath it)
    or leaks one (the pool never fills back).
    """
    p = Preset("beam", block_size=2, num_gpu_blocks=16, num_seq_ids=8, vocab=3)

    def finish(ls: Lockstep, data: st.DataObject) -> None:
        ls.free_all()

    _program(
        factory,
        p,
        {"allocate": 1, "fork": 4, "free": 2, "append_batch": 3, "append": 1},
        settings,
        seed=seed,
        finish=finish,
    )


def swap_in_reserves_append_capacity(
    factory: BlockManagerFactory,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> None:
    """``can_swap_in(seq, k)`` must count the blocks the ``k`` tokens about to be appended need."""
    p = Preset("swapcap", block_size=2, num_gpu_blocks=6, num_cpu_blocks=8, vocab=3)
    ops = {"allocate": 2, "append": 2, "swap_out": 2, "swap_in": 1, "can_swap_in": 3, "free": 1}
    _program(factory, p, ops, settings, seed=seed)


def no_blocks_leaked_on_abort(
    factory: BlockManagerFactory,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> None:
    """After any program, freeing every sequence (abort all) gives both pools back in full."""
    p = Preset(
        "abort",
        block_size=2,
        num_gpu_blocks=10,
        num_cpu_blocks=6,
        enable_prefix_caching=True,
        vocab=3,
    )
    ops = {name: 1 for name in ("allocate", "append", "append_batch", "fork", "free")}
    ops |= {"swap_out": 1, "swap_in": 1}

    def finish(ls: Lockstep, data: st.DataObject) -> None:
        note("free every live sequence")
        ls.free_all()

    _program(factory, p, ops, settings, seed=seed, finish=finish)


def no_hit_before_kv_written(
    factory: BlockManagerFactory,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> None:
    """No prompt is served a cached block before the step that writes the block's KV ran.

    Prompts sharing prefixes are allocated and computed in chunks (``mark_computed`` of part
    of the prompt, as chunked prefill does) or not at all yet; a block that enters the prefix
    cache when it is allocated (or filled by an append) lets a second prompt hit it while its
    KV is unwritten, and that prompt reads ``-1`` back from the fake KV store.
    """
    p = Preset("chunks", block_size=2, num_gpu_blocks=12, enable_prefix_caching=True, vocab=2)
    ops = {"allocate": 3, "mark_computed": 2, "append": 1, "free": 1, "fork": 1}
    _program(factory, p, ops, settings, seed=seed)


def colliding_hash(parent_hash: int, token_ids: Sequence[int], extra_key: str | None) -> int:
    """The spec's block hash reduced to 3 values: unequal blocks collide all the time."""
    return hash_block_tokens(parent_hash, token_ids, extra_key) % 3


PROPERTIES: dict[str, Property] = {
    f.__name__: f
    for f in (
        evicted_block_not_in_hash_index,
        touch_before_allocate,
        hash_collision_never_reuses_block,
        fork_free_refcounts_under_beam_search,
        swap_in_reserves_append_capacity,
        no_blocks_leaked_on_abort,
        no_hit_before_kv_written,
    )
}
