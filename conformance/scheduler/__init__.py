"""Scheduler conformance: the protocol and adapters (``protocol``) and lockstep runs (``run``)."""
