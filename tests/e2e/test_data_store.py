"""`jaxlm prepare --files` builds the token store that `jaxlm train` then reads: the files
are tokenized once, whatever the run directory."""

from conftest import TINY_SHAPE, corpus

from jaxlm.cli import main


def test_prepare_builds_the_store_that_training_reuses(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    text = corpus(tmp_path)
    assert main(["prepare", "--files", str(text)]) == 0
    out, err = capsys.readouterr()
    assert "tokenizing" in err and out.startswith("train ") and "tokens" in out
    for run in ("a", "b"):
        assert main(["train", f"run.dir={tmp_path / run}", f"data.files={text}",
                     "train.steps=2", "train.eval_batches=1", *TINY_SHAPE]) == 0
        _, err = capsys.readouterr()
        assert "tokenizing" not in err, err
    assert len(list((tmp_path / "cache" / "stores").glob("*/manifest.json"))) == 1
