"""Launching a Triton kernel without paying Triton's per-call binding again.

``kernel[grid](*args, **constexprs)`` goes through Triton's JIT entry point on every call: it
binds the arguments, reads its option knobs from the environment, turns the whole option set
into a string to find the cache key, checks the kernel's global constants and only then calls
the launcher. For a kernel with many compile-time parameters that is tens of microseconds of
host time per call, several times the device time of a short decode
(``benchmarks/gpu_decode_host.py`` on the H200 machine at 34d9b93: an eager B = 1 decode call,
two launches, took 111.0 us through the entry point and 63.6 us launched as below).

:class:`FastLaunch` keeps, per specialization, the compiled kernel that the JIT entry point
returned the first time, and launches it directly afterwards. The specialization key holds at
least everything Triton specializes a compiled kernel on, so a kernel compiled for one class of
arguments is never launched with another:

* a tensor: its dtype and whether its address is a multiple of 16 (Triton assumes 16-byte
  alignment in the compiled code when it was);
* an int: whether it is a multiple of 16, whether it equals 1, whether it fits in 32 bits,
  whether it reaches 2^63 (Triton's i32, i64 and u64);
* a float: nothing (floats are never specialized);
* everything else (the compile-time parameters, the launch options): its value;
* the current CUDA device when the first tensor is on CUDA (Triton keys its cache on it and
  loads a compiled kernel into the context current at its first launch).

A key seen for the first time goes through the JIT entry point, which compiles (or finds) the
kernel and launches it; what it returns is kept. Under Triton's CPU interpreter the entry point
returns nothing to keep, so every call takes it: the interpreter path is unchanged.

The kept kernels are a memo of a pure function (the key determines the compiled kernel), like
Triton's own cache, which they index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

__all__ = ["FastLaunch", "specialization_key"]

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def _arg_key(arg: object) -> object:
    """The part of the key for one run-time argument (see the module docstring)."""
    kind = type(arg)
    if kind is int:  # Triton's classes: i32, i64, u64 (from 2^63); 16 | arg; arg == 1
        n = cast(int, arg)
        return ("i", n % 16 == 0, n == 1, _I32_MIN <= n <= _I32_MAX, n < 2**63)
    if kind is float:
        return "f"
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool):  # before int: bool is an int
        return ("b", arg)
    if isinstance(arg, int):  # an int subclass
        return _arg_key(int(arg))
    if isinstance(arg, float):
        return "f"
    return ("v", arg)


def specialization_key(
    args: tuple[object, ...], constants: tuple[object, ...]
) -> tuple[object, ...]:
    """The key :class:`FastLaunch` files a compiled kernel under: the current CUDA device when
    the first tensor is a CUDA one (Triton loads a compiled kernel into the context of the
    device current at its first launch), each run-time argument's class, the constants.

    >>> a = torch.zeros(8, dtype=torch.float32)
    >>> specialization_key((a, 32, 1.5), (64,)) == specialization_key((a, 48, 0.5), (64,))
    True
    >>> specialization_key((a, 32), (64,)) == specialization_key((a, 33), (64,))
    False
    >>> specialization_key((a,), ()) == specialization_key((a[1:],), ())  # 4 bytes off
    False
    """
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device = torch.cuda.current_device() if first is not None and first.is_cuda else None
    return (device, tuple([_arg_key(a) for a in args]), constants)


class FastLaunch:
    """A ``@triton.jit`` kernel, launched through the compiled kernel kept for its
    specialization (the module docstring says why and when that is safe).

    ``launch = FastLaunch(kernel)``, then ``launch(grid, *args, constexprs..., options...)``
    where ``grid`` is a 3-tuple of ints (no callable, no shorter tuple: the direct launch
    unpacks three) and ``args`` are the kernel's run-time
    arguments in order; the keyword arguments name every remaining parameter of the kernel
    (its compile-time parameters; a call site that names them in another order files its
    kernels under other keys) and Triton's launch options (``num_warps``,
    ``num_stages``, ``maxnreg``...), as for ``kernel[grid](...)``.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.arg_names: tuple[str, ...] = tuple(kernel.arg_names)
        params = getattr(kernel, "params", None)  # a JITFunction's (not the interpreter's)
        #: how many leading parameters are run-time ones (the rest are compile-time)
        self.run_time: int | None = None
        if params is not None:
            flags = [bool(p.is_constexpr) for p in params]
            self.run_time = flags.index(True) if True in flags else len(flags)
            if not all(flags[self.run_time :]):
                raise ValueError(
                    f"{kernel.__name__}: FastLaunch needs the run-time parameters first "
                    f"(compile-time flags in order: {flags})"
                )
        #: specialization key -> the compiled kernel Triton returned for it
        self.compiled: dict[tuple[object, ...], Any] = {}
        #: calls that went through Triton's JIT entry point (first sight of a key, interpreter)
        self.jit_calls = 0

    def __call__(self, grid: tuple[int, int, int], *args: object, **kwargs: object) -> None:
        names = self.arg_names[len(args) :]
        key = specialization_key(args, tuple(kwargs.items()))
        kept = self.compiled.get(key)
        if kept is None:
            if not (isinstance(grid, tuple) and len(grid) == 3):
                raise TypeError(f"{self.kernel.__name__}: grid must be a 3-tuple, got {grid!r}")
            self._check_call(len(args), names, kwargs)  # a hit repeats a checked pattern
            self.jit_calls += 1
            compiled = self.kernel[grid](*args, **kwargs)
            if _launchable(compiled):
                self.compiled[key] = _Kept.of(compiled, key[0])
            return
        kept.launch(grid, args, tuple([kwargs[n] for n in names]))

    def _check_call(
        self, positional: int, names: tuple[str, ...], kwargs: dict[str, object]
    ) -> None:
        """Every parameter given; run-time ones positionally (they are keyed by class), compile-
        time ones by keyword (they are keyed by value)."""
        name = self.kernel.__name__
        missing = [n for n in names if n not in kwargs]
        if missing:
            raise TypeError(f"{name}: missing kernel arguments {missing}")
        if self.run_time is not None and positional != self.run_time:
            raise TypeError(
                f"{name}: {positional} positional arguments, expected the {self.run_time} "
                f"run-time ones {list(self.arg_names[: self.run_time])} (compile-time ones by "
                "keyword)"
            )


