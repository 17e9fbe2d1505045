"""Table of bad inputs across config, data, mesh, checkpoint and CLI: each exits with code 2
and one short message naming the culprit, without a traceback, and no file of an existing
run directory changes."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SHAPE

from jaxlm.cli import main

SHAPE = [*TINY_SHAPE, "run.quiet=true"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    text = tmp / "ok.txt"
    text.write_text("Speak the speech, I pray you, as I pronounced it to you.\n" * 200)
    run = tmp / "run"
    assert main(["train", f"run.dir={run}", f"data.files={text}", "train.steps=2",
                 "checkpoint.every=1", *SHAPE]) == 0
    files = {
        "empty": "\n\n  \n",
        "latin1.txt": None,
        "nofield.jsonl": json.dumps({"body": "hello"}) + "\n",
        "broken.jsonl": '{"text": "unterminated\n',
        "badyaml.yaml": "train:\n  steps: [1\n",
        "listyaml.yaml": "- a\n- b\n",
    }
    for name, content in files.items():
        path = tmp / (name if "." in name else name + ".txt")
        if content is None:
            path.write_bytes("caf\xe9 ".encode("latin-1") * 100)
        else:
            path.write_text(content)
    (tmp / "emptydir").mkdir()
    (tmp / "mamba").mkdir()
    (tmp / "mamba" / "config.json").write_text('{"model_type": "mamba"}')
    broken_run = tmp / "broken_run"
    assert main(["train", f"run.dir={broken_run}", f"data.files={text}", "train.steps=1",
                 *SHAPE]) == 0
    for f in (broken_run / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0")
    _damaged_runs(tmp, run)
    _hf_dirs(tmp)
    (tmp / "cachefile").write_text("not a folder")
    return tmp, run


def _damaged_runs(tmp: Path, run: Path) -> None:
    """Copies of the trained run whose config.yaml is not YAML, has an unknown key, has a
    value of the wrong type, or is empty."""
    saved = yaml.safe_load((run / "config.yaml").read_text())
    damage = {
        "yaml_run": "model:\n  d_model: [32\n",
        "key_run": yaml.safe_dump({**saved, "train": {**saved["train"], "stpes": 2}}),
        "type_run": yaml.safe_dump({**saved, "train": {**saved["train"], "steps": "ten"}}),
        "empty_run": "",
    }
    for name, text in damage.items():
        shutil.copytree(run, tmp / name)
        (tmp / name / "config.yaml").write_text(text)


def _hf_dirs(tmp: Path) -> None:
    gpt2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 260,
            "n_positions": 32}
    contents = {
        "hf_badjson": ('{"model_type": "gpt2",', None),
        "hf_list": ("[1, 2]", None),
        "hf_nokey": (json.dumps({"model_type": "gpt2"}), None),
        "hf_gpt2": (json.dumps(gpt2), None),  # no weights
        "hf_badtensors": (json.dumps(gpt2), b"not a safetensors file"),
    }
    for name, (config, weights) in contents.items():
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(config)
        if weights is not None:
            (tmp / name / "model.safetensors").write_bytes(weights)


def _checksums(root: Path) -> dict[str, str]:
    """Every file's sha256 and every folder below `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "folder" for p in sorted(root.rglob("*"))}


def _remove_new(root: Path, before: dict[str, str]) -> None:
    """Removes what a (failed) case left behind, so that it cannot fail the cases after it."""
    for p in sorted(root.rglob("*")):
        if str(p.relative_to(root)) not in before and p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


