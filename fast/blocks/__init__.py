"""The numba block manager: observably identical to :class:`spec.block_manager.BlockManager`.

Modules: ``manager`` (the public :class:`~fast.blocks.manager.BlockManager`), ``state`` (the
arrays and their layout), ``kernels`` (the jitted operations on the state), ``freelist`` (the
FIFO free queue as a linked list), ``open_addressing`` (the int64 -> int32 hash tables),
``prefix_ids`` (interned prefix-cache keys and the hash memo), ``hash`` (BLAKE2b in numba,
bit-equal to the spec's hash) and ``integrity`` (``check_integrity``).
"""
