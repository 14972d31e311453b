"""Adapters: pagedkv's conformance suite pointed at paged-KV caches of other libraries.

:mod:`conformance.adapters.semantic` is the implementation-independent check mode;
:mod:`conformance.adapters.transformers_cb` adapts transformers' continuous-batching cache
allocator. Importing this package imports no third-party library.
"""

from conformance.adapters.semantic import (
    Capabilities,
    NoRoom,
    SemanticReport,
    check_semantic,
)

__all__ = ["Capabilities", "NoRoom", "SemanticReport", "check_semantic"]