T, R = "{tmp}", "{run}"
CASES = [
    # config
    (["train", f"run.dir={R}", "train.stpes=5"], "did you mean 'train.steps'"),
    (["train", f"run.dir={T}/new", "model.d_modle=64"], "did you mean 'model.d_model'"),
    (["train", f"run.dir={T}/new", "train.steps=ten"], "train.steps: expected int"),
    (["train", f"run.dir={T}/new", "model.scan_layers=maybe"], "model.scan_layers"),
    (["train", f"run.dir={T}/new", "model.attention=fastest"], "model.attention"),
    (["train", f"run.dir={T}/new", "model.preset=gpt5"], "model.preset='gpt5'"),
    (["train", f"run.dir={T}/new", "train.seq_len=4096"], "exceeds model.max_seq_len"),
    (["train", f"run.dir={T}/new", "model.num_heads=7"], "not divisible by model.num_heads=7"),
    (["train", f"run.dir={T}/new", "model.dropout=1.5"], "model.dropout"),
    (["train", f"run.dir={T}/new", "optim.lr=-1"], "optim.lr must be positive"),
    (["train", "--config", "tinyy"], "did you mean 'tiny'"),
    (["train", "--config", f"{T}/badyaml.yaml"], "not valid YAML"),
    (["train", "--config", f"{T}/listyaml.yaml"], "must be a mapping"),
    (["train", "--config", f"{T}/missing.yaml"], "not found"),
    (["train", f"run.dir={T}/new", f"data.files={T}/ok.txt", "model.vocab_size=100", *SHAPE],
     "model.vocab_size=100"),
    # resume of an existing run
    (["train", f"run.dir={R}", "model.d_model=64"], "would change the model shape"),
    (["train", f"run.dir={R}", "seed=7"], "seed"),
    # data
    (["train", f"run.dir={R}", f"data.files={T}/nope.txt"], "nope.txt' not found"),
    (["train", f"run.dir={T}/new", f"data.files={T}/empty.txt", *SHAPE], "empty"),
    (["train", f"run.dir={T}/new", f"data.files={T}/emptydir", *SHAPE], "emptydir"),
    (["train", f"run.dir={T}/new", f"data.files={T}/nofield.jsonl", *SHAPE], "no field 'text'"),
    (["train", f"run.dir={T}/new", f"data.files={T}/broken.jsonl", *SHAPE], "broken.jsonl"),
    (["train", f"run.dir={T}/new", f"data.files={T}/latin1.txt", "data.utf8_errors=error",
      *SHAPE], "not valid UTF-8"),
    # mesh
    (["train", f"run.dir={T}/new", f"data.files={T}/ok.txt", "mesh.data=3", *SHAPE],
     "there are 8 devices"),
    (["train", f"run.dir={T}/new", f"data.files={T}/ok.txt", "train.batch_size=12",
      *[a for a in SHAPE if not a.startswith("train.batch_size=")]],
     "not divisible by the data-parallel size 8"),
    (["train", f"run.dir={T}/new", f"data.files={T}/ok.txt", "mesh.data=1", "mesh.tensor=8",
      *SHAPE], "not divisible by mesh.tensor=8"),
    (["train", f"run.dir={T}/new", f"data.files={T}/ok.txt", "mesh.dcn_data=2", *SHAPE],
     "devices are in 1 process"),
    (["train", f"run.dir={T}/new", "mesh.dcn_fsdp=0"], "mesh.dcn_fsdp a positive count"),
    (["train", f"run.dir={T}/new", "profile.steps=-1"], "profile.steps must be >= 0"),
    # checkpoints and other commands
    (["train", f"run.dir={T}/broken_run", "train.steps=3"], "no readable checkpoint"),
    (["generate", "--run", f"{T}/nowhere", "--prompt", "x"], "not a jaxlm run directory"),
    (["eval", "--run", f"{T}/nowhere"], "not a jaxlm run directory"),
    (["export", "--run", R, "--out", R], "not empty"),
    (["prepare", "shakespear"], "did you mean 'shakespeare'"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/mamba", "--out", f"{T}/conv"], "mamba"),
    (["compile", "--topology", "v99:9x9"], "v99:9x9"),
]

# Every subcommand's own arguments: a missing path, a wrong type, an out-of-range number and a
# damaged run directory (config.yaml not YAML, an unknown key, a wrong type, empty). Argument
# errors come from argparse (one line, exit 2); the rest from the command.
DAMAGED = [("yaml_run", "not valid YAML at line 3"),
           ("key_run", "unknown config key 'train.stpes'; did you mean 'train.steps'"),
           ("type_run", "train.steps: expected int"),
           ("empty_run", "expected a mapping of config keys, the file is empty")]
# Cheap if a refusal regresses into running: a tiny new run, one token, one batch, one step.
TRAIN = ["train", f"run.dir={T}/new", f"data.files={T}/ok.txt", *SHAPE, "train.steps=1"]
GEN, EVAL = ["generate", "--run", R, "--max-new-tokens", "1"], ["eval", "--run", R,
                                                                 "--max-batches", "1"]
BENCH, PROF = ["bench", *SHAPE, "--steps", "1", "--warmup", "0"], ["profile", "--run", R,
                                                                   "--steps", "1"]
CASES += [
    # train
    *[(["train", f"run.dir={T}/{d}"], f"{d}/config.yaml is not a valid jaxlm run config: {n}")
      for d, n in DAMAGED],
    ([*TRAIN, "--init-timeout", "0"], "argument --init-timeout: must be > 0, got 0"),
    ([*TRAIN, "--init-timeout", "nan"], "--init-timeout: expected a finite number"),
    ([*TRAIN, "--num-processes", "0"], "argument --num-processes: must be >= 1, got 0"),
    ([*TRAIN, "--num-processes", "two"], "--num-processes: expected an integer, got 'two'"),
    ([*TRAIN, "--process-id", "-1"], "argument --process-id: must be >= 0, got -1"),
    # generate
    (["generate", "--run", f"{T}/ok.txt"], "not a jaxlm run directory"),
    (["generate", "--run", f"{T}/hf_badjson", "--max-new-tokens", "1"],
     "hf_badjson/config.json' is not valid JSON"),
    (["generate", "--run", f"{T}/hf_list", "--max-new-tokens", "1"], "must hold a JSON object"),
    (["export", "--run", f"{T}/hf_badjson", "--out", f"{T}/exported"], "is not valid JSON"),
    *[(["generate", "--run", f"{T}/{d}"], f"{d}/config.yaml is not a valid jaxlm run config: {n}")
      for d, n in DAMAGED],
    (["generate", "--run", f"{T}/broken_run"], "broken_run"),
    ([*GEN, "--max-new-tokens", "-3"], "--max-new-tokens: must be >= 1, got -3"),
    ([*GEN, "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    ([*GEN, "--max-new-tokens", "ten"], "--max-new-tokens: expected an integer"),
    ([*GEN, "--temperature", "-0.5"], "--temperature: must be >= 0, got -0.5"),
    ([*GEN, "--temperature", "hot"], "--temperature: expected a number"),
    ([*GEN, "--top-k", "-1"], "--top-k: must be >= 0, got -1"),
    ([*GEN, "--top-p", "0"], "--top-p: must be > 0 and <= 1, got 0"),
    ([*GEN, "--top-p", "1.5"], "--top-p: must be > 0 and <= 1, got 1.5"),
    ([*GEN, "--beams", "0"], "--beams: must be >= 1, got 0"),
    ([*GEN, "--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
    ([*GEN, "--seed", "-1"], "--seed: must be >= 0"),
    ([*GEN, "--seed", str(2**64)], "--seed: must be >= 0 and < "),
    ([*GEN, "--length-penalty", "inf"], "--length-penalty: expected a finite"),
    (["generate", "--prompt", "x"], "the following arguments are required: --run"),
    # eval
    *[(["eval", "--run", f"{T}/{d}"], f"{d}/config.yaml is not a valid jaxlm run config: {n}")
      for d, n in DAMAGED],
    ([*EVAL, "--max-batches", "-1"], "--max-batches: must be >= 0, got -1"),
    ([*EVAL, "--max-batches", "all"], "--max-batches: expected an integer"),
    ([*EVAL, "--max-examples", "-5"], "--max-examples: must be >= 0, got -5"),
    ([*EVAL, "--beams", "0"], "--beams: must be >= 1, got 0"),
    ([*EVAL, "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0, got -1"),
    ([*EVAL, "--task", "poetry"], "argument --task: invalid choice: 'poetry'"),
    # convert hf2jaxlm
    (["convert", "hf2jaxlm", "--hf", f"{T}/nowhere", "--out", f"{T}/conv"],
     "not an HF model directory"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/hf_badjson", "--out", f"{T}/conv"],
     "hf_badjson/config.json' is not valid JSON"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/hf_list", "--out", f"{T}/conv"],
     "must hold a JSON object, not a list"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/hf_nokey", "--out", f"{T}/conv"], "lacks 'n_embd'"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/hf_gpt2", "--out", f"{T}/conv", "train.steps=ten"],
     "train.steps: expected int"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/hf_gpt2", "--out", f"{T}/conv", "train.steps=0"],
     "train.steps must be positive"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/hf_gpt2", "--out", f"{T}/conv"],
     "no *.safetensors file"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/hf_badtensors", "--out", f"{T}/conv"],
     "cannot read the safetensors"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/hf_gpt2", "--out", R], "already exists"),
    (["convert", "hf2jaxlm", "--out", f"{T}/conv"], "required: --hf"),
    (["convert", "sideways"], "argument DIRECTION: invalid choice: 'sideways'"),
    # convert jaxlm2hf
    (["convert", "jaxlm2hf", "--run", f"{T}/nowhere", "--out", f"{T}/conv"],
     "not a jaxlm run directory"),
    *[(["convert", "jaxlm2hf", "--run", f"{T}/{d}", "--out", f"{T}/conv"],
       f"{d}/config.yaml is not a valid jaxlm run config: {n}") for d, n in DAMAGED[:2]],
    (["convert", "jaxlm2hf", "--run", R, "--out", f"{T}/ok.txt"], "already exists"),
    # export
    (["export", "--run", f"{T}/nowhere", "--out", f"{T}/conv"], "not a jaxlm run directory"),
    *[(["export", "--run", f"{T}/{d}", "--out", f"{T}/conv"],
       f"{d}/config.yaml is not a valid jaxlm run config: {n}") for d, n in DAMAGED[:3]],
    (["export", "--run", R, "--out", f"{T}/conv", "--step", "-1"], "--step: must be >= 0"),
    (["export", "--run", R, "--out", f"{T}/conv", "--step", "last"], "--step: expected an int"),
    (["export", "--run", R, "--out", f"{T}/ok.txt"], "ok.txt' exists and is not a directory"),
    # plot
    (["plot", f"{T}/nowhere", "--out", f"{T}/conv/p.png"], "not a jaxlm run directory"),
    (["plot", f"{T}/ok.txt", "--out", f"{T}/conv/p.png"], "not a jaxlm run directory"),
    *[(["plot", R, f"{T}/{d}", "--out", f"{T}/conv/p.png"],
       f"{d}/config.yaml is not a valid jaxlm run config: {n}") for d, n in DAMAGED[:2]],
    (["plot", R, "--out", f"{T}/ok.txt/p.png"], "ok.txt' is a file, not a folder"),
    (["plot", R, "--out", f"{T}/conv/p.txt"], "unknown figure format '.txt'"),
    (["plot", R, "--out", str(Path(T))], "is a directory"),
    # runs (a damaged run is listed, not refused: see the test below)
    (["runs", f"{T}/nowhere"], "nowhere' is not a directory"),
    (["runs", f"{T}/ok.txt"], "ok.txt' is not a directory"),
    # compile (config errors come before the topology, which needs libtpu)
    (["compile", "--topology", "v5e:2x2", "--config", f"{T}/missing.yaml"], "not found"),
    (["compile", "--topology", "v5e:2x2", "train.batch_size=many"], "train.batch_size"),
    (["compile", "--topology", "v5e:2x2", "train.batch_size=0"], "must be positive"),
    (["compile", "--topology", ""], "argument --topology: expected a TPU topology"),
    (["compile"], "required: --topology"),
    (["compile", "--topology", "v5e:2x2", "--slices", "0"], "argument --slices: must be >= 1"),
    # bench
    (["bench", "--config", f"{T}/missing.yaml"], "not found"),
    ([*BENCH, "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ([*BENCH, "--steps", "many"], "argument --steps: expected an integer"),
    ([*BENCH, "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["bench", "train.seq_len=long"], "train.seq_len: expected int"),
    (["bench", "optim.lr=-1"], "optim.lr must be positive"),
    # profile
    (["profile", "--run", f"{T}/nowhere"], "not a jaxlm run directory"),
    *[(["profile", "--run", f"{T}/{d}"], f"{d}/config.yaml is not a valid jaxlm run config: {n}")
      for d, n in DAMAGED[:3]],
    (["profile", "--config", f"{T}/missing.yaml"], "not found"),
    ([*PROF, "--trace", f"{T}/ok.txt"], "--trace '{tmp}/ok.txt' is a file"),
    ([*PROF, "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ([*PROF, "--steps", "1.5"], "argument --steps: expected an integer"),
    ([*PROF, "--config", "tiny"], "not allowed with argument --run"),
    ([*PROF, "train.steps=ten"], "train.steps: expected int"),
    ([*PROF, "train.batch_size=0"], "train.batch_size must be positive"),
    ([*PROF, "--out", f"{T}/conv/p.png"], "the folder"),
    ([*PROF, "--out", f"{T}/p.bmpx"], "unknown figure format '.bmpx'"),
    # prepare
    (["prepare", ""], "unknown corpus ''"),
    (["prepare"], "required: name"),
    (["prepare", "shakespeare", "JAXLM_CACHE={tmp}/cachefile"], "cannot use the cache folder"),
]


def _run(argv: list[str]) -> int:
    """main(argv)'s exit code; argparse's own errors leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, needle", CASES, ids=[f"{i:03d}-{c[0][0]}"
                                                      for i, c in enumerate(CASES)])
def test_bad_input(env, capsys, monkeypatch, argv, needle):
    tmp, run = env
    argv = [a.replace(T, str(tmp)).replace(R, str(run)) for a in argv]
    for a in [a for a in argv if a.startswith("JAXLM_CACHE=")]:  # an environment variable
        monkeypatch.setenv(*a.split("=", 1))
        argv.remove(a)
    needle = needle.replace(T, str(tmp))
    before = _checksums(tmp)
    try:
        code = _run(argv)
        after = _checksums(tmp)
    finally:
        _remove_new(tmp, before)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1, err
    assert after == before  # nothing changed, nothing new (a run dir, a staging dir, a PNG)


def test_runs_lists_a_damaged_run_as_unreadable_and_goes_on(env, capsys):
    tmp, run = env
    before = _checksums(tmp)
    assert main(["runs", str(tmp)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    table = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert {"run", "broken_run", "yaml_run", "key_run", "type_run", "empty_run"} <= set(table)
    assert table["run"].split()[-1] == "finished"
    for name, needle in DAMAGED:
        assert f"unreadable: {needle}" in table[name], table[name]
        # The preset and total steps come from config.yaml; the rest is still shown.
        assert table[name].split()[1:4] == ["-", table["run"].split()[2], "2/?"], table[name]
    assert main(["runs", str(tmp), "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert infos["key_run"]["status"].startswith("unreadable: unknown config key 'train.stpes'")
    assert infos["key_run"]["last_checkpoint"] == 2 and infos["key_run"]["total_steps"] is None
    assert infos["key_run"]["params"] == infos["run"]["params"]  # from summary.json
    assert infos["run"]["status"] == "finished" and infos["run"]["params"] > 0
    assert _checksums(tmp) == before


def test_non_utf8_bytes_are_replaced_and_counted_by_default(env, caplog, capsys):
    from jaxlm.data.sources import plan_files, read_piece

    tmp, _ = env
    got = read_piece(plan_files([str(tmp / "latin1.txt")])[0])
    assert got.texts[0].count("\ufffd") == got.replaced == 100
    assert main(["prepare", "--files", str(tmp / "latin1.txt"), "--quiet"]) == 0
    assert "replaced 100 invalid UTF-8" in caplog.text
    assert "train" in capsys.readouterr().out


def test_top_k_above_the_vocabulary_means_every_token(env, capsys):
    _, run = env
    assert main(["generate", "--run", str(run), "--top-k", "100000", "--max-new-tokens", "2",
                 "--prompt", "Speak"]) == 0
    assert capsys.readouterr().out.startswith("Speak")
