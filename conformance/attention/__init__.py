"""Attention conformance: cases drawn by hypothesis (``cases``), adapters and checks against the
spec's float64 math (``impl``), and the suite outside pytest (``suite``)."""
