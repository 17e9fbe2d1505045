"""Config schema, presets, overrides and errors."""

import pytest
import yaml

from jaxlm import config as config_lib
from jaxlm.config import ConfigError


def test_default_config_and_overrides():
    cfg = config_lib.load(None, ["train.steps=7", "optim.lr=1e-3", "model.dtype=bfloat16",
                                 "data.files=a.txt,b.txt"])
    assert cfg.name == "tiny"
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.model.dtype == "bfloat16"
    assert cfg.data.files == ["a.txt", "b.txt"]


def test_preset_sets_architecture_and_yaml_wins_over_preset():
    cfg = config_lib.load(None, ["model.preset=llama"])
    assert cfg.model.norm == "rmsnorm" and cfg.model.position == "rope"
    assert cfg.model.d_model == 96  # from tiny.yaml, not the preset's 2048


def test_round_trip_through_yaml():
    cfg = config_lib.load(None, ["seed=3"])
    again = config_lib.from_yaml_text(config_lib.dump(cfg))
    assert again == cfg
    assert yaml.safe_load(config_lib.dump(cfg))["seed"] == 3


@pytest.mark.parametrize("overrides, needle", [
    (["train.stpes=3"], "did you mean 'train.steps'"),
    (["modle.d_model=3"], "did you mean 'model.d_model'"),
    (["train.steps=abc"], "train.steps: expected int"),
    (["model.dropout=yes"], "model.dropout: expected float"),
    (["optim.lr"], "expected key=value"),
    (["model.attention=magic"], "model.attention='magic'"),
    (["model.preset=gtp2"], "did you mean 'gpt2'"),
    (["model.num_heads=5"], "not divisible by model.num_heads=5"),
    (["train.seq_len=4096"], "exceeds model.max_seq_len"),
    (["model.num_kv_heads=3"], "not a multiple of model.num_kv_heads"),
    (["train.steps=0"], "train.steps must be positive"),
    (["optim.lr=.nan"], "optim.lr must be positive and finite"),
    (["optim.eps=0"], "optim.eps must be positive and finite"),
    (["mesh.data=0"], "mesh.data must be a positive size or -1"),
])
def test_bad_overrides_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError, match=None) as e:
        config_lib.load(None, overrides)
    assert needle in str(e.value)


def test_unknown_config_name_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        config_lib.load("tinny")
    with pytest.raises(ConfigError, match="not found"):
        config_lib.load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_lib.load(str(bad))


def test_every_key_has_help():
    rows = config_lib.describe()
    assert len(rows) > 40
    for key, _, _, help_text in rows:
        assert help_text and len(help_text) > 5, key


def test_configs_are_all_loadable():
    for name in config_lib.config_names():
        config_lib.load(name)


SHIPPED_PARAMS = {  # millions of parameters each shipped config builds
    "tiny": (0.24, 0.27), "gpt2-124m": (124, 125), "llama-1b": (1000, 1200),
    "transformer-mt-tiny": (1.8, 2.0), "transformer-base-mt": (50, 55),
    "bert-mlm-tiny": (0.1, 5), "t5-small-summarize": (45, 60), "gpt2-qa-tiny": (1.2, 1.5),
    "mixtral-8x7b": (46_600, 46_800), "llama3-8b": (8_020, 8_040), "sft-tiny": (0.8, 0.9),
    "lora-tiny": (0.8, 1.0), "dpo-tiny": (0.8, 0.9),
}


def test_every_shipped_config_loads_and_builds_its_model():
    import jax
    import jax.numpy as jnp

    from jaxlm.families.registry import build_model
    from jaxlm.train.state import count_params

    assert set(config_lib.config_names()) == set(SHIPPED_PARAMS)
    for name, (low, high) in SHIPPED_PARAMS.items():
        cfg = config_lib.load(name)
        model = build_model(cfg.model)
        x = jnp.ones((1, 8), jnp.int32)
        args = (x, x) if cfg.model.family == "encoder_decoder" else (x,)
        shapes = jax.eval_shape(lambda m=model, a=args: m.init(jax.random.PRNGKey(0), *a))
        millions = count_params(shapes["params"]) / 1e6
        assert low <= millions <= high, (name, millions)
        assert cfg.train.seq_len <= cfg.model.max_seq_len, name


def test_resume_takes_quiet_from_this_invocation_not_the_saved_run(tmp_path):
    from jaxlm.train import rundir

    run = tmp_path / "run"
    cfg, _, resuming = rundir.resolve("tiny", [f"run.dir={run}", "run.quiet=true"])
    assert not resuming and cfg.run.quiet
    rundir.write_config(run, cfg)
    again, _, resuming = rundir.resolve(None, [f"run.dir={run}"])
    assert resuming and not again.run.quiet
    assert rundir.resolve(None, [f"run.dir={run}", "run.quiet=true"])[0].run.quiet
