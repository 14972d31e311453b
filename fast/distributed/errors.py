"""The errors of tensor parallelism: a refused size, and a process group that went down.

Every one is a :class:`~spec.errors.PagedKVError` carrying its numbers as attributes. A group
that went down stays down: each later call raises :class:`TensorParallelGroupDownError` naming
the first failure, never a hang.
"""

from __future__ import annotations

from spec.errors import InvalidArgumentError, PagedKVError

__all__ = [
    "InvalidTensorParallelSizeError",
    "TensorParallelError",
    "WorkerFailedError",
    "WorkerDiedError",
    "CollectiveError",
    "TensorParallelGroupDownError",
    "UnshardableWeightError",
]


class InvalidTensorParallelSizeError(InvalidArgumentError):
    """``tensor_parallel_size`` is not a positive int, does not divide the model's query heads,
    or asks for more CUDA devices than the machine has. ``value`` is the size asked for."""

    def __init__(self, value: object, reason: str) -> None:
        super().__init__("tensor_parallel_size", value, reason)


class TensorParallelError(PagedKVError, RuntimeError):
    """The tensor-parallel group failed; the group is torn down. ``rank`` is the rank at fault
    (None when it cannot be told)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class WorkerFailedError(TensorParallelError):
    """A worker raised: ``error`` is its exception as ``Type: message``, ``traceback`` its
    traceback text (both from the worker)."""

    def __init__(self, rank: int, error: str, traceback: str = "") -> None:
        super().__init__(f"tensor-parallel rank {rank} failed: {error}", rank)
        self.error = error
        self.traceback = traceback


class WorkerDiedError(TensorParallelError):
    """A worker process ended without reporting an error (killed, out of memory...):
    ``exitcode`` is its exit code (negative: the signal that ended it)."""

    def __init__(self, rank: int, exitcode: int | None, hint: str = "") -> None:
        message = f"tensor-parallel rank {rank} died (exit code {exitcode})"
        super().__init__(f"{message}; {hint}" if hint else message, rank)
        self.exitcode = exitcode


class CollectiveError(TensorParallelError):
    """A collective failed or timed out on the driver (rank 0) with every worker still alive
    and silent: ``operation`` names it, ``timeout_s`` is the limit it ran under."""

    def __init__(self, operation: str, timeout_s: float, cause: str) -> None:
        super().__init__(
            f"tensor-parallel {operation} failed (timeout {timeout_s:g} s): {cause}", None
        )
        self.operation = operation
        self.timeout_s = timeout_s


class TensorParallelGroupDownError(TensorParallelError):
    """The group was shut down or failed before this call: ``reason`` says which."""

    def __init__(self, reason: str, rank: int | None = None) -> None:
        super().__init__(f"the tensor-parallel group is down: {reason}", rank)
        self.reason = reason


class UnshardableWeightError(PagedKVError, ValueError):
    """A model parameter has no sharding rule (an architecture tensor parallelism does not know
    yet): ``name`` is the parameter."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no tensor-parallel sharding rule for parameter {name!r}")
        self.name = name
