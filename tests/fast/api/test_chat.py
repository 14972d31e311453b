"""LLM.chat: vLLM's shapes (one conversation or a list), the chat template with the generation
prompt, and named errors that say which message is wrong, raised before anything is queued."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fast.api.errors import ChatTemplateError, InvalidMessageError
from fast.api.llm import LLM
from fast.engine.sampling_params import SamplingParams
from spec.errors import InvalidArgumentError

GREEDY = SamplingParams(temperature=0.0, max_tokens=5)


@pytest.fixture(scope="module")
def llm(char_model: Path) -> LLM:
    return LLM(str(char_model), max_model_len=128, block_size=4, num_gpu_blocks=128)


def _from_text(llm: LLM, text: str) -> Any:
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    return llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]


def test_one_conversation_is_rendered_with_the_generation_prompt(llm: LLM) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    (out,) = llm.chat(messages, GREEDY, use_tqdm=False)
    assert out.prompt == "s:be brief;u:hi;a:"  # the char model's template
    assert out.prompt_token_ids == llm.get_tokenizer().encode(
        "s:be brief;u:hi;a:", add_special_tokens=False
    )
    assert out.outputs[0].token_ids == _from_text(llm, "s:be brief;u:hi;a:").outputs[0].token_ids


def test_a_list_of_conversations_gives_one_output_each_in_order(llm: LLM) -> None:
    convs = [[{"role": "user", "content": c}] for c in ("one", "two", "three")]
    outs = llm.chat(convs, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["u:one;a:", "u:two;a:", "u:three;a:"]
    for o in outs:
        assert o.outputs[0].token_ids == _from_text(llm, o.prompt).outputs[0].token_ids


def test_one_sampling_params_per_conversation(llm: LLM) -> None:
    convs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    params = [
        SamplingParams(temperature=0, max_tokens=2),
        SamplingParams(temperature=0, max_tokens=4),
    ]
    outs = llm.chat(convs, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 4]


def test_text_parts_are_joined(llm: LLM) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    (out,) = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False)
    assert out.prompt == "u:a\nb;a:"


def test_options_reach_the_template(llm: LLM) -> None:
    msgs = [{"role": "user", "content": "x"}]
    (out,) = llm.chat(msgs, GREEDY, use_tqdm=False, add_generation_prompt=False)
    assert out.prompt == "u:x;"
    template = "{{ greeting }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (out,) = llm.chat(
        msgs,
        GREEDY,
        use_tqdm=False,
        chat_template=template,
        chat_template_kwargs={"greeting": "hey"},
    )
    assert out.prompt == "hey[x]"
    assert llm.get_tokenizer().chat_template != template  # the model's template is untouched


def test_tools_reach_the_template(llm: LLM) -> None:
    template = "{% for t in tools %}<{{ t['name'] }}>{% endfor %}{{ messages[0]['content'] }}"
    tools = [{"name": "add"}, {"name": "mul"}]
    (out,) = llm.chat(
        [{"role": "user", "content": "x"}], GREEDY, chat_template=template, tools=tools
    )
    assert out.prompt == "<add><mul>x"


def test_continue_final_message_leaves_it_open(llm: LLM) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hel"}]
    (out,) = llm.chat(
        msgs, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )
    assert out.prompt == "u:hi;a:hel"
    with pytest.raises(ChatTemplateError, match="add_generation_prompt=False"):
        llm.chat(msgs, GREEDY, continue_final_message=True)


BAD_MESSAGES: list[tuple[object, str]] = [
    ("hello", "must be a dict"),
    ({"content": "hi"}, "has no 'role'"),
    ({"role": "user"}, "has no 'content'"),
    ({"role": 3, "content": "hi"}, "'role' must be a str"),
    ({"role": "wizard", "content": "hi"}, "unknown role 'wizard'"),
    ({"role": "user", "content": 5}, "'content' must be a str"),
    ({"role": "user", "content": None}, "'content' must be a str"),
    ({"role": "user", "content": b"hi"}, "'content' must be a str"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, "content[0]"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_MESSAGES)
def test_bad_message_names_its_index_and_queues_nothing(llm: LLM, bad: object, reason: str) -> None:
    msgs = [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}, bad]
    with pytest.raises(InvalidMessageError) as e:
        llm.chat(msgs, GREEDY, use_tqdm=False)  # type: ignore[list-item]
    assert e.value.index == 2 and e.value.conversation is None
    assert str(e.value).startswith("invalid messages[2]=") and reason in str(e.value)
    assert isinstance(e.value, InvalidArgumentError)
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_message_in_a_later_conversation_runs_none_of_them(llm: LLM) -> None:
    good = [{"role": "user", "content": "ok"}]
    bad = [{"role": "user", "content": "ok"}, {"role": "user"}]
    with pytest.raises(InvalidMessageError) as e:
        llm.chat([good, good, bad], GREEDY, use_tqdm=False)
    assert (e.value.conversation, e.value.index) == (2, 1)
    assert "messages[2][1]" in str(e.value)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.chat(good, GREEDY, use_tqdm=False)) == 1  # and the LLM still works


@pytest.mark.parametrize("messages", [[], "hi", {"role": "user", "content": "hi"}, [[]], None])
def test_not_a_conversation(llm: LLM, messages: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="messages"):
        llm.chat(messages, GREEDY)


def test_template_refusal_is_a_named_error(llm: LLM) -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="system first"):
        llm.chat([{"role": "user", "content": "x"}], GREEDY, chat_template=template)


def test_no_template_or_no_tokenizer(char_model: Path, tiny: Any) -> None:
    llm = LLM(str(char_model), max_model_len=64, block_size=4, num_gpu_blocks=32)
    llm.get_tokenizer().chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        llm.chat([{"role": "user", "content": "x"}], GREEDY)
    bare = LLM(tiny, max_model_len=64, block_size=4, num_gpu_blocks=32)
    with pytest.raises(ChatTemplateError, match="tokenizer"):
        bare.chat([{"role": "user", "content": "x"}], GREEDY)
