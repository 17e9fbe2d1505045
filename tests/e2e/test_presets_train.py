"""Every preset trains through the same `jaxlm train` path with the objective that fits its
family: causal LM, masked LM, or seq2seq (continuation on plain text, pairs from jsonl)."""

import json
import math

import numpy as np
import pytest

import jaxlm
from jaxlm.cli import main
from jaxlm.train import rundir

TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=0",
        "model.d_ff=64", "model.vocab_size=260", "model.max_seq_len=32", "train.seq_len=32",
        "train.batch_size=8", "train.steps=3", "train.log_every=1", "train.eval_every=0",
        "train.eval_batches=1", "run.quiet=true"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog."
                              for i in range(300)))
    return path


@pytest.fixture(scope="module")
def random_letters(tmp_path_factory):
    """40,000 letters drawn uniformly from 8: all there is to learn is which 8 of the 260
    byte ids occur. A model that learns it gets from log 260 to log 8 nats per predicted
    token, and only one that sees what it predicts gets much below."""
    path = tmp_path_factory.mktemp("data") / "letters.txt"
    path.write_text("".join(np.random.default_rng(0).choice(list("abcdefgh"), 40_000)))
    return path


LEARN = ["train.steps=40", "optim.lr=3e-2", "optim.warmup_steps=5"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt2", "gpt3", "llama", "bert", "roberta", "transformer",
                                    "t5", "bart", "marian"])
def test_preset_trains_with_its_objective(tmp_path, random_letters, preset):
    run = tmp_path / preset
    overrides = [o for o in TINY if not o.startswith("train.steps")]
    assert main(["train", f"model.preset={preset}", *overrides, *LEARN,
                 f"data.files={random_letters}", f"run.dir={run}"]) == 0
    rows = rundir.read_metrics(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    # From chance over the byte vocabulary to the entropy of the letters, and not below it
    # (masked LM: a little below, the 10% of picked tokens left unchanged give them away).
    assert losses[0] > math.log(260) - 0.3, losses[0]
    end = float(np.mean(losses[-5:]))
    assert math.log(8) - 0.4 < end < math.log(8) + 0.3, losses
    assert math.log(8) - 0.4 < evals[-1]["eval_loss"] < math.log(8) + 0.3, evals[-1]
    if preset in ("bert", "roberta"):
        assert "eval_accuracy" in evals[-1]  # the masked-LM objective ran
    assert jaxlm.load(run).config.model.preset == preset


def test_seq2seq_trains_on_jsonl_pairs(tmp_path):
    pairs = [{"source": f"{i} plus one", "target": f"{i + 1}"} for i in range(200)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in pairs))
    run = tmp_path / "mt"
    overrides = [o for o in TINY if not o.startswith("train.steps")]
    assert main(["train", "model.preset=transformer", *overrides, "train.steps=30",
                 "optim.lr=3e-3", "optim.warmup_steps=3", f"data.files={data}",
                 "data.format=pairs", f"run.dir={run}"]) == 0
    losses = [r["loss"] for r in rundir.read_metrics(run) if "loss" in r]
    assert losses[-1] < losses[0] - 1.0


def test_bpe_tokenizer_is_trained_saved_and_reused(tmp_path, text_file):
    from jaxlm.data.tokenizers import load_tokenizer

    run = tmp_path / "bpe"
    args = ["train", "model.preset=gpt2", *TINY, f"data.files={text_file}", f"run.dir={run}",
            "data.tokenizer=bpe", "data.bpe_vocab_size=300", "model.vocab_size=300"]
    assert main(args) == 0
    tok = load_tokenizer(run / "tokenizer")
    assert 260 < tok.vocab_size <= 300
    ids = tok.encode("the quick brown fox")
    assert len(ids) < len("the quick brown fox") and tok.decode(ids) == "the quick brown fox"
    lm = jaxlm.load(run)
    assert lm.tokenizer.encode("lazy dog") == tok.encode("lazy dog")