class _Kept:
    """A compiled kernel and what its launcher needs, read once: Triton's runner
    (``compiled[grid]``) looks up the device, the stream and the launch hooks on every call;
    this keeps the launcher, the function handle, the packed metadata and the stream getter,
    and goes through the runner while a launch hook is set (a profiler's), and always when this
    Triton's compiled kernel lacks those attributes or the tensors are not on CUDA."""

    def __init__(self, compiled: Any, direct: tuple[Any, ...] | None, device: int | None):
        self.compiled = compiled
        self.direct = direct  # (launcher, function, packed metadata, stream getter) or None
        self.device = device

    @staticmethod
    def of(compiled: Any, device: object) -> _Kept:
        try:
            from triton.runtime.driver import driver

            compiled._init_handles()
            direct = (
                compiled.run,
                compiled.function,
                compiled.packed_metadata,
                driver.active.get_current_stream,
            )
        except (AttributeError, ImportError):  # another Triton: its runner does it all
            direct = None
        return _Kept(compiled, direct, device if isinstance(device, int) else None)

    def launch(
        self, grid: tuple[int, int, int], args: tuple[object, ...], constants: tuple[object, ...]
    ) -> None:
        import triton

        hooks = triton.knobs.runtime
        if (
            self.direct is None
            or self.device is None
            or _hook_set(hooks.launch_enter_hook)
            or _hook_set(hooks.launch_exit_hook)
        ):
            runner: Callable[..., None] = self.compiled[grid]
            runner(*args, *constants)
            return
        run, function, packed, stream = self.direct
        g0, g1, g2 = grid
        run(g0, g1, g2, stream(self.device), function, packed, None, None, None, *args, *constants)


def _hook_set(hook: object) -> bool:
    """Whether a Triton launch hook is set: Triton 3.6 keeps None when none is, later versions
    a chain of hooks (``HookChain``) whose ``calls`` may be empty."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _launchable(compiled: object) -> bool:
    """Whether the JIT entry point returned a compiled kernel that can be launched directly
    (not under the interpreter, which returns None)."""
    return compiled is not None and callable(getattr(compiled, "__getitem__", None))
