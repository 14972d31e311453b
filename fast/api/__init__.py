"""The user-facing layer: the :class:`~fast.api.llm.LLM` class and the ``pagedkv`` command line.

The records both this layer and the engine speak (``SamplingParams``, ``RequestOutput``,
``CompletionOutput``) live in :mod:`fast.engine`; ``fast`` re-exports them.
"""
