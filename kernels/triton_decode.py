# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton paged decode: flash-decoding with all query heads of a KV head in one program.

Grid ``(B, Hkv, S)``. Program ``(b, h, s)`` loads the ``G = Hq / Hkv`` query heads that share KV
head ``h`` as one ``[G_PAD, D]`` tile (``G_PAD >= 16`` rows, padding rows zero) so that both
products run on the tensor cores: ``[G_PAD, D] x [D, BLOCK_N]`` for the logits and
``[G_PAD, BLOCK_N] x [BLOCK_N, D]`` for the values. It walks split ``s`` of the visible keys in
tiles of ``BLOCK_N`` tokens; token ``n`` is read from page ``block_table[b, n // PAGE]`` row
``n % PAGE``, with the element offset formed in int64 (block ids times the block stride pass
2^31 on large pools). Any page size from 1 works: a tile of ``BLOCK_N`` keys may span
``BLOCK_N / PAGE`` pages, one row each at page 1. A head dim ``D`` that is not a power of two is
tiled as ``BLOCK_D = next_pow2(D)`` columns with every load and store masked by ``col < D``
(``other=0``): padded lanes add 0 to the logits and are never written. With ``S == 1`` the
program writes the normalised output directly; otherwise it writes a partial ``(o, lse)`` and
``_merge_kernel`` combines the ``S`` states: ``o = sum_j w_j o_j / sum_j w_j`` with
``w_j = 2^(lse_j - max lse)`` (base-2 log-sum-exp).

Launch cost matters at small batch (a decode step is tens of microseconds), so the kernels take
few run-time arguments: q, out and the inner cache dimensions are contiguous and their strides
are derived from the compile-time sizes; only the block stride and table width vary at run time.
The table width and the window are marked ``do_not_specialize``: Triton would otherwise compile
one variant per divisibility class of each (width 64 vs 65), mid-run, as an engine's tables grow.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.checks import AttentionDims
from kernels.splits import choose_num_splits
from kernels.triton_common import (
    check_inner_contiguous,
    check_triton_dims,
    dot_config,
    next_pow2,
    padded_head_dim,
)
from kernels.triton_launch import FastLaunch

__all__ = [
    "triton_paged_decode",
    "decode_config",
    "num_sms",
    "FP8_DEQUANT_MODES",
    "DEFAULT_FP8_DEQUANT",
    "DEFAULT_FP8_DEQUANT_F16",
    "fp8_dequant_mode",
    "fp8_bits_dequant",
]

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)


def _prmt_asm(shift: int, mask: int, scale: int | None) -> str:
    """PTX: one word of four fp8 codes -> two words of two 16-bit floats. ``prmt`` with
    sign-replicating selectors makes ``[s1 * 0xFF, c1, s0 * 0xFF, c0]`` (``0x9180``) and
    ``[.., c3, .., c2]`` (``0xB3A2``); shifting by ``shift`` and masking with ``mask`` leaves a
    replicated sign bit at bit 15 and the code's 7 magnitude bits in the target's exponent and
    mantissa fields; ``scale`` (a bf16x2 power of two) multiplies by the exponent bias
    difference (exact)."""
    lines = [
        "{",
        ".reg .b32 t0, t1, f, z;",
        "prmt.b32 t0, $2, 0, 0x9180;",
        "prmt.b32 t1, $2, 0, 0xB3A2;",
        f"shl.b32 t0, t0, {shift};",
        f"shl.b32 t1, t1, {shift};",
    ]
    if scale is None:
        lines += [f"and.b32 $0, t0, {mask:#x};", f"and.b32 $1, t1, {mask:#x};"]
    else:
        lines += [
            f"and.b32 t0, t0, {mask:#x};",
            f"and.b32 t1, t1, {mask:#x};",
            f"mov.b32 f, {scale:#x};",
            "mov.b32 z, 0x80008000;",  # + (-0, -0): keeps the sign of zeros
            "fma.rn.bf16x2 $0, t0, f, z;",
            "fma.rn.bf16x2 $1, t1, f, z;",
        ]
    return "\n".join(lines + ["}"])


#: e4m3 -> fp16 bits: sign to 15, magnitude to 7..13 = the value times 2^-8.
_E4M3_F16 = tl.constexpr(_prmt_asm(7, 0xBF80BF80, None))
#: e5m2 -> fp16: the same value (e5m2 is fp16's top byte): ``[c1, 0, c0, 0]``, ``[c3, 0, c2, 0]``.
_E5M2_F16 = tl.constexpr("prmt.b32 $0, $2, 0, 0x1404;\nprmt.b32 $1, $2, 0, 0x3424;")
#: e4m3 -> bf16: sign to 15, magnitude to 4..10 (the value times 2^-120), times 2^120 (0x7B80).
_E4M3_BF16 = tl.constexpr(_prmt_asm(4, 0x87F087F0, 0x7B807B80))
#: e5m2 -> bf16: magnitude to 5..11 (the value times 2^-112), times 2^112 (0x7780).
_E5M2_BF16 = tl.constexpr(_prmt_asm(5, 0x8FE08FE0, 0x77807780))


