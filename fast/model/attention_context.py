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
        num_decodes: in a step that is not all decode, how many of the first sequences have
            one new token each (0: none, or not split). The layers then run the decode kernel
            on those rows and the prefill kernel on the rest (the prefill kernel spends a
            whole tile of query rows on a single token: on an H200, 11.6 vs 5.3 ms per step
            for 256 decode rows beside 256 prefill tokens, benchmarks/gpu_mixed_step.py).
        prefill_block_tables: ``[B - num_decodes, W]`` int32, ``block_tables[num_decodes:]``
            in a tensor of its own (a slice at an offset that is not a multiple of 16 bytes
            would compile another kernel variant in the middle of a run).
        prefill_seq_lens: ``[B - num_decodes]`` int32, ``seq_lens[num_decodes:]``, likewise.
        prefill_cu_seqlens_q: ``[B - num_decodes + 1]`` int32, the prefill rows' prefix sums
            (``cu_seqlens_q[num_decodes:] - num_decodes``).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    is_decode: bool
    num_decodes: int = 0
    prefill_block_tables: torch.Tensor | None = None
    prefill_seq_lens: torch.Tensor | None = None
    prefill_cu_seqlens_q: torch.Tensor | None = None

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
