"""One function per public operation: draw its arguments, then call it through a Lockstep.

Shared by the state machine (one rule per operation) and the named properties (which drive
random programs over a subset of operations). Arguments are drawn so that most calls are legal
and some are not; illegal calls must raise the same exception on both sides.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from conformance.blocks.lockstep import Lockstep
from conformance.blocks.presets import Preset
from conformance.blocks.strategies import any_seq_id, extra_keys, legal, prompts, seq_id_from

__all__ = ["OPERATIONS", "Operation", "allocate_and_compute"]

Operation = Callable[[Lockstep, st.DataObject, Preset], None]


def _not_live(ls: Lockstep, p: Preset) -> list[int]:
    live = set(ls.live())
    return [s for s in range(p.num_seq_ids) if s not in live]


def allocate_and_compute(
    ls: Lockstep,
    data: st.DataObject,
    p: Preset,
    seq_id: int,
    prompt: list[int],
    extra_key: str | None,
) -> None:
    """``allocate``, then, as an engine's prefill step would, ``mark_computed`` of the whole
    prompt (mostly), of part of it (a chunk), or of nothing yet (the step has not run). Without
    prefix caching the count decides nothing but what the KV store reads back: the whole prompt,
    with no draw (so the searches of the other properties keep their shape)."""
    out = ls.call("allocate", seq_id, prompt, extra_key)
    if out.error is not None:
        return
    if not p.enable_prefix_caching:
        ls.call("mark_computed", seq_id, len(prompt))
        return
    how = data.draw(st.sampled_from(["all", "all", "part", "none"]), label="prefill computes")
    if how == "all":
        ls.call("mark_computed", seq_id, len(prompt))
    elif how == "part":
        n = data.draw(st.integers(int(out.value), len(prompt)), label="num_tokens")
        ls.call("mark_computed", seq_id, n)


def _compute_all(ls: Lockstep, data: st.DataObject, p: Preset, seq_ids: list[int]) -> None:
    """After appends (a decode step ran): mostly, the KV of every token is now computed
    (always, without a draw, when prefix caching is off)."""
    computes: bool = not p.enable_prefix_caching or data.draw(
        legal(4), label="decode step computes"
    )
    if seq_ids and computes:
        ls.call("mark_computed_batch", seq_ids, [ls.model.num_tokens(s) for s in seq_ids])


def allocate(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    seq_id = data.draw(seq_id_from(_not_live(ls, p), p), label="seq_id")
    prompt = data.draw(prompts(p, allow_empty=True), label="token_ids")
    allocate_and_compute(ls, data, p, seq_id, prompt, data.draw(extra_keys(), label="extra_key"))


def append(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    seq_id = data.draw(seq_id_from(ls.resident(), p), label="seq_id")
    out = ls.call("append", seq_id, data.draw(st.integers(0, p.vocab - 1), label="token_id"))
    if out.error is None:
        _compute_all(ls, data, p, [seq_id])


def append_batch(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    resident = ls.resident()
    ok: bool = data.draw(legal(), label="legal")
    if resident and ok:
        ids = data.draw(st.lists(st.sampled_from(resident), unique=True), label="seq_ids")
    else:
        ids = data.draw(st.lists(any_seq_id(p), max_size=4), label="seq_ids")
    n = len(ids)
    toks = data.draw(
        st.lists(st.integers(0, p.vocab - 1), min_size=n, max_size=n), label="token_ids"
    )
    if ls.call("append_batch", ids, toks).error is None:
        _compute_all(ls, data, p, list(ids))


def mark_computed(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    seq_id = data.draw(seq_id_from(ls.resident(), p), label="seq_id")
    lo = hi = 0
    if seq_id in ls.resident():
        lo, hi = ls.model.num_computed_tokens(seq_id), ls.model.num_tokens(seq_id)
    if data.draw(legal(), label="legal"):
        n = data.draw(st.integers(lo, hi), label="num_tokens")
    else:
        n = data.draw(st.integers(-1, hi + 1), label="num_tokens")
    ls.call("mark_computed", seq_id, n)


def mark_computed_batch(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    resident = ls.resident()
    ok: bool = data.draw(legal(), label="legal")
    if resident and ok:
        ids = data.draw(st.lists(st.sampled_from(resident), unique=True), label="seq_ids")
        counts = [
            data.draw(
                st.integers(ls.model.num_computed_tokens(s), ls.model.num_tokens(s)),
                label="num_tokens",
            )
            for s in ids
        ]
    else:
        ids = data.draw(st.lists(any_seq_id(p), max_size=4), label="seq_ids")
        counts = data.draw(
            st.lists(st.integers(-1, p.max_prompt_len), min_size=len(ids), max_size=len(ids)),
            label="num_tokens",
        )
    ls.call("mark_computed_batch", ids, counts)


def fork(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    parent = data.draw(seq_id_from(ls.live(), p), label="parent_id")
    child = data.draw(seq_id_from(_not_live(ls, p), p), label="child_id")
    ls.call("fork", parent, child)


def free(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    ls.call("free", data.draw(seq_id_from(ls.live(), p), label="seq_id"))


def swap_out(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    ls.call("swap_out", data.draw(seq_id_from(ls.resident(), p), label="seq_id"))


def swap_in(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    ls.call("swap_in", data.draw(seq_id_from(ls.swapped(), p), label="seq_id"))


def reset_prefix_cache(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    ls.call("reset_prefix_cache")


def can_allocate(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    prompt = data.draw(prompts(p, allow_empty=True), label="token_ids")
    ls.call("can_allocate", prompt, data.draw(extra_keys(), label="extra_key"))


def can_append(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    ids = data.draw(st.lists(seq_id_from(ls.resident(), p), max_size=4), label="seq_ids")
    ls.call("can_append", ids)


def can_swap_in(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    seq_id = data.draw(seq_id_from(ls.swapped(), p), label="seq_id")
    k = data.draw(st.integers(0, 2 * p.block_size + 1), label="num_new_tokens")
    ls.call("can_swap_in", seq_id, k)


def slot_mapping(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    seq_id = data.draw(seq_id_from(ls.resident(), p), label="seq_id")
    n = ls.model.num_tokens(seq_id) if ls.model.has_sequence(seq_id) else 0
    if data.draw(legal(), label="legal"):
        start = data.draw(st.integers(0, n), label="start")
        end = data.draw(st.integers(start, n), label="end")
    else:
        start = data.draw(st.integers(-1, n + 1), label="start")
        end = data.draw(st.integers(-1, n + 1), label="end")
    ls.call("slot_mapping", seq_id, start, end)


OPERATIONS: dict[str, Operation] = {
    f.__name__: f
    for f in (
        allocate,
        append,
        append_batch,
        mark_computed,
        mark_computed_batch,
        fork,
        free,
        swap_out,
        swap_in,
        reset_prefix_cache,
        can_allocate,
        can_append,
        can_swap_in,
        slot_mapping,
    )
}
