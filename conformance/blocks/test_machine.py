"""The block-management state machine against every registered implementation (CI profile).

``pytest --pyargs conformance`` runs this module. The fast implementation gets the full CI
budget (about 20,000 steps over the presets); the spec against itself, a smaller one (it tests
the harness, not the spec).
"""

from __future__ import annotations

import pytest

from conformance.blocks.machine import StepCounter
from conformance.blocks.presets import PRESETS, Preset
from conformance.blocks.runner import PROFILES, run_machine
from conformance.registry import block_manager_factory, block_manager_names

#: examples per preset; ``None`` = the CI profile's budget
_EXAMPLES = {"spec": 15}


@pytest.mark.parametrize("p", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("impl", block_manager_names())
def test_block_machine(impl: str, p: Preset) -> None:
    counter = StepCounter()
    examples = _EXAMPLES.get(impl)
    run_machine(
        block_manager_factory(impl), p, PROFILES["ci"], counter=counter, max_examples=examples
    )
    want_runs = examples or PROFILES["ci"].max_examples
    assert counter.runs >= want_runs
    assert counter.steps >= 30 * want_runs  # most runs reach the step limit (50)
    assert counter.ops.get("allocate", 0) > 0 and counter.ops.get("free", 0) > 0
