"""Seeing a run: TensorBoard events, `jaxlm plot`, `jaxlm runs`, progress output in a real
terminal and in a pipe, model and end summaries, help texts. Two tiny `jaxlm train`
processes are shared by the module: one on a pseudo-terminal, one writing to a file."""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
import types
from pathlib import Path

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import progress, runs, tracking
from jaxlm.cli import build_parser, main
from jaxlm.train import rundir

SHAPE = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
         "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8"]
STEPS = 20
BAR = re.compile(r"train:\s+\d+%\|")


def _corpus(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]
    lines = [f"SPEAKER{i % 3}:\n" + " ".join(rng.choice(words, 8)) + ".\n" for i in range(300)]
    path = tmp / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def _train_cmd(run: Path, data: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "jaxlm.cli", "train", f"run.dir={run}", f"data.files={data}",
            f"seed={seed}", f"train.steps={STEPS}", "train.eval_every=10", "train.log_every=2",
            "checkpoint.every=10", "optim.lr=3e-3", "optim.warmup_steps=4", *SHAPE]


def _read_until_eof(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other side of the pty is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """runs/tty trained on a 24×120 pseudo-terminal, then runs/piped (another seed) with
    stdout+stderr to a file; returns (root, tty output, piped output). The second run reuses
    the first one's compiled programs through JAX's persistent cache."""
    tmp = tmp_path_factory.mktemp("vis")
    data, root = _corpus(tmp), tmp / "runs"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp / "jit"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    tty = subprocess.Popen(_train_cmd(root / "tty", data, seed=0), stdin=slave, stdout=slave,
                           stderr=slave, env=env, close_fds=True)
    os.close(slave)
    tty_out = _read_until_eof(master)
    os.close(master)
    assert tty.wait(timeout=600) == 0, tty_out.decode(errors="replace")[-2000:]
    log = tmp / "piped.log"
    with open(log, "wb") as f:
        piped = subprocess.run(_train_cmd(root / "piped", data, seed=1), stdout=f,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               timeout=600)
    assert piped.returncode == 0, log.read_text()[-2000:]
    # The terminal turned each "\n" into "\r\n" (onlcr); undo that to see what was written.
    return root, tty_out.replace(b"\r\n", b"\n").decode(), log.read_bytes()


# ------------------------------------------------------------------ progress output

def test_terminal_shows_one_live_progress_line(two_runs):
    _, out, _ = two_runs
    lines = out.split("\n")
    visible = [line.rsplit("\r", 1)[-1] for line in lines]  # what stays on screen
    bar_lines = [v for v in visible if BAR.search(v)]
    assert len(bar_lines) == 1, visible
    assert f"{STEPS}/{STEPS}" in bar_lines[0]
    renders = len(BAR.findall(out))
    assert renders >= 5, out  # redrawn in place with "\r", not one new line per update
    assert not any(re.match(r"step \d+/\d+ loss", v) for v in visible)  # no plain lines
    evals = [v for v in visible if "eval_loss" in v]  # printed above the bar, one line each
    assert [v.split(":")[0] for v in evals] == ["step 10", "step 20"]
    # The model summary comes first, the end summary last.
    assert "largest tensors" in out and "FLOPs/token" in out
    assert " view         jaxlm plot" in out


def test_pipe_gets_plain_lines_without_carriage_returns(two_runs):
    _, _, piped = two_runs
    assert b"\r" not in piped
    text = piped.decode()
    assert f"step {STEPS}/{STEPS} loss" in text and "step 10: eval_loss" in text
    assert not BAR.search(text)
    assert "parameters" in text and "FLOPs/token" in text and " tokens/s " in text


def test_unsized_terminal_still_gets_a_bar(monkeypatch):
    """A pty nobody sized reports 0 columns; tqdm would then draw an empty bar."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress.bar(total=3, desc="train", unit="step")
    for _ in range(3):
        bar.update(1)
    bar.close()
    stream.close()
    out = _read_until_eof(master).decode()
    os.close(master)
    assert BAR.search(out) and "3/3" in out


# ------------------------------------------------------------------ TensorBoard

def test_tensorboard_events_hold_the_metrics(two_runs):
    from tbparse import SummaryReader

    root, _, _ = two_runs
    run = root / "tty"
    df = SummaryReader(str(run)).scalars
    rows = rundir.read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(2, STEPS + 1, 2))

    def series(tag):
        sub = df[df.tag == tag].sort_values("step")
        return sub.step.tolist(), sub.value.to_numpy()

    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"),
                     ("train/grad_norm", "grad_norm"), ("train/tokens_per_sec", "tokens_per_sec")]:
        steps, values = series(tag)
        assert steps == [r["step"] for r in train_rows], tag
        np.testing.assert_allclose(values, [r[key] for r in train_rows], rtol=1e-5)
    steps, values = series("eval/loss")
    assert steps == [10, 20]
    np.testing.assert_allclose(values, [r["eval_loss"] for r in rows if "eval_loss" in r],
                               rtol=1e-5)
    assert {"eval/ppl", "eval/bits_per_byte"} <= set(df.tag)


def test_resumed_run_replaces_replayed_steps_in_tensorboard(tmp_path):
    """A run resumed from an older checkpoint logs some steps again; TensorBoard shows each
    step once (the new writer's purge step drops the stale events). An event row about an
    earlier step does not cut the loss curve."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = tracking.TensorBoardTracker(tmp_path)
    for step in (2, 4, 6, 8):
        first.log({"step": step, "loss": 10.0 - step})
    first.log({"step": 3, "event": "loss_spike", "loss": 50.0})  # an earlier step, reported late
    first.close()
    time.sleep(1.1)  # event file names carry the second they were opened
    resumed = tracking.TensorBoardTracker(tmp_path)
    for step in (6, 8, 10):
        resumed.log({"step": step, "loss": 100.0 + step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (2, 8.0), (4, 6.0), (6, 106.0), (8, 108.0), (10, 110.0)]
    assert [(e.step, e.value) for e in acc.Scalars("events/loss_spike/loss")] == [(3, 50.0)]


def test_tracker_tags_and_wandb(tmp_path, monkeypatch):
    assert tracking.scalars({"step": 3, "time": 1.0, "loss": 2.0, "eval_loss": 1.5,
                             "kind": "eval", "ok": True, "mfu": 0.4}) == {
        "train/loss": 2.0, "eval/loss": 1.5, "train/mfu": 0.4}
    assert tracking.scalars({"step": 3, "event": "loss_spike", "loss": 9.0, "zscore": 7.0}) == {
        "events/loss_spike/loss": 9.0, "events/loss_spike/zscore": 7.0}
    logged, inits = [], []

    class FakeRun:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            logged.append("finished")

    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = config_lib.load(None, ["run.wandb=true", "run.wandb_project=proj"])
    trackers = tracking.open_trackers(cfg, tmp_path)
    writer = rundir.MetricsWriter(tmp_path, trackers=trackers)
    writer.write({"step": 1, "loss": 3.0})
    writer.write({"step": 1, "eval_loss": 2.5})
    writer.write({"step": 4, "loss": 2.0})
    writer.write({"step": 3, "event": "loss_spike", "loss": 9.0})  # reported after step 4
    writer.close()
    assert [type(t).__name__ for t in trackers] == ["TensorBoardTracker", "WandbTracker"]
    assert inits[0]["project"] == "proj" and inits[0]["resume"] == "allow"
    assert inits[0]["id"] == (tmp_path / tracking.WANDB_ID_FILE).read_text().strip()
    assert logged == [(1, {"train/loss": 3.0}), (1, {"eval/loss": 2.5}),
                      (4, {"train/loss": 2.0}),
                      (4, {"events/loss_spike/loss": 9.0, "events/loss_spike/step": 3.0}),
                      "finished"]
    assert any(tmp_path.glob("events.out.tfevents.*"))

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a warning, not an error
    assert [type(t).__name__ for t in tracking.open_trackers(cfg, tmp_path)] == [
        "TensorBoardTracker"]


# ------------------------------------------------------------------ jaxlm plot

def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_a_png_comparing_the_runs(two_runs, tmp_path, capsys):
    import matplotlib.image

    root, _, _ = two_runs
    out = tmp_path / "cmp.png"
    assert main(["plot", str(root / "tty"), str(root / "piped"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert _png_size(out) == (1500, 800)
    img = matplotlib.image.imread(out)[..., :3]
    assert img.shape == (800, 1500, 3)
    assert img.std() > 0.05  # not a blank canvas
    pixels = (img.reshape(-1, 3) * 255).round().astype(int)
    colours = {tuple(p) for p in pixels}
    assert len(colours) > 50
    # Both runs' line colours (matplotlib's first two: C0 blue, C1 orange) are drawn.
    for rgb in [(0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)]:
        assert (np.abs(pixels - rgb).sum(axis=1) < 12).sum() > 200, rgb


def test_plot_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a jaxlm run directory" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ jaxlm runs

def test_runs_table_lists_both_runs(two_runs, capsys):
    root, _, _ = two_runs
    assert main(["runs", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["run", "preset", "params", "steps"]
    body = {line.split()[0]: line.split() for line in table[1:]}
    assert set(body) == {"piped", "tty"}
    for name in body:
        rows = rundir.read_metrics(root / name)
        best = min(r["eval_loss"] for r in rows if "eval_loss" in r)
        summary = json.loads((root / name / rundir.SUMMARY_FILE).read_text())
        cells = body[name]
        assert cells[1] == "gpt2" and cells[3] == f"{STEPS}/{STEPS}"
        assert cells[4] == f"{best:.4f}" and cells[6] == str(STEPS) and cells[7] == "finished"
        assert summary["params"] == runs.count_params(rundir.load_config(root / name))
    assert main(["runs", str(root), "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert infos["tty"]["steps"] == STEPS and infos["tty"]["last_checkpoint"] == STEPS
    assert infos["tty"]["tokens_per_sec"] > 0


def test_runs_status_rules(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    (tmp_path / rundir.METRICS_FILE).write_text("")
    old = 0.0 + runs.STALE_SECONDS * 10
    assert runs.status_of(tmp_path, {"status": "finished"}, 5, 10) == "finished"
    assert runs.status_of(tmp_path, {"status": "stopped"}, 5, 10) == "stopped"
    live = {"status": "running", "host": here, "pid": os.getpid()}
    assert runs.status_of(tmp_path, live, 5, 10) == "running"
    assert runs.status_of(tmp_path, {**live, "pid": dead.pid}, 5, 10) == "failed"
    elsewhere = {"status": "running", "host": "another-host", "pid": 1}
    assert runs.status_of(tmp_path, elsewhere, 5, 10) == "running"  # files just written
    mtime = os.stat(tmp_path / rundir.METRICS_FILE).st_mtime
    assert runs.status_of(tmp_path, elsewhere, 5, 10, now=mtime + old) == "failed"
    assert runs.status_of(tmp_path, {}, 10, 10) == "finished"  # no summary.json: by steps
    assert runs.status_of(tmp_path, {}, 5, 10, now=mtime + old) == "stopped"


def test_runs_on_a_missing_folder_exits_2(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------ summaries

def test_model_summary_and_flops():
    import jax

    from jaxlm import sharding
    from jaxlm.config import MeshConfig
    from jaxlm.families import registry
    from jaxlm.families.registry import build_model
    from jaxlm.train.report import human, model_summary
    from jaxlm.train.state import param_shardings

    cfg = config_lib.load(None, SHAPE)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shapes, shardings = param_shardings(build_model(cfg.model), mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, shardings)
    # FLOPs per token, as the family counts them for the summary and MFU, against a hand
    # count: 6N + 12·L·d·T / 2 (causal), N the matmul weights: the tied 260×32 embedding and
    # per layer query, key, value, output (4·32·32) and the MLP (2·32·64).
    fpt = registry.of(cfg.model).flops_per_token(cfg, abstract)
    assert fpt == 6 * (260 * 32 + 2 * (4 * 32 * 32 + 2 * 32 * 64)) + 12 * 2 * 32 * 32 / 2
    text = model_summary(abstract, cfg, fpt)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert f"({n:,})" in text
    assert "embed" in text and "decoder" in text and "layers_0..1 (×2)" in text
    # The embedding [vocab, embed] is the largest tensor, split over tensor × fsdp.
    biggest = text.split("largest tensors")[1].splitlines()[1]
    assert "embed/embedding" in biggest and "P('tensor', 'fsdp')" in biggest
    assert "(130, 16)" in biggest  # per-device shard of (260, 32) on a 2×2 split
    assert f"= {human(fpt)}  ({human(fpt * 8 * 32)} per step of 256 tokens)" in text, text


# ------------------------------------------------------------------ help

def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_command_help_shows_defaults_and_an_example(capsys):
    parser = build_parser()
    top = parser.format_help()
    commands = list(_subparsers(parser))
    assert {"train", "generate", "eval", "prepare", "plot", "runs"} <= {n for n, _ in commands}
    for name, sub in commands:
        if " " not in name:
            assert name in top
        text = " ".join(sub.format_help().split())  # undo the line wrapping
        assert "example: jaxlm" in text, name
        for action in sub._actions:
            if (action.option_strings and action.help != argparse.SUPPRESS
                    and not action.required and action.nargs != 0
                    and action.default not in (None, argparse.SUPPRESS)):
                assert f"{' '.join(action.help.split())} (default: " in text, (name, action.dest)
    assert "examples:" in top


def test_every_config_key_has_help(capsys):
    rows = config_lib.describe()
    keys = {r[0] for r in rows}
    assert {"run.wandb", "run.wandb_project", "train.steps", "model.d_model"} <= keys
    for key, tname, _default, help_text in rows:
        assert isinstance(help_text, str) and len(help_text.split()) >= 2, key
        assert tname, key
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in keys)
