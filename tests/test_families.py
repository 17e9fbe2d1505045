"""The family specs: each family's FLOPs equal its traced step's matmuls (encoder and decoder
lengths apart, banded layers by their window), its synthetic batch fits its objective,
config fields and data formats another family would ignore are refused, and `bench`,
`profile` and `compile` work for a shipped config of every family."""

import dataclasses
import importlib.util
import json

import jax
import numpy as np
import pytest
from conftest import TINY_MODEL

from jaxlm import config as config_lib
from jaxlm import perf, setup
from jaxlm.cli import main
from jaxlm.config import ConfigError
from jaxlm.data.batch import LMBatch, MLMBatch, Seq2SeqBatch
from jaxlm.families import registry, schema

SMALL = TINY_MODEL
# (config, extra overrides, expected batch type): one per family and data layout.
CASES = {
    "decoder": ("tiny", [], LMBatch),
    "decoder-banded": ("tiny", ["model.local_window=8", "model.local_every=2"], LMBatch),
    "encoder": ("bert-mlm-tiny", [], MLMBatch),
    "seq2seq-pairs": ("transformer-mt-tiny", ["model.num_decoder_layers=3"], Seq2SeqBatch),
    "seq2seq-text": ("transformer-mt-tiny", ["data.format=text"], Seq2SeqBatch),
    "t5": ("t5-small-summarize", ["model.dtype=float32", "model.head_dim=16"], Seq2SeqBatch),
}


def _cfg(name, extra=(), scan=True):
    return config_lib.load(name, [*SMALL, *extra, f"model.scan_layers={str(scan).lower()}"])


@pytest.mark.parametrize("case", list(CASES))
def test_dense_flops_equal_the_traced_matmul_flops(case):
    name, extra, batch_type = CASES[case]
    cfg = _cfg(name, extra, scan=case != "t5")
    s = setup.build(cfg)
    batch = s.abstract_batch()
    assert isinstance(batch, batch_type)
    with jax.set_mesh(s.mesh):
        traced = perf.jaxpr_matmul_flops(s.train_step, s.abstract_state, batch)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    assert traced == pytest.approx(s.flops_per_token(causal_halved=False) * tokens, rel=1e-9)


def _mask_pairs(T, window):
    """Query-key pairs a causal (banded) layer attends to, the diagonal counted half."""
    q = np.arange(T)[:, None]
    k = np.arange(T)[None, :]
    band = (k <= q) & (k > q - window)
    return band.sum() - T / 2


@pytest.mark.parametrize("window", [0, 8])
def test_causal_and_banded_layers_count_the_pairs_their_masks_allow(window):
    extra = [f"model.local_window={window}"] if window else []
    cfg = _cfg("tiny", extra)
    s = setup.build(cfg)
    T, L, width = 32, 2, 32
    dense = s.flops_per_token(causal_halved=False)
    halved = s.flops_per_token()
    local = L // 2 if window else 0
    pairs = (L - local) * _mask_pairs(T, T) + local * _mask_pairs(T, window)
    assert (dense - halved) * T == pytest.approx(12 * width * (L * T * T - pairs))


def test_seq2seq_on_text_counts_each_stack_on_its_half():
    """A window of T tokens: the encoder reads T/2, the decoder writes T/2 (not T each, which
    counted the weights twice). Pairs fill T on both sides: twice the weight work per counted
    token, four times the attention pairs, so more than twice in all."""
    text = setup.build(_cfg("transformer-mt-tiny", ["data.format=text"]))
    pairs = setup.build(_cfg("transformer-mt-tiny"))
    assert text.cfg.data.format == "text" and pairs.cfg.data.format == "pairs"
    assert text.family.tokens_per_example(text.cfg) == {"source": 16, "target": 16}
    assert pairs.family.tokens_per_example(pairs.cfg) == {"source": 32, "target": 32}
    ratio = pairs.flops_per_token() / text.flops_per_token()
    assert 2.0 < ratio < 2.5


def test_every_family_is_registered_with_its_facts():
    assert set(registry.FAMILIES) == set(schema.FAMILY_NAMES)
    for name, spec in registry.FAMILIES.items():
        assert spec.name == name and spec.own_fields == schema.OWN_FIELDS[name]
        for model_type in spec.hf_model_types:
            assert registry.hf_converter(model_type)[0] is spec
            assert registry.hf_converter(model_type, family=name)[0] is spec
            others = set(registry.FAMILIES) - {name}
            assert all(registry.hf_converter(model_type, o) is None for o in others)


