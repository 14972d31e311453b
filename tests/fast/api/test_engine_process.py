"""The engine in its own process: outputs cross the pipe as deltas and come back equal, the
child's errors come back as the same exceptions, and a dead child is an error, not a hang.

The official-client suite (``test_server.py``) runs on a server with its engine in a process too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from fast.api.engine_process import (
    DeltaDecoder,
    DeltaEncoder,
    EngineProcess,
    EngineProcessError,
    abort_answer,
)
from fast.api.llm import LLM
from fast.engine.inputs import InvalidPromptError
from fast.engine.outputs import RequestMetrics
from fast.engine.sampling_params import SamplingParams

ENGINE = dict(block_size=4, num_gpu_blocks=96, max_model_len=128)


def test_deltas_rebuild_every_output(char_model: Path) -> None:
    """Every DELTA output of every step, encoded, sent and rebuilt as the engine process does,
    equals a twin engine's cumulative output but for what the delta withholds (the last
    ``text_holdback`` characters of a running sequence's text; the metrics' times are each
    engine's own): n = 2 with logprobs, a stop string that cuts text already produced, prompt
    logprobs under chunked prefill, an abort in the middle."""
    from dataclasses import replace

    from fast.engine.sampling_params import RequestOutputKind

    def engine() -> Any:
        return LLM(str(char_model), **ENGINE, max_num_seqs=4, max_num_batched_tokens=8).llm_engine

    plain, delta = engine(), engine()
    sampled = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9, logprobs=2)
    requests = [
        ("a", "hello there", sampled),
        ("b", "the cat sat on", SamplingParams(temperature=0, max_tokens=12, stop=["e", "BBw"])),
        ("c", "abcdefghijklmnop", SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)),
        ("d", "zzz", SamplingParams(temperature=0, max_tokens=50, prompt_logprobs=1)),
        ("e", "zz", SamplingParams(temperature=0, max_tokens=50)),
    ]  # fmt: skip
    for rid, prompt, params in requests:
        plain.add_request(rid, prompt, params)
        delta.add_request(rid, prompt, replace(params, output_kind=RequestOutputKind.DELTA))
    hold = {rid: params.text_holdback for rid, _, params in requests}
    enc, dec = DeltaEncoder(), DeltaDecoder()
    sent: dict[tuple[str, int], int] = {}  # (request, index) -> characters of text sent

    def check(got: Any, want: Any, raw: Any) -> None:
        """``got`` (rebuilt from ``raw``) is ``want`` with each running text held back."""
        assert got.metrics == raw.metrics
        comps = []
        for c in want.outputs:
            end = len(c.text) if c.finish_reason else len(c.text) - hold[want.request_id]
            end = sent[want.request_id, c.index] = max(end, sent.get((want.request_id, c.index), 0))
            comps.append(replace(c, text=c.text[:end]))
        assert replace(got, metrics=None) == replace(want, outputs=comps, metrics=None)

    seen = held = steps = 0
    stops: list[Any] = []
    aborted: list[str] = []
    while plain.has_unfinished_requests():
        want, raw = plain.step(), delta.step()
        assert [o.request_id for o in raw] == [o.request_id for o in want]
        for w, r in zip(want, raw):
            got = dec.decode(enc.encode_delta(r))
            check(got, w, r)
            stops += [c.stop_reason for c in got.outputs if c.finish_reason == "stop"]
            held += sum(len(c.text) for c in w.outputs) - sum(
                sent[w.request_id, c.index] for c in w.outputs
            )
            seen += 1
        steps += 1
        # aborts, answered as the engine process answers them: "e" before its first output,
        # "d" after its first (its prompt logprobs were sent then)
        for rid in ["e"] * (steps == 3) + ["d"] * any(o.request_id == "d" for o in raw):
            final, answer = plain.abort_request(rid), abort_answer(delta, enc, rid)
            assert final is not None and answer is not None
            got = dec.decode(answer)
            check(got, final, replace(got, metrics=RequestMetrics(*answer[3])))  # as sent
            aborted.append(rid)
    assert not delta.has_unfinished_requests()
    assert seen > 10 and held > 0  # characters were withheld at some step
    assert stops == ["BBw"]  # and the stop string found later cut them
    assert aborted == ["e", "d"]
    assert not enc._prompt_lps and not dec._last  # finished requests are forgotten


def test_compact_and_full_reportsrebuild_every_output(
    char_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the engine process sends now (``step_deltas``: compact tuples for running n = 1
    requests without logprobs after their first output, full deltas for the rest), pickled and
    rebuilt by ``DeltaDecoder.decode_step``, equals at every step both a twin engine's
    cumulative outputs (each running text held back by ``text_holdback``) and what the full
    delta path (``step()`` + ``encode_delta``) rebuilds, metrics included (the compact engine's
    own); in a run with n = 1 and n = 2, logprobs on some requests, prompt logprobs under
    chunked prefill, stop strings with holdback, an abort in the middle, and a step that fails
    after recording compact reports and is rolled back (its ``_sent`` marks restored)."""
    import pickle
    from dataclasses import replace

    from fast.api.engine_process import _as_delta, step_deltas

    def engine() -> Any:
        return LLM(str(char_model), **ENGINE, max_num_seqs=8, max_num_batched_tokens=8).llm_engine

    plain, full, compact = engine(), engine(), engine()
    sampled = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9, logprobs=2)
    requests = [
        ("a", "hello there", sampled),
        ("b", "the cat sat on", SamplingParams(temperature=0, max_tokens=12, stop=["e", "BBw"])),
        ("c", "abcdefghijklmnop", SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1)),
        ("d", "zzz", SamplingParams(temperature=0, max_tokens=50)),
        ("e", "one two", SamplingParams(temperature=0, max_tokens=10, logprobs=1)),
        ("f", "abc", SamplingParams(temperature=1.0, seed=5, max_tokens=20, stop=["xyz"])),
        ("g", "dog", SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=7)),
        ("h", "the", SamplingParams(temperature=0, max_tokens=15, stop=["he", "e t"])),
    ]  # fmt: skip
    for rid, prompt, params in requests:
        plain.add_request(rid, prompt, params)
        full.add_request(*_as_delta(rid, prompt, params))
        compact.add_request(*_as_delta(rid, prompt, params))
    hold = {rid: params.text_holdback for rid, _, params in requests}
    enc_full, dec_full, enc, dec = DeltaEncoder(), DeltaDecoder(), DeltaEncoder(), DeltaDecoder()
    sent: dict[tuple[str, int], int] = {}  # (request, index) -> characters of text sent

    def check(got: Any, want: Any, old: Any) -> None:
        """``got`` is ``want`` with each running text held back, and ``old`` but for times."""
        assert replace(got, metrics=None) == replace(old, metrics=None)
        comps = []
        for c in want.outputs:
            end = len(c.text) if c.finish_reason else len(c.text) - hold[want.request_id]
            end = sent[want.request_id, c.index] = max(end, sent.get((want.request_id, c.index), 0))
            comps.append(replace(c, text=c.text[:end]))
        assert replace(got, metrics=None) == replace(want, outputs=comps, metrics=None)

    real = compact._compact_report
    made = {"n": 0}

    def fails_after_reporting(seq: Any) -> Any:
        report = real(seq)  # records what it reported in _sent ...
        if report is not None:
            made["n"] += 1
            if made["n"] == 12:  # ... then the step fails: the marks must be rolled back
                raise RuntimeError("injected")
        return report

    monkeypatch.setattr(compact, "_compact_report", fails_after_reporting)
    kinds = {"compact": 0, "full": 0}
    failures = steps = 0
    stops: list[Any] = []
    aborted: list[str] = []
    while plain.has_unfinished_requests():
        marks = dict(compact._sent)
        try:
            message = step_deltas(compact, enc)
        except RuntimeError:
            failures += 1
            assert compact._sent == marks  # the step's reports were taken back
            message = step_deltas(compact, enc)  # the same step again
        now, reports = pickle.loads(pickle.dumps(message))
        want, old = plain.step(), full.step()
        got = dec.decode_step(now, reports)
        assert [o.request_id for o in got] == [o.request_id for o in want]
        for g, w, o, r in zip(got, want, old, reports, strict=True):
            check(g, w, dec_full.decode(enc_full.encode_delta(o)))
            if len(r) == 4:
                kinds["compact"] += 1
                assert g.metrics == compact._metrics[g.request_id]  # what a full one carries
                assert g.outputs[0].logprobs is None and not g.finished
            else:
                kinds["full"] += 1
                assert g.metrics == RequestMetrics(*r[3])
            stops += [c.stop_reason for c in g.outputs if c.finish_reason == "stop"]
        steps += 1
        if steps >= 6 and "d" in compact._requests and "d" not in aborted:
            finals = plain.abort_request("d"), full.abort_request("d")
            answer = abort_answer(compact, enc, "d")
            assert finals[0] is not None and finals[1] is not None and answer is not None
            got_d = dec.decode(answer)
            check(got_d, finals[0], dec_full.decode(enc_full.encode_delta(finals[1])))
            assert got_d.outputs[0].finish_reason == "abort"
            aborted.append("d")
    assert failures == 1 and aborted == ["d"]
    assert kinds["compact"] > 20 and kinds["full"] > 10
    assert "BBw" in stops or "e" in stops
    assert not compact.has_unfinished_requests() and not full.has_unfinished_requests()
    assert not enc._prompt_lps and not dec._last and not compact._sent


