"""Random beam-search traces against every registered block manager (CI budget: a few s each)."""

from __future__ import annotations

import pytest

from conformance.blocks.beam import beam_search_traces
from conformance.blocks.runner import PROFILES, ci_seed
from conformance.registry import block_manager_factory, block_manager_names

#: Examples per implementation: about 5 s each on the 2-core CI machine.
EXAMPLES = 40


@pytest.mark.parametrize("impl", block_manager_names())
def test_beam_search_traces(impl: str) -> None:
    settings = PROFILES["ci"].settings(EXAMPLES)
    beam_search_traces(block_manager_factory(impl), settings, seed=ci_seed())
