"""Tensor parallelism over ``torch.distributed`` (docs/tensor-parallel.md).

``LLM(..., tensor_parallel_size=N)`` runs the model on N processes: rank 0 is the user's
process, with the engine (scheduler, block manager, sampler) and its shard of the model and of
every KV block; ranks 1..N-1 are spawned workers that run their shards on each step rank 0 sends.

* :mod:`fast.distributed.sharding`: which rows and columns of each weight a rank holds, and the
  KV-head replication rule;
* :mod:`fast.distributed.layers`: the row-parallel projections, the vocabulary-parallel
  embedding, the sharded model with its gathered logits;
* :mod:`fast.distributed.comm`: the process groups (with timeouts) and the collectives;
* :mod:`fast.distributed.protocol`: rank 0's commands (a step's batch, cache operations...);
* :mod:`fast.distributed.worker` and :mod:`fast.distributed.driver`: the two sides;
* :mod:`fast.distributed.errors`: the named errors;
* :mod:`fast.distributed.spawn`: starting children with SIGINT ignored (the workers, and the
  server's engine process).

The submodules import torch; this package module does not.
"""

from __future__ import annotations

__all__: list[str] = []
