"""Count Triton compilations: the check that warm-up compiled every kernel variant a run meets.

Triton compiles a ``@triton.jit`` kernel once per *specialization*: its compile-time
(``tl.constexpr``) arguments, the dtypes of its tensors, and, for integer and pointer arguments,
whether a value is 1 or divisible by 16. A variant first met in the middle of a run stops the
engine for a compilation (hundreds of milliseconds to seconds on a GPU). :class:`CompileWatch`
installs Triton's post-compile hook for the duration of a ``with`` block and records every kernel
compiled inside it, so a benchmark or test can require that none was.

>>> with CompileWatch() as watch:
...     pass
>>> watch.count, watch.kernels
(0, [])

The hook is process-wide (Triton has one); the watch chains to whatever hook was installed before
it and restores that hook on exit, so watches nest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from spec.errors import PagedKVError

__all__ = ["CompileWatch", "CompiledAfterWarmUpError"]


class CompiledAfterWarmUpError(PagedKVError):
    """Triton compiled kernels after warm-up; ``kernels`` names each variant compiled."""

    def __init__(self, kernels: list[str]) -> None:
        shown = "; ".join(kernels[:4]) + (
            f"; ... {len(kernels) - 4} more" if len(kernels) > 4 else ""
        )
        super().__init__(f"{len(kernels)} Triton compilation(s) after warm-up: {shown}")
        self.kernels = kernels


@dataclass
class CompileWatch:
    """A context manager recording Triton compilations (``kernels``: one repr per variant)."""

    kernels: list[str] = field(default_factory=list)
    _previous: Any = None
    _knobs: Any = None

    @property
    def count(self) -> int:
        """How many kernel variants were compiled inside the ``with`` block."""
        return len(self.kernels)

    def __enter__(self) -> CompileWatch:
        try:
            from triton import knobs
        except ImportError:  # no Triton (or one without knobs, < 3.4): nothing can compile
            return self
        self._knobs = knobs.runtime
        self._previous = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = self._hook
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._knobs is not None:
            self._knobs.jit_post_compile_hook = self._previous
            self._knobs = None

    def _hook(self, **kwargs: Any) -> bool | None:
        # the kernel and its launch options, then the specialization (which arguments Triton
        # saw as 16-byte aligned / divisible by 16): what tells two variants of a kernel apart
        info = kwargs.get("compile")
        configs = info.get("configs") if isinstance(info, dict) else None
        shown = str(kwargs.get("repr", kwargs.get("key", "?")))
        self.kernels.append(shown if configs is None else f"{shown} {configs}")
        if self._previous is not None:
            result: bool | None = self._previous(**kwargs)
            return result
        return None

    def check(self) -> None:
        """Raise :class:`CompiledAfterWarmUpError` if any kernel was compiled."""
        if self.kernels:
            raise CompiledAfterWarmUpError(list(self.kernels))