def test_delta_outputs_rebuild_the_cumulative_ones(char_model: Path) -> None:
    """What the engine process does: its engine reports DELTA outputs (only completions with
    something new; a stop string's prefix withheld), encoded as they are and rebuilt by the
    parent, step by step equal to a twin engine's cumulative outputs (the text of a running
    sequence excepted: the delta withholds the characters a stop string may still cut)."""
    from dataclasses import replace

    from fast.engine.sampling_params import RequestOutputKind

    def engine() -> Any:
        return LLM(str(char_model), **ENGINE, max_num_seqs=4).llm_engine

    plain, delta = engine(), engine()
    sampled = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9, logprobs=2)
    requests = [
        ("a", "hello there", sampled),
        ("b", "the cat sat on", SamplingParams(temperature=0, max_tokens=12, stop=["e"])),
        ("c", "abcdefghijklmnop", SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)),
    ]  # fmt: skip
    for rid, prompt, params in requests:
        plain.add_request(rid, prompt, params)
        delta.add_request(rid, prompt, replace(params, output_kind=RequestOutputKind.DELTA))
    enc, dec = DeltaEncoder(), DeltaDecoder()

    def key(out: Any, text: bool) -> Any:
        comps = [
            (c.index, c.token_ids, c.logprobs, c.finish_reason, c.text if text else None)
            for c in out.outputs
        ]
        return out.request_id, comps, out.finished, out.prompt_logprobs

    while plain.has_unfinished_requests():
        want = plain.step()
        got = [dec.decode(enc.encode_delta(o)) for o in delta.step()]
        assert [key(o, o.finished) for o in got] == [key(o, o.finished) for o in want]
    assert not delta.has_unfinished_requests() and not enc._prompt_lps and not dec._last


