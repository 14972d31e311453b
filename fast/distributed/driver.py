"""Rank 0's side of tensor parallelism: start the workers, hand them their shards, and command
each step; the engine (scheduler, block manager, sampler) stays in the user's process.

:class:`TensorParallelDriver` is what :class:`~fast.engine.engine.LLMEngine` holds when
``tensor_parallel_size > 1``. The engine calls it at five points: the step's cache operations
(:meth:`cache_ops`), the step's batch (:meth:`forward`, before rank 0 runs its own shard), the
rollback's KV save and restore (:meth:`save_kv`, :meth:`restore_kv`), and, once, the cache
allocation and CUDA warm-up. Everything else goes through the model it returns
(:attr:`model`), whose collectives the workers join.

Failure: a worker that raised reports its error over its pipe; a collective that fails or times
out on rank 0 looks for that report (or the worker's death) and raises the named
:class:`~fast.distributed.errors.TensorParallelError`, after tearing the group down; every
command first checks that every worker is alive. A group that went down stays down: later calls
raise :class:`~fast.distributed.errors.TensorParallelGroupDownError`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fast.distributed.comm import START_TIMEOUT_S, Communicator, make_groups
from fast.distributed.errors import (
    CollectiveError,
    InvalidTensorParallelSizeError,
    TensorParallelError,
    TensorParallelGroupDownError,
    WorkerDiedError,
    WorkerFailedError,
)
from fast.distributed.layers import TensorParallelCausalLM, parallelize
from fast.distributed.protocol import EngineKit, Op, StepBatch, header, pack_batch
from fast.distributed.sharding import ShardPlan, plan_sharding, shard_parameter
from fast.distributed.spawn import start_ignoring_sigint
from fast.distributed.worker import WorkerSpec, worker_main
from fast.loader import LoadedModel
from fast.loader.weights import empty_model
from fast.model.config import ModelConfig

__all__ = ["TensorParallelDriver", "DEFAULT_TIMEOUT_S"]

#: The default limit of one collective (and of the start-up), in seconds.
DEFAULT_TIMEOUT_S = 300.0

#: How long a failed collective waits for the worker's own report before naming the failure.
_REPORT_WAIT_S = 2.0


#: what a worker that dies before it reports usually means (the spawned child re-imports the
#: user's main module, and a script without the guard starts another LLM there, which fails)
_START_HINT = (
    "it ended while starting: workers are spawned processes that import your main module, so "
    'a script must create the LLM under `if __name__ == "__main__":`'
)


class TensorParallelDriver:
    """Rank 0 of a tensor-parallel group of ``tp_size`` processes.

    Args:
        loaded: the whole model (on the CPU): rank 0 shards it and sends each worker its shard.
        tp_size: the number of ranks (>= 2).
        device: rank 0's device; rank ``r`` uses ``cuda:r`` on CUDA, the CPU otherwise.
        dtype: the model's dtype.
        kit: the engine's step machinery, which the workers run.
        timeout_s: the limit of each collective once started (the start-up's is
            :data:`~fast.distributed.comm.START_TIMEOUT_S`).

    Raises :class:`~fast.distributed.errors.InvalidTensorParallelSizeError` before starting
    anything when the size does not fit the model or the machine.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        tp_size: int,
        device: torch.device,
        dtype: torch.dtype,
        kit: EngineKit,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        config: ModelConfig = loaded.config
        self.plan: ShardPlan = plan_sharding(config, tp_size)
        if multiprocessing.current_process().daemon:  # e.g. serve --engine-process's child
            raise InvalidTensorParallelSizeError(
                tp_size, "a daemon process cannot start worker processes (use 1 here)"
            )
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if tp_size > count or (device.index or 0) != 0:
                raise InvalidTensorParallelSizeError(
                    tp_size, f"needs cuda:0..cuda:{tp_size - 1}; this machine has {count} GPU(s)"
                )
        self.config = config
        self.tp_size = tp_size
        self.device = device
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.kit = kit
        self.local_config = self.plan.local_config(config, 0)
        self._down: TensorParallelError | None = None
        self._dir = tempfile.mkdtemp(prefix="pagedkv-tp-")
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self.comm: Communicator | None = None
        self._forwards = 0  # forwards rank 0 may run on what was sent (-1: any, warm-up)
        try:
            self.model = self._start(loaded)
        except BaseException:
            self.shutdown()
            raise

    # -- start-up ------------------------------------------------------------------------------
    def _start(self, loaded: LoadedModel) -> TensorParallelCausalLM:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        store = os.path.join(self._dir, "store")
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, torch.get_num_threads() // self.tp_size)
        for rank in range(1, self.tp_size):
            spec = WorkerSpec(
                rank,
                self.tp_size,
                store,
                backend,
                self.timeout_s,
                self.config,
                self.plan,
                self.dtype,
                f"cuda:{rank}" if self.device.type == "cuda" else "cpu",
                threads,
                os.getpid(),
                self.kit,
            )
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(spec, child), name=f"pagedkv-tp{rank}", daemon=True
            )
            start_ignoring_sigint(proc)  # a Ctrl-C is the driver's; workers go with it
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self._await("started")
        device_group, control = make_groups(store, 0, self.tp_size, backend, self.timeout_s)
        self.comm = Communicator(0, self.tp_size, device_group, control, self.timeout_s)
        self.comm.on_error = _weak_on_error(self)
        full = loaded.model
        local = empty_model(self.local_config, self.dtype, "cpu")
        local_params = dict(local.named_parameters())
        with torch.no_grad():
            for name, param in full.named_parameters():
                whole = param.detach().to("cpu", self.dtype)
                mine = shard_parameter(self.plan, self.config, 0, name, whole)
                local_params[name].data.copy_(mine)
                for rank in range(1, self.tp_size):
                    shard = shard_parameter(self.plan, self.config, rank, name, whole)
                    self.comm.send_weight(shard, rank)
        self._await("ready")
        parallelize(local, 0, self.comm)
        local = local.to(self.device).eval()
        # weakly: the driver is freed (and stops its workers) with the engine that holds it
        return TensorParallelCausalLM(local, self.comm, self.config.vocab_size, weakref.proxy(self))

    def _await(self, what: str) -> None:
        """Wait until every worker reported ``what`` (liveness checked while waiting)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
            while not conn.poll(0.05):
                if not proc.is_alive():
                    raise self._worker_error(rank, proc, conn) or WorkerDiedError(
                        rank, proc.exitcode, _START_HINT
                    )
                if time.monotonic() > deadline:
                    raise CollectiveError(f"start-up ({what})", START_TIMEOUT_S, f"rank {rank}")
            try:
                message = conn.recv()
            except (EOFError, OSError):  # it ended before saying anything
                proc.join(_REPORT_WAIT_S)
                raise WorkerDiedError(rank, proc.exitcode, _START_HINT) from None
            if message[0] != what:
                raise self._message_error(rank, message)

    # -- the engine's hooks ----------------------------------------------------------------
    def forward(self, batch: StepBatch) -> None:
        """Send the step's batch; the workers run their shard's forward on it."""
        head, payload = pack_batch(batch)
        self._command(head, payload)
        self._forwards = 1

    def cache_ops(
        self,
        swap_out: Sequence[tuple[int, int]],
        swap_in: Sequence[tuple[int, int]],
        copy: Sequence[tuple[int, int]],
    ) -> None:
        """The step's swaps and copy-on-write copies, applied to every worker's shard."""
        if not (swap_out or swap_in or copy):
            return
        pairs = [p for group in (swap_out, swap_in, copy) for p in group]
        payload = torch.tensor(pairs, dtype=torch.int64).reshape(-1)  # [2P]
        self._command(header(Op.CACHE_OPS, len(swap_out), len(swap_in), len(copy)), payload)

    def save_kv(self, blocks: torch.Tensor | np.ndarray) -> None:
        """Each worker keeps a copy of ``blocks``' KV (the step's rollback)."""
        index = torch.as_tensor(np.asarray(blocks, dtype=np.int64).reshape(-1))
        self._command(header(Op.SAVE_KV, int(index.shape[0])), index)

    def restore_kv(self) -> None:
        """Each worker writes its saved KV back (a rolled-back step); nothing when down."""
        if self._down is None:
            self._command(header(Op.RESTORE_KV))

    def allocate(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int) -> None:
        """Each worker allocates its KV shard of the same pools as rank 0's."""
        self._command(header(Op.ALLOCATE, num_gpu_blocks, num_cpu_blocks, block_size))

    def prepare_cuda(self, max_width: int, limit: int, capture: bool, sizes: list[int]) -> None:
        """Each worker warms up (and captures decode graphs) as rank 0 is about to."""
        payload = torch.tensor(sizes, dtype=torch.int64)
        self._command(header(Op.GRAPHS, max_width, limit, int(capture), len(sizes)), payload)
        self._forwards = -1  # rank 0's own warm-up and capture follow

    def inject_failure(self, rank: int, *, in_step: bool = False) -> None:
        """Tell worker ``rank`` to raise (tests: a rank failing mid-run): now, or
        (``in_step``) when the next step's batch reaches it, while rank 0 is in that step's
        collectives. The error comes out of the next command or collective."""
        self._command(header(Op.FAIL, rank, int(in_step)))

    # -- the sharded model's hooks (fast.distributed.layers.DriverHooks) ----------------------
    def before_logits(self, rows: int) -> None:
        """The workers join the LM head's collectives for ``rows`` hidden rows."""
        forwards = self._forwards
        self._command(header(Op.LOGITS, rows))
        self._forwards = forwards  # the step's logits (prompt logprobs: several) keep it

    def before_forward(self) -> None:
        """Rank 0 is about to run a forward: the workers must have been sent it. (A worker's
        failure is found by the forward's collectives, which wait for its report.)"""
        if self._down is not None:
            raise self._down_again()
        if self._forwards == 0:
            raise TensorParallelError(
                "rank 0 ran a forward that was not sent to the workers: under tensor "
                "parallelism only the engine's step runs the model (not beam search)",
                0,
            )
        if self._forwards > 0:
            self._forwards -= 1

    def local_error(self, exc: BaseException) -> None:
        """Rank 0 raised inside a forward or the LM head (not in a collective): the workers
        are left waiting in collectives rank 0 will not join, so the group goes down now
        (rather than at the next command's timeout); ``exc`` propagates to the caller."""
        if self._down is None:
            self._go_down(
                TensorParallelError(
                    f"rank 0 failed inside a step ({type(exc).__name__}: {exc}); the workers "
                    "were left in its collectives",
                    0,
                )
            )

    # -- commands and failures ---------------------------------------------------------------
    def _command(self, head: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        self._check()
        self._forwards = 0
        comm = self.comm
        assert comm is not None
        comm.command(head)
        if payload is not None and payload.numel():
            comm.command(payload)

    def _down_again(self) -> TensorParallelGroupDownError:
        """The error of a call after the group went down: the original reason, once (a group
        shut down or already reported down keeps its reason instead of wrapping it again)."""
        down = self._down
        assert down is not None
        if isinstance(down, TensorParallelGroupDownError):
            return TensorParallelGroupDownError(down.reason, down.rank)
        return TensorParallelGroupDownError(str(down), down.rank)

    def _check(self) -> None:
        """Raise if the group is down, or any worker reported an error or died (which takes
        the group down)."""
        if self._down is not None:
            raise self._down_again()
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
            error = self._worker_error(rank, proc, conn)
            if error is not None:
                raise self._go_down(error)

    def _on_error(self, operation: str, exc: BaseException) -> BaseException:
        """A collective failed on rank 0: name the rank that caused it, and go down."""
        if self._down is not None:
            return self._down_again()
        deadline = time.monotonic() + _REPORT_WAIT_S
        while True:
            for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
                error = self._worker_error(rank, proc, conn)
                if error is not None:
                    return self._go_down(error)
            if time.monotonic() > deadline:
                return self._go_down(CollectiveError(operation, self.timeout_s, str(exc)))
            time.sleep(0.05)

    def _worker_error(self, rank: int, proc: Any, conn: Any) -> TensorParallelError | None:
        """The error worker ``rank`` reported, else its death, else None (alive and silent;
        a late "ready" of the start-up is skipped)."""
        alive = proc.is_alive()
        try:
            while conn.poll(0 if alive else 0.5):
                message = conn.recv()
                if message[0] == "error":
                    return self._message_error(rank, message)
        except (EOFError, OSError):
            pass
        if alive:
            return None
        proc.join(1.0)
        return WorkerDiedError(rank, proc.exitcode)

    @staticmethod
    def _message_error(rank: int, message: Any) -> TensorParallelError:
        if message and message[0] == "error":
            return WorkerFailedError(rank, message[1], message[2])
        return WorkerFailedError(rank, f"unexpected message {message!r}")

    def _go_down(self, error: TensorParallelError) -> TensorParallelError:
        self._down = error
        self._stop_workers(graceful=False)
        return error

    # -- teardown ----------------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """The process ids of ranks 1..N-1 (empty once the group is down)."""
        return [int(p.pid) for p in self._procs]

    @property
    def is_down(self) -> bool:
        """Whether the group failed or was shut down."""
        return self._down is not None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (SHUTDOWN, then kill what is left) and free the group
        (idempotent)."""
        graceful = self._down is None and self.comm is not None
        if self._down is None:
            self._down = TensorParallelGroupDownError("shut down")
        self._stop_workers(graceful, timeout)

    def _stop_workers(self, graceful: bool, timeout: float = 10.0) -> None:
        if graceful and self.comm is not None and all(p.is_alive() for p in self._procs):
            try:
                self.comm.on_error = None
                self.comm.command(header(Op.SHUTDOWN))
            except Exception:  # noqa: BLE001 - the workers are killed below anyway
                pass
        deadline = time.monotonic() + (timeout if graceful else 0.0)
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if self.comm is not None:
            for group in (self.comm.device, self.comm.control):
                try:
                    group.shutdown()
                except Exception:  # noqa: BLE001 - best effort: the peers are gone
                    pass
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.shutdown(timeout=1.0)
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _weak_on_error(
    driver: TensorParallelDriver,
) -> Callable[[str, BaseException], BaseException]:
    """``driver._on_error`` without keeping the driver alive (no reference cycle through its
    communicator)."""
    method = weakref.WeakMethod(driver._on_error)

    def on_error(operation: str, exc: BaseException) -> BaseException:
        bound = method()
        return exc if bound is None else bound(operation, exc)

    return on_error
