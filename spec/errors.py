"""Named exceptions of pagedkv.

Every misuse of a block manager (spec or fast) raises one of these, carrying the offending
numbers both in its message and as attributes. The state of the object that raised is exactly
what it was before the call: operations validate everything before they mutate anything.

>>> from spec.errors import OutOfBlocksError, PagedKVError
>>> err = OutOfBlocksError(needed=3, free=2)
>>> (err.needed, err.free, isinstance(err, PagedKVError))
(3, 2, True)
>>> str(err)
'out of GPU blocks: need 3, 2 free'
"""

from __future__ import annotations


class PagedKVError(Exception):
    """Base class of every error pagedkv raises on bad input or impossible requests."""


class InvalidArgumentError(PagedKVError, ValueError):
    """An argument is out of its domain (block size < 1, empty prompt, negative id...).

    Attributes: ``name`` (the argument), ``value`` (what was passed), ``reason``.
    """

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {name}={value!r}: {reason}")


class UnknownSequenceError(PagedKVError, KeyError):
    """The sequence id is not live (never allocated, or already freed, for non-free calls)."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        super().__init__(seq_id)

    def __str__(self) -> str:
        return f"unknown sequence {self.seq_id}"


class SequenceExistsError(PagedKVError):
    """``allocate`` or ``fork`` onto an id that is already live (resident or swapped out)."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        super().__init__(f"sequence {seq_id} already exists")


class DoubleFreeError(PagedKVError):
    """``free`` of an id that was freed before and not allocated again since."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        super().__init__(f"sequence {seq_id} was already freed")


class SequenceStateError(PagedKVError):
    """The operation needs the sequence in the other pool.

    ``swapped`` is the sequence's current state: ``True`` when it is swapped out and the
    operation (append, fork, slot_mapping, swap_out...) needs it on the GPU; ``False`` when it is
    resident and the operation (swap_in) needs it swapped out.
    """

    def __init__(self, seq_id: int, swapped: bool, operation: str) -> None:
        self.seq_id = seq_id
        self.swapped = swapped
        self.operation = operation
        where = "swapped out" if swapped else "resident on the GPU"
        super().__init__(f"{operation}: sequence {seq_id} is {where}")


class OutOfBlocksError(PagedKVError):
    """Not enough free GPU blocks: ``needed`` blocks, ``free`` free, ``watermark`` reserved."""

    def __init__(self, needed: int, free: int, watermark: int = 0) -> None:
        self.needed = needed
        self.free = free
        self.watermark = watermark
        tail = f" (watermark keeps {watermark})" if watermark else ""
        super().__init__(f"out of GPU blocks: need {needed}, {free} free{tail}")


class SwapInError(PagedKVError):
    """``swap_in`` needs ``needed`` GPU blocks but ``free`` are free (minus ``watermark``)."""

    def __init__(self, needed: int, free: int, watermark: int = 0) -> None:
        self.needed = needed
        self.free = free
        self.watermark = watermark
        tail = f" (watermark keeps {watermark})" if watermark else ""
        super().__init__(f"cannot swap in: need {needed} GPU blocks, {free} free{tail}")


class SwapOutError(PagedKVError):
    """``swap_out`` needs ``needed`` CPU blocks but only ``free`` are free."""

    def __init__(self, needed: int, free: int) -> None:
        self.needed = needed
        self.free = free
        super().__init__(f"cannot swap out: need {needed} CPU blocks, {free} free")
