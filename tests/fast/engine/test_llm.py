"""fast.api.llm.LLM: prompts in every form, stop conditions, streaming, abort, seeds, bad input.

Every test ends with the pool whole again (no leaked block).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_llm_model import EOS, VOCAB, make_char_model

from fast.api.llm import LLM
from fast.engine.outputs import RequestOutput
from fast.engine.sampling_params import InvalidSamplingParamsError, SamplingParams
from fast.loader import ModelNotFoundError
from spec.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_char_model(tmp_path_factory.mktemp("char") / "m")


@pytest.fixture()
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), num_gpu_blocks=48, block_size=4, max_model_len=64)


def greedy(n: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)  # type: ignore[arg-type]


def whole(llm: LLM) -> bool:
    e = llm.llm_engine
    return e.num_free_gpu_blocks == e.num_gpu_blocks and not e.has_unfinished_requests()


def test_prompt_forms_give_the_same_output(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    ids = tok.encode("hello world")
    outs = llm.generate(
        ["hello world", {"prompt": "hello world"}, {"prompt_token_ids": ids}],
        greedy(ignore_eos=True),
        use_tqdm=False,
    )
    assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)
    assert outs[0].prompt == "hello world" and outs[2].prompt is None
    assert all(o.prompt_token_ids == ids for o in outs)
    texts = {o.outputs[0].text for o in outs}
    assert len(texts) == 1
    c = outs[0].outputs[0]
    assert c.index == 0 and c.text == tok.decode(c.token_ids) and len(c.token_ids) == 12
    assert c.finish_reason == "length" and c.stop_reason is None and outs[0].finished
    single = llm.generate(ids, greedy(ignore_eos=True), use_tqdm=False)  # one list of ids
    assert single[0].outputs[0].token_ids == c.token_ids
    assert whole(llm)


def test_outputs_in_input_order_with_per_prompt_params(llm: LLM) -> None:
    prompts = ["a", "bb", "ccc"]
    outs = llm.generate(prompts, [greedy(n, ignore_eos=True) for n in (5, 1, 3)], use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 1, 3]
    with pytest.raises(InvalidArgumentError):
        llm.generate(prompts, [greedy()] * 2)
    assert whole(llm)


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    full = llm.generate("abc", greedy(20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_tok = full.token_ids[4]
    cut = full.token_ids.index(stop_tok)
    out = llm.generate(
        "abc", greedy(20, ignore_eos=True, stop_token_ids=[stop_tok]), use_tqdm=False
    )[0].outputs[0]
    assert out.token_ids == full.token_ids[: cut + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # without ignore_eos the request stops at the first EOS (id 2) it samples, if any
    out = llm.generate("abc", greedy(20), use_tqdm=False)[0].outputs[0]
    if EOS in full.token_ids:
        assert out.token_ids == full.token_ids[: full.token_ids.index(EOS) + 1]
        assert out.finish_reason == "stop" and out.stop_reason is None
    else:
        assert out.token_ids == full.token_ids
    assert whole(llm)


def test_stop_string_truncates_text(llm: LLM) -> None:
    full = llm.generate("xyz", greedy(20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = full.text[5:7]
    at = full.text.find(stop)
    out = llm.generate("xyz", greedy(20, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[
        0
    ]
    assert out.text == full.text[:at]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[: at + len(stop)]  # one character per token
    kept = llm.generate(
        "xyz",
        greedy(20, ignore_eos=True, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == full.text[: at + len(stop)]
    assert whole(llm)


def test_max_model_len_finishes_with_length(model_dir: Path) -> None:
    llm = LLM(str(model_dir), num_gpu_blocks=8, block_size=4, max_model_len=16)
    out = llm.generate("0123456789", greedy(100, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 16
    assert out.outputs[0].finish_reason == "length"
    assert whole(llm)


def test_stream_yields_growing_outputs_and_abort_frees(llm: LLM) -> None:
    seen: dict[str, list[int]] = {}
    stream = llm.stream(["one", "two"], greedy(10, ignore_eos=True))
    first: RequestOutput = next(stream)
    seen[first.request_id] = first.outputs[0].token_ids
    llm.abort(first.request_id)
    aborted = next(stream)  # the aborted request's final output comes next
    assert aborted.request_id == first.request_id and aborted.finished
    assert aborted.outputs[0].finish_reason == "abort"
    assert aborted.outputs[0].token_ids == first.outputs[0].token_ids
    last: dict[str, RequestOutput] = {}
    for out in stream:
        assert out.request_id != first.request_id
        before = seen.get(out.request_id, [])
        assert out.outputs[0].token_ids[: len(before)] == before
        seen[out.request_id] = out.outputs[0].token_ids
        last[out.request_id] = out
    (other,) = last.values()
    assert other.finished and len(other.outputs[0].token_ids) == 10
    alone = llm.generate(other.prompt or "", greedy(10, ignore_eos=True), use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == other.outputs[0].token_ids
    llm.abort("no-such-request")
    assert whole(llm)


def test_seeded_sampling_is_batch_independent(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    alone = llm.generate("seed", p, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(["other", "seed", "more"], [greedy(), p, greedy()], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert whole(llm)


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("lp", greedy(6, ignore_eos=True, logprobs=2), use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    total = 0.0
    for token, lp in zip(out.token_ids, out.logprobs):
        assert token in lp and 1 <= len(lp) <= 3
        assert lp[token].rank == 1  # greedy takes the most likely
        assert lp[token].logprob == max(v.logprob for v in lp.values())
        total += lp[token].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_bad_input_raises_before_scheduling(llm: LLM, model_dir: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        llm.generate(["fine", ""], greedy(), use_tqdm=False)
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate(["fine", "x" * 65], greedy(), use_tqdm=False)
    assert e.value.value == 65
    with pytest.raises(InvalidArgumentError):
        llm.generate({"prompt_token_ids": [1, len(VOCAB) + 5]}, greedy(), use_tqdm=False)
    with pytest.raises(InvalidArgumentError):
        llm.generate({"nothing": 1}, greedy(), use_tqdm=False)
    with pytest.raises(InvalidSamplingParamsError):
        llm.generate("fine", SamplingParams(temperature=-1.0), use_tqdm=False)
    with pytest.raises(InvalidSamplingParamsError):
        llm.generate("fine", SamplingParams(n=0), use_tqdm=False)
    assert whole(llm)  # nothing was queued by the failed calls
    ok = llm.generate("fine", greedy(3, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3
    with pytest.raises(ModelNotFoundError):
        LLM(str(model_dir / "missing"))


def test_engine_configuration_errors(model_dir: Path) -> None:
    with pytest.raises(InvalidArgumentError):  # 4 blocks of 4 < max_model_len 64
        LLM(str(model_dir), num_gpu_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(InvalidArgumentError):
        LLM(str(model_dir), max_model_len=1024)  # above max_position_embeddings 256
    with pytest.raises(InvalidArgumentError):
        LLM(str(model_dir), preemption_mode="drop")
    with pytest.raises(InvalidArgumentError):
        LLM(str(model_dir), block_size=0)
    for sizes in ([128], (0, 128), (128.0,), (True,)):
        with pytest.raises(InvalidArgumentError, match="cuda_graph_token_sizes"):
            LLM(str(model_dir), cuda_graph_token_sizes=sizes)
    with pytest.raises(InvalidArgumentError, match="cuda_graph_batch_sizes"):
        LLM(str(model_dir), cuda_graph_batch_sizes=())


def test_tqdm_bar_counts_requests(llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    llm.generate(["a", "b", "c"], greedy(2, ignore_eos=True), use_tqdm=True)
    err = capsys.readouterr().err
    assert "3/3" in err


def test_n_samples_per_prompt(llm: LLM) -> None:
    p = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate("many", p, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples
    (again,) = llm.generate("many", p, use_tqdm=False)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    (g,) = llm.generate(
        "many", SamplingParams(n=2, temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )
    assert g.outputs[0].token_ids == g.outputs[1].token_ids
    stream = llm.stream("many", p)
    first = next(stream)
    assert len(first.outputs) == 3 and not first.finished
    llm.abort(first.request_id)
    (final,) = list(stream)  # only the aborted request's final output
    assert final.finished and [c.finish_reason for c in final.outputs] == ["abort"] * 3
    assert whole(llm)
