"""Cloud paths (`gs://`) through etils.epath, on fsspec's in-memory file system registered
for gs:// (what gcsfs gives epath, without a network): data files and token stores, a run
directory's own files and tokenizer, models converted and loaded to and from a bucket.
Orbax writes checkpoints through tensorstore's own cloud client, which is not faked here:
those are read back from a local copy."""

import sys

import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from jaxlm.cli import main
from jaxlm.data import build, paths
from jaxlm.data.paths import (
    Fingerprints,
    as_path,
    copy_tree,
    expand_files,
    local_copy,
    local_target,
)
from jaxlm.data.sources import plan_files
from jaxlm.data.store import TokenStore
from jaxlm.data.tokenizers import ByteTokenizer, load_tokenizer, train_bpe
from jaxlm.train import rundir


class _MemoryGCS(MemoryFileSystem):
    """gs:// on fsspec's in-memory file system."""

    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for scheme in ("gs://", "gcs://"):
            path = path.removeprefix(scheme)
        return path.strip("/")

    def __init__(self, *args, finalize_on_close=True, **kwargs):
        super().__init__(*args, **kwargs)


@pytest.fixture
def gcs(monkeypatch):
    """An empty in-memory bucket behind gs:// for the test."""
    for name in ("gs", "gcs"):
        monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, name, _MemoryGCS)
    monkeypatch.setattr(paths, "_backend_installed", lambda scheme: True)  # gcsfs's place
    cached = type(epath.backend.fsspec_backend)._get_filesystem  # epath keeps file systems
    cached.cache_clear()
    _MemoryGCS.store.clear()
    _MemoryGCS.pseudo_dirs[:] = [""]
    yield
    cached.cache_clear()


def _store(root, files):
    fp = Fingerprints(None)
    return build.ensure(as_path(root), {"files": [fp.of(f)["sha256"] for f in files]},
                        lambda: plan_files(files, 16), ByteTokenizer(), workers=1, quiet=True)


def test_data_files_and_token_stores_on_gs(tmp_path, gcs):
    """Listed (folders, globs), fingerprinted, tokenized into a store on the bucket and read
    back by the code that reads local files, into the same store as local copies give."""
    texts = ["first document\nwith two lines\nand café", "second one\n", "the third"]
    for i, text in enumerate(texts):
        as_path(f"gs://bucket/data/{i}.txt").write_text(text)
        (tmp_path / f"{i}.txt").write_text(text)
    remote = expand_files(["gs://bucket/data"])
    assert remote == [f"gs://bucket/data/{i}.txt" for i in range(3)]
    assert expand_files(["gs://bucket/data/1*.txt"]) == remote[1:2]
    store = _store("gs://bucket/stores", remote)
    assert str(store.directory).startswith("gs://bucket/stores/")
    reopened = TokenStore.open(store.directory)
    tok = ByteTokenizer()
    want = np.concatenate([np.r_[tok.encode(t), tok.eos_id] for t in texts])
    np.testing.assert_array_equal(reopened.read(0, reopened.num_tokens), want)
    local = _store(tmp_path / "stores", [str(tmp_path / f"{i}.txt") for i in range(3)])
    assert reopened.directory.name == local.directory.name


def test_a_run_directory_on_gs_keeps_its_config_metrics_summary_and_tokenizer(gcs,
                                                                              monkeypatch):
    cfg, run_dir, resuming = rundir.resolve(None, ["run.dir=gs://bucket/run"])
    assert str(run_dir) == "gs://bucket/run" and not resuming
    rundir.write_config(run_dir, cfg)
    assert rundir.load_config("gs://bucket/run") == cfg
    _, _, resuming = rundir.resolve(None, ["run.dir=gs://bucket/run", "train.steps=7"])
    assert resuming

    # A cloud object cannot be appended to: the file is written whole, the first row at
    # once, the others at most every REMOTE_FLUSH_SECONDS and at close.
    monkeypatch.setattr(rundir.MetricsWriter, "REMOTE_FLUSH_SECONDS", 3600.0)
    writer = rundir.MetricsWriter(run_dir)
    writer.write({"step": 1, "loss": 2.0})
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [1]
    writer.write({"step": 2, "loss": 1.5})
    writer.close()
    resumed = rundir.MetricsWriter(run_dir)
    resumed.write({"step": 3, "loss": 1.0})
    resumed.close()
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [1, 2, 3]

    rundir.write_summary(run_dir, {"status": "finished", "loss": float("nan")})
    assert rundir.read_summary(run_dir) == {"status": "finished", "loss": "nan"}

    tok = train_bpe(["to be or not to be, that is the question " * 40], 300)
    with local_target(run_dir / rundir.TOKENIZER_DIR) as folder:
        tok.save(folder)
    back = load_tokenizer(run_dir / rundir.TOKENIZER_DIR)
    assert back.encode("the question") == tok.encode("the question")


def test_models_convert_and_load_to_and_from_gs(tmp_path, gcs):
    """An HF directory on gs:// loads as the local one; `jaxlm convert` reads it and writes
    a run to gs://, whose conversion back (to gs://) holds the original tensors."""
    import jax
    import torch
    import transformers
    from safetensors.numpy import load_file

    import jaxlm
    from jaxlm.convert.run import hf_to_run, run_to_hf

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    copy_tree(tmp_path / "hf", "gs://bucket/hf")
    jax.tree.map(np.testing.assert_array_equal, jaxlm.load("gs://bucket/hf").params,
                 jaxlm.load(tmp_path / "hf").params)

    out = hf_to_run("gs://bucket/hf", "gs://bucket/run")
    assert str(out) == "gs://bucket/run" and rundir.load_config(out).name == "hf"
    with local_copy("gs://bucket/run") as local:
        run_to_hf(local, "gs://bucket/hf2")
    with local_copy("gs://bucket/hf2") as back:
        want, got = (load_file(d / "model.safetensors") for d in (tmp_path / "hf", back))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_cloud_path_that_cannot_work_here_is_one_line(tmp_path, capsys, monkeypatch):
    """Without gcsfs (or an unknown scheme): exit 2, one line saying what to do, nothing
    written."""
    monkeypatch.setattr(paths, "_backend_installed", lambda scheme: False)
    monkeypatch.chdir(tmp_path)
    for arg, says in (("run.dir=gs://bucket/run", "pip install gcsfs"),
                      ("data.files=gs://bucket/data", "pip install gcsfs"),
                      ("run.dir=memory://run", "memory:// paths are not supported")):
        assert main(["train", arg, "train.steps=1"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())
