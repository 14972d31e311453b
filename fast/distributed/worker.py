"""A tensor-parallel worker (ranks 1..N-1): a spawned process that holds its shard of the model
and of every KV block, and runs what rank 0 commands, step by step.

It keeps no scheduler, block manager or sampler: the block tables arrive with each step
(:mod:`fast.distributed.protocol`), and the logits go back to rank 0, which samples. It ends on
SHUTDOWN, when the driver's process is gone (its sockets close, or its pid is no longer the
parent), or on its own error, which it reports over its pipe before exiting with status 1.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

import kernels
from fast.distributed.comm import Communicator, make_groups
from fast.distributed.layers import TensorParallelCausalLM, parallelize
from fast.distributed.protocol import HEADER, EngineKit, Op, payload_size, unpack_batch
from fast.distributed.sharding import ShardPlan
from fast.loader.weights import empty_model
from fast.model.config import ModelConfig
from fast.model.llama import allocate_kv_caches

__all__ = ["WorkerSpec", "InjectedFaultError", "worker_main", "Worker"]


class InjectedFaultError(RuntimeError):
    """Raised by a worker told to fail (Op.FAIL: how tests make a rank fail mid-run)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to join the group and build its shard (pickled to the child)."""

    rank: int
    world: int
    store_path: str
    backend: str  # "gloo" or "nccl"
    timeout_s: float
    config: ModelConfig  # the whole model's
    plan: ShardPlan
    dtype: torch.dtype
    device: str  # "cpu" or "cuda:<rank>"
    threads: int  # torch CPU threads
    parent_pid: int
    kit: EngineKit  # the engine's step machinery


def _watch_parent(parent_pid: int) -> None:
    """Exit when the driver's process is gone (re-parented: it died without telling us)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def worker_main(spec: WorkerSpec, conn: Any) -> None:
    """The worker process: report "started", join the groups, receive the shard, report
    "ready", then serve commands. Any error is sent as ("error", "Type: message", traceback)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    torch.set_num_threads(spec.threads)
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), daemon=True).start()
    try:
        conn.send(("started",))
        worker = Worker(spec)
        conn.send(("ready",))
        worker.serve()
    except BaseException as exc:  # report, then leave at once: the sockets close with us
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            conn.close()
        finally:
            os._exit(1)


class Worker:
    """One rank's model shard, KV cache shard and command loop."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        device_group, control = make_groups(
            spec.store_path, spec.rank, spec.world, spec.backend, spec.timeout_s
        )
        self.comm = Communicator(spec.rank, spec.world, device_group, control, spec.timeout_s)
        self.local_config = spec.plan.local_config(spec.config, spec.rank)
        model = empty_model(self.local_config, spec.dtype, "cpu")
        with torch.no_grad():
            for _, param in model.named_parameters():
                self.comm.recv_weight(param.data)
        parallelize(model, spec.plan.vocab_start(spec.rank), self.comm)
        model = model.to(self.device).eval()
        self.model = TensorParallelCausalLM(model, self.comm, spec.config.vocab_size)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cpu_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kit = spec.kit
        self.staging = spec.kit.staging(self.device)
        self.graphs: Any = None
        self.saved: Any = None  # the rollback's KV copies (the engine's save_kv result)
        self.fail_at_forward = False  # Op.FAIL with its second field set (tests)

    def serve(self) -> None:
        """Run commands until SHUTDOWN."""
        with torch.inference_mode():
            while True:
                head = self.comm.command(torch.zeros(HEADER, dtype=torch.int64), idle=True)
                code = int(head[0])
                try:
                    op = Op(code)
                except ValueError:
                    raise ValueError(f"unknown tensor-parallel command {code}") from None
                if op == Op.SHUTDOWN:
                    return
                self.run(op, head)

    def _payload(self, size: int) -> torch.Tensor:
        return self.comm.command(torch.zeros(size, dtype=torch.int64))

    def run(self, op: Op, head: torch.Tensor) -> None:
        """Carry out one command (its payload is read here)."""
        f = [int(x) for x in head[1:]]
        if op == Op.FORWARD:
            batch = unpack_batch(head, self._payload(payload_size(head)), self.kit.batch)
            if self.fail_at_forward:  # rank 0 is about to wait in this step's all-reduce
                raise InjectedFaultError(f"rank {self.spec.rank} was told to fail in a step")
            hidden = None
            if self.graphs is not None and batch.decode:  # as the engine decides on rank 0
                hidden = self.graphs.run(batch)
            if hidden is None:
                ids, pos, ctx, _ = self.staging.upload(batch)
                self.model(ids, pos, ctx, self.kv_caches)
        elif op == Op.LOGITS:
            h = self.spec.config.hidden_size
            self.model.compute_logits(
                torch.empty(f[0], h, dtype=self.spec.dtype, device=self.device)
            )
        elif op == Op.CACHE_OPS:
            pairs = self._payload(2 * (f[0] + f[1] + f[2])).view(-1, 2)  # [P, 2]
            self._cache_ops(pairs[: f[0]], pairs[f[0] : f[0] + f[1]], pairs[f[0] + f[1] :])
        elif op == Op.SAVE_KV:
            blocks = self._payload(f[0]).numpy()  # [E]
            self.saved = self.kit.save_kv(self.kv_caches, blocks, self.device)
        elif op == Op.RESTORE_KV:
            if self.saved is not None:
                self.kit.restore_kv(self.kv_caches, self.saved)
            self.saved = None
        elif op == Op.ALLOCATE:
            dtype, c = self.spec.dtype, self.local_config
            self.kv_caches = allocate_kv_caches(c, f[0], f[2], dtype, self.device)
            self.cpu_caches = allocate_kv_caches(c, f[1], f[2], dtype, "cpu") if f[1] else []
        elif op == Op.GRAPHS:
            self._graphs(f[0], f[1], bool(f[2]), self._payload(f[3]).tolist())
        elif op == Op.FAIL:
            if f[0] == self.spec.rank and f[1]:
                self.fail_at_forward = True
            elif f[0] == self.spec.rank:
                raise InjectedFaultError(f"rank {self.spec.rank} was told to fail")
        else:  # pragma: no cover - every Op is handled above
            raise ValueError(f"unhandled tensor-parallel command {op!r}")

    def _cache_ops(self, swap_out: torch.Tensor, swap_in: torch.Tensor, copy: torch.Tensor) -> None:
        # pairs [P, 2] each; the engine's order: swap out, swap in, copy-on-write copies
        if swap_out.shape[0]:
            for (k, v), (ck, cv) in zip(self.kv_caches, self.cpu_caches):
                kernels.swap_blocks(k, ck, swap_out)
                kernels.swap_blocks(v, cv, swap_out)
        if swap_in.shape[0]:
            for (k, v), (ck, cv) in zip(self.kv_caches, self.cpu_caches):
                kernels.swap_blocks(ck, k, swap_in)
                kernels.swap_blocks(cv, v, swap_in)
        if copy.shape[0]:
            pairs = copy.to(self.device)
            for k, v in self.kv_caches:
                kernels.copy_blocks(k, v, pairs)

    def _graphs(self, max_width: int, limit: int, capture: bool, sizes: list[int]) -> None:
        """The engine's CUDA warm-up and decode-graph capture, in step with rank 0 (the
        all-reduces inside are captured into each rank's graphs)."""
        warm_up, graphs = self.kit.warm_up, self.kit.graphs
        if warm_up is None or graphs is None:
            raise ValueError("a CUDA warm-up was commanded, but the engine gave no CUDA kit")
        warm_up(self.model, self.kv_caches, self.device, max_width, sizes, limit)
        if capture:
            self.graphs = graphs(self.model, self.kv_caches, self.device, max_width, sizes)
