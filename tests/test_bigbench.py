"""The opt-in BIG-bench corpora (xsum, disfl-qa): extraction from a fake archive laid out like
bigbench-1.0.0.tar.gz, held-out splits, the index download with its hash check, and
decoder-only prompt -> answer rows."""

import hashlib
import http.server
import io
import json
import tarfile
import threading

import numpy as np
import pytest

from jaxlm.data import bigbench, pipeline, prepare
from jaxlm.data.prepare import CORPORA, Archive, PrepareError
from jaxlm.data.tokenizers import ByteTokenizer

TOP = "bigbench-1.0.0/bigbench/benchmark_tasks"


def fake_sdist(path, contexts=60, questions=3):
    qa = [{"input": f"What is item {q} or rather thing {q} ?  \ncontext: Paragraph {c} "
                    f"says   items.  ", "target": f"thing {q} of {c}"}
          for c in range(contexts) for q in range(questions)]
    xsum = [{"input": f"Article {i} line one.\n  Line two of {i}.\n", "target": f"Summary {i}.",
             "comment": ""} for i in range(200)]
    with tarfile.open(path, "w:gz") as tar:
        for name, examples in (("disfl_qa", qa), ("gem/xsum", xsum)):
            data = json.dumps({"name": name, "examples": examples}).encode()
            info = tarfile.TarInfo(f"{TOP}/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _load(text):
    return [json.loads(x) for x in text.splitlines()]


def test_disfl_qa_holds_out_whole_paragraphs(tmp_path):
    with Archive(fake_sdist(tmp_path / "bb.tar.gz")) as ar:
        splits = bigbench.disfl_qa(ar)
    parts = {k: _load(getattr(splits, k)) for k in ("train", "valid", "test")}
    assert sum(map(len, parts.values())) == 180
    assert parts["valid"] and parts["test"] and len(parts["train"]) > 120
    first = parts["train"][0]
    assert first["source"].startswith("context: Paragraph ") and "\nquestion: What is item" \
        in first["source"] and "  " not in first["source"]
    ctx = {k: {p["source"].split("\n")[0] for p in v} for k, v in parts.items()}
    assert not ctx["train"] & ctx["test"] and not ctx["train"] & ctx["valid"]
    assert splits.info["pairs"] == {k: len(v) for k, v in parts.items()}
    assert bigbench.split_disfl_qa_input("Q ?\ncontext: C") == ("Q ?", "C")
    with pytest.raises(PrepareError, match="context"):
        bigbench.split_disfl_qa_input("no context here")


def test_xsum_pairs_and_fixed_split(tmp_path):
    with Archive(fake_sdist(tmp_path / "bb.tar.gz")) as ar:
        a, b = bigbench.xsum(ar), bigbench.xsum(ar)
    assert a == b  # a pure function of the archive
    train = _load(a.train)
    assert train[0]["source"].split("\n")[1].startswith("Line two")
    assert 0 < len(_load(a.test)) < 30 and len(train) > 160


class _Index(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *a):
        pass


@pytest.fixture
def index(tmp_path, monkeypatch):
    archive = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    url = f"http://127.0.0.1:{server.server_port}"
    _Index.files = {"/simple/bigbench/": json.dumps({"files": [
        {"filename": "bigbench-1.0.0.tar.gz", "url": f"{url}/f/bigbench-1.0.0.tar.gz"}]}).encode(),
        "/f/bigbench-1.0.0.tar.gz": archive}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("JAXLM_INDEX_URL", f"{url}/simple")
    yield hashlib.sha256(archive).hexdigest()
    server.shutdown()


def test_prepare_from_the_index_checks_the_pinned_hash(index, tmp_path, monkeypatch):
    spec = CORPORA["disfl-qa"]
    assert spec.from_index and spec.sdist and spec.package == "bigbench"
    # The real pin refuses the fake archive and leaves nothing behind.
    with pytest.raises(PrepareError, match="sha256 mismatch"):
        prepare.prepare("disfl-qa", cache=tmp_path / "c1", progress=False)
    assert not any((tmp_path / "c1" / "corpora").iterdir())
    monkeypatch.setitem(CORPORA, "disfl-qa", spec._replace(sha256=index))
    corpus = prepare.prepare("disfl-qa", cache=tmp_path / "c2", progress=False)
    assert corpus.test is not None and _load(corpus.test.read_text())
    meta = json.loads((corpus.train.parent / "meta.json").read_text())
    assert meta["package"] == "bigbench" and meta["sha256"] == index


def test_prepare_from_the_index_reports_a_missing_file(index, tmp_path, monkeypatch):
    spec = CORPORA["xsum"]._replace(version="9.9.9")
    monkeypatch.setitem(CORPORA, "xsum", spec)
    with pytest.raises(PrepareError, match="lists no bigbench-9.9.9.tar.gz"):
        prepare.prepare("xsum", cache=tmp_path, progress=False)


def test_prompted_rows_put_the_loss_on_the_answer_only():
    tok = ByteTokenizer()
    rows = pipeline.prompted_rows([("context: abc\nquestion: q?", "xy"), ("z" * 100, "w")],
                                  tok, seq_len=48)
    eos = tok.eos_id
    # Row 0: prompt + cue, then " xy" EOS; targets are inputs shifted by one.
    ids = tok.encode("context: abc\nquestion: q?" + pipeline.ANSWER_CUE + " xy") + [eos]
    n = len(ids) - 1
    assert rows["inputs"][0, :n].tolist() == ids[:-1]
    assert rows["targets"][0, :n].tolist() == ids[1:]
    answer_targets = rows["targets"][0][rows["loss_mask"][0] > 0].tolist()
    assert answer_targets == tok.encode(" xy") + [eos]
    # Row 1: the source loses its beginning; the cue and the answer stay whole.
    assert rows["targets"][1][rows["loss_mask"][1] > 0].tolist() == tok.encode(" w") + [eos]
    text = tok.decode(rows["inputs"][1][rows["inputs"][1] != 0].tolist())
    assert text.startswith("zzz") and text.endswith(pipeline.ANSWER_CUE + " w")
    assert np.count_nonzero(rows["inputs"][1]) == 48
