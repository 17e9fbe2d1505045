"""Property tests of config overrides: any valid value round-trips through `key=value`, any
misspelt key is refused with a suggestion, and a resolved config survives YAML."""

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlm import config as config_lib
from jaxlm.config import ConfigError

INT_KEYS = ["train.steps", "train.batch_size", "train.log_every", "checkpoint.every", "seed"]
FLOAT_KEYS = ["optim.lr", "optim.weight_decay", "optim.clip_norm", "train.z_loss"]


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(INT_KEYS), value=st.integers(1, 10**9))
def test_int_overrides_round_trip(key, value):
    cfg = config_lib.load(None, [f"{key}={value}"])
    assert config_lib._get(cfg, key) == value
    assert config_lib.from_yaml_text(config_lib.dump(cfg)) == cfg


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(FLOAT_KEYS),
       value=st.floats(1e-8, 1e3, allow_nan=False, allow_infinity=False))
def test_float_overrides_round_trip(key, value):
    cfg = config_lib.load(None, [f"{key}={value!r}"])
    assert config_lib._get(cfg, key) == value


@settings(max_examples=60, deadline=None)
@given(junk=st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
def test_unknown_keys_are_refused(junk):
    key = f"train.{junk}"
    valid = {k for k, *_ in config_lib.describe()}
    if key in valid:
        return
    try:
        config_lib.load(None, [f"{key}=1"])
    except ConfigError as e:
        assert f"unknown config key '{key}'" in str(e)
    else:
        raise AssertionError(f"{key} was accepted")


@settings(max_examples=40, deadline=None)
@given(value=st.text(min_size=1, max_size=20).filter(lambda s: "\n" not in s))
def test_string_keys_take_any_text_and_ints_refuse_it(value):
    try:
        cfg = config_lib.load(None, [f"run.dir={value}"])
    except ConfigError:
        return  # YAML reads it as a non-string (list, mapping...): refused, never crashes
    assert isinstance(cfg.run.dir, str)
    try:
        config_lib.load(None, [f"train.steps={value}"])
    except ConfigError as e:
        assert "train.steps" in str(e)
