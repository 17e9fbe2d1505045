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
    assert cfg.model.d_model == 128  # from tiny.yaml, not the preset's 2048


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
