"""Fault injection: a NaN batch and a destructive learning-rate spike mid-run; no unsafe
loading anywhere in the package."""

import math
import re
import tokenize
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SHAPE
from jax.experimental import io_callback

import jaxlm
import jaxlm.optim
from jaxlm.cli import main
from jaxlm.data import pipeline
from jaxlm.train import rundir

SHAPE = [*TINY_SHAPE, "optim.warmup_steps=5", "optim.lr=3e-3", "train.log_every=1",
         "train.eval_every=0", "checkpoint.every=10", "run.quiet=true", "train.max_bad_steps=3"]
STEPS, BAD_POSITION = 40, 24


def _corpus(tmp: Path) -> Path:
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]
    rng = np.random.default_rng(0)
    path = tmp / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 9)) + "." for _ in range(3000)))
    return path


def _train(tmp, name, monkeypatch, *, skip=None, poison=None, extra=()):
    orig = pipeline.LMBatches.batch

    def batch(self, position):
        if skip is not None and self.shuffle and position >= skip:
            position += 1
        b = orig(self, position)
        if poison is not None and self.shuffle and position == poison:
            b = b.replace(loss_mask=np.full_like(b.loss_mask, np.nan))
        return b

    monkeypatch.setattr(pipeline.LMBatches, "batch", batch)
    run = tmp / name
    code = main(["train", f"run.dir={run}", f"data.files={_corpus(tmp)}",
                 f"train.steps={STEPS}", *SHAPE, *extra])
    monkeypatch.setattr(pipeline.LMBatches, "batch", orig)
    rows = rundir.read_metrics(run)
    return code, run, rows


def _final_loss(rows):
    return [r["loss"] for r in rows if "loss" in r and "event" not in r][-1]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    code, _, rows = _train(tmp_path_factory.mktemp("clean"), "clean", mp, skip=BAD_POSITION)
    mp.undo()
    assert code == 0
    return _final_loss(rows)


def test_nan_batch_is_skipped_logged_and_harmless(tmp_path, monkeypatch, clean_run):
    code, run, rows = _train(tmp_path, "nan", monkeypatch, poison=BAD_POSITION)
    assert code == 0
    events = [r for r in rows if r.get("event") == "bad_step"]
    assert [e["step"] for e in events] == [BAD_POSITION + 1]
    lm = jaxlm.load(run)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(lm.params))
    assert abs(_final_loss(rows) - clean_run) / clean_run < 0.01


# (optimizer step index, 0-based, whose update gets a 1000x rate; checkpoint expected as
# the rollback target). Checkpoints every 10 steps: a spike just after one, one mid-interval,
# and one whose damaged update lands in the checkpoint of step 30 (saved before the loss
# spike shows at step 31), and one damaging the checkpoint of step 20 itself.
@pytest.mark.parametrize("spike_at,clean_step", [(24, 20), (29, 20), (19, 10)])
def test_destructive_lr_spike_rolls_back_and_recovers(tmp_path, monkeypatch, clean_run,
                                                      spike_at, clean_step):
    base = jaxlm.optim.lr_schedule
    fired = []

    def factor(step):  # host side: the fault happens once, like a real transient fault
        if int(step) == spike_at and not fired:
            fired.append(int(step))
            return np.float32(1000.0)
        return np.float32(1.0)

    def spiky(cfg, total):
        s = base(cfg, total)
        return lambda step: s(step) * io_callback(
            factor, jax.ShapeDtypeStruct((), jnp.float32), step)

    monkeypatch.setattr(jaxlm.optim, "lr_schedule", spiky)
    code, run, rows = _train(tmp_path, "spike", monkeypatch, extra=["train.spike_zscore=4"])
    assert code == 0
    kinds = [r.get("event") for r in rows if "event" in r]
    assert "loss_spike" in kinds and "rollback" in kinds
    rollback = next(r for r in rows if r.get("event") == "rollback")
    assert rollback["to_step"] == clean_step
    lm = jaxlm.load(run)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(lm.params))
    final = _final_loss(rows)
    assert math.isfinite(final) and abs(final - clean_run) / clean_run < 0.02, (final, clean_run)


def test_stop_policy_exits_with_a_message(tmp_path, monkeypatch, capsys):
    def always_nan(self, position):
        b = pipeline.LMBatches.__dict__["_orig"](self, position)
        return b.replace(loss_mask=np.full_like(b.loss_mask, np.nan))

    monkeypatch.setattr(pipeline.LMBatches, "_orig", pipeline.LMBatches.batch, raising=False)
    monkeypatch.setattr(pipeline.LMBatches, "batch", always_nan)
    code = main(["train", f"run.dir={tmp_path / 'r'}", f"data.files={_corpus(tmp_path)}",
                 "train.steps=10", *SHAPE, "train.on_bad_steps=stop"])
    err = capsys.readouterr().err
    assert code == 1 and "bad (non-finite or spiking) steps" in err and "Traceback" not in err


UNSAFE = [r"\bpickle\b", r"torch\.load", r"yaml\.load\((?![^)]*Loader=yaml\.SafeLoader)",
          r"trust_remote_code\s*=\s*True", r"\beval\(", r"allow_pickle\s*=\s*True"]


def _code_lines(path: Path) -> dict[int, str]:
    """Source lines without comments and string literals (docstrings may name what we avoid)."""
    lines: dict[int, str] = {}
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING, tokenize.ENCODING):
                continue
            lines[tok.start[0]] = lines.get(tok.start[0], "") + tok.string + " "
    return lines


def test_no_unsafe_loading_in_the_package():
    root = Path(jaxlm.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for i, line in _code_lines(path).items():
            for pattern in UNSAFE:
                if re.search(pattern, line.replace(" . ", ".").replace(" (", "(")):
                    offenders.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_unsafe_scan_would_catch_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nx = torch.load(f)\ny = yaml.load(s)\n# pickle in a comment\n")
    hits = [line for line in _code_lines(bad).values()
            if any(re.search(p, line.replace(" . ", ".").replace(" (", "(")) for p in UNSAFE)]
    assert len(hits) == 3
