"""Open-addressing hash tables from int64 keys to int32 values, on two numpy arrays.

``keys`` int64 ``[cap]`` (``-1`` = empty slot) and ``values`` int32 ``[cap]``, ``cap`` a power of
two kept at least twice the number of entries; linear probing, and deletion by backward shift
(no tombstones), so a lookup stops at the first empty slot. The block manager keeps two such
tables (sequence id -> row, block hash -> block) and the prefix-id nodes one more (see
:mod:`fast.blocks.prefix_ids`); all of them start probing at :func:`home`.

>>> import numpy as np
>>> keys, values = np.full(8, -1, dtype=np.int64), np.full(8, -1, dtype=np.int32)
>>> insert(keys, values, 42, 7)
>>> find(keys, values, 42), find(keys, values, 43)
(7, -1)
>>> delete(keys, values, 42)
>>> find(keys, values, 42)
-1
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

__all__ = ["home", "find", "insert", "delete"]

I64 = NDArray[np.int64]
I32 = NDArray[np.int32]


@njit(cache=True, inline="always")
def home(key: int, mask: int) -> int:
    """The first slot probed for ``key`` in a table of ``mask + 1`` slots (Fibonacci hashing)."""
    x = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    h: int = np.int64((x >> np.uint64(29)) & np.uint64(mask))
    return h


@njit(cache=True)
def find(keys: I64, values: I32, key: int) -> int:
    """The value stored under ``key`` (>= 0), or -1."""
    if key < 0:
        return -1
    mask = len(keys) - 1
    i = home(key, mask)
    while True:
        k = keys[i]
        if k == key:
            return int(values[i])
        if k == -1:
            return -1
        i = (i + 1) & mask


@njit(cache=True)
def insert(keys: I64, values: I32, key: int, value: int) -> None:
    """Store ``key -> value``; ``key`` must be absent and the table less than full."""
    mask = len(keys) - 1
    i = home(key, mask)
    while keys[i] != -1:
        i = (i + 1) & mask
    keys[i] = key
    values[i] = value


@njit(cache=True)
def delete(keys: I64, values: I32, key: int) -> None:
    """Remove ``key`` (if present), shifting later probes back so lookups stay correct."""
    mask = len(keys) - 1
    i = home(key, mask)
    while keys[i] != key:
        if keys[i] == -1:
            return
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if keys[j] == -1:
            break
        h = home(keys[j], mask)
        if (i < j and i < h <= j) or (i > j and (h > i or h <= j)):
            continue  # keys[j] still reachable from its home slot
        keys[i] = keys[j]
        values[i] = values[j]
        i = j
    keys[i] = -1
    values[i] = -1