def test_engine_process_serves_and_reportserrors(char_model: Path) -> None:
    ref = LLM(str(char_model), **ENGINE)
    proc = EngineProcess(str(char_model), **ENGINE)
    try:
        assert proc.llm_engine is proc and proc.max_model_len == 128
        assert proc.tokenizer.encode("abc") == ref.get_tokenizer().encode("abc")
        params = SamplingParams(temperature=0, max_tokens=6)
        proc.add_request("r", "hello", params)
        outs: list[Any] = []
        while proc.has_unfinished_requests():
            outs += proc.step()
        want = ref.generate("hello", params, use_tqdm=False)[0]
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == want.outputs[0].token_ids
        assert outs[-1].outputs[0].text == want.outputs[0].text
        assert proc.num_free_gpu_blocks == proc.num_gpu_blocks == 96
        with pytest.raises(InvalidPromptError) as e:  # the child's refusal: same class, numbers
            proc.add_request("r2", "a" * 200, SamplingParams(max_tokens=2))
        assert (e.value.name, e.value.value) == ("prompt", 200) and "max_model_len 128" in str(
            e.value
        )
        assert not proc.has_unfinished_requests()  # the refused request left nothing behind
    finally:
        proc.close()
    assert not proc._proc.is_alive()
    with pytest.raises(EngineProcessError, match="closed"):
        proc.step()


def test_a_model_that_is_not_there_raises_its_own_error(tmp_path: Path) -> None:
    from fast.loader import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="nothing"):
        EngineProcess(str(tmp_path / "nothing"), device="cpu")


def test_a_dead_engine_process_is_an_error(char_model: Path) -> None:
    proc = EngineProcess(str(char_model), **ENGINE)
    proc._proc.kill()
    proc._proc.join()
    with pytest.raises(EngineProcessError, match="died|gone"):
        proc.step()
    proc.close()


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("spawned engine processes are tested on Linux")


def test_server_survives_its_engine_process_dying(char_model: Path) -> None:
    """The engine process killed mid-stream: the stream ends with an error event, new requests
    get 503, /health says 503, and nothing hangs."""
    import httpx

    from fast.api.server import BackgroundServer, ServerConfig, build_app

    proc = EngineProcess(str(char_model), **ENGINE)
    app = build_app(proc, ServerConfig(served_model_name="char"))
    with BackgroundServer(app) as srv:
        body = {"model": "char", "prompt": "abc", "max_tokens": 100, "stream": True}
        real_step = proc.step

        def step_then_die() -> Any:
            outs = real_step()
            if proc._snap["generated_tokens"] >= 3:
                proc._proc.kill()
                proc._proc.join()
            return outs

        proc.step = step_then_die  # type: ignore[method-assign]
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and "engine process" in lines[-2]
        r2 = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert r2.status_code == 503 and "not running" in r2.json()["error"]["message"]
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 503


