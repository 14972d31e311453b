"""Triton paged-attention kernels, with torch fallbacks used when there is no GPU.

This package deliberately defines no ``__version__``: Hugging Face publishes a distribution whose
import name is also ``kernels``, and transformers probes for that name.
"""
