"""The ``pagedkv`` command: ``pagedkv generate "prompt"``, ``pagedkv serve``.

A user error (a missing prompts file, a bad model path, a corrupt GGUF, an out-of-range
sampling option, ``--device cuda`` without CUDA) is one line on stderr and exit status 2;
Ctrl-C is one line and exit status 130. The conformance suite has its own command line,
``python -m conformance``: the product does not import its test suite.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser", "UsageError", "DEVICES", "DTYPES"]

#: ``--device`` values (``auto``: CUDA when there is one, else the CPU).
DEVICES = ("auto", "cpu", "cuda")
#: ``--dtype`` values: ``auto`` and the names :class:`~fast.engine.config.EngineConfig` knows.
DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float")
#: ``--kv-cache-dtype`` values: the names of ``spec.kv_quant.KV_CACHE_DTYPES`` (vLLM's).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

SEED_HELP = (
    "seed for sampling. With --seed, a sampled run (--temperature > 0) gives the same text "
    "every time; without it, sampling differs from run to run. Greedy decoding (the default, "
    "--temperature 0) needs no seed."
)


class UsageError(Exception):
    """A mistake in the command line or its inputs, reported as one line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pagedkv``; greedy decoding unless a temperature is given.

    >>> args = build_parser().parse_args(["generate", "Hello", "--max-tokens", "4"])
    >>> args.command, args.prompts, args.max_tokens, args.temperature, args.model
    ('generate', ['Hello'], 4, 0.0, None)
    """
    parser = argparse.ArgumentParser(
        prog="pagedkv", description="Offline text generation with the pagedkv engine."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate text for one or more prompts",
        description="Generate text for one or more prompts (greedy unless --temperature > 0).",
        epilog="Reproducibility: " + SEED_HELP,
    )
    gen.add_argument("prompts", nargs="*", help="prompt text (one or more)")
    gen.add_argument("--prompts-file", help="a UTF-8 file with one prompt per line")
    gen.add_argument(
        "--model",
        default=None,
        help="a .gguf file or Hugging Face directory (default: SmolLM2-135M-Instruct)",
    )
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    gen.add_argument(
        "--no-chat-template",
        action="store_true",
        help="send the prompt as is instead of as a chat user message",
    )
    gen.add_argument("--device", default="auto", choices=DEVICES)
    gen.add_argument("--dtype", default="auto", choices=DTYPES)
    gen.add_argument(
        "--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="docs/fp8.md"
    )
    gen.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="longest prompt + output (default: the model's, as vLLM)",
    )
    gen.add_argument(
        "--tensor-parallel-size", type=_positive_int, default=1, help="docs/tensor-parallel.md"
    )
    gen.add_argument("--no-tqdm", action="store_true", help="no progress bar")
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub: Any) -> None:
    """``pagedkv serve``: the OpenAI-compatible server (fast.api.server); engine options as in
    ``LLM(...)``.

    >>> args = build_parser().parse_args(["serve", "--port", "0", "--max-num-seqs", "8"])
    >>> args.command, args.port, args.max_num_seqs, args.model, args.api_key
    ('serve', 0, 8, None, None)
    """
    srv = sub.add_parser(
        "serve",
        help="serve the model over HTTP with OpenAI's API",
        description="An OpenAI-compatible server: /v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics, /tokenize, /detokenize.",
    )
    srv.add_argument(
        "--model",
        default=None,
        help="a .gguf file or Hugging Face directory (default: SmolLM2-135M-Instruct)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="port (0: a free one)")
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $PAGEDKV_API_KEY; none if unset)",
    )
    srv.add_argument("--served-model-name", default=None, help="the model's name in the API")
    srv.add_argument(
        "--max-waiting-requests",
        type=_positive_int,
        default=256,
        help="waiting requests past which new ones get 503 with Retry-After",
    )
    srv.add_argument("--max-request-bytes", type=_positive_int, default=8 * 1024 * 1024)
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds running requests may finish on shutdown before they are aborted",
    )
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    srv.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine in a process of its own, beside the HTTP server's, so the "
        "server's work does not slow the engine's steps (docs/serving.md; default: on, off with "
        "--tensor-parallel-size above 1; --no-engine-process: the engine in a thread)",
    )
    eng = srv.add_argument_group("engine options (as LLM(...)'s)")
    eng.add_argument("--device", default="auto", choices=DEVICES)
    eng.add_argument("--dtype", default="auto", choices=DTYPES)
    eng.add_argument("--max-model-len", type=_positive_int, default=None)
    eng.add_argument("--block-size", type=_positive_int, default=None)
    eng.add_argument("--max-num-seqs", type=_positive_int, default=None)
    eng.add_argument("--max-num-batched-tokens", type=_positive_int, default=None)
    eng.add_argument("--num-gpu-blocks", type=_positive_int, default=None)
    eng.add_argument("--kv-cache-gb", type=float, default=None)
    eng.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES)
    eng.add_argument("--tensor-parallel-size", type=_positive_int, default=None)
    eng.add_argument("--gpu-memory-utilization", type=float, default=None)
    eng.add_argument("--swap-space", type=float, default=None, help="GiB")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    eng.add_argument(
        "--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None
    )
    eng.add_argument("--preemption-mode", choices=("recompute", "swap"), default=None)
    eng.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    eng.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each decode step before the previous one's tokens reach the host "
        "(docs/engine.md, 'Overlapped scheduling'; off by default)",
    )
    eng.add_argument("--max-logprobs", type=int, default=None)
    eng.add_argument("--seed", type=int, default=None, help="the engine's seed (default 0)")
    eng.add_argument(
        "--generation-config",
        default=None,
        help="default sampling fields: 'auto' (the model's generation_config.json, the "
        "default), 'vllm' (none), or a directory holding a generation_config.json",
    )
    eng.add_argument(
        "--revision", default=None, help="branch, tag or commit of a model id in the HF cache"
    )


#: ``pagedkv serve`` options that are ``LLM(...)`` keyword arguments of the same name.
SERVE_ENGINE_OPTIONS = (
    "device",
    "dtype",
    "max_model_len",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "num_gpu_blocks",
    "kv_cache_gb",
    "kv_cache_dtype",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "swap_space",
    "enable_prefix_caching",
    "enable_chunked_prefill",
    "preemption_mode",
    "enforce_eager",
    "async_scheduling",
    "max_logprobs",
    "seed",
    "generation_config",
    "revision",
)


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        from fast.api.server import ServerConfig, serve
    except ImportError as e:
        raise UsageError(
            f"pagedkv serve needs the server's packages ({e.name} is missing): "
            "pip install 'pagedkv[serve]'"
        ) from None
    from fast.api.llm import LLM, _check_device

    _check_device(args.device)
    kwargs = {k: getattr(args, k) for k in SERVE_ENGINE_OPTIONS if getattr(args, k) is not None}
    api_key = args.api_key if args.api_key is not None else os.environ.get("PAGEDKV_API_KEY")
    name = args.served_model_name or (
        args.model.rstrip("/").rsplit("/", 1)[-1] if args.model else "SmolLM2-135M-Instruct"
    )
    config = ServerConfig(
        served_model_name=name,
        api_key=api_key or None,
        max_waiting_requests=args.max_waiting_requests,
        max_request_bytes=args.max_request_bytes,
        shutdown_timeout_s=args.shutdown_timeout,
    )
    llm: Any
    tensor_parallel = (args.tensor_parallel_size or 1) > 1
    if args.engine_process is None:  # measured ahead of one process on the H200 and this CPU
        args.engine_process = not tensor_parallel
    if args.engine_process and tensor_parallel:  # before loading anything
        raise UsageError(
            f"--engine-process cannot be combined with --tensor-parallel-size "
            f"{args.tensor_parallel_size}: the engine process is a daemon, which cannot start the "
            "tensor-parallel workers; drop one of them"
        )
    if args.engine_process:
        from fast.api.engine_process import EngineProcess

        llm = EngineProcess(args.model, **kwargs)
    else:
        llm = LLM(args.model, **kwargs)

    def ready(url: str) -> None:
        print(f"pagedkv: serving {name!r} on {url} (OpenAI base_url {url}/v1)", flush=True)

    try:
        serve(llm, config, args.host, args.port, args.log_level, on_ready=ready)
    except OSError as e:  # the port is taken, the address is not this machine's
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (argparse reports the error as one usage line).

    >>> _positive_int("8")
    8
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pagedkv")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            raise UsageError(f"prompts file {args.prompts_file!r} does not exist") from None
        except IsADirectoryError:
            raise UsageError(f"prompts file {args.prompts_file!r} is a directory") from None
        except UnicodeDecodeError as e:
            raise UsageError(
                f"prompts file {args.prompts_file!r} is not UTF-8 text ({e})"
            ) from None
        except OSError as e:
            raise UsageError(f"cannot read prompts file {args.prompts_file!r}: {e}") from None
        if not lines:
            raise UsageError(
                f"prompts file {args.prompts_file!r} has no prompts (no non-blank line)"
            )
        prompts += lines
    if not prompts:
        raise UsageError("give a prompt or --prompts-file")
    return prompts


def _user_errors() -> tuple[type[BaseException], ...]:
    """The named exceptions that mean "bad input", not "bug" (imported when needed: torch)."""
    from fast.loader import ModelNotFoundError
    from fast.loader.dequant import UnsupportedQuantizationError
    from fast.loader.generation_config import GenerationConfigError
    from fast.loader.gguf import UnsupportedGGUFError
    from fast.loader.gguf_file import GGUFFormatError
    from fast.loader.hf import UnsupportedModelError
    from fast.loader.hf_files import ShardedCheckpointError
    from fast.model.config import InvalidModelConfigError
    from fast.model.llama import WeightLoadError
    from fast.tokenizer.tokenizer import TokenizerError
    from spec.errors import PagedKVError

    return (
        PagedKVError,
        ModelNotFoundError,
        GGUFFormatError,
        UnsupportedGGUFError,
        UnsupportedModelError,
        UnsupportedQuantizationError,
        ShardedCheckpointError,
        GenerationConfigError,
        InvalidModelConfigError,
        WeightLoadError,
        TokenizerError,
        FileNotFoundError,  # a model directory without weights (ModelNotFoundError is one too)
        PermissionError,
    )


def _generate(args: argparse.Namespace) -> int:
    prompts = _prompts(args)

    from fast.api.llm import LLM, _check_device
    from fast.engine.sampling_params import SamplingParams

    # Everything that can be checked without the model is checked before it loads.
    kwargs: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
    }
    if args.seed is not None:
        kwargs["seed"] = args.seed
    params = SamplingParams(**kwargs)
    _check_device(args.device)
    # Without --seed the engine's generator is seeded at random: sampling differs run to run.
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**63)
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=seed,
        kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    tok = llm.get_tokenizer()
    use_tqdm = not args.no_tqdm and len(prompts) > 1
    if not args.no_chat_template and tok is not None and tok.chat_template is not None:
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        outputs = llm.chat(conversations, params, use_tqdm=use_tqdm)
    else:
        outputs = llm.generate([{"prompt": p} for p in prompts], params, use_tqdm=use_tqdm)
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}]")
        print(out.outputs[0].text)
    return 0


def _fail(message: str) -> int:
    print(f"pagedkv: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pagedkv`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        try:
            return _serve(args) if args.command == "serve" else _generate(args)
        except UsageError as e:
            return _fail(str(e))
        except KeyboardInterrupt:
            raise  # before _user_errors(): a Ctrl-C inside `import torch` breaks its re-import
        except _user_errors() as e:
            return _fail(str(e))
    except KeyboardInterrupt:
        print("pagedkv: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
