"""Load test of ``pagedkv serve``, in the spirit of vLLM's benchmark_serving.

Run from the repository root::

    # this CPU: SmolLM2, 64 requests of the ShareGPT-like trace with lengths / 8
    PYTHONPATH=. python benchmarks/serve_load.py --model smollm2 --requests 64 --scale 8 \\
        --rates inf,0.5,1,2 --out benchmarks/results/serve_load_cpu.json
    # the GPU machine: the Llama-3-8B-shaped random bf16 model, the unscaled trace
    PYTHONPATH=. python benchmarks/serve_load.py --model random-llama3-8b --device cuda \\
        --requests 512 --rates inf,4,8,16,32 --out $OUT/serve_load_h200.json

1. The server is started by this script in a child process (``--url`` uses a running one
   instead): ``smollm2`` (the default GGUF), ``random-llama3-8b`` (``ModelConfig.llama3_8b()``
   with random bf16 weights, as ``benchmarks/gpu_engine.py`` builds it: no download, no
   tokenizer; prompts are token ids), or a model path. The child first runs the same trace
   offline through ``LLM.generate`` on the same engine (after a warm-up) and reports its output
   throughput: the figure the server is compared with; it times it again after the load
   (``offline_after``), since a shared machine's speed drifts. Put ``inf`` first in
   ``--rates`` to compare the server with the offline run next to it in time.
2. Requests: docs/workloads.md's ShareGPT-like trace (seed 0; lengths divided by ``--scale`` and
   clipped to [4, 1024 / scale]; token ids uniform in [100, vocab)), sent as
   ``POST /v1/completions`` with ``prompt`` = the token ids, ``max_tokens`` = the drawn output
   length, ``ignore_eos``, greedy, streamed with ``include_usage``.
3. Arrivals: a Poisson process at each ``--rates`` value (requests per second; exponential gaps
   from a seeded generator), or all at once for ``inf``.
4. Per request, from the client's side: TTFT (send to first streamed token), ITL (gaps between
   streamed chunks), TPOT ((end - first token) / (output tokens - 1)), end-to-end latency. Per
   rate: request and output-token throughput over the wall time from the first send to the last
   answer, p50 / p99 of TTFT, TPOT and ITL in ms, goodput (requests per second whose TTFT and
   TPOT both meet ``--slo-ttft-ms`` / ``--slo-tpot-ms``), and the running requests seen by
   ``/metrics`` polled every 0.25 s (mean and max).

Writes the JSON (with ``benchmarks/provenance.py``'s commit, date and versions) to ``--out``;
``--svg-from FILE`` prints the latency/throughput curve of a results file as SVG (docs/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def trace(n: int, scale: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """docs/workloads.md's ShareGPT-like trace, lengths / ``scale``, ids uniform in [100, vocab)."""
    rng = np.random.default_rng(seed)
    hi = 1024 // scale
    n_in = np.clip(np.round(rng.lognormal(4.68, 1.0, n) / scale), 4, hi).astype(int)
    n_out = np.clip(np.round(rng.lognormal(5.76, 1.0, n) / scale), 4, hi).astype(int)
    prompts = [rng.integers(100, vocab, size=k).tolist() for k in n_in]
    return prompts, [int(k) for k in n_out]


# -- the server (child process) -------------------------------------------------------------


