"""The parallel layers, and how a model built from a rank's local config becomes its shard.

A rank's model is the ordinary model class built from
:meth:`~fast.distributed.sharding.ShardPlan.local_config` (its heads, intermediate columns and
vocabulary rows), so column-parallel projections (Q/K/V, gate/up) need no code of their own:
they are plain :class:`~fast.model.layers.Linear` layers of the local width. Three modules are
swapped in by :func:`parallelize`:

* :class:`RowParallelLinear` for ``o_proj`` and ``down_proj``: the local partial product, then
  one all-reduce (the only collectives of a decoder layer: two per layer);
* :class:`VocabParallelEmbedding` for ``embed_tokens``: rows of the rank's token ids, zeros for
  the others, all-reduced (exact: one non-zero term per element);
* :class:`TensorParallelCausalLM` wraps the whole: ``forward`` is the local model's, and
  ``compute_logits`` broadcasts rank 0's hidden rows, computes the rank's vocabulary slice and
  gathers the slices on rank 0 (concatenation: exact).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fast.distributed.comm import Communicator
from fast.distributed.errors import TensorParallelError
from fast.model.attention_context import AttentionContext
from fast.model.layers import DecoderLayer, Embedding, Linear
from fast.model.llama import LlamaForCausalLM

__all__ = [
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "TensorParallelCausalLM",
    "DriverHooks",
    "parallelize",
]


class RowParallelLinear(Linear):
    """``y = sum over ranks of x_r W_r^T``: the input split by columns, one all-reduce."""

    def __init__(self, weight: nn.Parameter, comm: Communicator) -> None:
        nn.Module.__init__(self)  # the shard's weight [out, in_local] is given, not allocated
        self.weight = weight
        self.bias = None
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in_local] -> [T, out], the same on every rank
        return self.comm.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(Embedding):
    """Rows ``[start, start + Vp)`` of the embedding table; other ids contribute zeros."""

    def __init__(self, weight: nn.Parameter, start: int, comm: Communicator) -> None:
        nn.Module.__init__(self)  # the shard's table [Vp, H] is given, not allocated
        self.weight = weight
        self.start = start
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [T] -> [T, H], the same on every rank
        local = ids - self.start  # [T]
        mine = (local >= 0) & (local < self.weight.shape[0])  # [T]
        out = F.embedding(torch.where(mine, local, 0), self.weight)  # [T, H]
        out = out * mine.unsqueeze(-1).to(out.dtype)  # [T, H] zero rows for other ranks' ids
        return self.comm.all_reduce(out)


class DriverHooks(Protocol):
    """What rank 0's model asks of the driver (:class:`~fast.distributed.driver.
    TensorParallelDriver`): workers have no driver."""

    def before_forward(self) -> None:
        """Raise unless the workers were sent this forward."""

    def before_logits(self, rows: int) -> None:
        """Send the LOGITS command for ``rows`` hidden rows (the workers join the collectives)."""

    def local_error(self, exc: BaseException) -> None:
        """Rank 0 raised between collectives the workers are in: take the group down."""


class TensorParallelCausalLM(nn.Module):
    """One rank's shard of a causal LM: ``forward`` as the model's (collectives inside),
    ``compute_logits`` gathered on rank 0. ``driver`` is rank 0's (None on a worker)."""

    def __init__(
        self,
        inner: LlamaForCausalLM,
        comm: Communicator,
        vocab_size: int,
        driver: DriverHooks | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config  # the rank's local config
        self.comm = comm
        self.vocab_size = vocab_size
        self.driver = driver

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, H] (the same on every rank)."""
        if self.driver is None:
            worker_out: torch.Tensor = self.inner(input_ids, positions, ctx, kv_caches)
            return worker_out
        self.driver.before_forward()
        try:
            out: torch.Tensor = self.inner(input_ids, positions, ctx, kv_caches)
        except TensorParallelError:
            raise
        except BaseException as exc:  # the workers wait in this forward's collectives
            self.driver.local_error(exc)
            raise
        return out

    def use_fused_ops(self, on: bool = True) -> None:
        """The local model's :meth:`~fast.model.llama.LlamaForCausalLM.use_fused_ops` (the
        fused kernels are per token and per head: a shard runs them as the whole model does)."""
        self.inner.use_fused_ops(on)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (rank 0's) -> logits [N, V] float32 on rank 0; on a worker its own
        slice [N, Vp] (unused)."""
        if self.driver is None:
            return self._logits(hidden)
        self.driver.before_logits(int(hidden.shape[0]))
        try:
            return self._logits(hidden)
        except TensorParallelError:
            raise
        except BaseException as exc:
            self.driver.local_error(exc)
            raise

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [N, H] -> [N, V] on rank 0, [N, Vp] on a worker
        hidden = self.comm.broadcast(hidden.contiguous())  # [N, H]
        local = self.inner.compute_logits(hidden)  # [N, Vp] float32
        parts = self.comm.gather(local.contiguous())  # tp x [N, Vp] on rank 0
        if not parts:
            return local
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]  # [N, V]


def parallelize(model: LlamaForCausalLM, start: int, comm: Communicator) -> LlamaForCausalLM:
    """Swap the row-parallel projections and the embedding of a model built from a rank's
    local config for their parallel versions (same parameters, moved over); returns ``model``.
    ``start`` is the rank's first token id."""
    for layer in model.model.layers:
        if not isinstance(layer, DecoderLayer):
            raise TypeError(f"not a decoder layer: {type(layer).__name__}")
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj = _row_parallel(attn.o_proj, comm)
        mlp.down_proj = _row_parallel(mlp.down_proj, comm)
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens.weight, start, comm)
    return model


def _row_parallel(linear: nn.Module, comm: Communicator) -> RowParallelLinear:
    """``linear``'s parameter in a :class:`RowParallelLinear` (no copy, no allocation)."""
    if not isinstance(linear, Linear) or linear.bias is not None:
        raise TypeError(f"a row-parallel projection must be a bias-free Linear: {linear}")
    return RowParallelLinear(linear.weight, comm)
