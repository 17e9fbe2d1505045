"""Multi-host for real: two processes × 4 CPU devices joined by jax.distributed on 127.0.0.1
(launch/local.sh) train exactly like one process with 8 devices, and their checkpoint loads
in a single process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.data.pipeline import LMBatches
from jaxlm.train import rundir

ROOT = Path(__file__).resolve().parents[2]
SHAPE = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
         "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8"]


def _env(**extra: str) -> dict[str, str]:
    # Keeps the session's compilation cache and JAXLM_CACHE (conftest), so nothing is
    # written to ~/.cache.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "JAXLM_", "XLA_FLAGS"))
           or k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAXLM_CACHE"))}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_each_process_reads_its_share_of_the_global_batch():
    tokens = np.arange(5000, dtype=np.int32)
    whole = LMBatches(tokens, 16, 8, seed=3)
    parts = [LMBatches(tokens, 16, 8, seed=3, process_index=i, process_count=2)
             for i in range(2)]
    for position in (0, 7, 40):
        local = [p.batch(position) for p in parts]
        assert all(b.inputs.shape == (4, 16) for b in local)
        np.testing.assert_array_equal(np.concatenate([b.inputs for b in local]),
                                      whole.batch(position).inputs)


def _train_losses(run: Path) -> tuple[list[int], list[float], float]:
    rows = [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return [r["step"] for r in train], [r["loss"] for r in train], evals[-1]


def _local_sh(nproc: int, logs: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), str(nproc), *args], cwd=ROOT,
        env=_env(PYTHON=sys.executable, JAXLM_LOG_DIR=str(logs), JAXLM_LOCAL_DEVICES="4"),
        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_like_one_and_restore_in_one(tmp_path):
    """2 processes train like 1; a 2-process checkpoint restores in 1 process, and a
    1-process checkpoint resumes in 2 processes exactly where it stopped (parameters,
    optimizer state and data position)."""
    lines = [f"line {i}: " + " ".join(["to", "be", "or", "not"][(i + j) % 4] for j in range(9))
             for i in range(600)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    # A constant learning rate after warmup, so a run of 20 steps and one of 22 take the same
    # steps up to 20 (the schedule's length does not matter).
    common = [f"data.files={tmp_path / 'corpus.txt'}", "train.log_every=1",
              "train.eval_every=0", "train.eval_batches=2", "checkpoint.every=20",
              "optim.warmup_steps=5", "optim.min_lr_ratio=1.0", "run.quiet=false", *SHAPE]
    one, two = tmp_path / "one", tmp_path / "two"
    # The 8-device reference runs alongside the 2-process run (both are mostly waiting).
    ref = subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", f"run.dir={one}", "train.steps=20",
         *common], cwd=ROOT, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = tmp_path / "logs"
    mp = _local_sh(2, logs, "train", f"run.dir={two}", "train.steps=22", *common)
    ref_out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_out
    assert mp.returncode == 0, mp.stdout + mp.stderr

    # Each process joined with 4 of the 8 devices and logged that once, to its own log.
    for i in range(2):
        log = (logs / f"process_{i}.log").read_text()
        assert log.count(f"jaxlm: process {i}/2") == 1
        assert "4 local cpu device(s)" in log and "of 8" in log
    # Only process 0 wrote metrics: one row per step, no duplicates.
    steps1, losses1, eval1 = _train_losses(one)
    steps2, losses2, eval2 = _train_losses(two)
    assert steps1 == list(range(1, 21)) and steps2 == list(range(1, 23))
    np.testing.assert_allclose(losses2[:20], losses1, rtol=1e-5)
    assert losses2[-1] < losses2[0]

    # The 2-process checkpoint (shards written by both processes) loads in this single
    # process, onto one device, and holds the same parameters as the 1-process run.
    lm_two, lm_one = jaxlm.load(two, step=20), jaxlm.load(one)
    _assert_same_params(lm_two.params, lm_one.params)
    assert isinstance(lm_two.generate("to be", max_new_tokens=8), str)

    # The 1-process run resumes in 2 processes: steps 21-22 and the final evaluation are
    # those of the run that went through in 2 processes.
    logs = tmp_path / "logs_resumed"
    mp = _local_sh(2, logs, "train", f"run.dir={one}", "train.steps=22", *common)
    assert mp.returncode == 0, mp.stdout + mp.stderr
    assert f"resumed {one} from step 20" in (logs / "process_0.log").read_text()
    steps1, losses1, eval1 = _train_losses(one)
    assert steps1 == list(range(1, 23))
    np.testing.assert_allclose(losses1, losses2, rtol=1e-5)
    np.testing.assert_allclose(eval1, eval2, rtol=1e-5)
    _assert_same_params(jaxlm.load(one).params, jaxlm.load(two).params)


def _assert_same_params(a, b) -> None:
    """Equal within 1e-5, except the attention key bias: its gradient is zero in exact
    arithmetic, so Adam turns reduction-order noise (which differs with the device layout)
    into steps of ~lr; it only has to stay near zero on both sides."""
    def split(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        key_bias = {jax.tree_util.keystr(k): v for k, v in flat if "'key'" in
                    jax.tree_util.keystr(k) and "'bias'" in jax.tree_util.keystr(k)}
        rest = {jax.tree_util.keystr(k): v for k, v in flat
                if jax.tree_util.keystr(k) not in key_bias}
        return key_bias, rest

    (kb_a, rest_a), (kb_b, rest_b) = split(a), split(b)
    chex.assert_trees_all_close(rest_a, rest_b, rtol=1e-5, atol=1e-5)
    assert kb_a.keys() == kb_b.keys()
    for name in kb_a:
        np.testing.assert_allclose(kb_a[name], kb_b[name], atol=1e-4, err_msg=name)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    """A preemption signal that reaches only one host: every process stops and saves at the
    same step (they agree each step), all exit 0, and the run resumes from there."""
    import signal
    import time

    (tmp_path / "corpus.txt").write_text("\n".join(f"line {i}: to be or not to be"
                                                   for i in range(600)))
    run = tmp_path / "run"
    port = _free_port()
    common = [f"data.files={tmp_path / 'corpus.txt'}", "train.steps=400", "train.log_every=1",
              "train.eval_every=0", "checkpoint.every=1000", "run.quiet=true", *SHAPE]
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i), f"run.dir={run}", *common],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    deadline = time.time() + 240
    while time.time() < deadline and not (run / rundir.METRICS_FILE).exists():
        time.sleep(0.2)
    time.sleep(2.0)
    procs[1].send_signal(signal.SIGTERM)  # only the second host hears it
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    steps = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] < 400
    stop = steps[0]
    assert [r["step"] for r in rundir.read_metrics(run) if "loss" in r] == \
        list(range(1, stop + 1))

    # Both processes, started again, resume from the step they stopped at and go on.
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i), f"run.dir={run}", *common,
         f"train.steps={stop + 2}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert f"resumed {run} from step {stop}" in outs[0][1]
    assert [r["step"] for r in rundir.read_metrics(run) if "loss" in r] == \
        list(range(1, stop + 3))
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()
                  if p.name.isdigit()) == [stop, stop + 2]