def _spec(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    """(model: a path, None or a factory of the random model; LLM keyword arguments; name)."""
    import functools

    import torch

    engine: dict[str, Any] = dict(
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        block_size=16,
    )
    if args.max_num_batched_tokens:
        engine["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.async_scheduling:  # the offline run and the server alike
        engine["async_scheduling"] = True
    if args.model == "random-llama3-8b":
        from fast.loader import random_model
        from fast.model.config import ModelConfig

        device = "cuda" if args.device in ("auto", "cuda") else args.device
        factory = functools.partial(
            random_model, ModelConfig.llama3_8b(), seed=0, dtype=torch.bfloat16, device=device
        )
        return factory, {**engine, "gpu_memory_utilization": 0.9, "dtype": "bfloat16"}, args.model
    path = None if args.model == "smollm2" else args.model
    return path, engine, "SmolLM2-135M-Instruct" if path is None else Path(path).name


def _load(args: argparse.Namespace) -> tuple[Any, str, int]:
    """(LLM, served name, vocabulary size)."""
    from fast.api.llm import LLM

    model, kwargs, name = _spec(args)
    llm = LLM(model() if callable(model) else model, **kwargs)
    return llm, name, llm.llm_engine.model_config.vocab_size


def offline(llm: Any, prompts: list[list[int]], n_out: list[int]) -> dict[str, Any]:
    """``LLM.generate`` on the trace (after a short warm-up): output tokens per second."""
    from fast.engine.sampling_params import SamplingParams

    def params(k: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)

    llm.generate([{"prompt_token_ids": p[:16]} for p in prompts[:4]], params(4), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], [params(k) for k in n_out], use_tqdm=False
    )
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": round(dt, 3), "output_tokens": tokens, "output_tok_s": round(tokens / dt, 2)}


def run_server(args: argparse.Namespace) -> None:
    """The child: load, measure offline, then serve until killed; reports on stdout."""
    import torch

    if args.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    from fast.api.server import ServerConfig, serve

    llm, name, vocab = _load(args)
    prompts, n_out = trace(args.requests, args.scale, vocab)
    report: dict[str, Any] = {"name": name, "vocab": vocab}
    if not args.skip_offline:
        report["offline"] = offline(llm, prompts, n_out)
    config = ServerConfig(served_model_name=name, max_waiting_requests=max(1024, 2 * args.requests))

    def ready(url: str) -> None:
        print("SERVER " + json.dumps({**report, "url": url}), flush=True)

    if args.engine_process:  # the offline engine makes way for the same one in its own process
        import gc

        from fast.api.engine_process import EngineProcess

        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model, kwargs, _ = _spec(args)
        served: Any = EngineProcess(model, **kwargs)
    else:
        served = llm
    serve(served, config, "127.0.0.1", 0, "warning", on_ready=ready)
    if not args.skip_offline and not args.engine_process:  # stopped by the parent (SIGTERM)
        print("OFFLINE_AFTER " + json.dumps(offline(llm, prompts, n_out)), flush=True)


# -- the client -----------------------------------------------------------------------------


async def one_request(
    h: Any, url: str, name: str, prompt: list[int], max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    times: list[float] = []
    tokens = 0
    error = None
    try:
        async with h.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                        continue
                    now = time.perf_counter()
                    if chunk["choices"]:
                        if first is None:
                            first = now
                        times.append(now)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # a failed request is counted, not fatal
        error = repr(e)
    end = time.perf_counter()
    ok = error is None and first is not None and tokens == max_tokens
    return {
        "ok": ok,
        "error": error,
        "start": t0,
        "ttft": (first - t0) if first is not None else None,
        "itl": [b - a for a, b in zip(times, times[1:])],
        "tpot": (end - first) / (tokens - 1) if first is not None and tokens > 1 else None,
        "e2e": end - t0,
        "tokens": tokens,
        "prompt_tokens": len(prompt),
        "end": end,
    }


async def poll_running(h: Any, url: str, seen: list[float], stop: asyncio.Event) -> None:
    pattern = re.compile(r"^vllm:num_requests_running(?:\{[^}]*\})? (\S+)$", re.M)
    while not stop.is_set():
        try:
            r = await h.get(url + "/metrics")
            m = pattern.search(r.text)
            if m:
                seen.append(float(m.group(1)))
        except Exception:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


def process_cpu_s(pid: int) -> dict[str, float] | None:
    """CPU seconds (user + system) of process ``pid`` and, summed, of its live child processes
    (the engine process under ``--engine-process``), from /proc; None where there is no /proc."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def own(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    try:
        children = [
            int(c)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        ]
        return {"self": own(pid), "children": sum(own(c) for c in children)}
    except (OSError, ValueError, IndexError):
        return None


async def _send_part(
    url: str,
    name: str,
    prompts: list[list[int]],
    n_out: list[int],
    offsets: list[float],
    start_at: float,
) -> list[dict[str, Any]]:
    """Send request ``i`` at ``start_at + offsets[i]`` (``time.perf_counter``, which is
    CLOCK_MONOTONIC on Linux: one clock for every client process) and collect the answers."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as h:
        tasks = []
        for p, k, offset in zip(prompts, n_out, offsets):
            delay = start_at + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one_request(h, url, name, p, k)))
        return list(await asyncio.gather(*tasks))


def _client_process(part: dict[str, Any], ready: Any, go: Any, start_at: Any, out: Any) -> None:
    """One client process: import, say ready, wait for the common start, send its part."""
    import httpx  # noqa: F401  (imported before the start, not during it)

    ready.put(os.getpid())
    go.wait()
    cpu0 = time.process_time()
    results = asyncio.run(
        _send_part(
            part["url"], part["name"], part["prompts"], part["n_out"], part["offsets"],
            start_at.value,
        )
    )  # fmt: skip
    out.put({"index": part["index"], "results": results, "cpu_s": time.process_time() - cpu0})


