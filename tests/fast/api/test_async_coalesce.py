"""A stream that falls behind the engine handles each request's newest output once.

Outputs are cumulative, so of several queued for one request only the last carries news; a
lagging consumer (a busy event loop, a slow client) sends it as one chunk of several tokens.
"""

from __future__ import annotations

from fast.api.async_engine import _latest
from fast.engine.outputs import CompletionOutput, RequestOutput


def _out(rid: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    comp = CompletionOutput(index=0, text="", token_ids=tokens, cumulative_logprob=None)
    return RequestOutput(rid, None, [1, 2], [comp], finished)


def test_keeps_each_requests_last_output_in_order_of_last_arrival() -> None:
    a1, b1, a2, c1, b2 = (
        _out("a", [5]),
        _out("b", [7]),
        _out("a", [5, 6]),
        _out("c", [9]),
        _out("b", [7, 8], True),
    )
    got = _latest([a1, b1, a2, c1, b2])
    assert got == [a2, c1, b2]
    assert _latest([a1]) == [a1]


def test_an_error_comes_after_the_outputs_queued_before_it() -> None:
    a1, b1 = _out("a", [5], True), _out("b", [7])
    boom, later = RuntimeError("step failed"), RuntimeError("second")
    got = _latest([a1, boom, b1, later])
    assert got[:2] == [a1, b1] and got[2] is boom and len(got) == 3
