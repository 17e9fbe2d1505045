"""A byte-level run trained here, exported with `jaxlm convert jaxlm2hf` in shards with an
index, loads in HF as it is: AutoTokenizer gives the run's ids and
`pipeline("text-generation")` writes what `jaxlm.load(run).generate` writes; the shards
load back into jaxlm with the same logits; a bfloat16 export holds bfloat16 tensors."""

import json

import numpy as np
import pytest
import transformers
from conftest import TINY_SHAPE, corpus
from safetensors import safe_open

import jaxlm
from jaxlm.cli import main

PROMPT = "ROMEO:\nthou art"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run, out = tmp / "run", tmp / "hf"
    assert main(["train", f"run.dir={run}", f"data.files={corpus(tmp)}", "train.steps=30",
                 "train.eval_every=0", "train.log_every=10", "checkpoint.every=30",
                 "optim.lr=3e-3", "optim.warmup_steps=5", "run.quiet=true", *TINY_SHAPE]) == 0
    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(out),
                 "--max-shard-size", "40KB"]) == 0
    return run, out


def test_export_is_sharded_with_an_index(exported):
    _, out = exported
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 40_000 + 10_000 for p in shards)  # + headers
    assert not (out / "model.safetensors").exists()


def test_hf_pipeline_generates_what_jaxlm_generates(exported):
    run, out = exported
    lm = jaxlm.load(run)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 260 and tok(PROMPT)["input_ids"] == lm.tokenizer.encode(PROMPT)
    pipe = transformers.pipeline("text-generation", model=str(out), tokenizer=tok,
                                 device="cpu")
    got = pipe(PROMPT, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    want = lm.generate(PROMPT, max_new_tokens=16, temperature=0.0)
    assert len(want) > 0 and got == PROMPT + want, (got, want)


def test_sharded_export_loads_back_with_the_same_logits(exported):
    run, out = exported
    tokens = np.asarray([list(PROMPT.encode())])
    np.testing.assert_allclose(np.asarray(jaxlm.load(out)(tokens)),
                               np.asarray(jaxlm.load(run)(tokens)), atol=1e-5)


def test_bfloat16_export(exported, tmp_path):
    run, _ = exported
    out = tmp_path / "bf16"
    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(out),
                 "--dtype", "bfloat16"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert str(model.dtype) == "torch.bfloat16"


def test_a_model_hf_cannot_hold_is_refused_before_its_weights_are_read(tmp_path, capsys):
    """A run whose model has no HF class (GPT-2 with a gated MLP) exits 2 naming why, before
    any checkpoint is read (this run has none), and writes nothing."""
    from jaxlm import config as config_lib
    from jaxlm.train import rundir

    run, out = tmp_path / "run", tmp_path / "hf"
    rundir.write_config(run, config_lib.load("tiny", ["model.gated_mlp=true"]))
    assert main(["convert", "jaxlm2hf", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "gated" in err, err
    assert not out.exists() and not list(tmp_path.glob(".hf.partial*"))
