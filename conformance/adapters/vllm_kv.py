"""Adapter: vLLM's v1 KV cache manager (``vllm.v1.core.kv_cache_manager.KVCacheManager``).

What is driven: one full-attention KV cache group of ``num_blocks`` blocks (block 0 is vLLM's
null block, never handed out) with prefix caching on, and real ``vllm.v1.request.Request``
objects whose block hashes come from vLLM's own ``get_request_block_hasher`` (sha256). The
adapter follows the scheduler's protocol: ``get_computed_blocks`` for the prefix hit, then
``allocate_slots`` for the rest of the prompt with ``delay_cache_blocks=True`` (the path vLLM
uses when the KV of allocated blocks arrives later), ``cache_blocks`` after each computed
chunk, ``allocate_slots`` for one more token after ``append_output_token_ids``, ``free``,
and ``reset_prefix_cache`` as the eviction of everything. vLLM's manager owns block ids, not
memory: the KV lives in the adapter's array, written and read at ``block_id * block_size +
offset`` through the manager's block table (``get_block_ids``), which is what its workers'
slot mapping does.

Not expressible: fork (vLLM samples ``n > 1`` as separate requests that share blocks through
the prefix cache), copy-on-write, swap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conformance.adapters.semantic import Capabilities, NoRoom

__all__ = ["VLLMKVCacheAdapter", "versions", "make_factory"]


def versions() -> dict[str, str]:
    """The exact versions the adapter runs against."""
    import torch
    import vllm  # type: ignore[import-not-found, unused-ignore]

    return {"vllm": str(vllm.__version__), "torch": torch.__version__}


class VLLMKVCacheAdapter:
    """One ``KVCacheManager`` with prefix caching, driven as vLLM's scheduler does."""

    def __init__(self, block_size: int = 2, num_blocks: int = 9) -> None:
        import torch
        from vllm import SamplingParams  # type: ignore[import-not-found, unused-ignore]
        from vllm.utils.hashing import sha256  # type: ignore[import-not-found, unused-ignore]
        from vllm.v1.core import kv_cache_utils  # type: ignore[import-not-found, unused-ignore]
        from vllm.v1.core.kv_cache_manager import KVCacheManager  # type: ignore[import-not-found, unused-ignore]
        from vllm.v1.kv_cache_interface import (  # type: ignore[import-not-found, unused-ignore]
            FullAttentionSpec,
            KVCacheConfig,
            KVCacheGroupSpec,
        )
        from vllm.v1.request import Request  # type: ignore[import-not-found, unused-ignore]

        spec = FullAttentionSpec(
            block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32
        )
        config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["layer0"], spec)],
        )
        kv_cache_utils.init_none_hash(sha256)
        self.manager: Any = KVCacheManager(
            config,
            max_model_len=4096,
            scheduler_block_size=block_size,
            hash_block_size=block_size,
            enable_caching=True,
        )
        self._hasher = kv_cache_utils.get_request_block_hasher(block_size, sha256)
        self._request_cls: Any = Request
        self._params: Any = SamplingParams
        self.block_size = block_size
        self.kv = [float("nan")] * (num_blocks * block_size)  # never written: NaN
        self.requests: dict[int, Any] = {}
        self.capabilities = Capabilities(
            name="vllm.KVCacheManager",
            block_size=block_size,
            num_blocks=num_blocks - 1,  # block 0 is the null block
            prefix_caching=True,
            fork=False,
            refcounts=True,
            cached_blocks=True,
            swap=False,
            copy_on_write=False,
            policies=(
                "block 0 is a null block that is never handed out",
                "a full block is registered in the prefix cache once its tokens are scheduled "
                "(here: once computed, with delay_cache_blocks); the spec registers a block "
                "when it is computed",
                "n > 1 sampling is separate requests sharing blocks through the prefix cache; "
                "there is no fork",
            ),
        )

    def _blocks(self, seq_id: int) -> list[int]:
        return [int(b) for b in self.manager.get_block_ids(f"r{seq_id}")[0]]

    def _slot(self, seq_id: int, position: int) -> int:
        block = self._blocks(seq_id)[position // self.block_size]
        return block * self.block_size + position % self.block_size

    # -- the adapter surface -----------------------------------------------------------------
    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        request = self._request_cls(
            f"r{seq_id}",
            list(token_ids),
            self._params(max_tokens=1 << 20),
            None,
            block_hasher=self._hasher,
        )
        hit, cached, _ = self.manager.get_computed_blocks(request)
        got = self.manager.allocate_slots(
            request, len(token_ids) - cached, cached, hit, delay_cache_blocks=True
        )
        if got is None:
            raise NoRoom
        request.num_computed_tokens = cached
        self.requests[seq_id] = request
        return int(cached)

    def write(self, seq_id: int, start: int, values: Sequence[float]) -> None:
        for i, value in enumerate(values):
            self.kv[self._slot(seq_id, start + i)] = value
        request = self.requests[seq_id]
        request.num_computed_tokens = start + len(values)
        self.manager.cache_blocks(request, start + len(values))

    def read(self, seq_id: int, num_tokens: int) -> list[float]:
        return [self.kv[self._slot(seq_id, p)] for p in range(num_tokens)]

    def append(self, seq_id: int, token_id: int) -> None:
        request = self.requests[seq_id]
        held = len(self._blocks(seq_id)) * self.block_size
        if request.num_tokens + 1 > held and self.manager.block_pool.get_num_free_blocks() < 1:
            raise NoRoom
        request.append_output_token_ids(token_id)
        got = self.manager.allocate_slots(request, 1, delay_cache_blocks=True)
        if got is None:
            raise RuntimeError("allocate_slots refused one token with a free block")

    def fork(self, parent_id: int, child_id: int) -> None:  # pragma: no cover - fork=False
        raise NotImplementedError("vLLM has no fork")

    def free(self, seq_id: int) -> None:
        self.manager.free(self.requests.pop(seq_id))

    def block_table(self, seq_id: int) -> list[int]:
        return self._blocks(seq_id)

    def refcount(self, block: int) -> int:
        return int(self.manager.block_pool.blocks[block].ref_cnt)

    def _cached(self) -> int:
        pool = self.manager.block_pool
        return sum(1 for b in pool.blocks[1:] if b.ref_cnt == 0 and b.block_hash is not None)

    def num_free_blocks(self) -> int:
        return int(self.manager.block_pool.get_num_free_blocks()) - self._cached()

    def num_cached_blocks(self) -> int:
        return self._cached()

    def evict_all(self) -> None:
        if not self.manager.reset_prefix_cache():
            raise RuntimeError("reset_prefix_cache refused with every request freed")


def make_factory(**kwargs: int) -> Any:
    """A zero-argument factory of fresh adapters (what ``check_semantic`` takes)."""
    return lambda: VLLMKVCacheAdapter(**kwargs)
