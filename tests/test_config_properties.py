"""Property tests of config overrides: any valid value round-trips through `key=value`, any
misspelt key is refused with a suggestion, and a resolved config survives YAML."""

import string

import yaml
from hypothesis import example, given, settings
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


def _yaml_value(text: str):
    """What an override `key=text` carries: the YAML reading of text, the raw text where
    it is no valid YAML, and "" for an empty value."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    return "" if value is None else value


@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.text(min_size=1, max_size=20).filter(lambda s: "\n" not in s),
                       st.integers(-5, 10**6).map(str)))
@example("true")
@example("-3")
@example("0")
@example("7")
@example("1.5")
@example("[1, 2]")
@example("{a: 1}")
@example("2001-01-01")
@example("~")
@example("a: b: c")
def test_string_keys_take_any_text_and_ints_refuse_it(value):
    parsed = _yaml_value(value)
    scalar = isinstance(parsed, (str, int, float)) and not isinstance(parsed, bool)
    try:
        cfg = config_lib.load(None, [f"run.dir={value}"])
    except ConfigError as e:
        # Only what YAML reads as a list, a mapping, a bool, a date... is refused, by name.
        assert not scalar and "run.dir" in str(e), (value, str(e))
    else:
        assert scalar and cfg.run.dir == str(parsed), (value, cfg.run.dir)
    try:
        cfg = config_lib.load(None, [f"train.steps={value}"])
    except ConfigError as e:
        assert "train.steps" in str(e)
        assert not (type(parsed) is int and parsed > 0), (value, str(e))
    else:  # accepted only as a positive whole number, and then exactly that number
        assert type(parsed) is int and parsed > 0 and cfg.train.steps == parsed, value
