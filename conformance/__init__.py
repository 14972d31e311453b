"""The conformance suite: the spec is the model, the implementation under test is a parameter.

Three checks, one per concept, each returning a :class:`Report` (and raising
:class:`ConformanceFailure` with ``raise_on_failure=True``)::

    check_block_manager(factory)   # factory(BlockManagerConfig, **kw) -> BlockManagerImpl
    check_scheduler(factory)       # factory(SchedulerConfig, BlockManagerConfig) -> SchedulerImpl
    check_attention(impl)          # impl: AttentionImpl (paged_decode, paged_prefill)

``import conformance`` is cheap: the names below are imported on first use (hypothesis when a
check runs, torch only for the attention suite). The command line is ``python -m conformance``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conformance.api import check_attention, check_block_manager, check_scheduler
    from conformance.attention.impl import AttentionImpl
    from conformance.blocks.lockstep import ConformanceError
    from conformance.protocols import BlockManagerFactory, BlockManagerImpl
    from conformance.report import ConformanceFailure, Failure, Report
    from conformance.scheduler.protocol import SchedulerFactory, SchedulerImpl

__all__ = [
    "check_block_manager",
    "check_scheduler",
    "check_attention",
    "BlockManagerImpl",
    "BlockManagerFactory",
    "SchedulerImpl",
    "SchedulerFactory",
    "AttentionImpl",
    "Report",
    "Failure",
    "ConformanceError",
    "ConformanceFailure",
]

_WHERE = {
    "check_block_manager": "conformance.api",
    "check_scheduler": "conformance.api",
    "check_attention": "conformance.api",
    "BlockManagerImpl": "conformance.protocols",
    "BlockManagerFactory": "conformance.protocols",
    "SchedulerImpl": "conformance.scheduler.protocol",
    "SchedulerFactory": "conformance.scheduler.protocol",
    "AttentionImpl": "conformance.attention.impl",
    "Report": "conformance.report",
    "Failure": "conformance.report",
    "ConformanceError": "conformance.blocks.lockstep",
    "ConformanceFailure": "conformance.report",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'conformance' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
