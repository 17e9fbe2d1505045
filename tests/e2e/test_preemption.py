"""Real `jaxlm train` processes stopped by SIGINT/SIGTERM (clean save, exit 0, exact resume)
and by SIGKILL in the middle of asynchronous checkpoint writes (always resumable, no
committed checkpoint lost)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_SHAPE

from jaxlm.checkpoint import Checkpointer
from jaxlm.train import rundir

SHAPE = TINY_SHAPE
STEPS = 60
CMD = [sys.executable, "-m", "jaxlm.cli", "train"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _common(data: Path, extra=()) -> list[str]:
    return [f"data.files={data}", f"train.steps={STEPS}", "train.log_every=1",
            "train.eval_every=0", "optim.warmup_steps=5", "run.quiet=true", *SHAPE, *extra]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rundir.read_metrics(run) if "loss" in r}


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    data = tmp / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]
    data.write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(2000)))
    ref = tmp / "straight"
    subprocess.run([*CMD, f"run.dir={ref}", *_common(data, ["checkpoint.every=1000"])],
                   check=True, env=ENV, capture_output=True)
    return data, _losses(ref), ref


def _wait_for_steps(run: Path, n: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(_losses(run)) < n and proc.poll() is None:
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_exits_0_and_resumes_exactly(tmp_path, data_and_reference, sig):
    data, ref, _ = data_and_reference
    run = tmp_path / "run"
    args = [*CMD, f"run.dir={run}", *_common(data, ["checkpoint.every=1000"])]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_steps(run, int(np.random.default_rng(sig).integers(5, 30)), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = max(_losses(run))
    assert stopped_at < STEPS and "Run the same command to resume" in err
    assert Checkpointer(run / "checkpoints").steps() == [stopped_at]  # saved where it stopped
    out = subprocess.run(args, env=ENV, capture_output=True, text=True, check=True)
    assert f"resumed {run} from step {stopped_at}" in out.stderr
    resumed = _losses(run)
    assert max(resumed) == STEPS
    for step in range(stopped_at + 1, STEPS + 1):
        assert resumed[step] == ref[step], step  # bit-identical


@pytest.mark.slow
def test_sigkill_during_async_checkpoint_writes(tmp_path, data_and_reference):
    data, ref, _ = data_and_reference
    run = tmp_path / "run"
    args = [*CMD, f"run.dir={run}", *_common(data, ["checkpoint.every=1", "checkpoint.keep=100"])]
    committed_before_kills: set[int] = set()
    for kill_after in (6, 13, 21):  # different points of the write cycle
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _wait_for_steps(run, kill_after, proc)
        time.sleep(0.01 * kill_after)
        committed_before_kills |= set(Checkpointer(run / "checkpoints").steps())
        proc.kill()
        proc.wait()
        assert committed_before_kills <= set(Checkpointer(run / "checkpoints").steps())
    out = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resumed_from = int(out.stderr.split("from step ")[1].split()[0])
    assert resumed_from >= max(committed_before_kills)
    assert committed_before_kills <= set(Checkpointer(run / "checkpoints").steps())
    final = _losses(run)  # the last run rewrote steps resumed_from+1..STEPS
    for step in range(resumed_from + 1, STEPS + 1):
        assert final[step] == ref[step], step
    import jaxlm

    a = jaxlm.load(run).params
    b = jaxlm.load(data_and_reference[2]).params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
