"""Which rows and columns of each weight a tensor-parallel rank holds (docs/tensor-parallel.md).

Megatron-style sharding of a Llama decoder over ``tp`` ranks:

* the fused Q/K/V projection is split by heads along its output (column parallel): rank ``r``
  holds query heads ``[r q, (r + 1) q)``, ``q = Hq / tp``, and the KV heads those queries read;
* the output projection is split along its input, the same query heads (row parallel: each rank
  has a partial sum of every output, one all-reduce adds them);
* the fused gate/up projection is split along its output, the down projection along its input,
  the same intermediate columns (again one all-reduce);
* embedding and LM head are split by vocabulary rows (each rank ``vocab_per_rank`` rows, the last
  padded with zero rows); norms are replicated.

KV heads: query head ``h`` reads KV head ``h // g`` (``g = Hq / Hkv``). The kernels need a
uniform group on every rank, so rank ``r`` keeps ``q / gcd(q, g)`` local KV heads, local head
``j`` being a copy of model head ``(r q + j gcd(q, g)) // g``. That is ``Hkv / tp`` distinct heads
when ``tp`` divides ``Hkv`` (no copies), one head per rank when ``Hkv`` divides ``tp`` (each
head on ``tp / Hkv`` ranks, vLLM's replication), and in between (``Hkv = 3``, ``tp = 2``) as many
copies as the uniform group needs. The only refused sizes are those that do not divide ``Hq``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fast.distributed.errors import InvalidTensorParallelSizeError, UnshardableWeightError
from fast.model.config import ModelConfig

__all__ = [
    "ShardPlan",
    "plan_sharding",
    "check_tensor_parallel_size",
    "shard_parameter",
    "reassemble_parameter",
]


def check_tensor_parallel_size(value: object) -> int:
    """``value`` as a tensor-parallel size: an int >= 1 (a bool is refused: ``True`` is an int).

    >>> check_tensor_parallel_size(2)
    2
    >>> check_tensor_parallel_size(0)
    Traceback (most recent call last):
    ...
    fast.distributed.errors.InvalidTensorParallelSizeError: invalid tensor_parallel_size=0: \
must be an int >= 1
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidTensorParallelSizeError(value, "must be an int >= 1")
    return value


@dataclass(frozen=True)
class ShardPlan:
    """How a model of ``vocab_size`` tokens splits over ``tp_size`` ranks.

    >>> from fast.model.config import ModelConfig
    >>> c = ModelConfig(vocab_size=10, hidden_size=12, intermediate_size=7, num_hidden_layers=1,
    ...                 num_attention_heads=6, num_key_value_heads=3, head_dim=2)
    >>> p = plan_sharding(c, 2)
    >>> p.heads_per_rank, p.kv_heads, p.ffn_bounds, p.vocab_per_rank
    (3, ((0, 0, 1), (1, 2, 2)), (0, 3, 7), 5)
    >>> plan_sharding(c, 3).kv_heads   # tp divides Hkv: one distinct head each
    ((0,), (1,), (2,))
    >>> plan_sharding(c, 6).kv_heads   # Hkv divides tp: each head on two ranks
    ((0,), (0,), (1,), (1,), (2,), (2,))
    """

    tp_size: int
    heads_per_rank: int  # query heads on each rank
    kv_heads: tuple[tuple[int, ...], ...]  # per rank: the model KV head of each local KV head
    ffn_bounds: tuple[int, ...]  # [tp + 1]: rank r holds intermediate columns [b[r], b[r + 1])
    vocab_size: int
    vocab_per_rank: int  # vocabulary rows of each rank's embedding / LM head shard

    @property
    def kv_heads_per_rank(self) -> int:
        """Local KV heads of every rank (the same on all ranks)."""
        return len(self.kv_heads[0])

    def vocab_start(self, rank: int) -> int:
        """The first token id of ``rank``'s vocabulary shard."""
        return rank * self.vocab_per_rank

    def local_config(self, config: ModelConfig, rank: int) -> ModelConfig:
        """``config`` with ``rank``'s share of heads, intermediate columns and vocabulary: the
        model built from it has exactly the rank's parameter shapes."""
        return dataclasses.replace(
            config,
            num_attention_heads=self.heads_per_rank,
            num_key_value_heads=self.kv_heads_per_rank,
            intermediate_size=self.ffn_bounds[rank + 1] - self.ffn_bounds[rank],
            vocab_size=self.vocab_per_rank,
        )


