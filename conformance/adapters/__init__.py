"""Adapters: pagedkv's conformance suite pointed at paged-KV caches of other libraries.

:mod:`conformance.adapters.semantic` is the implementation-independent check mode;
:mod:`conformance.adapters.transformers_cb` adapts transformers' continuous-batching cache
allocator; :mod:`conformance.adapters.torch_paged` adapts torch's experimental
``PagedAttention`` (block tables) and runs FlexAttention over its pages (attention);
:mod:`conformance.adapters.vllm_kv` adapts vLLM's v1 ``KVCacheManager``.
Importing this package imports no third-party library: the registries below name modules that
are imported when an adapter is asked for.

The command line reaches them by name: ``python -m conformance --impl transformers-cb``,
``--impl torch-paged`` or ``--impl vllm-kv`` (the semantic block suite), ``--impl torch-flex``
(the attention suite). An adapter whose library is not installed reports "not run".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from conformance.adapters.semantic import (
    Capabilities,
    NoRoom,
    SemanticReport,
    check_semantic,
)

__all__ = [
    "Capabilities",
    "NoRoom",
    "SemanticReport",
    "check_semantic",
    "SEMANTIC_ADAPTERS",
    "ATTENTION_ADAPTERS",
    "semantic_adapter_names",
    "attention_adapter",
    "check_semantic_adapter",
]

#: name -> (module, what it adapts); the module has ``make_factory()`` and ``versions()``
SEMANTIC_ADAPTERS: dict[str, tuple[str, str]] = {
    "transformers-cb": (
        "conformance.adapters.transformers_cb",
        "transformers' continuous-batching FullAttentionCacheAllocator",
    ),
    "torch-paged": (
        "conformance.adapters.torch_paged",
        "torch.nn.attention.experimental PagedAttention (reserve, assign, erase, page table)",
    ),
    "vllm-kv": (
        "conformance.adapters.vllm_kv",
        "vLLM's v1 KVCacheManager (prefix caching, block pool, scheduler protocol)",
    ),
}

#: name -> "module:class" of an attention implementation built with no arguments
ATTENTION_ADAPTERS: dict[str, str] = {
    "torch-flex": "conformance.adapters.torch_paged:TorchFlexAttention",
}


def semantic_adapter_names() -> list[str]:
    """Names of the adapters the semantic block suite runs, sorted."""
    return sorted(SEMANTIC_ADAPTERS)


def attention_adapter(name: str) -> Any:
    """A fresh attention implementation registered in :data:`ATTENTION_ADAPTERS`."""
    module, _, cls = ATTENTION_ADAPTERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def check_semantic_adapter(
    name: str,
    *,
    programs: int = 300,
    shrink_seconds: float = 20.0,
    log: Callable[[str], None] = lambda line: None,
) -> Any:
    """Run the semantic block suite on adapter ``name``; a :class:`conformance.report.Report`.

    The report's steps are the programs run (each a random engine program of up to 40
    operations, checked after every one); ``checked`` counts each property's checks, ``skipped``
    lists what the adapter's capabilities leave out, with the reason. A defect becomes the one
    failure, with the shrunk program (shrinking stops after ``shrink_seconds``).
    """
    from conformance.blocks.runner import shrink_time_limit
    from conformance.report import Failure, Report

    module = importlib.import_module(SEMANTIC_ADAPTERS[name][0])
    try:
        module.versions()
    except ImportError as exc:  # the library is not installed here
        return Report("blocks", name, "not run", reason=f"cannot import the library: {exc}")
    with shrink_time_limit(shrink_seconds):
        result = check_semantic(module.make_factory(), module.versions(), max_examples=programs)
    log(result.summary())
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    report = Report("blocks", name, backend=f"semantic mode: {result.impl} ({versions})")
    report.steps = report.runs = result.programs
    report.checked = [f"{prop} ({n} times)" for prop, n in result.steps.items()]
    report.skipped = [f"{what} ({why})" for what, why in result.skipped.items()]
    report.seconds = result.seconds
    if not result.ok:
        prop, _, message = result.defect.partition(": ")
        report.failures = [Failure(prop, message, result.counterexample)]
        report.status = "failed"
    return report
