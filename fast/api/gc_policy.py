"""The cyclic garbage collector in a process that holds one engine for its whole life.

A process that has imported torch and built an engine tracks about 250,000 container objects
before its first request (253,223 for a small random model on this repository's CPU), and every
full collection of Python's cyclic collector walks all of them: 114 ms on that CPU at start-up,
164 ms with 1,000 requests in flight. (One decode step of the H200's 1,000-request trace takes
213-225 ms; a run with the collector disabled had no such step, but a run with the heap frozen
still had it, so that step is not explained by this walk: docs/performance.md, "End to end".)

:func:`freeze_startup_heap` collects once, then moves every object alive into the collector's
permanent generation (``gc.freeze``), so later collections walk only what requests create (a full
collection after it: under 0.1 ms in the same CPU measurement). Frozen objects are never
collected as cyclic garbage, so only a process that holds one engine for its life calls it: the
server's engine process (``pagedkv serve``'s default), once its engine is built. Processes that
build and drop engines (a library user's, the test suite's, the one-process server started from
``fast.api.cli.main`` inside them) do not.

:func:`frozen_heap` is the same for the length of one batch call (``LLM.generate``): what is
alive when the call starts is frozen, and given back to the collector when it returns, so a
collection during the call walks only what the call creates, and garbage made before or during
it is still collected (after the call, or by the call's own collections). Freezing and
unfreezing move whole lists of objects: O(1), not O(objects).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["freeze_startup_heap", "frozen_heap"]


def freeze_startup_heap() -> int:
    """Collect, then freeze every live object (``gc.freeze``); returns how many are frozen.

    >>> import gc
    >>> freeze_startup_heap() > 0
    True
    >>> gc.unfreeze()  # (tests put the process back)
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze every live object for the ``with`` block (no collection first), unfreeze after.

    A heap someone froze already (the engine process's, a user's ``gc.freeze()``) is left as it
    is, on entry and on exit:

    >>> import gc
    >>> with frozen_heap():
    ...     gc.get_freeze_count() > 0
    True
    >>> gc.get_freeze_count()
    0
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
