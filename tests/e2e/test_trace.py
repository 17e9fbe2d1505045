"""Profiler traces: `profile.start_step`/`profile.steps` write a jax.profiler trace of exactly
that window of train steps into <run>/profile, and `jaxlm profile --trace DIR` one of a few
more steps, in the layout XProf and TensorBoard's profile plugin read
(plugins/profile/<run>/<host>.xplane.pb), with one annotated event per step."""

from pathlib import Path

import jax.numpy as jnp
from conftest import TINY_SHAPE, corpus
from jax.profiler import ProfileData

from jaxlm import config as config_lib
from jaxlm import trace
from jaxlm.cli import main
from jaxlm.train import hooks


def _traced_steps(log_dir: Path) -> list[int]:
    """The step numbers of the "train" step annotations in the one trace under `log_dir`."""
    (xplane,) = trace.trace_files(log_dir)  # plugins/profile/<run>/<host>.xplane.pb
    assert xplane.parent.parent == log_dir / "plugins" / "profile"
    assert xplane.stat().st_size > 0
    data = ProfileData.from_file(str(xplane))  # the XSpace protobuf the tools read
    steps = [dict(ev.stats)["step_num"] for plane in data.planes for line in plane.lines
             for ev in line.events if ev.name == trace.STEP_NAME]
    assert any(plane.name.startswith("/host:") for plane in data.planes)
    return sorted(steps)


def test_train_traces_the_window_of_steps(tmp_path):
    run = tmp_path / "run"
    args = ["train", f"run.dir={run}", f"data.files={corpus(tmp_path)}", "train.steps=6",
            "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=100",
            "profile.start_step=2", "profile.steps=3", "run.quiet=true", *TINY_SHAPE]
    assert main(args) == 0
    assert _traced_steps(run / trace.RUN_SUBDIR) == [3, 4, 5]


def test_a_resumed_run_traces_what_is_left_of_the_window(tmp_path, capsys):
    cfg = config_lib.load(None, ["profile.start_step=2", "profile.steps=3"])
    assert not hooks.Trace(cfg, tmp_path, start=5).on  # resumed past it: no trace
    inside = hooks.Trace(cfg, tmp_path, start=3)  # resumed inside: steps 4-5, from now on
    assert inside.active
    p = hooks.Progress(step=4, total=9, position=4, state=jnp.zeros(3))
    assert not inside.due(p)
    p.step = 5
    assert inside.due(p)
    inside.run(p)
    assert not inside.active and len(trace.trace_files(tmp_path / trace.RUN_SUBDIR)) == 1
    assert f"profiler trace of steps 4-5 in {tmp_path / 'profile'}" in capsys.readouterr().err


def test_profile_command_writes_a_trace(tmp_path, capsys):
    out = tmp_path / "traces"
    assert main(["profile", "--steps", "2", "--trace", str(out), *TINY_SHAPE]) == 0
    assert _traced_steps(out) == [1, 2]
    captured = capsys.readouterr()
    assert f"profiler trace       {trace.trace_files(out)[0]}" in captured.out
    assert f"xprof --logdir {out}" in captured.err