async def at_rate(
    url: str,
    name: str,
    prompts: list[list[int]],
    n_out: list[int],
    rate: float,
    seed: int,
    server_pid: int | None = None,
    clients: int = 1,
) -> dict[str, Any]:
    """Requests at Poisson arrivals of ``rate`` per second (all at once for ``inf``), sent by
    ``clients`` processes: request ``i`` by process ``i % clients``, at the same times as one
    process would send them. A single asyncio client with httpx spends about 0.3 ms of CPU per
    streamed chunk on a 2-core box: at the GPU's thousands of tokens per second one process
    would measure itself, not the server (``cpu_busy`` records each side's CPU per second)."""
    import multiprocessing

    import httpx

    rng = np.random.default_rng(seed)
    gaps = np.zeros(len(prompts)) if math.isinf(rate) else rng.exponential(1.0 / rate, len(prompts))
    offsets = [float(x) for x in np.cumsum(gaps)]
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = []
    for c in range(clients):
        idx = list(range(c, len(prompts), clients))
        part = {
            "index": c, "url": url, "name": name, "prompts": [prompts[i] for i in idx],
            "n_out": [n_out[i] for i in idx], "offsets": [offsets[i] for i in idx],
        }  # fmt: skip
        procs.append(
            ctx.Process(target=_client_process, args=(part, ready, go, start_at, out), daemon=True)
        )
    loop = asyncio.get_running_loop()
    try:
        for proc in procs:
            proc.start()
        for _ in procs:  # every client has imported httpx before the common start
            await loop.run_in_executor(None, ready.get, True, 120)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as h:
            seen: list[float] = []
            stop = asyncio.Event()
            poller = asyncio.ensure_future(poll_running(h, url, seen, stop))
            server0 = process_cpu_s(server_pid) if server_pid is not None else None
            start_at.value = time.perf_counter() + 0.05
            go.set()
            parts = await loop.run_in_executor(None, gather_reports, out, procs)
            server1 = process_cpu_s(server_pid) if server_pid is not None else None
            stop.set()
            await poller
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    parts.sort(key=lambda part: part["index"])
    results = [r for part in parts for r in part["results"]]
    wall = max(r["end"] for r in results) - start_at.value if results else 0.0
    cpu = {f"client{part['index']}": part["cpu_s"] for part in parts}
    if server0 is not None and server1 is not None:
        cpu["server"] = server1["self"] - server0["self"]
        cpu["server_children"] = server1["children"] - server0["children"]
    # CPU seconds per wall second of each process: a process near 1.0 is what limits the run
    busy = {k: round(v / max(wall, 1e-9), 3) for k, v in cpu.items()}
    return {
        "rate": rate, "wall_s": wall, "results": results, "running": seen, "cpu_busy": busy,
        "clients": clients,
    }  # fmt: skip


class ClientDiedError(RuntimeError):
    """A client process exited without reporting its results (its requests are unaccounted)."""


