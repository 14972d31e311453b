"""FastLaunch: the compiled kernel kept per specialization, launched without Triton's binding.

On CPU a stand-in kernel records what is called (the interpreter keeps nothing to launch
directly); on the GPU the real decode kernel is launched both ways and compared bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels.triton_launch import FastLaunch, _hook_set, _Kept, specialization_key


class _Compiled:
    """What Triton's JIT entry point returns: ``compiled[grid](*all_args)`` launches."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    def __getitem__(self, grid: tuple[int, int, int]) -> Any:
        return lambda *args: self.log.append(("direct", (grid, args)))


class _Param:
    def __init__(self, is_constexpr: bool) -> None:
        self.is_constexpr = is_constexpr


class _Kernel:
    """A stand-in ``@triton.jit`` kernel with parameters ``x, n, BLOCK, MODE`` (the last two
    compile-time)."""

    __name__ = "_kernel"
    arg_names = ["x", "n", "BLOCK", "MODE"]
    params = [_Param(False), _Param(False), _Param(True), _Param(True)]

    def __init__(self, returns_compiled: bool = True) -> None:
        self.log: list[tuple[str, Any]] = []
        self.returns_compiled = returns_compiled

    def __getitem__(self, grid: tuple[int, int, int]) -> Any:
        def jit(*args: object, **kwargs: object) -> _Compiled | None:
            self.log.append(("jit", (grid, args, kwargs)))
            return _Compiled(self.log) if self.returns_compiled else None

        return jit


def test_a_key_seen_once_launches_directly_with_every_argument_in_order() -> None:
    kernel = _Kernel()
    launch = FastLaunch(kernel)
    x = torch.zeros(64)
    launch((4, 1, 1), x, 32, MODE="a", BLOCK=64, num_warps=4)
    launch((8, 2, 1), x, 48, MODE="a", BLOCK=64, num_warps=4)  # same classes: 32, 48 % 16 == 0
    assert [kind for kind, _ in kernel.log] == ["jit", "direct"]
    # the direct launch gets the run-time arguments, then the constexprs in signature order
    assert kernel.log[1][1] == ((8, 2, 1), (x, 48, 64, "a"))
    assert launch.jit_calls == 1


@pytest.mark.parametrize(
    "first, second",
    [
        ((0, 32), (1, 32)),  # a tensor 4 bytes off a 16-byte boundary
        ((0, 32), (0, 33)),  # an int that is not a multiple of 16
        ((0, 17), (0, 1)),  # an int equal to 1 (Triton may fold it)
        ((0, 32), (0, 2**33)),  # an int past 32 bits
    ],
)
def test_another_specialization_class_goes_through_triton_again(
    first: tuple[int, int], second: tuple[int, int]
) -> None:
    kernel = _Kernel()
    launch = FastLaunch(kernel)
    base = torch.zeros(64)
    for offset, n in (first, second):
        launch((1, 1, 1), base[offset:], n, BLOCK=64, MODE="a")
    assert [kind for kind, _ in kernel.log] == ["jit", "jit"]
    assert len(launch.compiled) == 2


def test_another_dtype_constexpr_or_option_goes_through_triton_again() -> None:
    kernel = _Kernel()
    launch = FastLaunch(kernel)
    x = torch.zeros(64)
    launch((1, 1, 1), x, 32, BLOCK=64, MODE="a")
    launch((1, 1, 1), x.double(), 32, BLOCK=64, MODE="a")
    launch((1, 1, 1), x, 32, BLOCK=32, MODE="a")
    launch((1, 1, 1), x, 32, BLOCK=64, MODE="b")
    launch((1, 1, 1), x, 32, BLOCK=64, MODE="a", num_warps=8)
    assert launch.jit_calls == 5
    assert all(kind == "jit" for kind, _ in kernel.log)


def test_a_missing_kernel_argument_is_named() -> None:
    launch = FastLaunch(_Kernel())
    with pytest.raises(TypeError, match="MODE"):
        launch((1, 1, 1), torch.zeros(4), 16, BLOCK=64)


def test_a_compile_time_argument_given_positionally_is_refused() -> None:
    """Run-time arguments are keyed by class (32 and 48 alike): a constexpr among them would
    reuse a kernel compiled for another value."""
    launch = FastLaunch(_Kernel())
    with pytest.raises(TypeError, match="3 positional arguments, expected the 2 run-time"):
        launch((1, 1, 1), torch.zeros(4), 16, 64, MODE="a")


def test_a_grid_that_is_not_a_3_tuple_is_refused() -> None:
    """The direct launch unpacks three grid sizes: a shorter grid would work through Triton the
    first time and fail on every later call."""
    launch = FastLaunch(_Kernel())
    with pytest.raises(TypeError, match="3-tuple"):
        launch((4,), torch.zeros(4), 16, BLOCK=64, MODE="a")  # type: ignore[arg-type]


def test_a_run_time_argument_given_by_keyword_is_refused() -> None:
    launch = FastLaunch(_Kernel())
    with pytest.raises(TypeError, match="1 positional arguments"):
        launch((1, 1, 1), torch.zeros(4), n=16, BLOCK=64, MODE="a")


