"""CUDA graphs of the decode step, one per padded batch size.

A decode step launches hundreds of small kernels (every layer's norms, projections, rope, KV
write, attention); at small batches their launch time exceeds their run time. A CUDA graph
records the launches once and replays them with one call. Graph replay needs fixed shapes and
addresses, so each captured size ``B`` owns static input buffers; a batch of ``b <= B``
sequences is copied into them, the rows ``b..B-1`` padded (slot ``-1``: no KV write; length 0:
no keys, output 0), and the first ``b`` rows of the output are used.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from fast.attention_context import AttentionContext

if TYPE_CHECKING:
    from fast.engine import LLMEngine

__all__ = ["DecodeGraphs"]


class DecodeGraphs:
    """Captured decode forwards for the batch sizes in ``cuda_graph_batch_sizes``."""

    def __init__(self, engine: LLMEngine) -> None:
        cfg = engine.config
        self.model = engine.model
        self.kv_caches = engine.kv_caches
        limit = engine.scheduler_config.max_num_seqs
        sizes = sorted({b for b in cfg.cuda_graph_batch_sizes if b <= limit} | {min(
            limit, max(cfg.cuda_graph_batch_sizes))})
        self.sizes = sizes
        big = sizes[-1]
        width = -(-engine.max_model_len // cfg.block_size)
        dev = engine.device
        self.input_ids = torch.zeros(big, dtype=torch.int64, device=dev)          # [B]
        self.positions = torch.zeros(big, dtype=torch.int64, device=dev)          # [B]
        self.slots = torch.full((big,), -1, dtype=torch.int64, device=dev)        # [B]
        self.tables = torch.zeros(big, width, dtype=torch.int32, device=dev)      # [B, W]
        self.lens = torch.zeros(big, dtype=torch.int32, device=dev)               # [B]
        self.cu = torch.arange(big + 1, dtype=torch.int32, device=dev)            # [B + 1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for b in reversed(sizes):          # largest first: smaller ones reuse its pool
                ctx = self._ctx(b)
                stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):         # compile and warm up outside the capture
                        self.model(self.input_ids[:b], self.positions[:b], ctx, self.kv_caches)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = self.model(self.input_ids[:b], self.positions[:b], ctx,
                                                 self.kv_caches)                  # [b, H]
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.synchronize()

    def _ctx(self, b: int) -> AttentionContext:
        return AttentionContext(self.slots[:b], self.tables[:b], self.lens[:b], self.cu[:b + 1],
                                1, True)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            ctx: AttentionContext) -> torch.Tensor | None:
        """Replay the smallest graph that fits ``b`` sequences; None when none does."""
        b = int(input_ids.shape[0])
        i = bisect.bisect_left(self.sizes, b)
        if i == len(self.sizes):
            return None
        size = self.sizes[i]
        w = int(ctx.block_tables.shape[1])
        if w > self.tables.shape[1]:
            return None
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(ctx.slot_mapping)
        self.slots[b:size].fill_(-1)
        self.tables[:b, :w].copy_(ctx.block_tables)
        self.lens[:b].copy_(ctx.seq_lens)
        self.lens[b:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:b]