def gather_reports(out: Any, procs: list[Any], poll_s: float = 1.0) -> list[dict[str, Any]]:
    """One report per client process from queue ``out`` (each a dict with its ``index``, the
    process's place in ``procs``). A process that has exited without one raises
    :class:`ClientDiedError` naming it and its exit status, instead of waiting forever; the
    queue is drained once more first, since a report can still be in the pipe of a process
    that put it and exited."""
    import queue

    parts: list[dict[str, Any]] = []
    while len(parts) < len(procs):
        try:
            parts.append(out.get(timeout=poll_s))
            continue
        except queue.Empty:
            pass
        got = {part["index"] for part in parts}
        dead = [
            (i, p.exitcode) for i, p in enumerate(procs) if i not in got and p.exitcode is not None
        ]
        if not dead:
            continue
        try:  # one more look: its report may have been in flight
            parts.append(out.get(timeout=poll_s))
            continue
        except queue.Empty:
            i, code = dead[0]
            raise ClientDiedError(
                f"client process {i} exited with status {code} before reporting "
                f"({len(parts)} of {len(procs)} clients reported)"
            ) from None
    return parts


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def summarize(run: dict[str, Any], slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    res = run["results"]
    ok = [r for r in res if r["ok"]]
    wall = run["wall_s"]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    good = [
        r for r in ok if r["ttft"] * 1000 <= slo_ttft_ms and (r["tpot"] or 0) * 1000 <= slo_tpot_ms
    ]
    running = run["running"]
    return {
        "rate_req_s": "inf" if math.isinf(run["rate"]) else run["rate"],
        "requests": len(res),
        "failed": len(res) - len(ok),
        "errors": sorted({str(r["error"])[:120] for r in res if r["error"]})[:5],
        "wall_s": round(wall, 2),
        "request_throughput": round(len(ok) / wall, 3),
        "output_tok_s": round(tokens / wall, 2),
        "total_tok_s": round((tokens + sum(r["prompt_tokens"] for r in ok)) / wall, 2),
        "ttft_ms": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
        "tpot_ms": {"p50": _pct(tpot, 50), "p99": _pct(tpot, 99)},
        "itl_ms": {"p50": _pct(itl, 50), "p99": _pct(itl, 99)},
        "e2e_ms": {
            "p50": _pct([r["e2e"] for r in ok], 50),
            "p99": _pct([r["e2e"] for r in ok], 99),
        },
        "goodput_req_s": round(len(good) / wall, 3),
        "clients": run.get("clients"),
        "cpu_busy": run.get("cpu_busy"),
        "running": {
            "mean": round(float(np.mean(running)), 1) if running else None,
            "max": max(running) if running else None,
        },
    }


def start_child(args: argparse.Namespace) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    for key in (
        "model",
        "device",
        "requests",
        "scale",
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "threads",
    ):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.skip_offline:
        cmd.append("--skip-offline")
    cmd.append("--engine-process" if args.engine_process else "--no-engine-process")
    if args.async_scheduling:
        cmd.append("--async-scheduling")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("SERVER "):
            return proc, json.loads(line[len("SERVER ") :])
        print(line, end="")
    raise RuntimeError(f"the server process exited ({proc.wait()}) before it was ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, random-llama3-8b or a path")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--url", default=None, help="a running server (no child, no offline)")
    parser.add_argument("--name", default=None, help="the served model name with --url")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--scale", type=int, default=1, help="divide the trace's lengths")
    parser.add_argument("--rates", default="inf,1,2,4")
    parser.add_argument(
        "--clients",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) // 2)),
        help="client processes sending the requests (default: half the CPUs, at most 8)",
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine in its own process (pagedkv serve's default) or, with "
        "--no-engine-process, in a thread of the server",
    )
    parser.add_argument(
        "--async-scheduling",
        action="store_true",
        help="overlapped scheduling in the offline run and the server alike",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--svg-from", default=None, help="print the SVG curve of a results JSON")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients < 1:
        parser.error(f"--clients must be >= 1, got {args.clients}")
    if args.svg_from:
        print(svg(json.loads(Path(args.svg_from).read_text())))
        return
    if args.serve:
        run_server(args)
        return
    sys.path.insert(0, str(HERE))
    from provenance import provenance

    cpu = args.device == "cpu" or (args.device == "auto" and not _has_cuda())
    slo_ttft = args.slo_ttft_ms or (5000.0 if cpu else 1000.0)
    slo_tpot = args.slo_tpot_ms or (500.0 if cpu else 30.0)
    proc = None
    try:
        if args.url:
            info: dict[str, Any] = {"url": args.url, "name": args.name, "vocab": 32000}
        else:
            proc, info = start_child(args)
        prompts, n_out = trace(args.requests, args.scale, int(info["vocab"]))
        result: dict[str, Any] = {
            **provenance(),
            "benchmark": "pagedkv serve under Poisson load (benchmarks/serve_load.py)",
            "model": info["name"],
            "device": "cpu" if cpu else "cuda",
            "trace": f"ShareGPT-like (docs/workloads.md), seed 0, {args.requests} requests, "
            f"lengths / {args.scale}, clipped to [4, {1024 // args.scale}]",
            "mean_input": round(float(np.mean([len(p) for p in prompts])), 1),
            "mean_output": round(float(np.mean(n_out)), 1),
            "engine": {
                "max_model_len": args.max_model_len,
                "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "torch_threads": args.threads if cpu else None,
                "engine_process": args.engine_process,
                "async_scheduling": args.async_scheduling,
            },
            "slo": {"ttft_ms": slo_ttft, "tpot_ms": slo_tpot},
            "load_average_1m_at_start": round(os.getloadavg()[0], 2),
            "offline": info.get("offline"),
            "runs": [],
        }
        for i, text in enumerate(args.rates.split(",")):
            rate = math.inf if text.strip() == "inf" else float(text)
            pid = proc.pid if proc is not None else None
            run = asyncio.run(
                at_rate(
                    info["url"],
                    info["name"],
                    prompts,
                    n_out,
                    rate,
                    seed=i,
                    server_pid=pid,
                    clients=args.clients,
                )  # fmt: skip
            )
            row = summarize(run, slo_ttft, slo_tpot)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
        offline_tok_s = (info.get("offline") or {}).get("output_tok_s")
        inf_rows = [r for r in result["runs"] if r["rate_req_s"] == "inf"]
        if offline_tok_s and inf_rows:
            result["server_vs_offline_at_inf"] = round(
                inf_rows[0]["output_tok_s"] / offline_tok_s, 3
            )
        print(table(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if proc is not None:
            after = stop_child(proc)
            if after is not None and args.out and Path(args.out).exists():
                saved = json.loads(Path(args.out).read_text())
                saved["offline_after"] = after
                Path(args.out).write_text(json.dumps(saved, indent=2) + "\n")
                print(f"offline LLM.generate after the load: {after['output_tok_s']} out tok/s")


def stop_child(proc: subprocess.Popen[str]) -> dict[str, Any] | None:
    """SIGTERM the server child; it then times ``LLM.generate`` once more (its report)."""
    proc.terminate()
    after = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("OFFLINE_AFTER "):
                after = json.loads(line[len("OFFLINE_AFTER ") :])
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
    return after


def svg(result: dict[str, Any], width: int = 640, height: int = 360) -> str:
    """The latency/throughput curve as an SVG (no blank lines: it goes into Markdown as is):
    x = output tokens/s measured at each rate, y = latency in ms (log scale), one point per rate
    for TTFT p50, TPOT p50 and TPOT p99."""
    runs = sorted(result["runs"], key=lambda r: r["output_tok_s"])
    series = [
        ("TTFT p50", "#1f77b4", [r["ttft_ms"]["p50"] for r in runs]),
        ("TPOT p50", "#2ca02c", [r["tpot_ms"]["p50"] for r in runs]),
        ("TPOT p99", "#d62728", [r["tpot_ms"]["p99"] for r in runs]),
    ]
    xs = [r["output_tok_s"] for r in runs]
    ys = [y for _, _, vals in series for y in vals if y]
    left, right, top, bottom = 70, 20, 30, 50
    x_hi = max(xs) * 1.1
    lo, hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    hi = max(hi, lo + 1)

    def px(x: float) -> float:
        return left + (width - left - right) * x / x_hi

    def py(y: float) -> float:
        return top + (height - top - bottom) * (hi - math.log10(y)) / (hi - lo)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="{width / 2}" y="18" text-anchor="middle">{result["model"]} on '
        f"{result['device']}: latency vs throughput (one point per request rate)</text>",
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
        f'stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">'
        f"output tokens/s</text>",
        f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {(top + height - bottom) / 2})">ms (log scale)</text>',
    ]
    for e in range(lo, hi + 1):
        y = py(10**e)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{10**e:g}</text>')
    for k in range(6):
        x = x_hi * k / 5
        out.append(
            f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.0f}</text>'
        )
    for i, (label, color, vals) in enumerate(series):
        pts = [(px(x), py(y)) for x, y in zip(xs, vals) if y]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for a, b in pts:
            out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>')
        lx = left + 10 + 110 * i
        out.append(f'<rect x="{lx}" y="{top + 4}" width="12" height="4" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{top + 10}">{label}</text>')
    for r, x in zip(runs, xs):
        y = py(r["tpot_ms"]["p99"] or 1)
        out.append(
            f'<text x="{px(x):.1f}" y="{y - 8:.1f}" text-anchor="middle" fill="#555">'
            f"{r['rate_req_s']}/s</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def table(result: dict[str, Any]) -> str:
    """The runs as a Markdown table."""
    lines = [
        "| rate (req/s) | req/s | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | "
        "ITL p50 / p99 (ms) | goodput (req/s) | running mean / max | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['rate_req_s']} | {r['request_throughput']} | {r['output_tok_s']} | "
            f"{r['ttft_ms']['p50']} / {r['ttft_ms']['p99']} | "
            f"{r['tpot_ms']['p50']} / {r['tpot_ms']['p99']} | "
            f"{r['itl_ms']['p50']} / {r['itl_ms']['p99']} | {r['goodput_req_s']} | "
            f"{r['running']['mean']} / {r['running']['max']} | {r['failed']} |"
        )
    off = result.get("offline")
    if off:
        lines.append(
            f"\nOffline `LLM.generate` on the same trace and engine: {off['output_tok_s']} out "
            f"tok/s; server at infinite rate / offline = {result.get('server_vs_offline_at_inf')}"
        )
    after = result.get("offline_after")
    if after:
        lines.append(f"Offline again after the load: {after['output_tok_s']} out tok/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
