"""End-to-end training through the CLI entry point: loss falls, checkpoints restore,
generation works, resume continues, and bad input exits 2 without touching the run."""

import hashlib
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_SHAPE, corpus

import jaxlm
from jaxlm import sampling, sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.cli import main
from jaxlm.config import MeshConfig
from jaxlm.families.registry import build_model
from jaxlm.optim import make_optimizer
from jaxlm.train import rundir
from jaxlm.train.report import Summary, format_summary
from jaxlm.train.state import init_state, state_shardings

SHAPE = TINY_SHAPE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    run = tmp / "run"
    args = ["train", f"run.dir={run}", f"data.files={corpus(tmp)}", "train.steps=40",
            "train.eval_every=20", "train.log_every=5", "checkpoint.every=20",
            "optim.lr=3e-3", "optim.warmup_steps=5", *SHAPE]
    assert main(args) == 0
    return run, tmp


def test_loss_falls_and_files_are_written(trained):
    run, _ = trained
    rows = rundir.read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(train_rows[0])
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (run / "config.yaml").exists() and (run / "tokenizer").is_dir()
    assert Checkpointer(run / "checkpoints").steps() == [20, 40]


def test_load_and_generate(trained):
    run, _ = trained
    lm = jaxlm.load(run)
    logits = lm([[1, 2, 3, 4]])
    assert logits.shape == (1, 4, lm.config.model.vocab_size)
    text = lm.generate("SPEAKER1:\n", max_new_tokens=20, temperature=0.5, seed=1)
    assert isinstance(text, str) and len(text) > 0
    greedy = lm.generate("SPEAKER1:\n", max_new_tokens=10, temperature=0.0)
    assert greedy == lm.generate("SPEAKER1:\n", max_new_tokens=10, temperature=0.0, seed=7)


def test_checkpoint_save_restore_is_exact(tmp_path):
    from jaxlm import config as config_lib

    cfg = config_lib.load(None, SHAPE)
    model = build_model(cfg.model)
    tx = make_optimizer(cfg.optim, 10)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        state = init_state(model, tx, mesh, seed=3)
        ckpt = Checkpointer(tmp_path / "ck", async_save=False)
        ckpt.save(7, state, {"position": 7})
        ckpt.wait()
        abstract, shardings = state_shardings(model, tx, mesh)
        step, restored, data = ckpt.restore(abstract)
        ckpt.close()
    assert step == 7 and data == {"position": 7}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Sharded as the params' logical axes say, also inside the optimizer state.
    emb = restored.params["embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    mu = restored.opt_state[1][0].mu["embed"]["embedding"]
    assert mu.sharding.spec == emb.sharding.spec


def _checksums(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra, needle", [
    (["train.stpes=3"], "did you mean 'train.steps'"),
    (["train.steps=many"], "train.steps: expected int"),
    (["data.files=/no/such/file.txt"], "not found"),
    (["model.d_model=64"], "would change the model shape"),
    (["model.num_layers=3"], "model.num_layers"),
])
def test_bad_input_exits_2_and_leaves_the_run_untouched(trained, capsys, extra, needle):
    run, tmp = trained
    before = _checksums(run)
    code = main(["train", f"run.dir={run}", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.splitlines()) <= 2
    assert _checksums(run) == before


def test_empty_corpus_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code = main(["train", f"run.dir={tmp_path / 'r'}", f"data.files={empty}", *SHAPE])
    err = capsys.readouterr().err
    assert code == 2 and "empty" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def _metrics_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rundir.read_metrics(run) if "loss" in r}


def _readable(lm, prompt: str, tokens: int, seed: int) -> str:
    return lm.generate(prompt, max_new_tokens=tokens, temperature=sampling.TEMPERATURE,
                       top_k=sampling.TOP_K, top_p=sampling.TOP_P, seed=seed)


def test_summary_sample_is_the_models_seeded_continuation(trained):
    run, _ = trained
    sample = rundir.read_summary(run)["sample"]  # the fixture's run has data.files: "The"
    new = _readable(jaxlm.load(run), "The", sampling.SUMMARY_TOKENS, sampling.SUMMARY_SEED)
    assert new and sample == "The" + new


def test_generate_defaults_are_the_readable_settings(trained, capsys):
    run, _ = trained
    assert main(["generate", "--run", str(run), "--prompt", "SPEAKER1:", "--seed", "3",
                 "--max-new-tokens", "40"]) == 0
    expected = "SPEAKER1:" + _readable(jaxlm.load(run), "SPEAKER1:", 40, 3)
    assert capsys.readouterr().out == expected + "\n"
    # The library's defaults are the command's.
    assert "SPEAKER1:" + jaxlm.load(run).generate("SPEAKER1:", 40, seed=3) == expected


def test_summary_shows_the_sample_without_control_bytes():
    text = format_summary(Summary(run_dir="r", steps=1, params=1, sample="ROMEO:\nI\x1b[2J am"))
    lines = text.splitlines()
    i = lines.index(" sample       ROMEO:")
    assert lines[i + 1] == "              I\ufffd[2J am"
    assert "sample" not in format_summary(Summary(run_dir="r", steps=1, params=1))
