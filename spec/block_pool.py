"""A pool of physical KV-cache blocks: a free queue with a fixed order and a refcount per block.

Policy (the part another implementation must reproduce exactly):

* Blocks are numbered ``0 .. num_blocks - 1``. At start the free queue holds them in that
  order, so the first allocations get ``0, 1, 2, ...``.
* :meth:`BlockPool.take` pops the **head** of the queue; :meth:`BlockPool.release` appends to
  the **tail**. The queue is first-in first-out: the block freed longest ago is reused first.
* :meth:`BlockPool.remove` takes a block out of the middle of the queue (a prefix-cache hit on a
  cached block whose refcount is 0); the other blocks keep their relative order.
* A block is in the queue if and only if its refcount is 0.

>>> pool = BlockPool(4)
>>> [pool.take(), pool.take()]
[0, 1]
>>> pool.release(0)
>>> pool.free_order()
[2, 3, 0]
"""

from __future__ import annotations

from spec.errors import InvalidArgumentError, OutOfBlocksError


class BlockPool:
    """Physical blocks ``0..num_blocks-1`` with refcounts and a FIFO free queue."""

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise InvalidArgumentError("num_blocks", num_blocks, "must be an int >= 0")
        self.num_blocks = num_blocks
        self._refcount: list[int] = [0] * num_blocks
        # dict as an ordered set: insertion order is queue order (head first).
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))

    # -- queries
    @property
    def num_free(self) -> int:
        """Number of blocks in the free queue (refcount 0)."""
        return len(self._free)

    def refcount(self, block: int) -> int:
        """How many block tables reference ``block``."""
        return self._refcount[block]

    def is_free(self, block: int) -> bool:
        """True when ``block`` is in the free queue."""
        return block in self._free

    def free_order(self) -> list[int]:
        """The free queue, head (next to be taken) first."""
        return list(self._free)

    def peek(self, n: int) -> list[int]:
        """The first ``n`` blocks :meth:`take` would return, without taking them."""
        out: list[int] = []
        for block in self._free:
            if len(out) == n:
                break
            out.append(block)
        return out

    # -- mutations
    def take(self) -> int:
        """Pop the head of the free queue and give it refcount 1."""
        if not self._free:
            raise OutOfBlocksError(needed=1, free=0)
        block = next(iter(self._free))
        del self._free[block]
        self._refcount[block] = 1
        return block

    def remove(self, block: int) -> None:
        """Take a free ``block`` out of the middle of the queue and give it refcount 1."""
        if block not in self._free:
            raise InvalidArgumentError("block", block, "is not free")
        del self._free[block]
        self._refcount[block] = 1

    def incref(self, block: int) -> None:
        """One more table references an in-use ``block``."""
        if self._refcount[block] < 1:
            raise InvalidArgumentError("block", block, "is free; use remove() to reuse it")
        self._refcount[block] += 1

    def decref(self, block: int) -> int:
        """One table fewer references ``block``; at 0 it is not yet queued (see release)."""
        if self._refcount[block] < 1:
            raise InvalidArgumentError("block", block, "refcount is already 0")
        self._refcount[block] -= 1
        return self._refcount[block]

    def release(self, block: int) -> None:
        """Drop one reference; when the count reaches 0 append ``block`` to the queue tail."""
        if self.decref(block) == 0:
            self._free[block] = None

    # -- invariants
    def check_integrity(self, expected_refcounts: list[int] | None = None) -> None:
        """Raise AssertionError unless the pool is self-consistent.

        ``expected_refcounts[b]`` (when given) is the number of tables that reference ``b``;
        it must equal the stored refcount.
        """
        if len(self._refcount) != self.num_blocks:
            raise AssertionError(f"{len(self._refcount)} refcounts for {self.num_blocks} blocks")
        for block in self._free:
            if not 0 <= block < self.num_blocks:
                raise AssertionError(f"free queue holds block {block} outside the pool")
        for block, count in enumerate(self._refcount):
            if count < 0:
                raise AssertionError(f"block {block} has refcount {count} < 0")
            if (count == 0) != (block in self._free):
                raise AssertionError(
                    f"block {block} has refcount {count} but is_free={block in self._free}"
                )
        if expected_refcounts is not None:
            for block, count in enumerate(self._refcount):
                if count != expected_refcounts[block]:
                    raise AssertionError(
                        f"block {block} has refcount {count} but {expected_refcounts[block]}"
                        " tables reference it"
                    )
