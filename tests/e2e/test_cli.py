"""Command-line parsing details."""

import pytest
import yaml

from jaxlm.cli import main


def test_overrides_may_follow_flags(capsys, monkeypatch, tmp_path):
    # away from the checkout: after the README's first command its runs/tiny holds a run whose
    # seed this override would change, which train refuses
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--print-config", "train.steps=5", "--quiet", "seed=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["seed"] == 3 and cfg["train"]["steps"] == 5 and cfg["run"]["quiet"] is True


def test_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_numeric_options_accept_their_bounds():
    """The range checks refuse only what is out of range: each bound itself parses."""
    from jaxlm.cli import build_parser

    p = build_parser()
    g = p.parse_args(["generate", "--run", "r", "--max-new-tokens", "1", "--temperature", "0",
                      "--top-k", "0", "--top-p", "1", "--beams", "1", "--num-samples", "1",
                      "--seed", "0", "--length-penalty", "-0.5"])
    assert (g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.length_penalty) == (
        1, 0.0, 0, 1.0, -0.5)
    e = p.parse_args(["eval", "--run", "r", "--max-batches", "0", "--max-examples", "0",
                      "--max-new-tokens", "0", "--beams", "1"])
    assert (e.max_batches, e.max_examples, e.max_new_tokens) == (0, 0, 0)
    assert p.parse_args(["export", "--run", "r", "--out", "o", "--step", "0"]).step == 0
    assert p.parse_args(["bench", "--steps", "1", "--warmup", "0"]).warmup == 0
    assert p.parse_args(["profile", "--steps", "1"]).steps == 1
    t = p.parse_args(["train", "--num-processes", "1", "--process-id", "0",
                      "--init-timeout", "0.5"])
    assert (t.num_processes, t.process_id, t.init_timeout) == (1, 0, 0.5)


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--run", "r", "--top-p", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["jaxlm generate: error: argument --top-p: must be > 0 and "
                                "<= 1, got 0 (see jaxlm generate --help)"]


def test_no_function_in_cli_is_over_80_lines():
    import ast
    import inspect

    from jaxlm import cli

    tree = ast.parse(inspect.getsource(cli))
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80}
    assert not long, long
