"""The numba block manager: observably identical to :class:`spec.block_manager.BlockManager`.

Modules: ``manager`` (the public :class:`~fast.blocks.manager.BlockManager`), ``kernels`` (the
jitted operations on the state arrays), ``hash`` (BLAKE2b in numba, bit-equal to the spec's
hash), ``prefix_ids`` (interned prefix-cache keys) and ``integrity`` (``check_integrity``).
"""
