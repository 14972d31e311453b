"""Run the spec and an implementation side by side, and compare everything they show.

:class:`Lockstep` is the engine under both the state machine and the named properties: every
operation goes to the spec (the model) and to the implementation under test; the two outcomes
(return value or exception type) must be equal; after an error both sides must be unchanged. A
fake KV store is written through the implementation's slot mappings, copy-on-write pairs and
swap maps, the way an engine writes KV: a sequence's tokens are stored only when
``mark_computed`` says a step computed them (``allocate`` and ``append`` store nothing). So
:meth:`Lockstep.check` proves that every resident sequence reads back its own tokens over its
computed prefix, which includes every prefix-cache hit: a block served from the cache before
the step that writes its KV reads back as unwritten (``-1``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from conformance.protocols import BlockManagerImpl

__all__ = ["ConformanceError", "Outcome", "Lockstep", "outcome", "observables"]


class ConformanceError(AssertionError):
    """The implementation under test differs from the spec (or broke an integrity check)."""


@dataclass(frozen=True)
class Outcome:
    """What one call produced: a normalized return value, or the type of the exception raised."""

    value: Any = None
    error: type[BaseException] | None = None

    def __str__(self) -> str:
        return f"raises {self.error.__name__}" if self.error is not None else repr(self.value)


def _normalize(value: Any) -> Any:
    """Numpy arrays and tuples to nested lists of ints, so that results compare with ``==``."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_normalize(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def outcome(fn: Callable[..., Any], *args: Any) -> Outcome:
    """Call ``fn(*args)``; capture its normalized result or its exception type."""
    try:
        return Outcome(value=_normalize(fn(*args)))
    except Exception as exc:  # noqa: BLE001 - every exception type is an observable
        return Outcome(error=type(exc))


def observables(
    bm: BlockManagerImpl, seq_ids: Sequence[int], num_gpu_blocks: int = 0
) -> dict[str, Any]:
    """Everything the public queries show about ``bm`` for the sequence ids ``seq_ids``.

    Besides the per-sequence state: the refcount of each of the ``num_gpu_blocks`` device
    blocks, the free queue in order (head first), the prefix cache's blocks, and its eviction
    order (the cached blocks that are free, in free-queue order: least recently released first).
    """
    seqs: dict[int, Any] = {}
    live_resident: list[int] = []
    for s in seq_ids:
        if not bm.has_sequence(s):
            continue
        n = bm.num_tokens(s)
        swapped = bm.is_swapped(s)
        if not swapped:
            live_resident.append(s)
        seqs[s] = {
            "num_tokens": n,
            "token_ids": _normalize(bm.token_ids(s)),
            "block_table": _normalize(bm.block_table(s)),
            "is_swapped": swapped,
            "slot_mapping": outcome(bm.slot_mapping, s, 0, n),
            "num_computed_tokens": int(bm.num_computed_tokens(s)),
            "can_swap_in": outcome(bm.can_swap_in, s, 1),
        }
    free_order = [int(b) for b in bm.free_block_order()]
    cached = [int(b) for b in bm.cached_blocks()]
    cached_set = set(cached)
    return {
        "num_free_gpu_blocks": int(bm.num_free_gpu_blocks),
        "num_free_cpu_blocks": int(bm.num_free_cpu_blocks),
        "refcount": [int(bm.refcount(b)) for b in range(num_gpu_blocks)],
        "free_block_order": free_order,
        "cached_blocks": cached,
        "cache_eviction_order": [b for b in free_order if b in cached_set],
        "sequence_ids": [int(s) for s in bm.sequence_ids()],
        "live": sorted(seqs),
        "sequences": seqs,
        "can_append": outcome(bm.can_append, live_resident),
    }


def _diff(a: dict[str, Any], b: dict[str, Any], path: str = "") -> str:
    """The first differing key path between two observable dicts, for error messages."""
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if va != vb:
            if isinstance(va, dict) and isinstance(vb, dict):
                return _diff(va, vb, f"{path}{k}.")
            return f"{path}{k}: spec={va!s} impl={vb!s}"
    return ""


