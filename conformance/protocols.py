"""The implementation protocols the conformance suite checks, one per concept.

An implementation under test is anything with the public surface of
``spec.block_manager.BlockManager`` (see ARCHITECTURE.md). The suite never looks inside it: it
calls the public operations on the implementation and on the spec side by side and compares
every observable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

__all__ = ["BlockManagerImpl", "BlockManagerFactory"]


@runtime_checkable
class BlockManagerImpl(Protocol):
    """A paged-KV block manager: the public operations of ``spec.block_manager.BlockManager``."""

    @property
    def num_free_gpu_blocks(self) -> int: ...

    @property
    def num_free_cpu_blocks(self) -> int: ...

    def has_sequence(self, seq_id: int) -> bool: ...

    def num_tokens(self, seq_id: int) -> int: ...

    def token_ids(self, seq_id: int) -> list[int]: ...

    def block_table(self, seq_id: int) -> list[int]: ...

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]: ...

    def is_swapped(self, seq_id: int) -> bool: ...

    def refcount(self, block: int) -> int: ...

    def free_block_order(self) -> list[int]: ...

    def cached_blocks(self) -> list[int]: ...

    def sequence_ids(self) -> list[int]: ...

    def can_allocate(self, token_ids: Sequence[int], extra_key: str | None = None) -> bool: ...

    def can_append(self, seq_ids: Sequence[int]) -> bool: ...

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 1) -> bool: ...

    def allocate(
        self, seq_id: int, token_ids: Sequence[int], extra_key: str | None = None
    ) -> int: ...

    def append(self, seq_id: int, token_id: int) -> tuple[int, int] | None: ...

    def append_batch(
        self, seq_ids: Sequence[int], token_ids: Sequence[int]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]: ...

    def fork(self, parent_id: int, child_id: int) -> None: ...

    def free(self, seq_id: int) -> None: ...

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]: ...

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]: ...

    def reset_prefix_cache(self) -> bool: ...

    def check_integrity(self) -> None: ...


#: Builds a fresh implementation from a ``spec.block_manager.BlockManagerConfig`` (and, for the
#: hash-collision property, a ``hash_fn=`` keyword: the block content hash to use).
BlockManagerFactory = Callable[..., BlockManagerImpl]