def _prmt_pairs_asm(shift: int, mask: int, scale: int | None) -> str:
    """PTX: two words of four fp8 codes each, ``e`` (key 2i) and ``o`` (key 2i + 1), at the same
    four head-dim lanes -> four words ``[o_j, e_j]`` of two 16-bit floats, one per lane ``j``:
    the pairs of consecutive keys that a thread holds in the tensor cores' operand layout.
    ``prmt`` with selector ``j, 8|j, 4+j, 8|(4+j)`` makes ``[sgn o_j, o_j, sgn e_j, e_j]``
    (the transposition costs nothing: it is the byte selection ``_prmt_asm`` makes anyway);
    then the same shift, mask and (bf16) power-of-two multiply."""
    lines = ["{", ".reg .b32 t0, t1, t2, t3, f, z;"]
    for j in range(4):
        sel = ((8 | (4 + j)) << 12) | ((4 + j) << 8) | ((8 | j) << 4) | j
        lines.append(f"prmt.b32 t{j}, $4, $5, {sel:#x};")
    for j in range(4):
        lines.append(f"shl.b32 t{j}, t{j}, {shift};")
    if scale is None:
        lines += [f"and.b32 ${j}, t{j}, {mask:#x};" for j in range(4)]
    else:
        lines += [f"and.b32 t{j}, t{j}, {mask:#x};" for j in range(4)]
        lines += [f"mov.b32 f, {scale:#x};", "mov.b32 z, 0x80008000;"]
        lines += [f"fma.rn.bf16x2 ${j}, t{j}, f, z;" for j in range(4)]
    return "\n".join(lines + ["}"])


#: The key-pair forms of the maps above (e5m2 -> fp16 is the shift-free ``[o_j, 0, e_j, 0]``).
_E4M3_F16_PAIRS = tl.constexpr(_prmt_pairs_asm(7, 0xBF80BF80, None))
_E4M3_BF16_PAIRS = tl.constexpr(_prmt_pairs_asm(4, 0x87F087F0, 0x7B807B80))
_E5M2_BF16_PAIRS = tl.constexpr(_prmt_pairs_asm(5, 0x8FE08FE0, 0x77807780))
_E5M2_F16_PAIRS = tl.constexpr(_prmt_pairs_asm(8, 0xFF00FF00, None))


def _cvt_asm(fmt: str, pairs: bool) -> str:
    """PTX: the hardware conversion of two fp8 codes to two fp16 (``cvt.rn.f16x2.e4m3x2``,
    sm_89+; exact), on a word's halves (``[c1, c0]``, ``[c3, c2]``) or, with ``pairs``, on the
    key pairs ``[o_j, e_j]`` of two words gathered by ``prmt`` (selectors 0x5140, 0x7362)."""
    if not pairs:
        body = ["mov.b32 {l0, h0}, $2;", f"cvt.rn.f16x2.{fmt}x2 $0, l0;"]
        body.append(f"cvt.rn.f16x2.{fmt}x2 $1, h0;")
    else:
        body = ["prmt.b32 t0, $4, $5, 0x5140;", "prmt.b32 t1, $4, $5, 0x7362;"]
        body += ["mov.b32 {l0, h0}, t0;", "mov.b32 {l1, h1}, t1;"]
        body += [f"cvt.rn.f16x2.{fmt}x2 ${j}, {r};" for j, r in enumerate(("l0", "h0", "l1", "h1"))]
    return "\n".join(["{", ".reg .b32 t0, t1;", ".reg .b16 l0, h0, l1, h1;", *body, "}"])


_E4M3_CVT = tl.constexpr(_cvt_asm("e4m3", False))
_E5M2_CVT = tl.constexpr(_cvt_asm("e5m2", False))
_E4M3_CVT_PAIRS = tl.constexpr(_cvt_asm("e4m3", True))
_E5M2_CVT_PAIRS = tl.constexpr(_cvt_asm("e5m2", True))


