"""The prefix cache: a content-hash chain over full blocks and an index hash -> block.

Hash of a full block (:func:`hash_block_tokens`)::

    blake2b(digest_size=8) over the concatenation of, all as int64 little-endian:
        parent_hash            (-1 for the first block of a sequence)
        len(tokens), *tokens
        -1 if extra_key is None else len(utf8(extra_key)), followed by the utf8 bytes
    -> the 8-byte digest read as a little-endian unsigned int, masked to 63 bits

so the hash is a non-negative int64 that any implementation can reproduce. Block ``i`` of a
sequence has hash ``h_i = hash_block_tokens(h_{i-1}, tokens[i*bs:(i+1)*bs], extra_key)``; since
it folds in its parent, equal hashes mean (up to collisions) equal whole prefixes.

The index maps a hash to at most one block; a block is registered at most once. A **hit**
requires the cached block's whole token prefix (all tokens from position 0 to its end) and extra
key to equal the request's: a hash collision, even one in an ancestor block, never reuses a
wrong block. Registering a hash that is already present does nothing (the first block stays).

>>> h0 = hash_block_tokens(-1, [1, 2], None)
>>> h0 == hash_block_tokens(-1, [1, 2], None), h0 == hash_block_tokens(-1, [1, 2], "lora-a")
(True, False)
>>> 0 <= h0 < 2**63
True
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROOT_PARENT_HASH = -1
"""The parent hash of a sequence's first block."""

HashFn = Callable[[int, Sequence[int], "str | None"], int]
"""Signature of a block hash function: (parent_hash, token_ids, extra_key) -> int in [0, 2**63)."""

_MASK63 = (1 << 63) - 1


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int], extra_key: str | None) -> int:
    """The deterministic 63-bit content hash of one full block (see the module docstring)."""
    parts = [struct.pack("<qq", parent_hash, len(token_ids))]
    parts.append(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_key is None:
        parts.append(struct.pack("<q", -1))
    else:
        key = extra_key.encode("utf-8")
        parts.append(struct.pack("<q", len(key)) + key)
    digest = hashlib.blake2b(b"".join(parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def chain_hashes(
    token_ids: Sequence[int], block_size: int, extra_key: str | None, hash_fn: HashFn
) -> list[int]:
    """Hashes of every full block of ``token_ids`` (``len(token_ids) // block_size`` of them)."""
    hashes: list[int] = []
    parent = ROOT_PARENT_HASH
    for i in range(len(token_ids) // block_size):
        parent = hash_fn(parent, token_ids[i * block_size : (i + 1) * block_size], extra_key)
        hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class CachedBlock:
    """What the index stores for one cached block."""

    block_hash: int
    prefix: tuple[int, ...]  # every token from position 0 through the end of this block
    extra_key: str | None


class PrefixCache:
    """Index from block hash to physical block, with the stored content of each cached block."""

    def __init__(self, hash_fn: HashFn = hash_block_tokens) -> None:
        self.hash_fn = hash_fn
        self._index: dict[int, int] = {}  # hash -> block
        self._entries: dict[int, CachedBlock] = {}  # block -> content

    def __len__(self) -> int:
        return len(self._entries)

    def is_cached(self, block: int) -> bool:
        """True when ``block`` is registered in the index."""
        return block in self._entries

    def cached_blocks(self) -> list[int]:
        """Cached block ids, ascending."""
        return sorted(self._entries)

    def entry(self, block: int) -> CachedBlock:
        """The stored content of a cached block."""
        return self._entries[block]

    def lookup(self, block_hash: int, prefix: Sequence[int], extra_key: str | None) -> int | None:
        """The cached block holding exactly ``prefix`` under ``extra_key``, or None."""
        block = self._index.get(block_hash)
        if block is None:
            return None
        entry = self._entries[block]
        if entry.extra_key != extra_key or entry.prefix != tuple(prefix):
            return None  # a hash collision: never reuse a block with other content
        return block

    def register(
        self, block: int, block_hash: int, prefix: Sequence[int], extra_key: str | None
    ) -> bool:
        """Index ``block`` under ``block_hash``; False (no change) if the hash is present."""
        if block_hash in self._index:
            return False
        if block in self._entries:
            raise AssertionError(f"block {block} is already cached")
        self._index[block_hash] = block
        self._entries[block] = CachedBlock(block_hash, tuple(prefix), extra_key)
        return True

    def evict(self, block: int) -> bool:
        """Drop ``block`` from the index; False if it was not cached."""
        entry = self._entries.pop(block, None)
        if entry is None:
            return False
        del self._index[entry.block_hash]
        return True

    def check_integrity(self, block_size: int) -> None:
        """Raise AssertionError unless index and entries agree and every hash matches content."""
        if len(self._index) != len(self._entries):
            raise AssertionError(f"{len(self._index)} hashes but {len(self._entries)} entries")
        for block_hash, block in self._index.items():
            entry = self._entries.get(block)
            if entry is None or entry.block_hash != block_hash:
                raise AssertionError(f"hash {block_hash} -> block {block} has no matching entry")
        for block, entry in self._entries.items():
            if len(entry.prefix) == 0 or len(entry.prefix) % block_size != 0:
                raise AssertionError(
                    f"cached block {block} stores {len(entry.prefix)} prefix tokens, "
                    f"not a positive multiple of {block_size}"
                )
            want = chain_hashes(entry.prefix, block_size, entry.extra_key, self.hash_fn)[-1]
            if want != entry.block_hash:
                raise AssertionError(
                    f"cached block {block} has hash {entry.block_hash}, its content hashes "
                    f"to {want}"
                )