@pytest.mark.parametrize("config,field,family", [
    ("tiny", "model.embed_norm=true", "decoder"),
    # embed_scale belongs to two families (Gemma's decoders, Marian): the third refuses it.
    ("bert-mlm-tiny", "model.embed_scale=true", "encoder"),
    ("bert-mlm-tiny", "model.final_logit_softcap=30", "encoder"),
    ("tiny", "model.type_vocab_size=2", "decoder"),
    ("bert-mlm-tiny", "model.local_window=16", "encoder"),
    ("transformer-mt-tiny", "model.type_vocab_size=2", "encoder_decoder"),
    ("tiny", "model.decoder_start_id=3", "decoder"),
])
def test_a_field_the_family_ignores_is_refused(config, field, family, tmp_path, capsys):
    key = field.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} does not apply to the {family} family"):
        config_lib.load(config, [field])
    run = tmp_path / "r"
    assert main(["train", "--config", config, field, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert key in err and family in err and "Traceback" not in err and not run.exists()


def test_a_field_set_by_the_preset_of_the_family_is_accepted():
    cfg = config_lib.load("tiny", ["model.preset=bart", "model.embed_norm=false",
                                   "model.vocab_size=512"])
    assert cfg.model.family == "encoder_decoder" and not cfg.model.embed_norm


@pytest.mark.parametrize("config,fmt", [("tiny", "pairs"), ("bert-mlm-tiny", "pairs"),
                                        ("transformer-mt-tiny", "prompt_answer")])
def test_a_data_format_the_family_cannot_train_on_is_refused(config, fmt):
    with pytest.raises(ConfigError, match=f"data.format={fmt} does not fit"):
        config_lib.load(config, [f"data.format={fmt}"])


def test_data_format_defaults_from_the_corpus_never_from_file_contents(tmp_path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"source": "a", "target": "b"}\n')
    assert config_lib.load("tiny", []).data.format == "text"
    assert config_lib.load("transformer-mt-tiny", []).data.format == "pairs"
    assert config_lib.load("gpt2-qa-tiny", []).data.format == "prompt_answer"
    # Files are text unless the config says otherwise.
    cfg = config_lib.load("transformer-mt-tiny", [f"data.files={pairs}"])
    assert cfg.data.format == "text"


def test_pairs_format_on_a_text_file_is_a_clear_error(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("just some text\n" * 50)
    code = main(["train", "--config", "transformer-mt-tiny", f"data.files={text}",
                 "data.format=pairs", f"run.dir={tmp_path / 'r'}", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "is not a .jsonl file" in err and "Traceback" not in err


def test_synthetic_batches_follow_the_data_format():
    for fmt, S in (("pairs", 32), ("text", 16)):
        s = setup.build(_cfg("transformer-mt-tiny", [f"data.format={fmt}"]))
        b = s.synthetic_batch(np.random.default_rng(0))
        assert b.src.shape == (8, S) and b.tgt_in.shape == (8, S)
        assert (b.tgt_in[:, 1:] == b.tgt_out[:, :-1]).all()


SHIPPED = ["tiny", "bert-mlm-tiny", "transformer-mt-tiny", "t5-small-summarize"]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install 'jaxlm[tpu]')")


def _traced_dense_flops(config):
    s = setup.build(config_lib.load(config, SMALL))
    with jax.set_mesh(s.mesh):
        return perf.jaxpr_matmul_flops(s.train_step, s.abstract_state, s.abstract_batch())


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED)
def test_bench_and_profile_run_for_every_family(config, capsys):
    assert main(["bench", "--config", config, "--steps", "1", "--warmup", "0", "--json",
                 *SMALL]) == 0
    result = json.loads(capsys.readouterr().out)
    tokens = result["tokens_per_step"]
    assert result["flops_per_token_dense"] * tokens == pytest.approx(
        _traced_dense_flops(config), rel=1e-9)
    assert main(["profile", "--config", config, "--steps", "1", *SMALL]) == 0
    assert "verdict" in capsys.readouterr().out


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED)
def test_compile_for_a_tpu_topology_runs_for_every_family(config, capsys):
    assert main(["compile", "--topology", "v5e:2x4", "--json", "--config", config,
                 *SMALL]) == 0
    report = json.loads(capsys.readouterr().out)
    s = setup.build(config_lib.load(config, SMALL))
    assert report["chips"] == 8 and report["fits"] is True
    assert report["flops_per_step"] == pytest.approx(s.flops_per_token() * 8 * 32, rel=1e-9)


def test_mesh_rules_from_the_config_change_the_parameter_shardings():
    cfg = _cfg("tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    base = setup.build(cfg).state_shardings.params
    moved = setup.build(dataclasses.replace(cfg, mesh=dataclasses.replace(
        cfg.mesh, rules=["mlp=fsdp", "embed="]))).state_shardings.params
    wi = lambda p: p["decoder"]["layers"]["mlp"]["wi"]["kernel"].spec
    assert tuple(wi(base)) == (None, "fsdp", "tensor")
    assert tuple(wi(moved)) == (None, None, "fsdp")
    with pytest.raises(ConfigError, match="mesh.rules entry"):
        setup.build(dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh,
                                                                      rules=["embed=pod"])))
