"""HF datasets as training data, offline (local files only; a hub name is the same code):
parquet and JSON folders and save_to_disk folders go through the token store; streaming
splits the documents by process and resumes at its position."""

import json
import re

import datasets
import numpy as np
import pytest
from conftest import TINY_SHAPE

from jaxlm.config import load
from jaxlm.data import position as data_position
from jaxlm.data import setup as data_setup
from jaxlm.data import stream
from jaxlm.data.errors import DataError
from jaxlm.data.tokenizers import ByteTokenizer


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """HF datasets' own arrow cache in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(["to", "be", "or", "not", "é"], rng.integers(5, 40)))
            for _ in range(n)]


def _stream_of(docs):
    eos = ByteTokenizer.eos_id
    return np.concatenate([np.r_[list(d.encode()), eos] for d in docs])


def _cfg(tmp_path, path, *extra):
    return load(None, [*TINY_SHAPE, f"data.hf_path={path}", "run.quiet=true", *extra])


def test_json_folder_trains_on_its_train_split_and_validates_on_validation(tmp_path):
    train, valid = _docs(300), _docs(40, seed=1)
    folder = tmp_path / "ds"
    folder.mkdir()
    for name, docs in (("train", train), ("validation", valid)):
        rows = [{"text": d, "id": i} for i, d in enumerate(docs)]
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = data_setup.build(_cfg(tmp_path, folder), tmp_path / "run", progress=False)
    np.testing.assert_array_equal(np.asarray(data.train.source.tokens[:]), _stream_of(train))
    np.testing.assert_array_equal(np.asarray(data.valid.source.tokens[:]), _stream_of(valid))
    assert data.bytes_per_token == pytest.approx(
        sum(len(d.encode()) for d in valid) / (sum(len(d.encode()) + 1 for d in valid)))


def test_parquet_and_save_to_disk_folders_hold_out_without_a_validation_split(tmp_path):
    docs = _docs(200)
    parquet = tmp_path / "pq"
    parquet.mkdir()
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(parquet / "part-0.parquet"))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(
        str(saved))
    held = int(len(docs) * 0.05)
    for path in (parquet, saved):
        data = data_setup.build(_cfg(tmp_path, path, "data.text_field=body"),
                                tmp_path / "run", progress=False)
        np.testing.assert_array_equal(np.asarray(data.train.source.tokens[:]),
                                      _stream_of(docs[:-held]))
        np.testing.assert_array_equal(np.asarray(data.valid.source.tokens[:]),
                                      _stream_of(docs[-held:]))
    with pytest.raises(DataError, match="no column 'text'"):
        data_setup.build(_cfg(tmp_path, saved), tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="no split 'dev'"):
        data_setup.build(_cfg(tmp_path, saved, "data.split=dev"), tmp_path / "run")


def test_a_hub_name_without_a_network_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not load the HF dataset 'nobody/no-such-set'"):
        data_setup.build(_cfg(tmp_path, "nobody/no-such-set"), tmp_path / "run")


def test_streaming_splits_documents_by_process_and_resumes_at_its_position(tmp_path):
    docs = [f"document {i}: " + d for i, d in enumerate(_docs(400))]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved), num_shards=4)
    cfg = _cfg(tmp_path, saved, "data.streaming=true", "train.eval_batches=2")
    tok = ByteTokenizer()
    parts = [stream.streams(cfg, tok, i, 2) for i in range(2)]
    seen = []
    for s in parts:
        text = "".join(bytes(int(t) for t in s.train.batch(p).inputs.ravel() if t < 256)
                       .decode(errors="replace") for p in range(6))
        seen.append({int(x) for x in re.findall(r"document (\d+):", text)})
        assert s.train.batch(0).inputs.shape == (4, 32)
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint documents
    every = round(1 / cfg.data.valid_fraction)
    held = {i for i, d in enumerate(docs) if stream.held_out(d, every)}
    assert held and not (seen[0] | seen[1]) & held  # validation documents never trained on
    sequential = [parts[0].train.batch(p).inputs for p in range(8)]
    resumed = stream.streams(cfg, tok, 0, 2).train  # a new process resuming at position 5
    for p in (5, 6, 7):
        np.testing.assert_array_equal(resumed.batch(p).inputs, sequential[p])
    data = data_setup.build(cfg, tmp_path / "run", progress=False)
    assert data.valid.batches_per_epoch == 2 and 0.9 < data.bytes_per_token <= 1.0


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_a_stream_reads_on_from_its_cursor_exactly(tmp_path, monkeypatch, kind):
    """A checkpoint's cursor (through JSON) resumes the stream where it stood, mid-block,
    mid-document and after an epoch, reading only what the next batches need; whether the
    processes share out rows (one shard) or shards (four parquet files)."""
    monkeypatch.setattr(stream, "BLOCK_DOCS", 16)
    docs = [f"document {i}: " + d for i, d in enumerate(_docs(120))]
    path = tmp_path / kind
    if kind == "saved":
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    else:
        path.mkdir()
        for k in range(4):
            datasets.Dataset.from_dict({"text": docs[k::4]}).to_parquet(
                str(path / f"part-{k}.parquet"))
    cfg = _cfg(tmp_path, path, "data.streaming=true", "train.eval_batches=1")
    tok, n = ByteTokenizer(), 90  # more than two epochs of this process's documents
    whole = stream.streams(cfg, tok, 1, 2).train
    straight = [whole.batch(p).inputs for p in range(n)]
    epochs = {whole.state(p)["epoch"] for p in range(n)}
    assert epochs == {0, 1, 2}
    longest = max(len(d.encode()) for d in docs) + 1
    for stop in (3, 40, n - 2):
        # The checkpoint's data item, through JSON, as the loop saves and restores it.
        item = json.loads(json.dumps(data_position.saved(whole, stop)))
        assert item == {"position": stop, "cursors": [whole.state(stop)]}
        resumed = stream.streams(cfg, tok, 1, 2).train
        assert data_position.restore(resumed, item, step=0) == stop
        for p in range(stop, n):
            np.testing.assert_array_equal(resumed.batch(p).inputs, straight[p])
        assert resumed.tokens_read <= (n - stop) * 4 * 32 + 32 + 2 * longest
