"""Each named property catches the mutant planted for its bug class (and passes on fast)."""

from __future__ import annotations

import pytest
from hypothesis import Phase, settings

from conformance.lockstep import ConformanceError
from conformance.mutants import MUTANTS, mutant_factory
from conformance.presets import preset
from conformance.properties import PROPERTIES, default_settings
from conformance.registry import block_manager_factory
from conformance.runner import PROFILES, run_machine


def _search(max_examples: int) -> settings:
    # no shrinking: finding the bug is what is tested, the minimal script is not needed here
    return settings(
        default_settings(max_examples), phases=[Phase.explicit, Phase.reuse, Phase.generate]
    )


def test_every_property_has_a_mutant() -> None:
    assert set(MUTANTS) == set(PROPERTIES)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_property_catches_its_mutant(name: str) -> None:
    with pytest.raises(ConformanceError):
        PROPERTIES[name](mutant_factory(name), _search(300))


# The general state machine finds these mutants too. Not the other two: hash collisions are
# only planted by their named property, and a stale index entry only bites when an evicted
# block's old prompt comes back while the block holds other tokens, which the tiny-pool
# allocate/free churn of ``evicted_block_not_in_hash_index`` reaches and the machine's mix
# of operations does not reach within the CI budget.
MACHINE_CATCHES = {
    "touch_before_allocate": "prefix_swap",
    "fork_free_refcounts_under_beam_search": "prefix_swap",
    "swap_in_reserves_append_capacity": "prefix_swap",
    "no_blocks_leaked_on_abort": "prefix_swap",
}


@pytest.mark.parametrize("name", sorted(MACHINE_CATCHES))
def test_mutant_is_caught_by_the_state_machine_too(name: str) -> None:
    with pytest.raises(ConformanceError):
        run_machine(
            mutant_factory(name), preset(MACHINE_CATCHES[name]), PROFILES["ci"], shrink=False
        )


def test_fast_passes_the_mutant_settings() -> None:
    """The same search that finds each mutant finds nothing on the real fast manager."""
    for name in sorted(PROPERTIES):
        PROPERTIES[name](block_manager_factory("fast"), _search(30))
