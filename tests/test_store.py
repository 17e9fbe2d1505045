"""The token store: tokenized once (by worker processes, resumable), equal to tokenizing each
document whole, read by random access; hold-out and packing (cloud paths:
tests/test_cloud_paths.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data import build, corpus
from jaxlm.data.errors import DataError
from jaxlm.data.packing import PackedRows
from jaxlm.data.paths import Fingerprints, as_path
from jaxlm.data.pipeline import pack_documents
from jaxlm.data.sources import plan_files
from jaxlm.data.tokenizers import ByteTokenizer, train_bpe

WORDS = ["thou", "art", "my", "lord", "and", "the", "king", "café", "naïve", "ß"]


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["\n".join(" ".join(rng.choice(WORDS, 7)) + ("  x" if i % 5 == 0 else "")
                      for i in range(rng.integers(20, 60))) for _ in range(n)]


@pytest.fixture
def files(tmp_path):
    """Two text files (one with CRLF endings, one long enough for several pieces) and a
    JSON lines file of 30 records (one empty, which is no document)."""
    texts = _texts(2)
    (tmp_path / "a.txt").write_bytes(texts[0].replace("\n", "\r\n").encode())
    (tmp_path / "b.txt").write_text(texts[1] * 20)
    records = [{"text": t} for t in _texts(30, seed=1)] + [{"text": ""}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    docs = [texts[0], texts[1] * 20] + [r["text"] for r in records if r["text"]]
    return [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.jsonl")], docs


def _store(root, paths, tok, piece_bytes=4096, workers=1, **kw):
    fp = Fingerprints(None)
    identity = {"files": [fp.of(f)["sha256"] for f in paths]}
    return build.ensure(as_path(root), identity, lambda: plan_files(paths, piece_bytes), tok,
                        workers=workers, quiet=True, **kw)


def _reference(docs, tok):
    return np.concatenate([np.r_[tok.encode(d), tok.eos_id] for d in docs])


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_store_holds_each_document_tokenized_whole(tmp_path, files, kind):
    """Pieces tokenized by two worker processes give exactly the ids of each document
    tokenized whole (+ EOS), uint16, with the document index and byte counts."""
    paths, docs = files
    tok = ByteTokenizer() if kind == "byte" else train_bpe(docs, 400)
    store = _store(tmp_path / "stores", paths, tok, workers=2)
    assert len(store.manifest["shards"]) > 3 and store.dtype == np.uint16
    np.testing.assert_array_equal(store.read(0, store.num_tokens), _reference(docs, tok))
    lengths = [len(tok.encode(d)) + 1 for d in docs]
    np.testing.assert_array_equal(store.doc_ends, np.cumsum(lengths))
    np.testing.assert_array_equal(store.doc_bytes, [len(d.encode()) for d in docs])
    assert store.span(5, 20)[3:7].tolist() == _reference(docs, tok)[8:12].tolist()


def test_same_sources_and_tokenizer_are_tokenized_once(tmp_path, files):
    paths, _ = files
    tok = ByteTokenizer()
    first = _store(tmp_path / "stores", paths, tok)
    copy = tmp_path / "copy.txt"  # the same content elsewhere: the same store
    copy.write_bytes(Path(paths[0]).read_bytes())
    calls = []
    again = build.ensure(as_path(tmp_path / "stores"),
                         {"files": [Fingerprints(None).of(f)["sha256"]
                                    for f in [str(copy), *paths[1:]]]},
                         lambda: calls.append(1) or [], tok, quiet=True)
    assert again.directory == first.directory and not calls
    Path(paths[1]).write_text("changed")
    assert _store(tmp_path / "stores", paths, tok).directory != first.directory
    bpe = _store(tmp_path / "stores", paths[:1], train_bpe(["some text"], 300))
    assert bpe.directory != _store(tmp_path / "stores", paths[:1], tok).directory


def test_an_interrupted_build_resumes_with_the_finished_shards(tmp_path, files, monkeypatch):
    paths, docs = files
    tok, written = ByteTokenizer(), []
    real = build.write_shard

    def flaky(directory, index, *a):
        if index == 3 and not written.count("stopped"):
            written.append("stopped")
            raise KeyboardInterrupt
        written.append(index)
        return real(directory, index, *a)

    monkeypatch.setattr(build, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        _store(tmp_path / "stores", paths, tok)
    assert written == [0, 1, 2, "stopped"]
    store = _store(tmp_path / "stores", paths, tok)
    assert written[4:] == list(range(3, len(store.manifest["shards"])))  # 0-2 not redone
    np.testing.assert_array_equal(store.read(0, store.num_tokens), _reference(docs, tok))


def test_bad_data_leaves_no_store(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no field 'text'"):
        _store(tmp_path / "stores", [str(bad)], ByteTokenizer())
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    with pytest.raises(DataError, match="empty"):
        _store(tmp_path / "stores", [str(blank)], ByteTokenizer())
    assert [p.suffix for p in (tmp_path / "stores").iterdir()] == [".lock", ".lock"]


def test_hold_out_by_documents_or_tokens(tmp_path, files):
    paths, docs = files
    store = _store(tmp_path / "stores", paths, ByteTokenizer())  # 32 documents
    train, valid = corpus.hold_out(store, 0.1)
    assert valid.start == train.stop == store.doc_ends[-4] and valid.stop == store.num_tokens
    assert valid.num_bytes() == sum(len(d.encode()) for d in docs[-3:])
    one = _store(tmp_path / "stores", paths[:1], ByteTokenizer())  # one document, no EOS
    train, valid = corpus.hold_out(one, 0.1)
    n = len(docs[0].encode())
    assert (len(train), len(valid)) == (int(n * 0.9), n - int(n * 0.9))
    assert abs(valid.num_bytes() - len(valid)) <= 1


def test_packed_rows_read_from_the_store_equal_pack_documents(tmp_path, files):
    paths, docs = files
    tok = ByteTokenizer()
    span = _store(tmp_path / "stores", paths, tok).span()
    rows = PackedRows(span, *span.documents(), 64)
    want = pack_documents([np.r_[tok.encode(d), tok.eos_id] for d in docs], 64)
    got = rows.collate(range(len(rows)))
    assert len(rows) == len(want["inputs"])
    for k, v in want.items():
        np.testing.assert_array_equal(getattr(got, k), v, err_msg=k)


def test_a_second_builder_waits_for_the_first_and_reads_its_store(tmp_path, files):
    import threading
    import time

    paths, _ = files
    plans = []

    def slow_plan():
        plans.append(1)
        time.sleep(1.0)
        return plan_files(paths, 4096)

    def run(out):
        out.append(build.ensure(as_path(tmp_path / "stores"), {"files": paths}, slow_plan,
                                ByteTokenizer(), quiet=True))

    stores: list = []
    threads = [threading.Thread(target=run, args=(stores,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(plans) == 1 and stores[0].directory == stores[1].directory


def test_a_tokenizer_trains_on_the_training_share_only(tmp_path, files):
    from jaxlm.config import DataConfig
    from jaxlm.data.pieces import Source

    paths, docs = files
    src = Source({}, lambda: plan_files(paths[:1]), "a")
    text = "".join(corpus.training_texts(src, None, DataConfig(valid_fraction=0.1)))
    assert text == docs[0][:round(0.9 * len(docs[0]))]
    assert "".join(corpus.training_texts(src, src, DataConfig())) == docs[0]


def test_ids_beyond_uint16_are_stored_as_uint32(tmp_path, files):
    class WideBytes(ByteTokenizer):  # bytes, with an EOS id that needs 32 bits
        vocab_size, eos_id = 70_000, 69_999

    paths, docs = files
    store = _store(tmp_path / "stores", paths[:1], WideBytes())
    assert store.dtype == np.uint32
    np.testing.assert_array_equal(store.read(0, store.num_tokens),
                                  np.r_[list(docs[0].encode()), 69_999])