def plan_sharding(config: ModelConfig, tp_size: object) -> ShardPlan:
    """The :class:`ShardPlan` of ``config`` over ``tp_size`` ranks.

    Raises :class:`~fast.distributed.errors.InvalidTensorParallelSizeError` naming the size
    when it is not an int >= 1, does not divide the query heads, or exceeds the intermediate
    size (a rank would hold no MLP column).
    """
    tp = check_tensor_parallel_size(tp_size)
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hq % tp:
        raise InvalidTensorParallelSizeError(
            tp, f"must divide the model's {hq} attention heads (num_attention_heads)"
        )
    if tp > config.intermediate_size:
        raise InvalidTensorParallelSizeError(
            tp, f"above the model's intermediate_size {config.intermediate_size}"
        )
    q, g = hq // tp, hq // hkv
    step = math.gcd(q, g)  # local query heads per local KV head
    kv_heads = tuple(tuple((r * q + j * step) // g for j in range(q // step)) for r in range(tp))
    f = config.intermediate_size
    ffn_bounds = tuple(r * f // tp for r in range(tp + 1))
    return ShardPlan(tp, q, kv_heads, ffn_bounds, config.vocab_size, -(-config.vocab_size // tp))


def _qkv_rows(plan: ShardPlan, config: ModelConfig, rank: int) -> torch.Tensor:
    """Rows [Q_local + 2 KV_local] of the fused Q/K/V projection that ``rank`` holds."""
    d, qs, kvs = config.head_dim, config.q_size, config.kv_size
    first = rank * plan.heads_per_rank
    q_rows = torch.arange(first * d, (first + plan.heads_per_rank) * d)  # [Q_local]
    heads = torch.tensor(plan.kv_heads[rank], dtype=torch.int64)  # [Hkv_local]
    head_rows = (heads[:, None] * d + torch.arange(d)).reshape(-1)  # [KV_local]
    return torch.cat([q_rows, qs + head_rows, qs + kvs + head_rows])


def _q_columns(plan: ShardPlan, config: ModelConfig, rank: int) -> slice:
    d, q = config.head_dim, plan.heads_per_rank
    return slice(rank * q * d, (rank + 1) * q * d)


def _rule(name: str) -> str:
    """The sharding rule of parameter ``name`` (our fused names)."""
    if name.endswith((".qkv_proj.weight", ".qkv_proj.bias")):
        return "qkv"
    if name.endswith(".o_proj.weight"):
        return "o"
    if name.endswith(".gate_up_proj.weight"):
        return "gate_up"
    if name.endswith(".down_proj.weight"):
        return "down"
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "vocab"
    if name.endswith("norm.weight"):
        return "replicated"
    raise UnshardableWeightError(name)


def shard_parameter(
    plan: ShardPlan, config: ModelConfig, rank: int, name: str, full: torch.Tensor
) -> torch.Tensor:
    """``rank``'s shard of parameter ``name`` (the model's full tensor ``full``), contiguous.

    Raises :class:`~fast.distributed.errors.UnshardableWeightError` for a name without a rule.
    """
    rule = _rule(name)
    if rule == "qkv":  # [Q + 2 KV, H] or [Q + 2 KV] -> [Q_l + 2 KV_l, ...]
        return full.index_select(0, _qkv_rows(plan, config, rank).to(full.device))
    if rule == "o":  # [H, Q] -> [H, Q_l]
        return full[:, _q_columns(plan, config, rank)].contiguous()
    lo, hi = plan.ffn_bounds[rank], plan.ffn_bounds[rank + 1]
    if rule == "gate_up":  # [2F, H] -> [2F_l, H]
        f = config.intermediate_size
        return torch.cat([full[lo:hi], full[f + lo : f + hi]])
    if rule == "down":  # [H, F] -> [H, F_l]
        return full[:, lo:hi].contiguous()
    if rule == "vocab":  # [V, H] -> [Vp, H], zero rows past the vocabulary
        start = plan.vocab_start(rank)
        out = full.new_zeros((plan.vocab_per_rank, *full.shape[1:]))
        rows = full[start : start + plan.vocab_per_rank]
        out[: rows.shape[0]] = rows
        return out
    return full.clone()  # replicated


def reassemble_parameter(
    plan: ShardPlan, config: ModelConfig, name: str, shards: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The full tensor back from every rank's shard (the inverse of :func:`shard_parameter`).

    Raises ``ValueError`` when copies disagree: two ranks holding the same KV head with
    different values, vocabulary padding that is not zero, replicated tensors that differ.
    """
    if len(shards) != plan.tp_size:
        raise ValueError(f"{name}: {len(shards)} shards for {plan.tp_size} ranks")
    rule = _rule(name)
    if rule == "replicated":
        if not all(torch.equal(s, shards[0]) for s in shards):
            raise ValueError(f"{name}: replicated copies differ")
        return shards[0].clone()
    if rule == "vocab":
        full = torch.cat(list(shards))  # [tp Vp, H]
        if full[plan.vocab_size :].count_nonzero():
            raise ValueError(f"{name}: vocabulary padding is not zero")
        return full[: plan.vocab_size]
    if rule in ("o", "down"):
        return torch.cat(list(shards), dim=1)
    if rule == "gate_up":
        halves = [s.chunk(2) for s in shards]  # each rank: gate [F_l, H], up [F_l, H]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    size = config.q_size + 2 * config.kv_size
    full = shards[0].new_zeros((size, *shards[0].shape[1:]))
    written = torch.zeros(size, dtype=torch.bool)
    for rank, shard in enumerate(shards):
        rows = _qkv_rows(plan, config, rank)
        again = written[rows]
        if bool((full[rows[again]] != shard[again]).any()):
            raise ValueError(f"{name}: rank {rank} holds a KV head copy that differs")
        full[rows] = shard
        written[rows] = True
    if not bool(written.all()):
        raise ValueError(f"{name}: rows no rank holds")
    return full