class FakeKVStore:
    """One int per slot standing in for a token's K/V: written through slot mappings."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.gpu: NDArray[np.int64] = np.full(num_gpu_blocks * block_size, -1, dtype=np.int64)
        self.cpu: NDArray[np.int64] = np.full(num_cpu_blocks * block_size, -1, dtype=np.int64)

    def write(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """Store ``tokens[i]`` at ``slots[i]`` in the device pool."""
        self.gpu[np.asarray(slots, dtype=np.int64)] = np.asarray(tokens, dtype=np.int64)

    def _copy(self, src: NDArray[np.int64], s: int, dst: NDArray[np.int64], d: int) -> None:
        dst[d * self.bs : (d + 1) * self.bs] = src[s * self.bs : (s + 1) * self.bs]

    def copy_blocks(self, pairs: Sequence[Sequence[int]]) -> None:
        """Copy-on-write: device block ``src`` into device block ``dst``, for each pair."""
        for s, d in pairs:
            self._copy(self.gpu, s, self.gpu, d)

    def swap_out(self, mapping: Sequence[Sequence[int]]) -> None:
        """Copy device block ``g`` into host block ``c`` for each ``(g, c)``."""
        for g, c in mapping:
            self._copy(self.gpu, g, self.cpu, c)

    def swap_in(self, mapping: Sequence[Sequence[int]]) -> None:
        """Copy host block ``c`` into device block ``g`` for each ``(c, g)``."""
        for c, g in mapping:
            self._copy(self.cpu, c, self.gpu, g)


class Lockstep:
    """The spec and an implementation driven by the same calls; see the module docstring.

    ``seq_ids`` is the universe of sequence ids the caller may use (observables are compared for
    all of them); ``log`` receives one line per operation (``hypothesis.note`` in the suite).
    """

    def __init__(
        self,
        model: BlockManagerImpl,
        impl: BlockManagerImpl,
        *,
        block_size: int,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
        seq_ids: Sequence[int],
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.model = model
        self.impl = impl
        self.seq_ids = list(seq_ids)
        self.log = log
        self.store = FakeKVStore(num_gpu_blocks, num_cpu_blocks, block_size)
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.steps = 0
        self._snapshot: tuple[dict[str, Any], dict[str, Any]] | None = None

    # -- the model's view, for strategies
    def live(self) -> list[int]:
        """Live sequence ids (resident or swapped), per the spec."""
        return [s for s in self.seq_ids if self.model.has_sequence(s)]

    def resident(self) -> list[int]:
        """Live sequences whose blocks are on the device, per the spec."""
        return [s for s in self.live() if not self.model.is_swapped(s)]

    def swapped(self) -> list[int]:
        """Live sequences swapped out to the host pool, per the spec."""
        return [s for s in self.live() if self.model.is_swapped(s)]

    # -- calls
    def call(self, op: str, *args: Any) -> Outcome:
        """Call ``op(*args)`` on both sides and insist on equal outcomes; apply its KV effects."""
        self.steps += 1
        before: dict[str, Any] | None = None
        before_impl: dict[str, Any] | None = None
        if op not in _QUERIES:
            # the state the last check() saw, when nothing has changed since (saves two
            # snapshots per step); else take them now
            if self._snapshot is not None:
                before, before_impl = self._snapshot
            else:
                before = observables(self.model, self.seq_ids, self.num_gpu_blocks)
                before_impl = observables(self.impl, self.seq_ids, self.num_gpu_blocks)
            self._snapshot = None
        written = self._to_write(op, args)
        want = outcome(getattr(self.model, op), *args)
        got = outcome(getattr(self.impl, op), *args)
        call = f"bm.{op}({', '.join(repr(a) for a in args)})"
        self.log(f"{call}  # -> {want}")
        if want.error is not None and not issubclass(want.error, _paged_kv_error()):
            raise ConformanceError(f"{call}: the spec itself raised {want.error.__name__}")
        if want != got:
            raise ConformanceError(f"{call}: spec {want}, implementation {got}")
        if want.error is not None and before is not None and before_impl is not None:
            for side, snap, bm in (("spec", before, self.model), ("impl", before_impl, self.impl)):
                after = observables(bm, self.seq_ids, self.num_gpu_blocks)
                if after != snap:
                    raise ConformanceError(
                        f"{call} raised {want.error.__name__} but changed the {side} state: "
                        f"{_diff(snap, after)}"
                    )
            self._snapshot = (before, before_impl)  # unchanged, as just checked
        if want.error is None:
            self._apply(op, got.value, written)
        return got

    def _to_write(self, op: str, args: tuple[Any, ...]) -> list[tuple[list[int], list[int]]]:
        """Before a ``mark_computed`` call: (slots, tokens) of the tokens it declares computed,
        from the implementation's answers (empty when the call will fail)."""
        if op == "mark_computed":
            pairs = [(args[0], args[1])]
        elif op == "mark_computed_batch":
            pairs = list(zip(args[0], args[1]))
        else:
            return []
        impl = self.impl
        out: list[tuple[list[int], list[int]]] = []
        try:
            for seq_id, n in pairs:
                lo = int(impl.num_computed_tokens(seq_id))
                if not isinstance(n, int) or not lo <= n <= impl.num_tokens(seq_id):
                    return []
                out.append((impl.slot_mapping(seq_id, lo, n), impl.token_ids(seq_id)[lo:n]))
        except Exception:  # noqa: BLE001 - the call itself fails the same way
            return []
        return out

    def _apply(self, op: str, value: Any, written: list[tuple[list[int], list[int]]]) -> None:
        """Mirror the operation's data movement in the fake KV store (from the impl's answers):
        copy-on-write copies, swaps, and the KV a ``mark_computed`` declares written."""
        if op == "append" and value is not None:
            self.store.copy_blocks([value])
        elif op == "append_batch":
            self.store.copy_blocks(value[1])
        elif op == "swap_out":
            self.store.swap_out(value)
        elif op == "swap_in":
            self.store.swap_in(value)
        for slots, tokens in written:
            self.store.write(slots, tokens)

    # -- checks
    def check(self) -> None:
        """Integrity on both sides, equal observables, and every resident sequence's tokens."""
        self.model.check_integrity()
        try:
            self.impl.check_integrity()
        except AssertionError as exc:
            raise ConformanceError(f"implementation check_integrity failed: {exc}") from exc
        want = observables(self.model, self.seq_ids, self.num_gpu_blocks)
        got = observables(self.impl, self.seq_ids, self.num_gpu_blocks)
        if want != got:
            raise ConformanceError(f"observables differ: {_diff(want, got)}")
        self._snapshot = (want, got)
        for s in self.seq_ids:
            if not self.impl.has_sequence(s) or self.impl.is_swapped(s):
                continue
            n = self.impl.num_computed_tokens(s)
            stored = self.store.gpu[np.asarray(self.impl.slot_mapping(s, 0, n), dtype=np.int64)]
            tokens = list(self.impl.token_ids(s))[:n]
            if stored.tolist() != tokens:
                raise ConformanceError(
                    f"sequence {s} reads back {stored.tolist()} from the slots of its {n} "
                    f"computed tokens, but those tokens are {tokens} (-1: KV never written)"
                )

    def free_all(self) -> None:
        """Free every live sequence (an abort of everything); the pools must be full again."""
        for s in self.live():
            self.call("free", s)
        self.check()
        for side, bm in (("spec", self.model), ("impl", self.impl)):
            if bm.num_free_gpu_blocks != self.num_gpu_blocks:
                raise ConformanceError(
                    f"{side}: {self.num_gpu_blocks - bm.num_free_gpu_blocks} device blocks "
                    f"leaked after freeing every sequence"
                )
            if bm.num_free_cpu_blocks != self.num_cpu_blocks:
                raise ConformanceError(
                    f"{side}: {self.num_cpu_blocks - bm.num_free_cpu_blocks} host blocks "
                    f"leaked after freeing every sequence"
                )


_QUERIES = frozenset(
    {
        "can_allocate",
        "can_append",
        "can_swap_in",
        "slot_mapping",
        "num_tokens",
        "num_computed_tokens",
    }
)


def _paged_kv_error() -> type[Exception]:
    from spec.errors import PagedKVError

    return PagedKVError
