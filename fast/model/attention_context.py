"""The per-step attention metadata the model hands to the paged kernels.

The engine flattens one step's tokens into a single batch ``[T]``; :class:`AttentionContext`
says where each new token's K/V goes (``slot_mapping``) and what each sequence attends to
(``block_tables``, ``seq_lens``, ``cu_seqlens_q``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionContext:
    """Attention metadata for one forward pass over a flat token batch.

    Attributes:
        slot_mapping: ``[T]`` int64, cache slot of every new token (``-1`` = padding, skipped).
        block_tables: ``[B, W]`` int32, physical block ids of each sequence in logical order.
        seq_lens: ``[B]`` int32, cached + new tokens of each sequence after this step.
        cu_seqlens_q: ``[B + 1]`` int32, prefix sums of the new-token counts.
        max_seqlen_q: the largest new-token count of any sequence.
        is_decode: every sequence has exactly one new token (the decode kernel is used).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    is_decode: bool

    @property
    def num_tokens(self) -> int:
        """T, the number of new tokens in the batch."""
        return int(self.slot_mapping.shape[0])

    def token_seq_lens(self) -> torch.Tensor:
        """[T] int32: each new token's sequence length after this step (cached + new tokens).

        Built on the context's device without a host synchronization (CUDA graphs replay it).
        """
        if self.is_decode:
            return self.seq_lens  # one token per sequence
        counts = self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]  # [B]
        return torch.repeat_interleave(self.seq_lens, counts, output_size=self.num_tokens)

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        num_cached: Sequence[int],
        num_new: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionContext:
        """Build the context from plain lists (tests, simple loops).

        Sequence ``b`` already has ``num_cached[b]`` tokens in its blocks and appends
        ``num_new[b]``; its block table must cover ``num_cached[b] + num_new[b]`` tokens.
        ``is_decode`` is set when every ``num_new`` is 1.
        """
        if not (len(block_tables) == len(num_cached) == len(num_new)) or not num_new:
            raise ValueError(
                f"need one block table, cached and new count per sequence: "
                f"{len(block_tables)}, {len(num_cached)}, {len(num_new)}"
            )
        width = max(len(t) for t in block_tables)
        slots: list[int] = []
        for table, cached, new in zip(block_tables, num_cached, num_new):
            if cached + new > len(table) * block_size:
                raise ValueError(
                    f"block table of {len(table)} blocks of {block_size} cannot "
                    f"hold {cached} + {new} tokens"
                )
            for pos in range(cached, cached + new):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        cu = [0]
        for new in num_new:
            cu.append(cu[-1] + new)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(
                [c + n for c, n in zip(num_cached, num_new)], dtype=torch.int32, device=device
            ),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            max_seqlen_q=max(num_new),
            is_decode=all(n == 1 for n in num_new),
        )