def test_a_kernel_with_run_time_parameters_after_compile_time_ones_is_refused() -> None:
    kernel = _Kernel()
    kernel.params = [_Param(False), _Param(True), _Param(False), _Param(True)]
    with pytest.raises(ValueError, match="run-time parameters first"):
        FastLaunch(kernel)


def test_ints_past_2_to_the_63_are_a_class_of_their_own() -> None:
    x = torch.zeros(4)
    assert specialization_key((x, 2**40), ()) != specialization_key((x, 2**63 + 16), ())


def test_under_the_interpreter_every_call_goes_through_triton() -> None:
    kernel = _Kernel(returns_compiled=False)  # the interpreter's entry point returns None
    launch = FastLaunch(kernel)
    for _ in range(3):
        launch((1, 1, 1), torch.zeros(4), 16, BLOCK=64, MODE="a")
    assert [kind for kind, _ in kernel.log] == ["jit"] * 3
    assert not launch.compiled


def test_the_key_ignores_float_values_and_int_values_within_a_class() -> None:
    x = torch.zeros(32)
    assert specialization_key((x, 32, 0.5), ()) == specialization_key((x, 64, 2.0), ())
    assert specialization_key((x, 3), ()) == specialization_key((x, 5), ())
    assert specialization_key((x, True), ()) != specialization_key((x, False), ())


def test_a_kept_kernel_launches_through_its_launcher_with_the_current_stream() -> None:
    """The direct launch: the launcher gets the grid, the device's stream, the function and
    packed metadata, no hooks, then the run-time arguments and the constants."""
    calls: list[tuple[object, ...]] = []
    kept = _Kept(
        _Compiled([]),
        (lambda *a: calls.append(a), "function", "packed", lambda dev: f"stream{dev}"),
        device=3,
    )
    kept.launch((4, 2, 1), ("x", 16), (64, "a"))
    assert calls == [(4, 2, 1, "stream3", "function", "packed", None, None, None, "x", 16, 64, "a")]


def test_a_launch_hook_sends_kept_kernels_through_tritons_runner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A profiler's launch hook must see every launch: the runner calls it, the direct path
    would not."""
    import triton

    log: list[tuple[str, Any]] = []
    direct: list[object] = []
    kept = _Kept(_Compiled(log), (lambda *a: direct.append(a), "f", "p", lambda d: 0), device=0)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
    kept.launch((1, 1, 1), ("x",), (64,))
    assert log == [("direct", ((1, 1, 1), ("x", 64)))] and not direct
    assert _hook_set(lambda: None) and not _hook_set(None)


@pytest.mark.gpu
def test_gpu_direct_launches_match_triton_bit_for_bit() -> None:
    """The decode kernel through FastLaunch (kept kernels, direct launches) against the same
    calls through Triton's entry point, over batches, splits and a misaligned cache view."""
    import kernels
    from kernels import triton_decode

    assert torch.cuda.is_available()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    hq, hkv, d, page = 32, 8, 128, 16
    pool = torch.randn(257 * page * hkv * d + 8, device=dev, dtype=torch.bfloat16)
    for offset in (0, 8):  # 8 bf16 = 16 bytes: aligned; then a view 2 bytes off below
        for shift in (0, 1):
            start = offset + shift
            kc = pool[start : start + 256 * page * hkv * d].view(256, page, hkv, d)
            vc = torch.randn_like(kc)
            for batch, length, splits in ((1, 4096, None), (3, 700, 1), (5, 33, 4)):
                q = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)
                pages = (length + page - 1) // page
                bt = torch.randint(0, 256, (batch, pages), device=dev, dtype=torch.int32)
                lens = torch.full((batch,), length, device=dev, dtype=torch.int32)
                runs = []
                for direct in (True, False, True):
                    saved = triton_decode._DECODE.compiled, triton_decode._MERGE.compiled
                    if not direct:  # an empty memo each call: every launch through Triton
                        triton_decode._DECODE.compiled, triton_decode._MERGE.compiled = {}, {}
                    try:
                        runs.append(
                            kernels.paged_decode(
                                q, kc, vc, bt, lens, scale=d**-0.5, num_splits=splits
                            )
                        )
                    finally:
                        triton_decode._DECODE.compiled, triton_decode._MERGE.compiled = saved
                torch.cuda.synchronize()
                assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
    before = triton_decode._DECODE.jit_calls
    q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16)
    bt = torch.arange(256, device=dev, dtype=torch.int32)[None]
    lens = torch.tensor([4096], device=dev, dtype=torch.int32)
    for _ in range(5):
        kernels.paged_decode(q, kc, vc, bt, lens, scale=d**-0.5)
    assert triton_decode._DECODE.jit_calls - before <= 1  # once for a new key, then direct
    kept = list(triton_decode._DECODE.compiled.values())
    assert kept and all(k.direct is not None and k.device is not None for k in kept)
