"""Steps the group cannot finish, each with its own group (the group does not survive them):

* a worker that is alive but stuck (SIGSTOP) makes rank 0's collective time out after
  ``distributed_timeout_s``: ``generate`` raises ``CollectiveError`` naming the operation and the
  limit, never hangs, and the stuck worker is killed with the group;
* rank 0 raising inside its own forward (between the collectives the workers are in) takes the
  group down at once: the caller gets rank 0's exception, later calls the group's end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tp_models import ENGINE, prompts, tiny

from fast.api.llm import LLM
from fast.distributed.errors import CollectiveError, TensorParallelGroupDownError
from fast.engine.sampling_params import SamplingParams

TIMEOUT_S = 5.0  # short for the test, long enough for a loaded 2-core machine


def test_a_stuck_worker_times_out_the_step() -> None:
    llm = LLM(
        tiny(4, 2, seed=9),
        tensor_parallel_size=2,
        distributed_timeout_s=TIMEOUT_S,
        num_gpu_blocks=16,
        max_model_len=32,
        **ENGINE,
    )
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    batch = prompts(seed=1, lens=(5,))
    assert len(llm.generate(batch, params, use_tqdm=False)[0].outputs[0].token_ids) == 3
    (pid,) = llm.llm_engine.tensor_parallel.worker_pids
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(CollectiveError) as info:
        llm.generate(batch, params, use_tqdm=False)
    took = time.monotonic() - start
    assert TIMEOUT_S <= took < TIMEOUT_S + 15
    # gloo's broadcast waits for the receiver: the step's first command is what times out
    assert info.value.timeout_s == TIMEOUT_S and info.value.operation in ("command", "all_reduce")
    with pytest.raises(ProcessLookupError):  # killed (SIGKILL ends a stopped process), reaped
        os.kill(pid, 0)
    with pytest.raises(
        TensorParallelGroupDownError, match="tensor-parallel (command|all_reduce) failed"
    ):
        llm.generate(batch, params, use_tqdm=False)
    llm.close()


def test_rank_0_failing_inside_a_step_takes_the_group_down_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    llm = LLM(
        tiny(4, 2, seed=9), tensor_parallel_size=2, num_gpu_blocks=16, max_model_len=32, **ENGINE
    )
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    batch = prompts(seed=1, lens=(5,))

    def broken(x: object) -> None:
        raise RuntimeError("rank 0's final norm failed")

    monkeypatch.setattr(llm.llm_engine.model.inner.model.norm, "forward", broken)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="final norm failed"):
        llm.generate(batch, params, use_tqdm=False)
    assert time.monotonic() - start < 10  # not the 300 s of a collective's timeout
    assert llm.llm_engine.tensor_parallel.worker_pids == []  # killed with the group
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(TensorParallelGroupDownError, match="rank 0 failed inside a step"):
        llm.generate(batch, params, use_tqdm=False)
    llm.close()


def test_a_script_without_the_main_guard_is_told_why_its_worker_died(tmp_path: Path) -> None:
    # the spawned worker re-imports the script as __mp_main__, which builds another LLM there:
    # the worker dies while starting, and the error says what to change
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from tp_models import ENGINE, tiny\n"
        "from fast.api.llm import LLM\n"
        "LLM(tiny(4, 2, seed=1), tensor_parallel_size=2, **ENGINE)\n"
    )
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode != 0
    assert "WorkerDiedError" in done.stderr and 'if __name__ == "__main__":' in done.stderr
