"""The engine: requests, the continuous-batching scheduler, the step loop, sampling, CUDA graphs.

Modules: ``engine`` (the step loop, :class:`~fast.engine.engine.LLMEngine`), ``scheduler``,
``sequence``, ``stop`` (stop rules), ``sampler``, ``sampling_params``, ``outputs``, ``config``,
``batch`` (host-side batch building) and ``cuda_graphs`` (decode graph capture and replay).
"""
