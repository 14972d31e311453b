"""Block-management conformance: the lockstep against the spec, the state machine, the properties.

Modules: ``lockstep`` (spec and implementation side by side, every observable compared),
``operations`` and ``strategies`` (drawing each public operation's arguments), ``presets`` (tiny
pools), ``machine`` (the hypothesis state machine), ``properties`` (one per bug class) and
``runner`` (profiles and the whole suite outside pytest).
"""
