"""The dispatch window: the host keeps at most STEPS_AHEAD steps queued, which keeps a
multi-device CPU program out of XLA's collective deadlock."""

import os
import subprocess
import sys

import pytest

from jaxlm.train import dispatch


def test_waits_for_the_oldest_step_once_the_window_is_full(monkeypatch):
    waited = []
    monkeypatch.setattr(dispatch.jax, "block_until_ready", waited.append)
    window = dispatch.Window(limit=2)
    for step in range(1, 6):
        window.add(f"metrics {step}")
    assert waited == ["metrics 1", "metrics 2", "metrics 3"]  # steps 4 and 5 still queued
    window.clear()
    window.add("metrics 6")
    assert waited == ["metrics 1", "metrics 2", "metrics 3"]


_BENCH = ("import sys; from jaxlm.train import dispatch; dispatch.STEPS_AHEAD = int(sys.argv[1]); "
          "from jaxlm.cli import main; sys.exit(main(['bench', '--steps', '120', '--rounds', '1', "
          "'--warmup', '1', 'run.cpu_devices=2', 'run.compile_cache=false']))")


@pytest.mark.slow
def test_two_cpu_devices_do_not_deadlock_with_many_steps_dispatched():
    """Unbounded (the window as wide as the round), XLA's CPU runtime stalled a 2-device
    all-reduce and aborted the process after 40 s; with the window the round completes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    out = subprocess.run([sys.executable, "-c", _BENCH, str(dispatch.STEPS_AHEAD)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-800:]
    assert "2 × cpu" in out.stdout
