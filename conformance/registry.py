"""Implementations registered for conformance testing, by name.

Built in: ``"spec"`` (the spec checked against itself, which tests the harness) and ``"fast"``
(the numba block manager). A third party adds its own with :func:`register_block_manager`::

    register_block_manager("mine", lambda config: MyAdapter(config))

The factory receives a ``spec.block_manager.BlockManagerConfig`` and returns an object with the
:class:`~conformance.protocols.BlockManagerImpl` surface. The hash-collision property also passes
``hash_fn=`` (the spec's block content hash, replaced by one that collides); a factory that
cannot take it fails that property with a ``TypeError``.
"""

from __future__ import annotations

from typing import Any

from conformance.protocols import BlockManagerFactory, BlockManagerImpl

__all__ = [
    "UnknownImplementationError",
    "SpecBlockManagerAdapter",
    "FastBlockManagerAdapter",
    "register_block_manager",
    "block_manager_factory",
    "block_manager_names",
]


class UnknownImplementationError(KeyError):
    """No implementation is registered under this name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no block manager registered as {name!r}; known: {known}")
        self.name = name
        self.known = known


class SpecBlockManagerAdapter:
    """The spec itself as an implementation: ``spec.block_manager.BlockManager``."""

    name = "spec"

    def __call__(self, config: Any, **kwargs: Any) -> BlockManagerImpl:
        from spec.block_manager import BlockManager

        return BlockManager(config, **kwargs)


class FastBlockManagerAdapter:
    """The numba implementation: ``fast.blocks.manager.BlockManager``."""

    name = "fast"

    def __call__(self, config: Any, **kwargs: Any) -> BlockManagerImpl:
        from fast.blocks.manager import BlockManager

        return BlockManager(config, **kwargs)


_BLOCK_MANAGERS: dict[str, BlockManagerFactory] = {
    SpecBlockManagerAdapter.name: SpecBlockManagerAdapter(),
    FastBlockManagerAdapter.name: FastBlockManagerAdapter(),
}


def register_block_manager(name: str, factory: BlockManagerFactory) -> None:
    """Make ``factory`` testable as ``python -m conformance --impl NAME``.

    Re-registering a name replaces the earlier factory.
    """
    _BLOCK_MANAGERS[name] = factory


def block_manager_factory(name: str) -> BlockManagerFactory:
    """The factory registered under ``name``; raises :class:`UnknownImplementationError`."""
    try:
        return _BLOCK_MANAGERS[name]
    except KeyError:
        raise UnknownImplementationError(name, block_manager_names()) from None


def block_manager_names() -> list[str]:
    """Every registered block-manager name, sorted."""
    return sorted(_BLOCK_MANAGERS)