def test_commands_go_back_to_back_and_answer_in_order(char_model: Path) -> None:
    """A batch of adds and aborts crosses at once; each gets its own answer, in order, while the
    engine keeps stepping the requests already added."""
    proc = EngineProcess(str(char_model), **ENGINE)
    try:
        p = SamplingParams(temperature=0, max_tokens=30)
        results = proc.call_many(
            [
                ("add", ("a", "hello", p)),
                ("add", ("bad", "a" * 200, p)),
                ("add", ("b", "the cat", p)),
                ("abort", "nobody"),
                ("abort", "b"),
            ]
        )
        assert [ok for ok, _ in results] == [True, False, True, True, True]
        assert isinstance(results[1][1], InvalidPromptError) and results[3][1] is None
        final_b = results[4][1]
        assert final_b.request_id == "b" and final_b.finished
        assert final_b.outputs[0].finish_reason == "abort"
        outs: dict[str, Any] = {}
        while proc.has_unfinished_requests():
            outs.update((o.request_id, o) for o in proc.step())
        assert set(outs) <= {"a", "b"} and outs["a"].finished
        assert len(outs["a"].outputs[0].token_ids) == 30
        assert proc.num_free_gpu_blocks == proc.num_gpu_blocks
    finally:
        proc.close()


def test_a_burst_of_commands_while_the_engine_steps_does_not_deadlock(char_model: Path) -> None:
    """300 adds (about 400 KB pickled, more than a pipe holds) while the engine steps, then 300
    aborts: one message each way per batch, so neither side blocks on a full pipe."""
    import threading

    proc = EngineProcess(str(char_model), **ENGINE)
    done: list[bool] = []

    def burst() -> None:
        p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        proc.add_request("first", "x" * 100, p)  # keeps the engine stepping meanwhile
        prompts = [("add", (f"r{i}", "y" * 100 + str(i), p)) for i in range(300)]
        assert all(ok for ok, _ in proc.call_many(prompts))
        proc.step()
        ends = proc.call_many([("abort", f"r{i}") for i in range(300)] + [("abort", "first")])
        assert all(ok for ok, _ in ends)
        while proc.has_unfinished_requests():
            proc.step()
        done.append(proc.num_free_gpu_blocks == proc.num_gpu_blocks)

    worker = threading.Thread(target=burst, daemon=True)
    worker.start()
    worker.join(timeout=120)
    try:
        assert not worker.is_alive(), "the burst deadlocked"
        assert done == [True]
    finally:
        proc._proc.kill() if worker.is_alive() else proc.close()


def test_the_engine_process_is_started_with_sigint_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Ctrl-C while the spawned child still imports torch killed it with a C++ "terminate
    # called ... KeyboardInterrupt": the child must inherit SIG_IGN from its start.
    import multiprocessing.context
    import signal

    seen: list[Any] = []

    def start(self: Any) -> None:
        seen.append(signal.getsignal(signal.SIGINT))
        raise RuntimeError("not started")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError, match="not started"):
        EngineProcess("unused")
    assert seen == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGINT) is before  # restored in the parent


def test_metrics_cross_the_pipe_field_by_field() -> None:
    """The deltas carry a request's metrics as a tuple of its fields in order: every field
    (distinct values) comes back in its place, and a field added to RequestMetrics without
    the wire format fails here."""
    from dataclasses import fields

    from fast.api.engine_process import _metrics_fields

    values = [float(i + 1) for i in range(len(fields(RequestMetrics)))]
    m = RequestMetrics(*values)
    assert _metrics_fields(m) == tuple(values)
    assert RequestMetrics(*(_metrics_fields(m) or ())) == m


def test_the_engine_process_freezes_its_start_up_heap(char_model: Path) -> None:
    """The child freezes what exists once its engine is built (fast.api.gc_policy), before it
    reports ready, so the cyclic collector's full passes stop walking the model and torch. Run
    in this process with the stop command already queued; the freeze is undone afterwards."""
    import gc
    import multiprocessing
    import signal

    from fast.api.engine_process import _child_main

    parent, child = multiprocessing.Pipe()
    parent.send(("stop", 0, None))
    sigint = signal.getsignal(signal.SIGINT)
    assert gc.get_freeze_count() == 0
    try:
        _child_main(child, str(char_model), {"device": "cpu"}, 1)
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
        signal.signal(signal.SIGINT, sigint)
    assert frozen > 10_000
    assert parent.recv()[0] == "ready"
    assert parent.recv()[:2] == ("reply", 0)
