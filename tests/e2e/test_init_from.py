"""`model.init_from`: a new run from an HF directory's weights (fresh optimizer) on a sharded
mesh, whose first loss equals the HF model's on the same batch, with the tokenizer carried
into the run; from a jaxlm run directory too; a contradicting model setting is refused with
one line before anything is written."""

import importlib

import numpy as np
import pytest
import torch
import transformers
from conftest import corpus, tiny_hf_llama

from jaxlm.cli import main
from jaxlm.data import setup as data_setup
from jaxlm.data.tokenizers import load_tokenizer, train_bpe
from jaxlm.train import rundir

V = 300
# The same sharded mesh in every run here: identical steps compile once (the session's cache).
TRAIN = ["train.steps=2", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
         "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=2",
         "optim.warmup_steps=1", "run.quiet=true", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random tiny HF Llama directory with an HF tokenizer (a BPE trained here)."""
    tmp = tmp_path_factory.mktemp("init_from")
    text = corpus(tmp)
    hf = tmp / "hf"
    bpe = train_bpe(text.read_text().splitlines(), V)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(hf)
    return hf, tiny_hf_llama(hf, V), text


def _hf_loss(model, inputs, targets, mask) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(np.asarray(inputs, np.int64))).logits.double()
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), torch.tensor(np.asarray(targets, np.int64)), reduction="none")
    mask = torch.tensor(np.asarray(mask)).double()
    return float((nll * mask).sum() / mask.sum())


def test_fine_tune_from_hf_dir_matches_hf_loss(hf_llama, tmp_path):
    hf, model, text = hf_llama
    run = tmp_path / "run"
    assert main(["train", f"model.init_from={hf}", f"data.files={text}", f"run.dir={run}",
                 *TRAIN]) == 0
    cfg = rundir.load_config(run)
    m = cfg.model
    assert (m.preset, m.num_layers, m.d_model, m.num_kv_heads, m.d_ff, m.vocab_size) == (
        "llama", 2, 32, 2, 64, V)
    # The tokenizer came along: the run's gives the HF tokenizer's ids.
    sample = "thou art my lord and the king"
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert load_tokenizer(run / rundir.TOKENIZER_DIR).encode(sample, add_special_tokens=False) \
        == hf_tok(sample, add_special_tokens=False)["input_ids"]

    batch = data_setup.build(cfg, run, progress=False).train.batch(0)
    rows = [r for r in rundir.read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    ref = _hf_loss(model, batch.inputs, batch.targets, batch.loss_mask)
    assert abs(rows[0]["loss"] - ref) <= 1e-4 * ref, (rows[0]["loss"], ref)


def test_fine_tune_from_a_run_dir(hf_llama, tmp_path, capsys):
    """A converted run as the source: its architecture and tokenizer come along; the new
    run starts at step 0 (its own checkpoints), not from the source's step."""
    hf, _, text = hf_llama
    source = tmp_path / "source"
    assert main(["convert", "hf2jaxlm", "--hf", str(hf), "--out", str(source)]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", f"model.init_from={source}", f"data.files={text}", f"run.dir={run}",
                 *TRAIN]) == 0
    assert f"initialised from {source}" in capsys.readouterr().err
    assert rundir.load_config(run).model.num_layers == 2
    assert (run / rundir.TOKENIZER_DIR).is_dir()
    assert [r["step"] for r in rundir.read_metrics(run) if "loss" in r] == [1, 2]


@pytest.mark.parametrize("setting, key", [("model.num_layers=3", "model.num_layers"),
                                          ("model.preset=gpt2", "model.preset")])
def test_contradiction_is_refused_and_nothing_written(hf_llama, tmp_path, capsys, setting,
                                                      key):
    hf, _, text = hf_llama
    run = tmp_path / "run"
    code = main(["train", f"model.init_from={hf}", setting, f"data.files={text}",
                 f"run.dir={run}", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key in err[0] and "init_from" in err[0], err
    assert not run.exists()


def test_missing_source_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", f"model.init_from={tmp_path / 'nowhere'}", f"run.dir={run}",
                 *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nowhere" in err[0] and not run.exists()


@pytest.mark.parametrize("command, target", [
    (["compile", "--topology", "v5e:2x2"], "jaxlm.aot.compile_for_topology"),
    (["bench"], "jaxlm.bench.bench"), (["profile"], "jaxlm.profile.profile")])
def test_compile_bench_profile_take_the_checkpoint_architecture(hf_llama, monkeypatch,
                                                                command, target):
    """Sized like the run `jaxlm train model.init_from=...` would make (the default config's
    shape would be another model); stopped where the work would start."""
    hf, _, _ = hf_llama
    seen = []

    class Reached(Exception):
        pass

    def capture(cfg, *args, **kwargs):
        seen.append(cfg)
        raise Reached

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, capture)
    with pytest.raises(Reached):
        main([*command, f"model.init_from={hf}"])
    m = seen[0].model
    assert (m.preset, m.num_layers, m.d_model, m.num_kv_heads, m.d_ff, m.vocab_size) == (
        "llama", 2, 32, 2, 64, V)
