"""Run the block-management suite: the state machine on every preset, then the named properties.

Profiles: ``ci`` is deterministic (``derandomize``) and bounded (about 20,000 state-machine steps
per implementation); ``deep`` draws fresh random programs, more and longer ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as Settings
from hypothesis.stateful import get_state_machine_test

from conformance.block_machine import StepCounter, make_block_machine
from conformance.presets import PRESETS, Preset
from conformance.properties import PROPERTIES
from conformance.protocols import BlockManagerFactory

__all__ = ["Profile", "PROFILES", "SuiteResult", "run_machine", "run_property", "run_suite"]


@dataclass(frozen=True)
class Profile:
    """How much to run: examples and steps per state-machine run, examples per property."""

    name: str
    max_examples: int
    step_count: int
    property_examples: int
    derandomize: bool

    def settings(self, max_examples: int | None = None, *, shrink: bool = True) -> Settings:
        """Hypothesis settings of this profile (no example database, no deadline)."""
        phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]
        return Settings(
            max_examples=max_examples or self.max_examples,
            stateful_step_count=self.step_count,
            derandomize=self.derandomize,
            database=None,
            deadline=None,
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
            phases=phases,
        )


PROFILES: dict[str, Profile] = {
    "ci": Profile("ci", max_examples=100, step_count=50, property_examples=60, derandomize=True),
    "deep": Profile(
        "deep", max_examples=1000, step_count=200, property_examples=2000, derandomize=False
    ),
}


@dataclass
class SuiteResult:
    """What a suite run did, for the summary."""

    impl: str
    profile: str
    counter: StepCounter = field(default_factory=StepCounter)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures


def run_machine(
    factory: BlockManagerFactory,
    p: Preset,
    profile: Profile,
    *,
    seed: int | None = None,
    counter: StepCounter | None = None,
    max_examples: int | None = None,
    shrink: bool = True,
) -> None:
    """Run the state machine on preset ``p``; raises on the first (shrunk) failure."""
    machine = make_block_machine(factory, p, counter)
    settings = profile.settings(max_examples, shrink=shrink)
    test = get_state_machine_test(machine, settings=settings)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    test()


def run_property(
    name: str, factory: BlockManagerFactory, profile: Profile, *, seed: int | None = None
) -> None:
    """Run the named property ``name`` (see :mod:`conformance.properties`)."""
    settings = profile.settings(profile.property_examples)
    if seed is not None:
        settings = Settings(settings, derandomize=False)
    PROPERTIES[name](factory, settings)


def run_suite(
    impl: str,
    factory: BlockManagerFactory,
    profile: Profile,
    *,
    steps: int | None = None,
    seed: int | None = None,
    properties: bool = True,
    log: Callable[[str], None] = print,
) -> SuiteResult:
    """The machine on every preset (in rounds until ``steps`` steps ran), then the properties."""
    result = SuiteResult(impl, profile.name)
    start = time.perf_counter()
    examples = None  # the profile's; with ``steps``, rounds sized to reach it in a few rounds
    if steps is not None:
        per_round = len(PRESETS) * profile.step_count
        examples = max(1, min(profile.max_examples, -(-steps // per_round)))
    rnd = 0
    while True:
        for p in PRESETS:
            before = result.counter.steps
            t0 = time.perf_counter()
            run_seed = None if seed is None and rnd == 0 else (seed or 0) + rnd
            try:
                run_machine(
                    factory,
                    p,
                    profile,
                    seed=run_seed,
                    counter=result.counter,
                    max_examples=examples,
                )
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, then the suite fails
                status = f"FAILED: {type(exc).__name__}: {exc}"
                result.failures.append(f"machine[{p.name}] {status}")
            log(
                f"machine {p.name:12s} {result.counter.steps - before:7d} steps "
                f"{time.perf_counter() - t0:6.1f} s  {status}"
            )
        rnd += 1
        if steps is None or result.counter.steps >= steps or result.failures:
            break
    if properties:
        for name in PROPERTIES:
            t0 = time.perf_counter()
            try:
                run_property(name, factory, profile, seed=seed)
                status = "ok"
            except Exception as exc:  # noqa: BLE001
                status = f"FAILED: {type(exc).__name__}: {exc}"
                result.failures.append(f"{name} {status}")
            log(f"property {name:40s} {time.perf_counter() - t0:6.1f} s  {status}")
    result.seconds = time.perf_counter() - start
    return result
