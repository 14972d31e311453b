"""The optimized implementation of pagedkv: block manager, engine, models, API and CLI.

``from fast import LLM, SamplingParams`` is the user's entry point. The names are resolved on
first use, so ``import fast`` stays cheap (torch is not imported until they are needed).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "LLMEngine",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
]

_WHERE = {
    "LLM": "fast.api.llm",
    "LLMEngine": "fast.engine.engine",
    "SamplingParams": "fast.engine.sampling_params",
    "RequestOutputKind": "fast.engine.sampling_params",
    "RequestOutput": "fast.engine.outputs",
    "CompletionOutput": "fast.engine.outputs",
    "BeamSearchParams": "fast.engine.beam_params",
    "BeamSearchOutput": "fast.engine.beam_params",
    "BeamSearchSequence": "fast.engine.beam_params",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
