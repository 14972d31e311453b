"""What a conformance check reports: :class:`Report`, :class:`Failure`, and the exceptions.

Imports nothing heavy (no hypothesis, no torch), so ``import conformance`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from conformance.blocks.lockstep import ConformanceError

__all__ = [
    "Status",
    "Failure",
    "Report",
    "ConformanceError",
    "ConformanceFailure",
    "counterexample_of",
]

Status = Literal["passed", "failed", "not run"]


@dataclass(frozen=True)
class Failure:
    """One check that found a divergence.

    Attributes:
        check: which check (``"machine[prefix]"``, a property name, ``"paged_decode"``...).
        message: what differed, as the lockstep or the comparison said it.
        counterexample: the shrunk input that shows it, as a readable script (one call per line
            for the block manager, the request stream for the scheduler, the case for attention).
    """

    check: str
    message: str
    counterexample: str = ""

    def __str__(self) -> str:
        text = f"{self.check}: {self.message}"
        if self.counterexample:
            body = "\n".join(f"    {line}" for line in self.counterexample.splitlines())
            text += f"\n  counterexample:\n{body}"
        return text


@dataclass
class Report:
    """The result of one suite against one implementation.

    ``status`` is ``"passed"`` only when every check ran and none failed; ``"not run"`` (with
    ``reason``) when the suite could not run for this implementation, which is never a pass.
    ``backend`` says what was actually exercised where that can differ from what was asked (the
    attention suite without a GPU checks the torch fallback, not the Triton kernels).
    ``skipped`` lists what was not checked because the implementation cannot express it, with
    the reason (another library's adapter declares its capabilities).
    """

    suite: str
    impl: str
    status: Status = "passed"
    steps: int = 0
    runs: int = 0
    checked: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    seed: int | None = None
    backend: str = ""
    reason: str = ""
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True only for ``status == "passed"``."""
        return self.status == "passed"

    def summary(self) -> str:
        """A few lines for a terminal: status, what ran, and each failure with its script."""
        head = f"{self.suite}: {self.impl} vs spec: {self.status.upper()}"
        if self.status == "not run":
            return f"{head} ({self.reason})"
        seed = "derandomized" if self.seed is None else f"seed {self.seed}"
        parts = [f"{self.steps} steps in {self.runs} runs", f"{len(self.checked)} checks", seed]
        lines = [f"{head}: {', '.join(parts)}, {self.seconds:.1f} s"]
        if self.backend:
            lines.append(f"  backend checked: {self.backend}")
        lines.append(f"  checks: {', '.join(self.checked)}")
        lines.extend(f"  skipped: {what}" for what in self.skipped)
        lines.extend(f"  FAILED {failure}" for failure in self.failures)
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        """Raise :class:`ConformanceFailure` unless the report passed."""
        if not self.ok:
            raise ConformanceFailure(self)


class ConformanceFailure(ConformanceError):
    """A check (``raise_on_failure=True``) did not pass; ``.report`` says what happened."""

    def __init__(self, report: Report) -> None:
        super().__init__(report.summary())
        self.report = report


def counterexample_of(exc: BaseException, prefixes: tuple[str, ...] = ("bm.",)) -> str:
    """The readable script hypothesis attached to ``exc`` (its notes), or "" when none.

    Keeps the lines starting with one of ``prefixes`` (the lockstep logs each block-manager call
    as ``bm.op(args)  # -> spec's outcome``); without such lines, the falsifying example itself.
    """
    notes = [str(n) for n in getattr(exc, "__notes__", [])]
    lines = [line for note in notes for line in note.splitlines()]
    calls = [line for line in lines if line.startswith(prefixes)]
    if calls:
        return "\n".join(calls)
    keep: list[str] = []
    for line in lines:
        if line.startswith("Explanation:"):
            break
        keep.append(line)
    return "\n".join(keep).strip()