@triton.jit
def _prmt(w, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(
        ASM, "=r,=r,r", [w], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1
    )


@triton.jit
def _x256(x):
    return (x.to(tl.float32) * 256.0).to(tl.float16)


@triton.jit
def _fp8_words_dequant(
    w,
    E5M2: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    PRMT_ASM: tl.constexpr,
    BF16: tl.constexpr,
    DPERM: tl.constexpr = False,
    HW_CVT: tl.constexpr = False,
):
    """[ROWS, COLS / 4] 32-bit words of four fp8 codes (little-endian) -> [ROWS, COLS] float16
    (``BF16`` False) or bfloat16, with integer operations instead of conversion instructions.

    fp16: an e5m2 code is the top byte of the fp16 of its value; an e4m3 code's magnitude bits
    go to fp16 bits 7..13 and its sign to bit 15, which is the value times ``2^-8`` (subnormals
    too: e4m3's ``m * 2^-9`` is fp16's subnormal ``m * 2^-17``), so the kernel multiplies the
    logit scale and the output by 256 (exact). bf16: the magnitude bits go to bits 4..10 (e4m3)
    or 5..11 (e5m2), the value times ``2^-120`` or ``2^-112``, and one bf16x2 multiply by the
    power of two restores it exactly: the same bf16 values as ``k.to(torch.bfloat16)``. On the
    GPU (``PRMT_ASM``) two ``prmt`` per word place the bytes; the interpreter runs the same maps
    in Triton operations on each 16-bit half ``[0, c]``.
    """
    w = w.to(tl.uint32, bitcast=True)
    if PRMT_ASM and HW_CVT:
        if E5M2:
            lo, hi = _prmt(w, _E5M2_CVT)
        else:
            lo, hi = _prmt(w, _E4M3_CVT)
    elif PRMT_ASM:
        if BF16:
            if E5M2:
                lo, hi = _prmt(w, _E5M2_BF16)
            else:
                lo, hi = _prmt(w, _E4M3_BF16)
        else:
            if E5M2:
                lo, hi = _prmt(w, _E5M2_F16)
            else:
                lo, hi = _prmt(w, _E4M3_F16)
    else:
        lo = (w & 0xFF) | ((w & 0xFF00) << 8)  # [0, c1, 0, c0]
        hi = ((w >> 16) & 0xFF) | ((w >> 8) & 0xFF0000)  # [0, c3, 0, c2]
        sign_lo = (lo & 0x800080) << 8  # bit 7 -> bit 15 of each half
        sign_hi = (hi & 0x800080) << 8
        shift: tl.constexpr = (5 if E5M2 else 4) if BF16 else (8 if E5M2 else 7)
        lo = ((lo & 0x7F007F) << shift) | sign_lo
        hi = ((hi & 0x7F007F) << shift) | sign_hi
    if BF16 and not PRMT_ASM:  # bf16 bits as float32's top half (float32 keeps subnormals),
        bias: tl.constexpr = 2.0**112 if E5M2 else 2.0**120  # times the power of two: exact
        a0 = (((lo & 0xFFFF) << 16).to(tl.float32, bitcast=True) * bias).to(tl.bfloat16)
        a1 = ((lo & 0xFFFF0000).to(tl.float32, bitcast=True) * bias).to(tl.bfloat16)
        a2 = (((hi & 0xFFFF) << 16).to(tl.float32, bitcast=True) * bias).to(tl.bfloat16)
        a3 = ((hi & 0xFFFF0000).to(tl.float32, bitcast=True) * bias).to(tl.bfloat16)
    elif BF16:
        a0 = (lo & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)  # code 4j
        a1 = (lo >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)  # 4j + 1
        a2 = (hi & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)  # 4j + 2
        a3 = (hi >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)  # 4j + 3
    else:
        a0 = (lo & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        a1 = (lo >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        a2 = (hi & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        a3 = (hi >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    if HW_CVT and not PRMT_ASM and not E5M2:  # the conversion's values: times 256 (exact)
        a0, a1, a2, a3 = _x256(a0), _x256(a1), _x256(a2), _x256(a3)
    x = tl.join(tl.join(a0, a2), tl.join(a1, a3))  # [ROWS, COLS/4, 2, 2]: (j, i, o) -> 4j+2i+o
    if DPERM:  # column 16b + 8i + 2t + o holds lane 16b + 4t + 2i + o (see _swap_k_lanes)
        x = tl.reshape(x, (ROWS, COLS // 16, 4, 2, 2))
        x = tl.permute(x, (0, 1, 3, 2, 4))
    return tl.reshape(x, (ROWS, COLS))


@triton.jit
def _prmt_pairs(we, wo, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(
        ASM,
        "=r,=r,=r,=r,r,r",
        [we, wo],
        dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _halves(x, E5M2: tl.constexpr, BF16: tl.constexpr, DONE: tl.constexpr):
    """Words of two 16-bit halves -> (low, high) as float16 or bfloat16. ``DONE``: the halves
    hold the final bits (the PTX maps); otherwise each half is ``[0, c]``, a code mapped here
    with Triton operations (the interpreter's form of the same map)."""
    if not DONE:
        sign = (x & 0x800080) << 8
        shift: tl.constexpr = (5 if E5M2 else 4) if BF16 else (8 if E5M2 else 7)
        x = ((x & 0x7F007F) << shift) | sign
    if BF16 and not DONE:  # bf16 bits as float32's top half (float32 keeps subnormals)
        bias: tl.constexpr = 2.0**112 if E5M2 else 2.0**120
        lo = (((x & 0xFFFF) << 16).to(tl.float32, bitcast=True) * bias).to(tl.bfloat16)
        hi = ((x & 0xFFFF0000).to(tl.float32, bitcast=True) * bias).to(tl.bfloat16)
    elif BF16:
        lo = (x & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        hi = (x >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        lo = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _fp8_pairs_dequant(
    we,
    wo,
    E5M2: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    PRMT_ASM: tl.constexpr,
    BF16: tl.constexpr,
    TRANS: tl.constexpr = False,
    HW_CVT: tl.constexpr = False,
):
    """Words of the even keys ``we`` and the odd keys ``wo`` ([ROWS / 2, COLS / 4] each, four
    codes per word) -> [ROWS, COLS] float16 (``BF16`` False; e4m3 times ``2^-8``) or bfloat16,
    with the head-dim lanes in the order ``n = j * COLS / 4 + c`` for lane ``4c + j`` (the
    caller stores the output columns back to ``4c + j``). The map is ``_fp8_words_dequant``'s,
    but each 32-bit result holds keys ``2i`` and ``2i + 1`` of one lane: the layout of a dot's
    second operand along its reduction (keys), so the compiler can keep the dequantized V in
    registers instead of staging it in shared memory for a transposing ``ldmatrix``. ``TRANS``:
    V^T [COLS, ROWS] instead, rows in the order of ``_swap_v_lanes`` (the swapped kernels'
    first operand of ``O^T = V^T P^T``). ``HW_CVT``: the hardware fp8x2 -> fp16x2 conversion
    (the values themselves, also for e4m3).
    """
    we = we.to(tl.uint32, bitcast=True)
    wo = wo.to(tl.uint32, bitcast=True)
    if PRMT_ASM and HW_CVT:
        if E5M2:
            x0, x1, x2, x3 = _prmt_pairs(we, wo, _E5M2_CVT_PAIRS)
        else:
            x0, x1, x2, x3 = _prmt_pairs(we, wo, _E4M3_CVT_PAIRS)
    elif PRMT_ASM:
        if BF16:
            if E5M2:
                x0, x1, x2, x3 = _prmt_pairs(we, wo, _E5M2_BF16_PAIRS)
            else:
                x0, x1, x2, x3 = _prmt_pairs(we, wo, _E4M3_BF16_PAIRS)
        else:
            if E5M2:
                x0, x1, x2, x3 = _prmt_pairs(we, wo, _E5M2_F16_PAIRS)
            else:
                x0, x1, x2, x3 = _prmt_pairs(we, wo, _E4M3_F16_PAIRS)
    else:  # [0, o_j, 0, e_j] per lane j
        x0 = (we & 0xFF) | ((wo & 0xFF) << 16)
        x1 = ((we >> 8) & 0xFF) | ((wo >> 8) & 0xFF) << 16
        x2 = ((we >> 16) & 0xFF) | ((wo >> 16) & 0xFF) << 16
        x3 = (we >> 24) | (wo >> 24) << 16
    e0, o0 = _halves(x0, E5M2, BF16, PRMT_ASM)
    e1, o1 = _halves(x1, E5M2, BF16, PRMT_ASM)
    e2, o2 = _halves(x2, E5M2, BF16, PRMT_ASM)
    e3, o3 = _halves(x3, E5M2, BF16, PRMT_ASM)
    if HW_CVT and not PRMT_ASM and not E5M2:  # the conversion's values: times 256 (exact)
        e0, o0 = _x256(e0), _x256(o0)
        e1, o1 = _x256(e1), _x256(o1)
        e2, o2 = _x256(e2), _x256(o2)
        e3, o3 = _x256(e3), _x256(o3)
    lane01 = tl.join(tl.join(e0, o0), tl.join(e1, o1))  # [I, C, 2 (key parity), 2 (j & 1)]
    lane23 = tl.join(tl.join(e2, o2), tl.join(e3, o3))
    x = tl.join(lane01, lane23)  # [I, C, parity, j & 1, j >> 1]
    if TRANS:  # V^T [COLS, ROWS]: row (j >> 1) COLS/2 + (c >> 3) 16 + (j & 1) 8 + (c & 7)
        x = tl.reshape(x, (ROWS // 2, COLS // 32, 8, 2, 2, 2))  # [I, c >> 3, c & 7, p, j]
        y = tl.reshape(tl.permute(x, (5, 1, 4, 2, 0, 3)), (COLS, ROWS))
    else:
        x = tl.permute(x, (0, 2, 4, 3, 1))  # [I, parity, j >> 1, j & 1, C]
        y = tl.reshape(x, (ROWS, COLS))  # key 2i + parity, column j * C + c
    return y


@triton.jit
def _swap_k_lanes(cols):
    """The head-dim lane that column ``16b + 8i + 2t + o`` of the swapped kernel's K (and q)
    holds: ``16b + 4t + 2i + o``, so that the four codes of one word land in the two pairs of
    columns that one thread holds in a dot's first operand (``DPERM``)."""
    return (cols // 16) * 16 + ((cols // 2) % 4) * 4 + ((cols // 8) % 2) * 2 + cols % 2


@triton.jit
def _swap_v_lanes(rows, BLOCK_D: tl.constexpr):
    """The head-dim lane ``4c + j`` that row ``m = (j >> 1) BLOCK_D/2 + (c >> 3) 16 + (j & 1) 8
    + (c & 7)`` of the swapped kernel's V^T (and of its output) holds (``_fp8_pairs_dequant``
    with ``TRANS``): the four lanes of one word land in the four rows one thread holds."""
    j = (rows // (BLOCK_D // 2)) * 2 + (rows // 8) % 2
    c = ((rows % (BLOCK_D // 2)) // 16) * 8 + rows % 8
    return 4 * c + j


@triton.jit
def _fp8_words_kernel(
    w_ptr,
    o_ptr,
    E5M2: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    PRMT_ASM: tl.constexpr,
    BF16: tl.constexpr,
    LAYOUT: tl.constexpr,
    HW_CVT: tl.constexpr,
):
    r = tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    w = tl.load(w_ptr + r[:, None] * (COLS // 4) + tl.arange(0, COLS // 4)[None, :])
    if LAYOUT == 0:  # "bits": natural order
        x = _fp8_words_dequant(w, E5M2, ROWS, COLS, PRMT_ASM, BF16, False, HW_CVT)
        tl.store(o_ptr + r[:, None] * COLS + c[None, :], x)
    elif LAYOUT == 1:  # the swapped kernel's K: permuted columns
        x = _fp8_words_dequant(w, E5M2, ROWS, COLS, PRMT_ASM, BF16, True, HW_CVT)
        tl.store(o_ptr + r[:, None] * COLS + _swap_k_lanes(c)[None, :], x)
    else:  # the swapped kernel's V^T [COLS, ROWS] from key pairs, permuted rows
        w2 = tl.reshape(w, (ROWS // 2, 2, COLS // 4))
        we, wo = tl.split(tl.permute(w2, (0, 2, 1)))
        x = _fp8_pairs_dequant(we, wo, E5M2, ROWS, COLS, PRMT_ASM, BF16, True, HW_CVT)
        tl.store(o_ptr + r[None, :] * COLS + _swap_v_lanes(c, COLS)[:, None], x)


#: fp8_bits_dequant's layouts: the "bits" tile, the swapped kernel's K and its V^T.
_BITS_LAYOUTS = ("words", "swap_k", "swap_v")


def fp8_bits_dequant(
    codes: torch.Tensor,
    dtype: torch.dtype = torch.float16,
    layout: str = "words",
    hw_cvt: bool = False,
) -> torch.Tensor:
    """The ``"bits"`` dequantization on its own: fp8 codes [R, C] (R, C powers of two, C >= 32)
    -> [R, C] of ``dtype``: bfloat16 gives the codes' values; float16 gives them times ``2^-8``
    for e4m3 (the kernel folds the 256 into its scales) and times 1 for e5m2; ``hw_cvt`` (float16
    only) is the hardware conversion of ``"f16_swap"``: the values themselves.

    ``layout`` picks the kernel's map: ``"words"`` (``"bits"``), ``"swap_k"`` (the swapped
    kernels' K, columns permuted) or ``"swap_v"`` (their V^T from pairs of keys); the result is
    put back in the codes' order. Runs the PTX on a GPU, Triton operations in the interpreter,
    so a test can check each map on every code.
    """
    rows, cols = codes.shape
    out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    words = codes.contiguous().view(torch.uint8).view(torch.int32)
    _fp8_words_kernel[(1,)](
        words,
        out,
        E5M2=codes.dtype == torch.float8_e5m2,
        ROWS=rows,
        COLS=cols,
        PRMT_ASM=not interpreting(),
        BF16=dtype == torch.bfloat16,
        LAYOUT=_BITS_LAYOUTS.index(layout),
        HW_CVT=hw_cvt,
    )
    return out


@triton.jit(do_not_specialize=["stride_btb", "window"])
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    lens_ptr,
    o_ptr,
    lse_ptr,
    ks_ptr,
    vs_ptr,
    stride_kb,
    stride_btb,
    scale_log2,
    softcap,
    window,
    HKV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    FP8: tl.constexpr,
    FP8_F16: tl.constexpr,
    FP8_BITS: tl.constexpr,
    BITS_BF16: tl.constexpr,
    E5M2: tl.constexpr,
    PRMT_ASM: tl.constexpr,
    SWAP_AB: tl.constexpr = False,
    V_PAIRS: tl.constexpr = False,
    HW_CVT: tl.constexpr = False,
    DEFER_L: tl.constexpr = False,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    n_tiles = tl.cdiv(seq_len - lo, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, SPLITS)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)

    rows = tl.arange(0, G_PAD)  # [G_PAD] query heads of this KV head
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D] head-dim lanes, >= D
    row_ok = rows < G
    if BLOCK_D == D:
        q_mask = row_ok[:, None]  # [G_PAD, 1]
    else:
        q_mask = row_ok[:, None] & (cols[None, :] < D)  # [G_PAD, BLOCK_D]
    head = (kvh * G + rows).to(tl.int64)  # [G_PAD] query head ids
    q_off = (b.to(tl.int64) * (HKV * G) + head) * D  # q, out: [B, Hq, D] contiguous
    if SWAP_AB:  # q's lanes in the order of the dequantized K's columns (DPERM)
        qcols = _swap_k_lanes(cols)
        if BLOCK_D == D:
            q = tl.load(q_ptr + q_off[:, None] + qcols[None, :], mask=q_mask, other=0.0)
        else:
            qm = row_ok[:, None] & (qcols[None, :] < D)
            q = tl.load(q_ptr + q_off[:, None] + qcols[None, :], mask=qm, other=0.0)
    else:
        q = tl.load(q_ptr + q_off[:, None] + cols[None, :], mask=q_mask, other=0.0)
    if FP8_F16:  # bf16 q -> fp16 (fp16 dots): exact for |q| in [2^-14, 65504] and 0
        q = q.to(tl.float16)
    if DOT_F32:
        q = q.to(tl.float32)
    if FP8:  # one KV head per program: fold its scales into the logit scale and the output
        scale_log2 = scale_log2 * tl.load(ks_ptr + kvh)
        if (
            FP8_BITS and not BITS_BF16 and not E5M2 and not HW_CVT
        ):  # undo the e4m3 bit dequantization's 2^-8 (exact)
            scale_log2 = scale_log2 * 256.0
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    if SWAP_AB:
        qt = tl.trans(q)  # [BLOCK_D, G_PAD]
        mt_i = tl.full([G_PAD], float("-inf"), tl.float32)
        lt_i = tl.zeros([G_PAD], tl.float32)
        if DEFER_L:  # per-key partial sums of p: summed over the keys once, after the loop
            ltn = tl.zeros([BLOCK_N, G_PAD], tl.float32)
        acct = tl.zeros([BLOCK_D, G_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = kvh.to(tl.int64) * D
    if FP8_BITS:
        kw_ptr = k_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
        vw_ptr = v_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
        wcols = tl.arange(0, BLOCK_D // 4)  # [BLOCK_D / 4] words of 4 codes
        w_head = kvh.to(tl.int64) * (D // 4)
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        ok = n < end
        page = tl.load(bt_row + n // PAGE, mask=ok, other=0).to(tl.int64)
        if FP8_BITS:  # [BLOCK_N, BLOCK_D / 4] words of 4 codes, dequantized in integer ops
            w_off = page * (stride_kb // 4) + (n % PAGE).to(tl.int64) * (HKV * D // 4) + w_head
            if BLOCK_D == D:
                w_mask = ok[:, None]
            else:
                w_mask = ok[:, None] & (wcols[None, :] < D // 4)
            kw = tl.load(kw_ptr + w_off[:, None] + wcols[None, :], mask=w_mask, other=0)
            vw = tl.load(vw_ptr + w_off[:, None] + wcols[None, :], mask=w_mask, other=0)
            k = _fp8_words_dequant(
                kw, E5M2, BLOCK_N, BLOCK_D, PRMT_ASM, BITS_BF16, SWAP_AB, HW_CVT
            )  # with SWAP_AB, K's columns in q's permuted order
            if V_PAIRS:  # V dequantized in key pairs straight into the dot's operand layout
                vw2 = tl.reshape(vw, (BLOCK_N // 2, 2, BLOCK_D // 4))
                we, wo = tl.split(tl.permute(vw2, (0, 2, 1)))  # even, odd keys [N / 2, D / 4]
                v = _fp8_pairs_dequant(
                    we, wo, E5M2, BLOCK_N, BLOCK_D, PRMT_ASM, BITS_BF16, SWAP_AB, HW_CVT
                )  # with SWAP_AB: V^T [BLOCK_D, BLOCK_N], rows permuted
            else:
                v = _fp8_words_dequant(vw, E5M2, BLOCK_N, BLOCK_D, PRMT_ASM, BITS_BF16)
        else:
            kv_off = page * stride_kb + (n % PAGE).to(tl.int64) * (HKV * D) + head_off  # int64
            if BLOCK_D == D:
                kv_mask = ok[:, None]  # [BLOCK_N, 1]
            else:
                kv_mask = ok[:, None] & (cols[None, :] < D)  # [BLOCK_N, BLOCK_D]
            k = tl.load(k_ptr + kv_off[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_off[:, None] + cols[None, :], mask=kv_mask, other=0.0)
        if FP8 and not FP8_BITS:  # fp8 codes -> q's dtype: exact (fp8 values are bf16/fp16/fp32)
            k = k.to(q.dtype)  # with FP8_F16, fp16: one hardware conversion per pair of codes
            v = v.to(q.dtype)
        if DOT_F32:
            k = k.to(tl.float32)
        if SWAP_AB:  # keys as rows: S^T = K q^T, O^T += V^T P^T; K, V^T stay in registers
            st = tl.dot(k, qt, input_precision=PRECISION)  # [BLOCK_N, G_PAD] fp32
            if HAS_SOFTCAP:
                y = st * (scale_log2 / (_LOG2E * softcap))
                st = softcap * _LOG2E * (1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
            else:
                st = st * scale_log2
            st = tl.where(ok[:, None], st, float("-inf"))
            mt_new = tl.maximum(mt_i, tl.max(st, 0))
            alphat = tl.exp2(mt_i - mt_new)
            pt = tl.exp2(st - mt_new[None, :])  # [BLOCK_N, G_PAD]
            if DEFER_L:  # no cross-warp reduction per tile (the keys span the 4 warps)
                ltn = ltn * alphat[None, :] + pt
            else:
                lt_i = lt_i * alphat + tl.sum(pt, 0)
            ptv = pt.to(v.dtype)
            if DOT_F32:
                ptv = ptv.to(tl.float32)
                v = v.to(tl.float32)
            acct = acct * alphat[None, :] + tl.dot(v, ptv, input_precision=PRECISION)
            mt_i = mt_new
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [G_PAD, BLOCK_N] fp32
            if HAS_SOFTCAP:
                # c * tanh(x / c) with tanh(y) = 1 - 2 / (exp(2y) + 1); scale_log2 = scale * log2(e)
                y = s * (scale_log2 / (_LOG2E * softcap))
                s = softcap * _LOG2E * (1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
            else:
                s = s * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a visible key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])  # [G_PAD, BLOCK_N]
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = p.to(v.dtype)
            if DOT_F32:
                pv = pv.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
            m_i = m_new
    if SWAP_AB:
        m_i = mt_i
        l_i = tl.sum(ltn, 0) if DEFER_L else lt_i
        acc = tl.trans(acct)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty split: l = 0, acc = 0 -> 0
    if FP8:
        if FP8_BITS and not BITS_BF16 and not E5M2 and not HW_CVT:
            o = o * (tl.load(vs_ptr + kvh) * 256.0)
        else:
            o = o * tl.load(vs_ptr + kvh)
    if V_PAIRS and SWAP_AB:  # output column m holds lane _swap_v_lanes(m)
        cols = _swap_v_lanes(cols, BLOCK_D)
        if BLOCK_D != D:
            q_mask = row_ok[:, None] & (cols[None, :] < D)
    elif V_PAIRS:  # output column j * BLOCK_D / 4 + c is head-dim lane 4c + j
        cols = 4 * (cols % (BLOCK_D // 4)) + cols // (BLOCK_D // 4)
        if BLOCK_D != D:
            q_mask = row_ok[:, None] & (cols[None, :] < D)
    if SPLITS == 1:
        tl.store(
            o_ptr + q_off[:, None] + cols[None, :],
            o.to(o_ptr.dtype.element_ty),
            mask=q_mask,
        )
    else:
        state = (b.to(tl.int64) * (HKV * G) + head) * SPLITS + split  # part [B, Hq, S, D]
        tl.store(o_ptr + state[:, None] * D + cols[None, :], o, mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + state, lse, mask=row_ok)  # lse [B, Hq, S]


@triton.jit
def _merge_kernel(
    part_ptr,
    lse_ptr,
    o_ptr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    S_PAD: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # b * Hq + h
    sp = tl.arange(0, S_PAD)
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D], lanes >= D masked
    col_ok = cols < D
    ok = sp < SPLITS
    lse = tl.load(lse_ptr + bh * SPLITS + sp, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # [S_PAD]; empty splits weigh 0
    parts = tl.load(
        part_ptr + (bh * SPLITS + sp)[:, None] * D + cols[None, :],
        mask=ok[:, None] & col_ok[None, :],
        other=0.0,
    )  # [S_PAD, BLOCK_D]
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [D]
    tl.store(o_ptr + bh * D + cols, o.to(o_ptr.dtype.element_ty), mask=col_ok)


#: the two kernels, launched through the compiled kernel kept per specialization (eager calls at
#: small batch are bound by Triton's per-call binding otherwise: kernels/triton_launch.py)
_DECODE = FastLaunch(_decode_kernel)
_MERGE = FastLaunch(_merge_kernel)


def decode_config(head_dim: int, dtype: torch.dtype, fp8_dequant: str = "") -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a head dim and dtype (and, for an fp8 cache, the
    dequantization that runs).

    Tuned on an H200 for 64, 128 and 256; any other dim takes the config of its padded tile width
    (the next power of two: 80 and 96 that of 128, 160 to 240 that of 256), since the registers
    and shared memory a program holds scale with the padded width. The fp8 dequantizations
    take the same, except the swapped-operand modes, which keep 4 programs per SM with two
    K/V buffers (5 stages) and run fastest so on the H200 (docs/fp8.md).
    """
    if interpreting():
        return 16, 1, 1
    width = padded_head_dim(head_dim)
    if fp8_dequant in _SWAP_MODES:  # two K/V buffers, still 4 programs per SM at D 128
        return (64, 4, 5) if width <= 128 else (32, 4, 2)
    if fp8_dequant in _WORD_MODES:  # as bf16's (4 programs per SM at D 128)
        return (64, 4, 3) if width <= 128 else (32, 4, 2)
    if dtype == torch.float32:
        return (32, 4, 2) if width <= 128 else (16, 4, 2)
    return (64, 4, 3) if width <= 128 else (32, 4, 2)


#: How the decode kernel turns fp8 codes into dot operands (see docs/fp8.md, "Decode speed"):
#:
#: * ``"convert"``: ``k.to(q.dtype)``; for bf16 queries Triton converts e4m3 -> fp16 -> bf16, one
#:   conversion instruction per element plus one per pair;
#: * ``"f16"``: the hardware fp8x2 -> fp16x2 conversion and fp16 dots (bf16 q rounded to fp16);
#: * ``"bits"``: K/V loaded as 32-bit words of four codes and placed into the bits of q's dtype
#:   with integer operations (two ``prmt`` per word on the GPU): for bf16, then one exact bf16x2
#:   multiply by a power of two, giving the same values and dots as ``"convert"``; for fp16, the
#:   e4m3 factor ``2^-8`` folded into the scales (the default);
#: * ``"bits_f16"``: as ``"bits"`` into fp16 for any q, fp16 dots (bf16 q rounded to fp16);
#: * ``"bits_swap"``, ``"bits_f16_swap"``: the same maps with the products swapped,
#:   ``S^T = K q^T`` and ``O^T = V^T P^T``, so that the dequantized K and V^T are the first
#:   operands of Hopper's ``wgmma``, which takes them from registers: K's head-dim lanes and q's
#:   are permuted alike (a dot does not depend on the order of its reduction), V is
#:   dequantized in pairs of keys (``prmt`` gathers key ``2i`` and ``2i + 1`` of a lane) and its
#:   lanes come out permuted and are stored back in place: no shared-memory round trip of the
#:   dequantized tiles, and q is read by the tensor cores from shared memory;
#: * ``"f16_swap"``: the swapped products with the hardware fp8x2 -> fp16x2 conversion in
#:   registers (one ``cvt`` per pair of codes, ``prmt`` gathering V's key pairs), fp16 dots.
#:
#: All but ``"convert"`` need fp16 or bf16 queries, and the ``"bits"`` modes rows that are 4-byte
#: aligned; otherwise ``"convert"`` runs.
FP8_DEQUANT_MODES = ("convert", "f16", "bits", "bits_f16", "bits_swap", "bits_f16_swap", "f16_swap")
#: The modes that load K/V as 32-bit words of four codes (rows must be 4-byte aligned).
_WORD_MODES = ("bits", "bits_f16", "bits_swap", "bits_f16_swap", "f16_swap")
#: The modes with fp16 dots (bf16 queries rounded to fp16).
_FP16_DOT_MODES = ("f16", "bits_f16", "bits_f16_swap", "f16_swap")
#: The modes with the products swapped (the dequantized tiles in wgmma's register operand).
_SWAP_MODES = ("bits_swap", "bits_f16_swap", "f16_swap")
#: The mode an fp8 cache gets with bf16 queries when the caller names none: the fastest whose
#: dots take q as it is (no rounding of bf16 queries to fp16). On the H200
#: (benchmarks/results/fp8_tune_h200.json, 420ee91), "bits_swap" at 64x4x5 decodes at
#: 1.35-1.48x the bf16 kernel's speed at 16 x 2048 to 8 x 32768, where "bits" runs at
#: 1.12-1.13x; "f16_swap" (opt-in for bf16 q) at 1.42-1.61x.
DEFAULT_FP8_DEQUANT = "bits_swap"
#: The default with fp16 queries: "f16_swap", whose fp16 dots then take q as it is (nothing is
#: rounded: the hardware fp8x2 -> fp16x2 conversion is exact and q is already fp16), so it is
#: as exact as "bits_swap" and the fastest mode measured (1.41-1.61x with bf16 q at 420ee91).
DEFAULT_FP8_DEQUANT_F16 = "f16_swap"


def fp8_dequant_mode(
    mode: str | None, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> str:
    """The fp8 dequantization that runs: ``mode`` (default :data:`DEFAULT_FP8_DEQUANT` for bf16
    queries, :data:`DEFAULT_FP8_DEQUANT_F16` for fp16 ones: each the fastest mode whose dots take
    q as it is) where the inputs allow it, else ``"convert"``: all but ``"convert"`` need fp16 or
    bf16 queries, the ``"bits"`` modes also a block stride and base addresses that keep every
    row 4-byte aligned.

    >>> q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    >>> kc = torch.zeros(2, 16, 1, 64, dtype=torch.float8_e4m3fn)
    >>> fp8_dequant_mode("bits", q, kc, kc), fp8_dequant_mode("bits", q.float(), kc, kc)
    ('bits', 'convert')
    >>> fp8_dequant_mode(None, q, kc, kc), fp8_dequant_mode(None, q.half(), kc, kc)
    ('bits_swap', 'f16_swap')
    """
    if mode is None:
        mode = DEFAULT_FP8_DEQUANT_F16 if q.dtype == torch.float16 else DEFAULT_FP8_DEQUANT
    if mode not in FP8_DEQUANT_MODES:
        raise ValueError(f"fp8_dequant={mode!r}: one of {', '.join(FP8_DEQUANT_MODES)}")
    if mode != "convert" and q.dtype not in (torch.float16, torch.bfloat16):
        return "convert"
    if mode in _WORD_MODES and (
        k_cache.stride(0) % 4 or k_cache.data_ptr() % 4 or v_cache.data_ptr() % 4
    ):
        return "convert"
    return mode


@functools.cache
def num_sms(device_index: int) -> int:
    """Multiprocessors of a CUDA device (read once per device)."""
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def triton_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    dims: AttentionDims,
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    num_splits: int | None,
    out: torch.Tensor | None,
    config: tuple[int, int, int] | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    fp8_dequant: str | None = None,
    defer_l: bool = False,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """Launch the decode kernel (and the merge when split). Shapes as ``kernels.paged_decode``;
    ``config`` overrides (BLOCK_N, num_warps, num_stages) for tuning; ``kv_scales`` are the
    ``[Hkv]`` float32 (k_scale, v_scale) of an fp8 cache (None otherwise); ``fp8_dequant`` one
    of :data:`FP8_DEQUANT_MODES` (None: :func:`fp8_dequant_mode`'s default for q's dtype).

    Tuning options (off by default; docs/fp8.md, "Closing the gap"): ``defer_l``, for the
    swapped-operand modes, keeps the softmax denominator as per-key partial sums and sums them
    over the keys once after the loop, instead of a cross-warp reduction per tile (the same
    values, summed in another order); ``maxnreg`` caps the registers per thread (Triton's
    launch option), e.g. 128 to keep 4 programs per SM at 128-key tiles."""
    check_triton_dims(dims, q.dtype)
    check_inner_contiguous(k_cache)
    batch, hq, d = q.shape
    result = out if out is not None and out.is_contiguous() else torch.empty_like(q)
    if batch == 0:
        return out if out is not None else result
    q = q.contiguous()
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    g = dims.group
    mode = fp8_dequant_mode(fp8_dequant, q, k_cache, v_cache) if kv_scales is not None else ""
    block_n, warps, stages = config or decode_config(d, q.dtype, mode)
    if num_splits is None:
        sms = num_sms(q.device.index or 0) if q.is_cuda else 132
        num_splits = choose_num_splits(
            batch, dims.num_kv_heads, dims.max_blocks * dims.block_size, num_sms=sms
        )
    splits = max(1, int(num_splits))
    precision, dot_f32 = dot_config(q.dtype)
    if splits == 1:
        part, lse = result, result  # lse unused
    else:
        part = torch.empty(batch, hq, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, hq, splits, dtype=torch.float32, device=q.device)
    _DECODE(
        (batch, dims.num_kv_heads, splits),
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part,
        lse,
        kv_scales[0] if kv_scales is not None else lse,
        kv_scales[1] if kv_scales is not None else lse,
        k_cache.stride(0),
        block_tables.stride(0),
        scale * LOG2E,
        float(softcap or 1.0),
        int(sliding_window or 0),
        HKV=dims.num_kv_heads,
        G=g,
        G_PAD=max(16, next_pow2(g)),
        D=d,
        BLOCK_D=padded_head_dim(d),
        PAGE=dims.block_size,
        BLOCK_N=block_n,
        SPLITS=splits,
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None,
        PRECISION=precision,
        DOT_F32=dot_f32,
        FP8=kv_scales is not None,
        FP8_F16=mode in _FP16_DOT_MODES and q.dtype == torch.bfloat16,
        FP8_BITS=mode in _WORD_MODES,
        BITS_BF16=mode in ("bits", "bits_swap") and q.dtype == torch.bfloat16,
        E5M2=k_cache.dtype == torch.float8_e5m2,
        PRMT_ASM=not interpreting(),
        SWAP_AB=mode.endswith("_swap"),
        V_PAIRS=mode.endswith("_swap"),
        HW_CVT=mode == "f16_swap",
        DEFER_L=defer_l and mode.endswith("_swap"),
        num_warps=warps,
        num_stages=stages,
        **({} if maxnreg is None else {"maxnreg": int(maxnreg)}),
    )
    if splits > 1:
        _MERGE(
            (batch * hq, 1, 1),
            part,
            lse,
            result,
            D=d,
            BLOCK_D=padded_head_dim(d),
            SPLITS=splits,
            S_PAD=max(2, next_pow2(splits)),
            num_warps=4 if padded_head_dim(d) >= 128 else 2,
        )
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result
