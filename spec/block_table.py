"""Per-sequence block tables and the slot mapping.

A sequence of ``n`` tokens in blocks of ``bs`` tokens occupies ``ceil(n / bs)`` blocks. Its
block table lists their physical ids in logical order: token ``t`` lives in block
``table[t // bs]`` at offset ``t % bs``, i.e. at slot ``table[t // bs] * bs + t % bs`` of the
cache viewed as ``[num_blocks * bs]`` token slots.

>>> num_blocks_for(9, 4)
3
>>> table = BlockTable(token_ids=[5, 6, 7, 8, 9], blocks=[7, 2])
>>> [slot_of(table.blocks, t, 4) for t in range(5)]
[28, 29, 30, 31, 8]
"""

from __future__ import annotations

from dataclasses import dataclass, field


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """``ceil(num_tokens / block_size)``: blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def slot_of(blocks: list[int], position: int, block_size: int) -> int:
    """Physical slot of token ``position``: ``blocks[position // bs] * bs + position % bs``."""
    return blocks[position // block_size] * block_size + position % block_size


@dataclass
class BlockTable:
    """The bookkeeping of one sequence.

    ``blocks`` are GPU block ids when ``swapped`` is False and CPU block ids when it is True.
    ``block_hashes[i]`` is the prefix-cache hash of full block ``i`` (only kept when prefix
    caching is on; then ``len(block_hashes) == len(token_ids) // block_size``).
    ``num_computed`` counts the leading tokens whose KV is written (``mark_computed``).
    """

    token_ids: list[int]
    blocks: list[int]
    extra_key: str | None = None
    block_hashes: list[int] = field(default_factory=list)
    swapped: bool = False
    num_computed: int = 0

    @property
    def num_tokens(self) -> int:
        """Number of tokens the sequence holds."""
        return len(self.token_ids)

    def copy(self) -> BlockTable:
        """An independent copy (used by fork)."""
        return BlockTable(
            token_ids=list(self.token_ids),
            blocks=list(self.blocks),
            extra_key=self.extra_key,
            block_hashes=list(self.block_hashes),
            swapped=self.swapped,
            num_computed=self.num_computed,
        )

    def block_tokens(self, index: int, block_size: int) -> list[int]:
        """The token ids stored in logical block ``index`` (fewer than bs in a last block)."""
        return self.token_ids[index * block_size : (index + 1) * block_size]

    def check_integrity(self, block_size: int, hashed: bool) -> None:
        """Raise AssertionError unless the table length matches the token count."""
        want = num_blocks_for(len(self.token_ids), block_size)
        if len(self.blocks) != want:
            raise AssertionError(
                f"{len(self.blocks)} blocks for {len(self.token_ids)} tokens at block size "
                f"{block_size} (want {want})"
            )
        if not 0 <= self.num_computed <= len(self.token_ids):
            raise AssertionError(f"{self.num_computed} computed tokens of {len(self.token_ids)}")
        if len(set(self.blocks)) != len(self.blocks):
            raise AssertionError(f"block table {self.blocks} repeats a block")
        want_hashes = len(self.token_ids) // block_size if hashed else 0
        if len(self.block_hashes) != want_hashes:
            raise AssertionError(
                f"{len(self.block_hashes)} block hashes for {len(self.token_ids)} tokens "
                f"(want {want_hashes})"
            )
