"""The conformance suite: the spec is the model, the implementation under test is a parameter."""
