"""CompileWatch installs Triton's post-compile hook, records what compiles, chains and restores.

On the CPU nothing compiles (the interpreter runs kernels as Python), so these tests call the
hook the way Triton's JIT does; ``test_engine_gpu.py`` checks a real run compiles nothing after
warm-up.
"""

from __future__ import annotations

from typing import Any

import pytest

from fast.engine.compile_watch import CompiledAfterWarmUpError, CompileWatch


@pytest.fixture()
def knobs() -> Any:
    """Triton's knobs, imported in the test (never at collection: tests/kernels/conftest.py must
    set TRITON_INTERPRET=1 before anything imports triton)."""
    return pytest.importorskip("triton.knobs")


def _compile(knobs: Any, name: str) -> None:
    hook = knobs.runtime.jit_post_compile_hook
    if hook is not None:
        hook(
            key=name,
            repr=f"{name}[num_warps=4]",
            fn=None,
            compile={},
            is_manual_warmup=False,
            already_compiled=False,
        )


def test_records_chains_and_restores(knobs: Any) -> None:
    seen: list[str] = []

    def outer(**kwargs: Any) -> None:
        seen.append(kwargs["key"])

    before = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = outer
    try:
        with CompileWatch() as a:
            _compile(knobs, "k1")
            with CompileWatch() as b:
                _compile(knobs, "k2")
            _compile(knobs, "k3")
        _compile(knobs, "k4")
        assert a.kernels == ["k1[num_warps=4]", "k2[num_warps=4]", "k3[num_warps=4]"]
        assert b.count == 1 and b.kernels == ["k2[num_warps=4]"]
        assert seen == ["k1", "k2", "k3", "k4"]  # the earlier hook still sees everything
        assert knobs.runtime.jit_post_compile_hook is outer
    finally:
        knobs.runtime.jit_post_compile_hook = before


def test_check_names_the_kernels(knobs: Any) -> None:
    with CompileWatch() as watch:
        watch.check()  # nothing compiled: no error
        for i in range(6):
            _compile(knobs, f"kernel{i}")
    with pytest.raises(
        CompiledAfterWarmUpError, match=r"6 Triton compilation\(s\).*kernel0.*2 more"
    ) as info:
        watch.check()
    assert len(info.value.kernels) == 6


def test_restores_on_exception(knobs: Any) -> None:
    before = knobs.runtime.jit_post_compile_hook
    with pytest.raises(RuntimeError), CompileWatch():
        raise RuntimeError("boom")
    assert knobs.runtime.jit_post_compile_hook is before
