"""Table of bad inputs across config, data, mesh, checkpoint and CLI: each exits with code 2
and one short message naming the culprit, without a traceback, and no file of an existing
run directory changes."""

import hashlib
import json
from pathlib import Path

import pytest

from jaxlm.cli import main

SHAPE = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
         "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8", "run.quiet=true"]


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
    return tmp, run


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


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
      *SHAPE[:-2], "run.quiet=true"], "not divisible by the data-parallel size 8"),
    (["train", f"run.dir={T}/new", f"data.files={T}/ok.txt", "mesh.data=1", "mesh.tensor=8",
      *SHAPE], "not divisible by mesh.tensor=8"),
    # checkpoints and other commands
    (["train", f"run.dir={T}/broken_run", "train.steps=3"], "no readable checkpoint"),
    (["generate", "--run", f"{T}/nowhere", "--prompt", "x"], "not a jaxlm run directory"),
    (["eval", "--run", f"{T}/nowhere"], "not a jaxlm run directory"),
    (["export", "--run", R, "--out", R], "not empty"),
    (["prepare", "shakespear"], "did you mean 'shakespeare'"),
    (["convert", "hf2jaxlm", "--hf", f"{T}/mamba", "--out", f"{T}/conv"], "mamba"),
    (["compile", "--topology", "v99:9x9"], "v99:9x9"),
]


@pytest.mark.parametrize("argv, needle", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input(env, capsys, argv, needle):
    tmp, run = env
    argv = [a.replace(T, str(tmp)).replace(R, str(run)) for a in argv]
    needle = needle.replace(T, str(tmp))
    before = _checksums(tmp)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    after = _checksums(tmp)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not (tmp / "new").exists() and not (tmp / "conv").exists()


def test_non_utf8_bytes_are_replaced_and_counted_by_default(env, caplog):
    from jaxlm.data.pipeline import read_texts

    tmp, _ = env
    docs = read_texts([str(tmp / "latin1.txt")])
    assert docs[0].count("\ufffd") == 100
    assert "replaced 100 invalid UTF-8" in caplog.text
