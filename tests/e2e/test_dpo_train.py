"""DPO end to end through the CLI: a base model trained by a previous command, DPO from its
weights (model.init_from) on preference JSON lines, logged rewards and held-out accuracy,
resume, and `jaxlm.load` of the result."""

import json

import jax
import numpy as np
import pytest
from conftest import TINY_SHAPE, corpus

import jaxlm
from jaxlm.checkpoint import Checkpointer
from jaxlm.cli import main
from jaxlm.setup import build
from jaxlm.train import rundir

QUIET = ["run.quiet=true"]


def _pairs(path, n, seed):
    """Prompts of random words; the chosen reply is always "yes", the rejected one "no"."""
    rng = np.random.default_rng(seed)
    words = ["thou", "art", "my", "lord", "and", "the", "king"]
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words, 4)) + "? "
            f.write(json.dumps({"prompt": prompt, "chosen": "yes", "rejected": "no"}) + "\n")
    return path


@pytest.mark.slow
def test_dpo_from_a_trained_model(tmp_path):
    base, run = tmp_path / "base", tmp_path / "dpo"
    assert main(["train", f"run.dir={base}", f"data.files={corpus(tmp_path)}",
                 "train.steps=3", "model.vocab_size=260", *TINY_SHAPE, *QUIET]) == 0
    dpo_args = ["train", f"run.dir={run}", f"model.init_from={base}", "train.objective=dpo",
                f"data.files={_pairs(tmp_path / 'train.jsonl', 64, 0)}",
                f"data.valid_files={_pairs(tmp_path / 'valid.jsonl', 16, 1)}",
                "train.batch_size=8", "train.seq_len=32", "train.log_every=2",
                "train.eval_every=6", "train.eval_batches=2", "checkpoint.every=6",
                "optim.lr=3e-3", "optim.warmup_steps=1", "dpo.beta=0.5", *QUIET]
    assert main([*dpo_args, "train.steps=6"]) == 0
    assert main([*dpo_args, "train.steps=12"]) == 0  # resumes: the reference is restored
    rows = rundir.read_metrics(run)
    train = [r for r in rows if "loss" in r and "dpo_accuracy" in r]
    evals = [r for r in rows if "eval_dpo_accuracy" in r]
    assert {"dpo_reward_margin", "dpo_chosen_reward", "dpo_rejected_reward",
            "dpo_logp_accuracy", "dpo_chosen_nll"} <= set(train[0])
    assert train[-1]["loss"] < 0.5 < np.log(2)  # the DPO loss of a policy equal to its reference
    assert [r["step"] for r in evals] == [6, 12]
    assert "eval_bits_per_byte" not in evals[-1] and evals[-1]["eval_dpo_chosen_nll"] > 0
    assert evals[-1]["eval_dpo_accuracy"] >= 0.9 and evals[-1]["eval_dpo_reward_margin"] > 0
    lm = jaxlm.load(run)
    assert lm.config.train.objective == "dpo"
    assert lm([[1, 2, 3]]).shape[:2] == (1, 3)
    # Across the resume the reference stayed the base model, bit for bit (a reference rebuilt
    # from the resumed policy would pass the loss checks above), and only the policy trained.
    setup = build(rundir.load_config(run))
    ckpt = Checkpointer(run / rundir.CHECKPOINT_DIR, async_save=False)
    step, state, _ = ckpt.restore(setup.abstract_state)
    ckpt.close()
    assert step == 12
    base_params = jax.device_get(jaxlm.load(base).params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ref_params), base_params)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(base_params)))
