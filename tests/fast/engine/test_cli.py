"""The ``pagedkv`` command line: generate (chat template on and off, prompts file) and
conformance."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_llm_model import make_char_model

from fast.api.cli import build_parser, main
from fast.api.llm import LLM
from fast.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_char_model(tmp_path_factory.mktemp("cli") / "m")


def _expected(model_dir: Path, prompt: str, chat: bool) -> str:
    llm = LLM(str(model_dir), max_model_len=256)
    tok = llm.get_tokenizer()
    if chat:
        ids = tok.encode(
            tok.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False
        )
    else:
        ids = tok.encode(prompt)
    out = llm.generate(
        {"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False
    )
    return out[0].outputs[0].text


@pytest.mark.parametrize("chat", [True, False])
def test_generate_prints_the_greedy_text(
    model_dir: Path, chat: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--max-tokens",
        "6",
        "--max-model-len",
        "256",
        "hello",
    ] + ([] if chat else ["--no-chat-template"])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed == _expected(model_dir, "hello", chat) + "\n"


def test_prompts_file_prints_each_and_shows_progress(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("one\n\ntwo\nthree\n")
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--max-tokens",
                "3",
                "--max-model-len",
                "256",
                "--prompts-file",
                str(f),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if line.startswith("--- [")] == [
        "--- [0]",
        "--- [1]",
        "--- [2]",
    ]
    assert "3/3" in captured.err


def test_generate_needs_a_prompt(model_dir: Path) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_dir)])
    args = build_parser().parse_args(["generate", "x", "--temperature", "0.5", "--seed", "3"])
    assert args.temperature == 0.5 and args.seed == 3 and args.model is None


def test_conformance_is_not_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["conformance", "--help"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
