"""Content hashes and exact prefix ids for the fast block manager's prefix cache.

The spec's index maps a block hash to one block, and a hit also requires the cached block's
whole token prefix (and extra key) to equal the request's, so that a hash collision never reuses
a wrong block. Comparing whole prefixes on every lookup costs O(prefix); instead each distinct
``(prefix, extra_key)`` gets an integer **prefix id** by hash-consing: the id of block ``i`` is
interned under ``(id of block i-1, tokens of block i, extra_key)``, so two prefixes have the same
id exactly when they are equal. A hit is then ``index[hash] == b and pid[b] == request pid``: the
spec's rule, compared in O(1).

Ids are never reused; :meth:`PrefixIds.collect` drops ids no live sequence or cached block (nor
any descendant of theirs) refers to, so the table stays proportional to the live state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from spec.prefix_cache import ROOT_PARENT_HASH, HashFn

__all__ = ["PrefixIds", "MISSING", "chain"]

MISSING = -2
"""The prefix id of a prefix that was never interned (matches no cached block)."""

_Key = tuple[int, tuple[int, ...], "str | None"]


class PrefixIds:
    """Interned prefix ids: equal ids if and only if equal (prefix, extra_key)."""

    def __init__(self) -> None:
        self._ids: dict[_Key, int] = {}
        self._keys: dict[int, _Key] = {}
        self._next = 0
        self.collect_at = 4096  # collect when this many ids exist

    def __len__(self) -> int:
        return len(self._ids)

    def intern(self, parent: int, tokens: tuple[int, ...], extra_key: str | None) -> int:
        """The id of ``prefix(parent) + tokens`` under ``extra_key``, creating it if new."""
        key = (parent, tokens, extra_key)
        pid = self._ids.get(key)
        if pid is None:
            pid = self._next
            self._next += 1
            self._ids[key] = pid
            self._keys[pid] = key
        return pid

    def lookup(self, parent: int, tokens: tuple[int, ...], extra_key: str | None) -> int:
        """The id if this prefix was interned, else :data:`MISSING`."""
        if parent == MISSING:
            return MISSING
        return self._ids.get((parent, tokens, extra_key), MISSING)

    def collect(self, live: Iterable[int]) -> None:
        """Forget every id that is neither in ``live`` nor an ancestor of one."""
        keep: set[int] = set()
        for pid in live:
            while pid >= 0 and pid not in keep:
                keep.add(pid)
                pid = self._keys[pid][0]
        self._keys = {pid: key for pid, key in self._keys.items() if pid in keep}
        self._ids = {key: pid for pid, key in self._keys.items()}
        self.collect_at = max(4096, 4 * len(self._ids))


def chain(
    tokens: Sequence[int],
    block_size: int,
    extra_key: str | None,
    hash_fn: HashFn,
    ids: PrefixIds,
    create: bool,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Hashes ``[n // bs]`` (the spec's chain) and prefix ids ``[n // bs]`` of the full blocks."""
    nfull = len(tokens) // block_size
    hashes = np.empty(nfull, dtype=np.int64)
    pids = np.empty(nfull, dtype=np.int64)
    h = ROOT_PARENT_HASH
    pid = -1
    for i in range(nfull):
        block = tuple(tokens[i * block_size : (i + 1) * block_size])
        h = hash_fn(h, block, extra_key)
        hashes[i] = h
        pid = ids.intern(pid, block, extra_key) if create else ids.lookup(pid, block, extra_key)
        pids[i] = pid
    return hashes, pids
