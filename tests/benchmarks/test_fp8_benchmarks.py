"""The CPU-safe parts of benchmarks/gpu_fp8.py and benchmarks/fp8_quality.py."""

from __future__ import annotations

import pytest
from benchmark_module import load_benchmark


def test_gpu_fp8_arguments() -> None:
    g = load_benchmark("gpu_fp8")
    args = g.parse_args(["--out", "/tmp/x"])
    assert args.out == "/tmp/x" and args.sections == list(g.SECTIONS) and args.kv_gb == 2.0
    args = g.parse_args(["--out", "d", "--sections", "capacity,decode", "--kv-gb", "2.5"])
    assert args.sections == ["capacity", "decode"] and args.kv_gb == 2.5
    with pytest.raises(SystemExit):
        g.parse_args(["--sections", "decode,speed"])
    assert max(length for _, length in g.DECODE_SHAPES) >= 32768  # long context is measured


def test_fp8_doubles_the_blocks_per_gib() -> None:
    cap = load_benchmark("gpu_fp8").blocks_per_gib()
    assert cap["bfloat16"]["bytes_per_block"] == 2 * 32 * 16 * 8 * 128 * 2  # 2 MiB
    assert cap["fp8_e4m3"]["blocks_per_gib"] == 2 * cap["bfloat16"]["blocks_per_gib"] == 1024
    assert cap["ratio"] == 2.0


def test_fp8_quality_arguments_and_agreement() -> None:
    q = load_benchmark("fp8_quality")
    args = q.parse_args(["--tokens", "8", "--configs", "fp32,fp8_e4m3_per_tensor"])
    assert args.tokens == 8 and args.configs.split(",")[0] == q.CONFIGS[0][0] == "fp32"
    assert len(q.PROMPTS) == 8
    same = q.agreement([[1, 2], [3, 4]], [[1, 2], [3, 4]])
    assert same == {"identical_outputs": 1.0, "prefix_agreement": 1.0, "position_agreement": 1.0}
    off = q.agreement([[1, 2, 3, 4]], [[9, 2, 3, 4]])  # diverges at once, agrees after
    assert off["prefix_agreement"] == 0.0 and off["position_agreement"] == 0.75
