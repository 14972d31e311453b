"""The executable specification of pagedkv.

Standard library and numpy only. Every other layer (``fast``, ``kernels``) is checked against
what this package says, by the property-based suite in ``conformance``.
"""
