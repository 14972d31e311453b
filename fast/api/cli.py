"""The ``pagedkv`` command: ``pagedkv generate "prompt"``.

The conformance suite has its own command line, ``python -m conformance``: the product does not
import its test suite.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pagedkv``; greedy decoding unless a temperature is given.

    >>> args = build_parser().parse_args(["generate", "Hello", "--max-tokens", "4"])
    >>> args.command, args.prompts, args.max_tokens, args.temperature, args.model
    ('generate', ['Hello'], 4, 0.0, None)
    """
    parser = argparse.ArgumentParser(prog="pagedkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="*", help="prompt text (one or more)")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument(
        "--model",
        default=None,
        help="a .gguf file or Hugging Face directory (default: SmolLM2-135M-Instruct)",
    )
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument(
        "--no-chat-template",
        action="store_true",
        help="send the prompt as is instead of as a chat user message",
    )
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--no-tqdm", action="store_true", help="no progress bar")
    return parser


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("pagedkv generate: give a prompt or --prompts-file")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from fast.api.llm import LLM
    from fast.engine.sampling_params import SamplingParams

    prompts = _prompts(args)
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=args.seed or 0,
    )
    tok = llm.get_tokenizer()
    if not args.no_chat_template and tok is not None and tok.chat_template is not None:
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts
        ]
    kwargs: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
    }
    if args.seed is not None:
        kwargs["seed"] = args.seed
    params = SamplingParams(**kwargs)
    items: list[Any] = [{"prompt": p} for p in prompts]
    if tok is not None and not args.no_chat_template and tok.chat_template is not None:
        # the template already holds the special tokens: do not add a second BOS
        items = [
            {"prompt": p, "prompt_token_ids": tok.encode(p, add_special_tokens=False)}
            for p in prompts
        ]
    outputs = llm.generate(items, params, use_tqdm=not args.no_tqdm and len(items) > 1)
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}]")
        print(out.outputs[0].text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pagedkv`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
