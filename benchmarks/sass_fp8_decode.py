"""Offline compile of the decode kernel for sm_90 (Hopper): registers, shared memory and the inner
loop's instruction mix, per KV dtype and fp8 dequantization, no GPU needed.

Run from the repository root (any machine; Triton's bundled ptxas/nvdisasm/cuobjdump do the
work)::

    PYTHONPATH=. python benchmarks/sass_fp8_decode.py [--configs 64x4x3,128x8x3] [--json F]
    PYTHONPATH=. python benchmarks/sass_fp8_decode.py --modes f16_swap,f16_swap+deferl \
        --configs 64x4x5,64x4x7,128x4x3x128     # a 4th number: maxnreg; +deferl: DEFER_L

To see what another Triton version makes of the same source (the H200 machine has 3.6), put
that version first on the path, e.g. ``pip install --target /tmp/t36 triton==3.6.0`` then
``PYTHONPATH=/tmp/t36:. python benchmarks/sass_fp8_decode.py``.

Shapes are Llama-3-8B's heads (Hq 32, Hkv 8, D 128), page 16, one split, bf16 queries. For each
variant it prints the main loop's length in SASS instructions per warp and per BLOCK_N tile,
the counts that matter (HMMA and Hopper's HGMMA, shared stores STS / STSM and loads LDS / LDSM,
conversions F2F/F2FP, byte loads LDS.U8, PRMT, HMUL2, cp.async LDGSTS, register moves), registers
per thread, local memory (spills), shared memory, the K/V
shared buffers, programs per SM (and the waves that the long shapes' 512 programs take on 132
SMs: a fraction past 1 leaves a tail of one program per SM), and a per-tile budget: the
cycles the tile's K/V bytes take at 4.4 TB/s over 132 SMs at 1.98 GHz (16.8 B/cycle/SM) against the
issue cycles (warp instructions / 4 schedulers) and the conversion-pipe cycles
(F2F + F2FP at 16 lanes per SM per cycle, the rate CUDA documents for type conversions).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VARIANTS = (  # (name, cache dtype in Triton's signature, fp8 dequantization)
    ("bf16", "bf16", None),
    ("fp8 convert", "fp8e4nv", "convert"),
    ("fp8 f16", "fp8e4nv", "f16"),
    ("fp8 bits", "fp8e4nv", "bits"),
    ("fp8 bits_f16", "fp8e4nv", "bits_f16"),
    ("fp8 bits + V pairs (flag, no mode)", "fp8e4nv", "bits+vpairs"),
    ("fp8 bits_swap", "fp8e4nv", "bits_swap"),
    ("fp8 bits_f16_swap", "fp8e4nv", "bits_f16_swap"),
    ("fp8 f16_swap", "fp8e4nv", "f16_swap"),
)
DEFAULT_CONFIGS = ((64, 4, 3), (64, 8, 4), (128, 4, 3), (128, 8, 3), (256, 8, 3))
KEYS = (
    "HMMA",
    "HGMMA",
    "STS",
    "STSM",
    "LDS",
    "F2F.",
    "F2FP.F16.E4M3",
    "LDS.U8",
    "PRMT",
    "LDSM",
    "LDGSTS",
    "IMAD.MOV",
    "HMUL2",
    "MUFU",
)
HBM_BYTES_PER_CYCLE = 4.4e12 / 132 / 1.98e9  # per SM
REGS_PER_SM, SMEM_PER_SM, MAX_WARPS = 65536, 227 * 1024, 64


def compile_variant(
    cache: str,
    mode: str | None,
    block_n: int,
    warps: int,
    stages: int,
    maxnreg: int | None = None,
) -> Any:
    """triton.compile of ``_decode_kernel`` for sm_90 with the launcher's specialization. A mode
    ending in ``+deferl`` sets ``DEFER_L`` (the swapped loop's deferred sum of p); ``maxnreg``
    caps the registers per thread (the launcher's ``maxnreg``)."""
    defer_l = mode is not None and mode.endswith("+deferl")
    mode = mode.removesuffix("+deferl") if mode is not None else None
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels.triton_decode import _decode_kernel as kernel

    fp8 = mode is not None
    types = {
        "q_ptr": "*bf16",
        "k_ptr": f"*{cache}",
        "v_ptr": f"*{cache}",
        "bt_ptr": "*i32",
        "lens_ptr": "*i32",
        "o_ptr": "*bf16",
        "lse_ptr": "*fp32",
        "ks_ptr": "*fp32",
        "vs_ptr": "*fp32",
        "stride_kb": "i32",
        "stride_btb": "i32",
        "scale_log2": "fp32",
        "softcap": "fp32",
        "window": "i32",
    }
    consts = {
        "HKV": 8,
        "G": 4,
        "G_PAD": 16,
        "D": 128,
        "BLOCK_D": 128,
        "PAGE": 16,
        "BLOCK_N": block_n,
        "SPLITS": 1,
        "HAS_WINDOW": False,
        "HAS_SOFTCAP": False,
        "PRECISION": "tf32",
        "DOT_F32": False,
        "FP8": fp8,
        "FP8_F16": mode in ("f16", "bits_f16", "bits_f16_swap", "f16_swap"),
        "FP8_BITS": mode is not None and (mode.startswith("bits") or mode.endswith("_swap")),
        "BITS_BF16": mode in ("bits", "bits_swap", "bits+vpairs"),
        "E5M2": False,
        "PRMT_ASM": True,
        "SWAP_AB": mode is not None and mode.endswith("_swap"),
        "V_PAIRS": mode is not None and (mode.endswith("_swap") or mode.endswith("vpairs")),
        "HW_CVT": mode == "f16_swap",
        "DEFER_L": defer_l,
    }
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    aligned = [n for n in types if n.endswith("_ptr")] + ["stride_kb"]  # multiples of 16
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={k: v for k, v in consts.items() if k in kernel.arg_names},
        attrs=attrs,
    )
    options: dict[str, Any] = {"num_warps": warps, "num_stages": stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def main_loop(sass: str) -> list[str]:
    """The longest backward-branch range of the disassembly: the loop over key tiles."""
    ins: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1).strip())
    best = (0, -1)
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s.*?(\.L_x_\d+)", text)
        if m and labels[m.group(1)] <= i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return ins[best[0] : best[1] + 1]


