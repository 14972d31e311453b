"""The process groups of one tensor-parallel run, and the collectives over them.

Two groups over one rendezvous store (a file in a private temporary directory, so no port can
collide and several runs can live in one process):

* ``device``: the model's collectives (all-reduce of the row-parallel outputs and the
  embedding, the hidden states for the LM head, the logits gathered to rank 0): NCCL on CUDA,
  gloo on the CPU, every call bounded by ``timeout_s``.
* ``control``: gloo on the CPU, rank 0's commands to the workers (a fixed-size header and an
  int64 payload). A worker waits here between steps, as long as the user leaves the engine
  idle, so its timeout is long; a driver that dies closes the sockets, which ends the wait.

The groups are backend objects (``ProcessGroupGloo`` / ``ProcessGroupNCCL``) built from the
store, not ``torch.distributed``'s process-wide default group: nothing global is set, and two
engines with tensor parallelism can run in one process (tests do).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import FileStore, PrefixStore

__all__ = ["Communicator", "IDLE_TIMEOUT_S", "START_TIMEOUT_S", "make_groups"]

#: How long a worker waits for the driver's next command (a week: an idle engine is fine).
IDLE_TIMEOUT_S = 7 * 24 * 3600.0

#: The limit of the start-up: spawn and imports, joining the groups, each weight's transfer.
START_TIMEOUT_S = 600.0


def make_groups(
    store_path: str, rank: int, world: int, backend: str, timeout_s: float
) -> tuple[Any, Any]:
    """(device group, control group) of this rank; blocks until every rank has joined (at most
    :data:`START_TIMEOUT_S`). ``timeout_s`` bounds each collective of the device group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = FileStore(store_path, world)
    store.set_timeout(datetime.timedelta(seconds=START_TIMEOUT_S))
    control = dist.ProcessGroupGloo(
        PrefixStore("control", store), rank, world, datetime.timedelta(seconds=IDLE_TIMEOUT_S)
    )
    device: Any
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout  # the watchdog aborts a collective stuck past it
        device = dist.ProcessGroupNCCL(PrefixStore("device", store), rank, world, options)
    else:
        device = dist.ProcessGroupGloo(PrefixStore("device", store), rank, world, timeout)
    return device, control


class Communicator:
    """One rank's collectives. Every failure goes through ``on_error``, which returns the
    exception to raise (the driver turns it into a named
    :class:`~fast.distributed.errors.TensorParallelError` and tears the group down; a worker
    re-raises it and reports).

    Args:
        rank, world: this rank and the group size.
        device, control: the groups of :func:`make_groups`.
        timeout_s: the limit of every device collective (NCCL: its group's own timeout).
        on_error: ``(operation, exception) -> exception to raise``.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        device: Any,
        control: Any,
        timeout_s: float,
        on_error: Callable[[str, BaseException], BaseException] | None = None,
    ) -> None:
        self.rank = rank
        self.world = world
        self.device = device
        self.control = control
        self.timeout_s = timeout_s
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._idle = datetime.timedelta(seconds=IDLE_TIMEOUT_S)
        self._start = datetime.timedelta(seconds=START_TIMEOUT_S)
        self._nccl = not isinstance(device, dist.ProcessGroupGloo)
        self.on_error = on_error

    def _fail(self, operation: str, exc: BaseException) -> BaseException:
        return exc if self.on_error is None else self.on_error(operation, exc)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x`` (the same on every rank)."""
        try:
            if self._nccl:
                self.device.allreduce([x]).wait()
            else:
                self.device.allreduce([x], dist.ReduceOp.SUM, self._timeout).wait()
        except Exception as exc:
            raise self._fail("all_reduce", exc) from exc
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (device group); returns ``x``."""
        try:
            if self._nccl:
                self.device.broadcast([x]).wait()
            else:
                self.device.broadcast(x, 0, self._timeout).wait()
        except Exception as exc:
            raise self._fail("broadcast", exc) from exc
        return x

    def gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x`` on rank 0, in rank order (an empty list on the others)."""
        out = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else []
        try:
            if self._nccl:  # NCCL gather as all-gather: every rank gets the list
                out = [torch.empty_like(x) for _ in range(self.world)]
                self.device.allgather([out], [x]).wait()
                return out if self.rank == 0 else []
            self.device.gather(out, x, 0, self._timeout).wait()
        except Exception as exc:
            raise self._fail("gather", exc) from exc
        return out

    def command(self, x: torch.Tensor, *, idle: bool = False) -> torch.Tensor:
        """Rank 0's CPU int64 ``x`` into every rank's ``x`` over the control group. ``idle``:
        a worker waiting for the next command (the long timeout)."""
        try:
            self.control.broadcast(x, 0, self._idle if idle else self._timeout).wait()
        except Exception as exc:
            raise self._fail("command", exc) from exc
        return x

    def send_weight(self, x: torch.Tensor, dst: int) -> None:
        """Rank 0 sends the CPU tensor ``x`` to rank ``dst`` (control group)."""
        try:
            self.control.send([x.contiguous()], dst, 0).wait(self._start)
        except Exception as exc:
            raise self._fail("send_weight", exc) from exc

    def recv_weight(self, x: torch.Tensor) -> None:
        """A worker receives rank 0's tensor into the CPU tensor ``x``."""
        try:
            self.control.recv([x], 0, 0).wait(self._start)
        except Exception as exc:
            raise self._fail("recv_weight", exc) from exc
