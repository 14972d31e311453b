"""The free queue of a block pool: a FIFO threaded through the block ids as a linked list.

The spec's pool (``spec.block_pool``) takes blocks from the head, returns them to the tail and,
on a prefix-cache hit of a free cached block, removes one from the middle. A doubly linked list
does all three in O(1) and keeps exactly the spec's order. A pool is two arrays:

* ``pool`` int32 ``[3, n]``: row ``REF`` the refcount of each block, rows ``NEXT`` and ``PREV``
  its neighbours in the queue (``-1`` = none; both ``-1`` while the block is in use);
* ``ends`` int64 ``[4]``: ``ends[HEAD]``, ``ends[TAIL]`` (``-1`` when empty),
  ``ends[COUNT]``, the number of queued blocks, and ``ends[EVICTED]``, a counter the block
  manager keeps of the blocks it took from the queue whose prefix-cache entry that dropped.

>>> pool, ends = new_pool(3)
>>> b = take(pool, ends)
>>> release(pool, ends, b)
>>> queue_order(pool, ends)
[1, 2, 0]
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

__all__ = [
    "REF", "NEXT", "PREV", "HEAD", "TAIL", "COUNT", "EVICTED",
    "new_pool", "unlink", "push_tail", "release", "take", "queue_order",
]  # fmt: skip

REF, NEXT, PREV = 0, 1, 2
"""Rows of a ``pool`` array."""
HEAD, TAIL, COUNT, EVICTED = 0, 1, 2, 3
"""Slots of an ``ends`` array."""

I64 = NDArray[np.int64]
I32 = NDArray[np.int32]


def new_pool(n: int) -> tuple[I32, I64]:
    """``(pool, ends)`` of ``n`` free blocks queued in id order, refcounts 0."""
    pool = np.zeros((3, n), dtype=np.int32)
    pool[NEXT] = np.arange(1, n + 1, dtype=np.int32)
    if n:
        pool[NEXT, n - 1] = -1
    pool[PREV] = np.arange(-1, n - 1, dtype=np.int32)
    ends = np.array([0 if n else -1, n - 1, n, 0], dtype=np.int64)
    return pool, ends


@njit(cache=True, inline="always")
def unlink(pool: I32, ends: I64, b: int) -> None:
    """Remove queued block ``b`` from the queue (its refcount is left to the caller)."""
    p = pool[PREV, b]
    n = pool[NEXT, b]
    if p >= 0:
        pool[NEXT, p] = n
    else:
        ends[HEAD] = n
    if n >= 0:
        pool[PREV, n] = p
    else:
        ends[TAIL] = p
    pool[NEXT, b] = -1
    pool[PREV, b] = -1
    ends[COUNT] -= 1


@njit(cache=True, inline="always")
def push_tail(pool: I32, ends: I64, b: int) -> None:
    """Queue block ``b`` at the tail."""
    t = ends[TAIL]
    pool[PREV, b] = t
    pool[NEXT, b] = -1
    if t >= 0:
        pool[NEXT, t] = b
    else:
        ends[HEAD] = b
    ends[TAIL] = b
    ends[COUNT] += 1


@njit(cache=True, inline="always")
def release(pool: I32, ends: I64, b: int) -> None:
    """Drop one reference to ``b``; at zero it is queued at the tail."""
    pool[REF, b] -= 1
    if pool[REF, b] == 0:
        push_tail(pool, ends, b)


@njit(cache=True, inline="always")
def take(pool: I32, ends: I64) -> int:
    """Pop the head block (the queue must not be empty); its refcount becomes 1."""
    b = ends[HEAD]
    unlink(pool, ends, b)
    pool[REF, b] = 1
    return int(b)


def queue_order(pool: I32, ends: I64) -> list[int]:
    """The queued blocks, head (next to be taken) first."""
    out: list[int] = []
    b = int(ends[HEAD])
    while b >= 0:
        out.append(b)
        b = int(pool[NEXT, b])
    return out