def _matches(op: str, key: str) -> bool:
    """``op`` counts under ``key``: a prefix match, except that ``STS`` (shared stores) leaves out
    ``STSM`` and ``LDS`` (shared loads) leaves out ``LDSM`` and ``LDS.U8``, counted apart."""
    if key == "STS":
        return op.startswith("STS") and not op.startswith("STSM")
    if key == "LDS":
        return op.startswith("LDS") and not op.startswith(("LDSM", "LDS.U8"))
    return op.startswith(key)


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def analyse(
    name: str, cache: str, mode: str | None, cfg: tuple[int, ...], tmp: Path
) -> dict[str, Any]:
    block_n, warps, stages = cfg[:3]
    maxnreg = cfg[3] if len(cfg) > 3 else None  # BLOCK_NxWARPSxSTAGESxMAXNREG
    compiled = compile_variant(cache, mode, block_n, warps, stages, maxnreg)
    cubin = tmp / "k.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run(
        [_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    usage = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))  # type: ignore[union-attr]
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))  # type: ignore[union-attr]
    shared = int(compiled.metadata.shared)
    ttgir = compiled.asm["ttgir"]
    buffers = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x", ttgir)
    loop = main_loop(sass)
    ops = collections.Counter(opcode(t) for t in loop)
    counts = {k: sum(v for o, v in ops.items() if _matches(o, k)) for k in KEYS}
    regs_alloc = -(-regs // 8) * 8
    per_sm = min(
        REGS_PER_SM // (regs_alloc * 32 * warps),
        SMEM_PER_SM // max(shared, 1),
        MAX_WARPS // warps,
    )
    elem_bytes = 2 if cache == "bf16" else 1
    tile_bytes = 2 * block_n * 128 * elem_bytes
    conversions = counts["F2F."] + counts["F2FP.F16.E4M3"]
    row = {
        "variant": name,
        "config": "x".join(map(str, cfg)),
        "loop_instr_per_warp": len(loop),
        **{k.rstrip("."): v for k, v in counts.items()},
        "regs": regs,
        "local_bytes": local,
        "shared_bytes": shared,
        "kv_buffers": buffers[-2:] if len(buffers) >= 2 else buffers,
        "programs_per_sm": per_sm,
        "waves_at_512_programs": round(512 / (132 * max(per_sm, 1)), 2),
        "mem_cycles_per_tile": round(tile_bytes / HBM_BYTES_PER_CYCLE),
        "issue_cycles_per_tile": round(len(loop) * warps / 4),
        "convert_cycles_per_tile": round(conversions * 32 * warps / 16),
    }
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default=",".join("x".join(map(str, c)) for c in DEFAULT_CONFIGS),
        help="BLOCK_NxWARPSxSTAGES[xMAXNREG], comma-separated (bf16 runs the first only)",
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--modes",
        default="",
        help="only these fp8 modes (comma-separated; a '+deferl' suffix sets DEFER_L), no bf16",
    )
    args = parser.parse_args(argv)
    import triton

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",") if c]
    variants: tuple[tuple[str, str, str | None], ...] = VARIANTS
    if args.modes:
        variants = tuple((f"fp8 {m}", "fp8e4nv", m) for m in args.modes.split(",") if m)
    rows = []
    print(f"triton {triton.__version__}, sm_90, Hq 32 Hkv 8 D 128 page 16, bf16 q")
    with tempfile.TemporaryDirectory() as tmp:
        for name, cache, mode in variants:
            for cfg in configs[:1] if mode is None else configs:
                row = analyse(name, cache, mode, cfg, Path(tmp))  # type: ignore[arg-type]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"triton": triton.__version__, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
