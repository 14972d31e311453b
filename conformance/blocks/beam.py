"""Beam-search traces: the block operations a beam search makes, spec and implementation in step.

A random beam process (the shape of :mod:`fast.engine.beam_search`'s bookkeeping, with the
choices drawn instead of scored) drives :class:`~conformance.blocks.lockstep.Lockstep`: each
prompt is allocated once and has up to ``k`` live beams; every step ``free``s the beams chosen
zero times (and every beam of a prompt whose search ends), ``fork``s a beam once per extra time
it is chosen (fresh child ids, before any append), appends each live beam's new token (one
``append_batch``, or one ``append`` per beam), and declares the appended tokens computed
(``mark_computed``, where the block manager has it). After every step:

* both sides pass ``check_integrity``, show equal observables, and every live beam reads back
  its own tokens from the fake KV store (a block freed or overwritten while a surviving beam
  reads it shows up as a wrong token);
* each device block's refcount is exactly the number of live beams whose table holds it (the
  beam process's own count, independent of the spec);
* each live beam's tokens are the prompt plus the tokens the process gave it.

At the end every beam is freed and both pools must be whole again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import given, note
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as Settings
from hypothesis import strategies as st

from conformance.blocks.lockstep import ConformanceError, Lockstep
from conformance.blocks.presets import Preset
from conformance.blocks.strategies import prompts
from conformance.protocols import BlockManagerFactory

__all__ = ["BEAM_PRESETS", "beam_search_traces", "run_beam_trace"]

#: Small pools with blocks of 2 (partial last blocks are common, so copies on write are too),
#: without and with the prefix cache (a later prompt may hit an earlier prompt's blocks).
BEAM_PRESETS: tuple[Preset, ...] = (
    Preset("beam_plain", block_size=2, num_gpu_blocks=24, num_seq_ids=48, vocab=3),
    Preset(
        "beam_prefix",
        block_size=2,
        num_gpu_blocks=24,
        num_seq_ids=48,
        vocab=2,
        enable_prefix_caching=True,
    ),
)


@dataclass
class _Beam:
    seq_id: int
    tokens: list[int]  # prompt + generated


def _mark_computed(ls: Lockstep, beams: list[_Beam]) -> None:
    """The step computed every live beam's KV: say so, where the block manager can hear it."""
    if not hasattr(ls.model, "mark_computed"):
        return
    for b in beams:
        ls.call("mark_computed", b.seq_id, len(b.tokens))


def _check_beams(ls: Lockstep, beams: list[_Beam]) -> None:
    """Refcounts from the beams' own tables, and each beam's tokens."""
    ls.check()
    held: Counter[int] = Counter()
    for b in beams:
        got = [int(t) for t in ls.impl.token_ids(b.seq_id)]
        if got != b.tokens:
            raise ConformanceError(f"beam {b.seq_id} holds tokens {got}, expected {b.tokens}")
        held.update(int(x) for x in ls.impl.block_table(b.seq_id))
    for block in range(ls.num_gpu_blocks):
        if int(ls.impl.refcount(block)) != held[block]:
            raise ConformanceError(
                f"block {block}: refcount {int(ls.impl.refcount(block))}, but "
                f"{held[block]} live beam(s) hold it"
            )


def run_beam_trace(ls: Lockstep, data: st.DataObject, p: Preset) -> None:
    """One random beam process on ``ls`` (see the module docstring); raises on a divergence."""
    used = [0]  # ids handed out (an id is never reused: a freed id stays freed)

    def fresh() -> int:
        used[0] += 1
        return ls.seq_ids[used[0] - 1]

    groups: list[list[_Beam]] = []
    width: list[int] = []
    for _ in range(data.draw(st.integers(1, 3), label="prompts")):
        prompt = data.draw(prompts(p), label="prompt")
        k = data.draw(st.integers(1, 4), label="beam width")
        sid = fresh()
        if ls.call("allocate", sid, prompt, None).error is not None:
            continue  # the pool cannot hold it: both sides refused alike
        beam = _Beam(sid, list(prompt))
        _mark_computed(ls, [beam])
        groups.append([beam])
        width.append(k)
        _check_beams(ls, [b for g in groups for b in g])
    for _ in range(data.draw(st.integers(1, 8), label="steps")):
        if not any(groups):
            break
        nxt: list[list[tuple[_Beam, int]]] = []
        for g, k in zip(groups, width):
            ends = bool(g) and not data.draw(st.integers(0, 5), label="search goes on")
            if not g or ends:
                nxt.append([])
                continue
            parents = data.draw(
                st.lists(st.integers(0, len(g) - 1), min_size=1, max_size=k), label="parents"
            )
            toks = data.draw(
                st.lists(st.integers(0, p.vocab - 1), min_size=len(parents), max_size=len(parents)),
                label="tokens",
            )
            nxt.append([(g[i], t) for i, t in sorted(zip(parents, toks))])
        forks = sum(len(c) - len({id(b) for b, _ in c}) for c in nxt)
        if forks > len(ls.seq_ids) - used[0]:
            break  # no fresh ids left for the children: the process ends here
        # frees first: beams chosen zero times, and the beams of searches that ended
        for g, chosen in zip(groups, nxt):
            kept = {id(b) for b, _ in chosen}
            for b in g:
                if id(b) not in kept:
                    ls.call("free", b.seq_id)
        # then forks: a beam's first continuation keeps its id, each further one is a child
        new_groups: list[list[_Beam]] = []
        for chosen in nxt:
            seen: set[int] = set()
            beams = []
            for parent, tok in chosen:
                if id(parent) in seen:
                    child = fresh()
                    if ls.call("fork", parent.seq_id, child).error is not None:
                        raise ConformanceError(f"fork of beam {parent.seq_id} failed")
                    beams.append(_Beam(child, parent.tokens + [tok]))
                else:
                    seen.add(id(parent))
                    beams.append(_Beam(parent.seq_id, parent.tokens + [tok]))
            new_groups.append(beams)
        live = [b for g in new_groups for b in g]
        # then the appends: all at once, or one by one
        batched: bool = data.draw(st.booleans(), label="append_batch")
        if live and batched:
            out = ls.call("append_batch", [b.seq_id for b in live], [b.tokens[-1] for b in live])
            ok = out.error is None
        else:
            ok = all(ls.call("append", b.seq_id, b.tokens[-1]).error is None for b in live)
        if not ok:  # out of blocks: the process ends here (append_batch changed nothing)
            note("out of blocks: every beam is freed")
            for b in live:
                if ls.model.has_sequence(b.seq_id):
                    ls.call("free", b.seq_id)
            groups = []
            break
        _mark_computed(ls, live)
        groups = new_groups
        _check_beams(ls, live)
    ls.free_all()


def beam_search_traces(
    factory: BlockManagerFactory,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> None:
    """Search random beam processes on every preset of :data:`BEAM_PRESETS`."""
    from conformance.blocks.machine import new_lockstep
    from conformance.blocks.properties import default_settings

    chosen = settings or default_settings()
    if seed is not None:
        chosen = Settings(chosen, derandomize=False)

    @chosen
    @given(st.data(), st.sampled_from(BEAM_PRESETS))
    def search(data: st.DataObject, p: Preset) -> None:
        ls = new_lockstep(factory, p)
        run_beam_trace(ls, data, p)

    if seed is not None:
        search = hypothesis_seed(seed)(search)
    search()
