"""``SamplingParams.output_kind`` (vLLM's ``RequestOutputKind``): what a streaming step reports.

DELTA outputs, concatenated, are exactly the CUMULATIVE final output (tokens, text, logprobs),
no character sent is ever taken back (stop strings: the last ``len(stop) - 1`` characters are
withheld while a sequence runs), prompt logprobs come once, and a failed step that is retried
reports nothing twice and skips nothing. FINAL_ONLY reports once, at the end.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_llm_model import VOCAB, make_char_model

from fast.api.llm import LLM
from fast.engine.outputs import RequestOutput
from fast.engine.sampling_params import (
    InvalidSamplingParamsError,
    RequestOutputKind,
    SamplingParams,
)

PROMPTS = ["the cat sat", "a dog ran far", "on the mat"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = make_char_model(tmp_path_factory.mktemp("char") / "m")
    return LLM(str(path), num_gpu_blocks=64, block_size=4, max_model_len=64)


def ids(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def stream(llm: LLM, params: list[SamplingParams]) -> dict[str, list[RequestOutput]]:
    """Every step's outputs, per request, stepping the engine as a server does."""
    engine = llm.llm_engine
    for i, (p, sp) in enumerate(zip(PROMPTS, params, strict=True)):
        engine.add_request(str(i), {"prompt_token_ids": ids(p)}, sp)
    seen: dict[str, list[RequestOutput]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks
    return seen


def joined(outs: list[RequestOutput]) -> list[tuple[list[int], str, list[Any] | None]]:
    """Concatenate DELTA outputs into (tokens, text, logprobs) per completion index."""
    acc: dict[int, tuple[list[int], str, list[Any] | None]] = {}
    for out in outs:
        for c in out.outputs:
            tok, text, lps = acc.get(c.index, ([], "", None if c.logprobs is None else []))
            acc[c.index] = (
                tok + c.token_ids,
                text + c.text,
                None if c.logprobs is None else (lps or []) + c.logprobs,
            )
    return [acc[i] for i in sorted(acc)]


def close(a: Any, b: Any) -> bool:
    """Logprob lists equal in ids and ranks, values within 1e-5 (the second run of a prompt
    reads its prefix from the cache, which changes the float summation order)."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        (x is None and y is None)
        or (
            x is not None
            and y is not None
            and x.keys() == y.keys()
            and all(x[t].rank == y[t].rank and abs(x[t].logprob - y[t].logprob) <= 1e-5 for t in x)
        )
        for x, y in zip(a, b, strict=True)
    )


def params_of(kind: RequestOutputKind) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=12, stop=["oj:", "xyz"], output_kind=kind),
        SamplingParams(
            n=2,
            temperature=0.9,
            seed=5,
            max_tokens=9,
            logprobs=2,
            prompt_logprobs=1,
            ignore_eos=True,
            output_kind=kind,
        ),  # fmt: skip
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, output_kind=kind),
    ]


def test_delta_outputs_add_up_to_the_cumulative_ones(llm: LLM) -> None:
    cumulative = stream(llm, params_of(RequestOutputKind.CUMULATIVE))
    delta = stream(llm, params_of(RequestOutputKind.DELTA))
    for rid, outs in delta.items():
        final = cumulative[rid][-1]
        assert final.finished and outs[-1].finished and not any(o.finished for o in outs[:-1])
        got = joined(outs)
        assert [(t, x) for t, x, _ in got] == [(c.token_ids, c.text) for c in final.outputs]
        assert all(close(g[2], c.logprobs) for g, c in zip(got, final.outputs, strict=True))
        assert all(o.prompt_token_ids == final.prompt_token_ids for o in outs)
        assert [o.outputs[0].cumulative_logprob for o in outs][-1] == pytest.approx(
            final.outputs[0].cumulative_logprob
        )
        lps = [o.prompt_logprobs for o in outs]
        if final.prompt_logprobs is None:
            assert lps == [None] * len(outs)
        else:  # once, with the first output
            assert close(lps[0], final.prompt_logprobs) and lps[1:] == [None] * (len(outs) - 1)
    assert sum(len(c.token_ids) for o in delta["2"] for c in o.outputs) == 7
    assert all(len(o.outputs[0].token_ids) == 1 for o in delta["2"])  # one new token a step


def test_delta_text_is_never_taken_back(llm: LLM) -> None:
    # greedy text of prompt 0 is "?;jfnoj:km8z" uncut: stop "oj:" (3 chars) cuts it to "?;jfn";
    # while running, the last 2 characters are withheld, so "o" and "oj" are never sent
    (final,) = stream(llm, params_of(RequestOutputKind.CUMULATIVE))["0"][-1:]
    outs = stream(llm, params_of(RequestOutputKind.DELTA))["0"]
    text = final.outputs[0].text
    sent = ""
    for o in outs:
        sent += o.outputs[0].text
        assert text.startswith(sent)
    assert sent == text == "?;jfn"
    assert (final.outputs[0].finish_reason, final.outputs[0].stop_reason) == ("stop", "oj:")


def test_a_finished_completion_is_not_reported_again(llm: LLM) -> None:
    # n = 2, seed 5 on prompt 1 samples ":?A)Gyqy)" and ":2EDAthJI" (as above); stop "?A" ends
    # the first after 3 tokens (text ":"), the second runs to 9: later outputs hold only it
    params = SamplingParams(
        n=2, temperature=0.9, seed=5, max_tokens=9, ignore_eos=True, stop="?A",
        output_kind=RequestOutputKind.DELTA,
    )  # fmt: skip
    engine = llm.llm_engine
    engine.add_request("n2", {"prompt_token_ids": ids(PROMPTS[1])}, params)
    outs: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    indexes = [[c.index for c in o.outputs] for o in outs]
    first_done = next(i for i, o in enumerate(outs) if o.outputs[0].finish_reason is not None)
    assert outs[first_done].outputs[0].index == 0 and outs[first_done].outputs[0].text == ""
    assert all(ix == [1] for ix in indexes[first_done + 1 :]) and len(outs) > first_done + 1
    got = joined(outs)
    assert [t for _, t, _ in got] == [":", ":2EDAthJI"]
    assert [len(k) for k, _, _ in got] == [3, 9]


def test_final_only_reports_once_at_the_end(llm: LLM) -> None:
    cumulative = stream(llm, params_of(RequestOutputKind.CUMULATIVE))
    final_only = stream(llm, params_of(RequestOutputKind.FINAL_ONLY))
    for rid, outs in final_only.items():
        assert len(outs) == 1 and outs[0].finished
        want = cumulative[rid][-1]
        assert [(c.token_ids, c.text) for c in outs[0].outputs] == [
            (c.token_ids, c.text) for c in want.outputs
        ]


def test_generate_returns_whole_outputs_whatever_the_kind(llm: LLM) -> None:
    prompts = [{"prompt_token_ids": ids(p)} for p in PROMPTS]
    want = llm.generate(prompts, params_of(RequestOutputKind.CUMULATIVE), use_tqdm=False)
    for kind in (RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY):
        got = llm.generate(prompts, params_of(kind), use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got] == [
            [c.token_ids for c in o.outputs] for o in want
        ]


def test_a_retried_step_reports_nothing_twice(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    want = stream(llm, params_of(RequestOutputKind.DELTA))
    engine = llm.llm_engine
    real = engine.sampler.sample
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] in (3, 6):  # fail after sampling: the step's outputs were being built
            raise RuntimeError("injected")
        return out

    monkeypatch.setattr(engine.sampler, "sample", flaky)
    real_delta = engine._delta_output
    built = {"n": 0}

    def fails_after_building(group: Any) -> Any:
        out = real_delta(group)  # records what it reported ...
        built["n"] += 1
        if built["n"] == 5:  # ... then the step fails: the record must be rolled back
            raise RuntimeError("injected")
        return out

    monkeypatch.setattr(engine, "_delta_output", fails_after_building)
    for i, (p, sp) in enumerate(zip(PROMPTS, params_of(RequestOutputKind.DELTA), strict=True)):
        engine.add_request(str(i), {"prompt_token_ids": ids(p)}, sp)
    seen: dict[str, list[RequestOutput]] = {str(i): [] for i in range(len(PROMPTS))}
    failures = 0
    while engine.has_unfinished_requests():
        try:
            outs = engine.step()
        except RuntimeError:
            failures += 1
            continue
        for out in outs:
            seen[out.request_id].append(out)
    assert failures == 3
    for rid in want:
        got, ref = joined(seen[rid]), joined(want[rid])
        assert [(t, x) for t, x, _ in got] == [(t, x) for t, x, _ in ref]
        assert all(close(g[2], r[2]) for g, r in zip(got, ref, strict=True))


def test_abort_reports_what_is_new_for_a_delta_request(llm: LLM) -> None:
    # stop "zzz" never occurs but withholds 2 characters while running; the abort's final
    # delta flushes them, and carries no token twice
    engine = llm.llm_engine
    delta = SamplingParams(
        temperature=0.0, max_tokens=30, stop="zzz", output_kind=RequestOutputKind.DELTA
    )
    engine.add_request("d", {"prompt_token_ids": ids(PROMPTS[0])}, delta)
    got: list[RequestOutput] = []
    for _ in range(4):  # the prefill step samples the first token, then one a step
        got += [o for o in engine.step() if o.request_id == "d"]
    final = engine.abort_request("d")
    assert final is not None and final.finished and final.outputs[0].finish_reason == "abort"
    assert final.outputs[0].token_ids == []  # every token was reported by its step
    tokens = [t for o in got for t in o.outputs[0].token_ids]
    assert len(tokens) == 4
    sent = "".join(o.outputs[0].text for o in got)
    assert sent == "".join(VOCAB[t] for t in tokens[:-2])  # the last 2 withheld ...
    assert sent + final.outputs[0].text == "".join(VOCAB[t] for t in tokens)  # ... then sent
    assert engine.abort_request("d") is None
    assert engine.num_free_gpu_blocks == engine.num_gpu_blocks


def test_an_unknown_output_kind_is_refused() -> None:
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA
    for bad in (3, True, "delta", 1.0):
        with pytest.raises(InvalidSamplingParamsError, match="output_kind"):
            SamplingParams(output_kind=bad)
