"""Command-line parsing details."""

import pytest
import yaml

from jaxlm.cli import main


def test_overrides_may_follow_flags(capsys):
    assert main(["train", "--print-config", "train.steps=5", "--quiet", "seed=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["seed"] == 3 and cfg["train"]["steps"] == 5 and cfg["run"]["quiet"] is True


def test_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
