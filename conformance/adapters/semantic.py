"""The semantic check mode: the block-management suite for implementations with other policies.

The lockstep (:mod:`conformance.blocks.lockstep`) compares every observable with the spec, so it
can only judge an implementation that promises the spec's policies (block ids, free order,
eviction order). A paged-KV cache that ships inside another library promises none of that. This
module drives the same kind of random engine program (allocate prompts that share prefixes,
compute them in chunks, append decoded tokens, fork, free) against a thin :class:`Adapter` and
checks only what every correct paged-KV cache must satisfy, whatever its policies:

``readback``
    every live sequence reads back, through the implementation's own read path, exactly the KV
    it wrote for its computed tokens (no block held by a live sequence was overwritten by
    another one, no fork lost content).
``prefix_hit_content``
    a prefix hit (``allocate`` returning ``cached > 0``) reads back the prompt's own first
    ``cached`` tokens: the implementation reused only blocks whose stored KV equals the prefix.
``refcounts``
    each block's reference count equals the number of live block-table entries holding it.
``no_double_hold``
    no more distinct blocks are held than exist; without fork and prefix caching (nothing may
    share), no block is in two live tables.
``free_accounting``
    free + held + cached-but-unreferenced blocks equals the capacity (nothing lost or counted
    twice).
``no_leak_after_free``
    after every sequence is freed (and the implementation's eviction run), every block is free.
``crash``
    an operation valid in the program's state raised (the library's own exception).

A check is run only when the adapter's :class:`Capabilities` make it meaningful; the rest are
listed in the report with the reason. Policies (block ids, which blocks are evicted, how many
tokens a prefix hit covers) are never compared: the report records hit counts as observations.
The KV written for token ``t`` at position ``p`` is ``(t, p)``-derived, so a read of a slot that
holds another position's or another prompt's KV is caught.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Capabilities",
    "Adapter",
    "NoRoom",
    "Defect",
    "SemanticReport",
    "PROPERTIES",
    "run_program",
    "check_semantic",
    "kv_value",
]


class NoRoom(Exception):
    """The adapter cannot fit the operation; it must leave its state exactly as before."""


class Defect(AssertionError):
    """An invariant that every correct paged-KV cache satisfies was broken."""

    def __init__(self, prop: str, message: str) -> None:
        super().__init__(f"{prop}: {message}")
        self.prop = prop
        self.message = message


@dataclass(frozen=True)
class Capabilities:
    """What an adapter can express; the checker skips what it cannot.

    Attributes:
        name: the implementation, as the report names it.
        block_size: tokens per block.
        num_blocks: capacity in blocks.
        prefix_caching: ``allocate`` may reuse cached blocks of an earlier prompt.
        fork: ``fork`` exists (shares or copies the parent's KV).
        refcounts: a per-block reference count is observable.
        cached_blocks: unreferenced blocks kept for reuse are observable (else they count free).
        swap: swap-out/in to a second pool exists.
        copy_on_write: a shared partial block is copied on the first divergent append.
        policies: policy differences from the spec, one sentence each (never checked).
    """

    name: str
    block_size: int
    num_blocks: int
    prefix_caching: bool
    fork: bool
    refcounts: bool
    cached_blocks: bool
    swap: bool
    copy_on_write: bool
    policies: tuple[str, ...] = ()


class Adapter(Protocol):
    """The surface the semantic checker drives (one instance per program)."""

    capabilities: Capabilities

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Give ``seq_id`` room for its prompt; return how many leading tokens are cached."""
        ...

    def write(self, seq_id: int, start: int, values: Sequence[float]) -> None:
        """Write the KV of positions ``start..start+len(values)`` (room already given), then
        tell the implementation those tokens are computed (``token_ids`` as allocated/appended)."""
        ...

    def read(self, seq_id: int, num_tokens: int) -> list[float]:
        """Read back the KV of positions ``0..num_tokens`` through the implementation."""
        ...

    def append(self, seq_id: int, token_id: int) -> None:
        """Give room for one more token of a fully computed sequence."""
        ...

    def fork(self, parent_id: int, child_id: int) -> None:
        """Make ``child_id`` a copy of a fully computed ``parent_id`` (sharing or copying KV)."""
        ...

    def free(self, seq_id: int) -> None: ...

    def block_table(self, seq_id: int) -> list[int]: ...

    def refcount(self, block: int) -> int: ...

    def num_free_blocks(self) -> int: ...

    def num_cached_blocks(self) -> int:
        """Unreferenced blocks kept for prefix reuse (0 when there are none)."""
        ...

    def evict_all(self) -> None:
        """Drop every cached unreferenced block (the implementation's own eviction)."""
        ...


#: property name -> (capability that makes it meaningful, or "" for always; reason when skipped)
PROPERTIES: dict[str, tuple[str, str]] = {
    "readback": ("", ""),
    "prefix_hit_content": ("prefix_caching", "no prefix caching: no hit can occur"),
    "refcounts": ("refcounts", "no observable reference count"),
    "no_double_hold": ("", ""),
    "free_accounting": ("", ""),
    "no_leak_after_free": ("", ""),
}

#: checks of the lockstep suite the semantic mode never runs, with the reason
NOT_SEMANTIC: dict[str, str] = {
    "exact block ids / free order / eviction order": (
        "policy: a foreign implementation chooses its own (documented as a difference)"
    ),
    "exact cached-token counts": "policy: recorded as observations, never compared",
    "errors leave state unchanged": "the adapter validates nothing; the library's own errors "
    "are not part of its contract",
}

CAPABILITY_PROPERTIES: dict[str, str] = {
    "swap": "swap_out/swap_in round trip (machine[swap], swap-in capacity)",
    "copy_on_write": "copy-on-write of a shared partial block on append (machine[fork])",
    "fork": "fork sharing (machine[fork], beam)",
}


def kv_value(token_id: int, position: int) -> float:
    """The KV the program writes for ``token_id`` at ``position`` (exact in float32)."""
    return float(token_id * 1024 + position + 1)


Op = tuple[Any, ...]


@dataclass
class _Seq:
    tokens: list[int]
    computed: int


@dataclass
class Observations:
    """Counts of what the programs did (policy observations, not pass/fail)."""

    ops: dict[str, int] = field(default_factory=dict)
    no_room: int = 0
    hits: int = 0
    hit_tokens: int = 0
    max_refcount: int = 0
    evictions: int = 0


def _check_invariants(
    adapter: Adapter, seqs: dict[int, _Seq], enabled: set[str], steps: dict[str, int]
) -> None:
    caps = adapter.capabilities
    holders: dict[int, int] = {}
    for sid, seq in seqs.items():
        table = adapter.block_table(sid)
        for block in table:
            holders[block] = holders.get(block, 0) + 1
        if "readback" in enabled and seq.computed:
            want = [kv_value(t, p) for p, t in enumerate(seq.tokens[: seq.computed])]
            got = adapter.read(sid, seq.computed)
            steps["readback"] += 1
            if got != want:
                bad = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
                raise Defect(
                    "readback",
                    f"seq {sid} position {bad}: read {got[bad]}, wrote {want[bad]} (table {table})",
                )
    if "refcounts" in enabled:
        steps["refcounts"] += 1
        for block, count in holders.items():
            if adapter.refcount(block) != count:
                raise Defect(
                    "refcounts",
                    f"block {block} is held by {count} table entries, refcount says "
                    f"{adapter.refcount(block)}",
                )
    free = adapter.num_free_blocks()
    cached = adapter.num_cached_blocks()
    if "no_double_hold" in enabled:
        steps["no_double_hold"] += 1
        if len(holders) > caps.num_blocks:
            raise Defect("no_double_hold", f"{len(holders)} distinct blocks held > capacity")
        if not (caps.fork or caps.prefix_caching):  # nothing may share: one holder per block
            shared = sorted(b for b, n in holders.items() if n > 1)
            if shared:
                raise Defect("no_double_hold", f"blocks {shared} are in two tables, none shares")
    if "free_accounting" in enabled:
        steps["free_accounting"] += 1
        if free + cached + len(holders) != caps.num_blocks:
            raise Defect(
                "free_accounting",
                f"free {free} + cached {cached} + held {len(holders)} != capacity "
                f"{caps.num_blocks}",
            )


def run_program(
    make: Callable[[], Adapter],
    program: Sequence[Op],
    enabled: set[str],
    steps: dict[str, int],
    obs: Observations,
    log: list[str],
) -> None:
    """Interpret ``program`` against a fresh adapter, checking after every operation.

    Operations invalid in the current state (a free of an unknown sequence, a fork of a
    sequence still being prefilled) are skipped, so any program is meaningful. ``log`` receives
    the operations actually run, as the counterexample script.
    """
    adapter = make()
    caps = adapter.capabilities
    seqs: dict[int, _Seq] = {}
    for op in program:
        kind = op[0]
        if kind == "allocate":
            _, sid, prompt = op
            if sid in seqs:
                continue
            try:
                cached = adapter.allocate(sid, prompt)
            except NoRoom:
                obs.no_room += 1
                continue
            log.append(f"allocate({sid}, {list(prompt)})  # cached {cached}")
            seqs[sid] = _Seq(list(prompt), cached)
            if cached:
                obs.hits += 1
                obs.hit_tokens += cached
                if "prefix_hit_content" in enabled:
                    steps["prefix_hit_content"] += 1
                    want = [kv_value(t, p) for p, t in enumerate(prompt[:cached])]
                    got = adapter.read(sid, cached)
                    if got != want:
                        raise Defect(
                            "prefix_hit_content",
                            f"seq {sid} hit {cached} tokens but reads {got}, prompt KV {want}",
                        )
        elif kind == "compute":
            _, sid, chunk = op
            seq = seqs.get(sid)
            if seq is None or seq.computed == len(seq.tokens):
                continue
            n = min(chunk, len(seq.tokens) - seq.computed)
            start = seq.computed
            values = [kv_value(t, start + i) for i, t in enumerate(seq.tokens[start : start + n])]
            log.append(f"compute({sid}, positions {start}..{start + n})")
            adapter.write(sid, start, values)
            seq.computed += n
        elif kind == "append":
            _, sid, token = op
            seq = seqs.get(sid)
            if seq is None or seq.computed != len(seq.tokens):
                continue
            try:
                adapter.append(sid, token)
            except NoRoom:
                obs.no_room += 1
                continue
            log.append(f"append({sid}, {token})")
            seq.tokens.append(token)
        elif kind == "fork":
            _, parent, child = op
            seq = seqs.get(parent)
            if not caps.fork or seq is None or child in seqs or seq.computed != len(seq.tokens):
                continue
            try:
                adapter.fork(parent, child)
            except NoRoom:
                obs.no_room += 1
                continue
            log.append(f"fork({parent}, {child})")
            seqs[child] = _Seq(list(seq.tokens), seq.computed)
        elif kind == "free":
            _, sid = op
            if sid not in seqs:
                continue
            log.append(f"free({sid})")
            adapter.free(sid)
            del seqs[sid]
        else:  # pragma: no cover - the strategy draws only the kinds above
            raise ValueError(f"unknown operation {op!r}")
        obs.ops[kind] = obs.ops.get(kind, 0) + 1
        _check_invariants(adapter, seqs, enabled, steps)
        if caps.refcounts:
            for sid in seqs:
                for block in adapter.block_table(sid):
                    obs.max_refcount = max(obs.max_refcount, adapter.refcount(block))
    for sid in list(seqs):
        log.append(f"free({sid})")
        adapter.free(sid)
    del seqs
    if "no_leak_after_free" in enabled:
        steps["no_leak_after_free"] += 1
        if adapter.num_cached_blocks():
            obs.evictions += 1
        adapter.evict_all()
        log.append("evict_all()")
        free = adapter.num_free_blocks()
        if free != caps.num_blocks or adapter.num_cached_blocks():
            raise Defect(
                "no_leak_after_free",
                f"after freeing every sequence and evicting, {free} of {caps.num_blocks} "
                f"blocks are free ({adapter.num_cached_blocks()} still cached)",
            )


@dataclass
class SemanticReport:
    """The result of the semantic suite on one adapter."""

    impl: str
    versions: dict[str, str]
    capabilities: Capabilities
    status: str = "passed"
    programs: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    observations: Observations = field(default_factory=Observations)
    defect: str = ""
    counterexample: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    def summary(self) -> str:
        """A few lines for a terminal or the docs."""
        vers = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines = [
            f"semantic blocks: {self.impl} ({vers}): {self.status.upper()}, "
            f"{self.programs} programs, {self.seconds:.1f} s"
        ]
        lines += [f"  checked {name}: {n} times" for name, n in self.steps.items()]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        o = self.observations
        lines.append(
            f"  observed: ops {o.ops}, {o.hits} prefix hits ({o.hit_tokens} tokens), "
            f"{o.no_room} refused for room, max refcount {o.max_refcount}"
        )
        lines += [f"  policy: {p}" for p in self.capabilities.policies]
        if self.defect:
            lines.append(f"  DEFECT {self.defect}")
            lines += [f"    {line}" for line in self.counterexample.splitlines()]
        return "\n".join(lines)


def check_semantic(
    make: Callable[[], Adapter],
    versions: dict[str, str],
    max_examples: int = 200,
    max_ops: int = 40,
    shrink: bool = True,
) -> SemanticReport:
    """Run random engine programs against adapters built by ``make``; shrink any defect.

    Derandomized, so a run is reproducible; ``max_examples`` bounds the programs tried;
    ``shrink=False`` reports the first failing program as found.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    caps = make().capabilities
    report = SemanticReport(impl=caps.name, versions=dict(versions), capabilities=caps)
    enabled: set[str] = set()
    for name, (needs, why) in PROPERTIES.items():
        if needs and not getattr(caps, needs):
            report.skipped[name] = why
        else:
            enabled.add(name)
            report.steps[name] = 0
    for cap, what in CAPABILITY_PROPERTIES.items():
        if not getattr(caps, cap):
            report.skipped[what] = f"the adapter declares no {cap}"
    report.skipped.update(NOT_SEMANTIC)

    seq = st.integers(0, 3)
    op = st.one_of(
        st.tuples(st.just("allocate"), seq, st.lists(st.integers(0, 2), min_size=1, max_size=10)),
        st.tuples(st.just("compute"), seq, st.integers(1, 12)),
        st.tuples(st.just("compute"), seq, st.integers(1, 12)),
        st.tuples(st.just("append"), seq, st.integers(0, 2)),
        st.tuples(st.just("fork"), seq, seq),
        st.tuples(st.just("fork"), seq, seq),
        st.tuples(st.just("free"), seq),
    )
    last: list[str] = []
    counted = [0]

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        phases=list(Phase) if shrink else [Phase.explicit, Phase.generate],
    )
    @given(st.lists(op, min_size=min(8, max_ops), max_size=max_ops))
    def test(program: list[Op]) -> None:
        counted[0] += 1
        log: list[str] = []
        try:
            run_program(make, program, enabled, report.steps, report.observations, log)
        except Defect:
            raise
        except NoRoom as exc:
            raise Defect("crash", f"NoRoom escaped an operation that checks room: {exc!r}") from exc
        except Exception as exc:
            raise Defect("crash", f"the implementation raised {exc!r}") from exc
        finally:
            last[:] = log

    start = time.perf_counter()
    try:
        test()
    except Defect as exc:
        report.status = "failed"
        report.defect = str(exc)
        report.counterexample = "\n".join(last)
    report.programs = counted[0]
    report.seconds = time.perf_counter() - start
    return report
