"""Tests for jaxlm.data.prepare (downloads small pinned archives from PyPI)."""

from __future__ import annotations

import io
import json
import re
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from jaxlm.data import prepare as P
from jaxlm.data.prepare import PrepareError, prepare, safe_extract_member

SPEAKER = re.compile(r"^[A-Z][A-Z' .,&-]*:$", re.M)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session, so each archive is fetched once."""
    return tmp_path_factory.mktemp("jaxlm_cache")


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("subprocess.run must not be called when the cache is present")


def test_botchan_prepared_and_cached(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare("botchan", cache=shared_cache, progress=False)
    assert first.test is None
    train, valid = first.train.read_text("utf-8"), first.valid.read_text("utf-8")
    assert len(train) > 100_000 and len(valid) > 10_000
    assert "Gutenberg" not in train + valid  # licence boilerplate stripped
    meta = json.loads((first.train.parent / "meta.json").read_text())
    assert meta["package"] == "sentencepiece" and meta["sha256"] == P.CORPORA["botchan"].sha256
    assert meta["bytes"]["train"] == first.train.stat().st_size

    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert prepare("botchan", cache=shared_cache, progress=False) == first


def test_pip_refuses_pinned_hash_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = P.CORPORA["botchan"]
    monkeypatch.setitem(P.CORPORA, "botchan", spec._replace(sha256="0" * 64))
    with pytest.raises(PrepareError, match="sha256") as err:
        prepare("botchan", cache=tmp_path, progress=False)
    assert "0" * 64 in str(err.value) and spec.sha256 in str(err.value)  # expected and actual
    assert list((tmp_path / "corpora").iterdir()) == []


def test_tampered_download_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "sentencepiece-0.2.3.tar.gz").write_bytes(b"not the real archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(PrepareError, match="sha256") as err:
        prepare("botchan", cache=tmp_path, progress=False)
    msg = str(err.value)
    assert "sentencepiece-0.2.3.tar.gz" in msg and P.CORPORA["botchan"].sha256 in msg
    assert list((tmp_path / "corpora").iterdir()) == []


def test_pip_failure_short_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(PrepareError, match="No matching distribution"):
        prepare("kjv", cache=tmp_path, progress=False)
    assert list((tmp_path / "corpora").iterdir()) == []


def _tar_with_bad_members(path: Path) -> None:
    with tarfile.open(path, "w") as tf:
        for name in ("ok.txt", "../evil.txt", "/abs/evil.txt", "a/../../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"bad"))
        for name, kind in (("link", tarfile.SYMTYPE), ("hard", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tf.addfile(info)


def test_tar_guard(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    _tar_with_bad_members(path)
    with tarfile.open(path) as tf:
        assert safe_extract_member(tf, "ok.txt") == b"bad"
        for name in ("../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "link", "hard"):
            with pytest.raises(PrepareError, match="refusing"):
                safe_extract_member(tf, name)
    with P.Archive(path) as archive, pytest.raises(PrepareError):
        archive.read("../evil.txt")
    assert not (tmp_path.parent / "evil.txt").exists()


def test_zip_guard(tmp_path: Path) -> None:
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(zipfile.ZipInfo("../evil.txt"), "bad")
        zf.writestr(zipfile.ZipInfo("/abs.txt"), "bad")
        zf.writestr(zipfile.ZipInfo("..\\win.txt"), "bad")
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with zipfile.ZipFile(path) as zf:
        assert {"../evil.txt", "/abs.txt"} <= set(zf.namelist())  # the zip really holds them
        assert safe_extract_member(zf, "ok.txt") == b"fine"
        for name in ("../evil.txt", "/abs.txt", "..\\win.txt", "link"):
            with pytest.raises(PrepareError, match="refusing"):
                safe_extract_member(zf, name)


def test_unknown_name_suggests_nearest() -> None:
    with pytest.raises(PrepareError, match="did you mean 'shakespeare'") as err:
        prepare("shakespear")
    assert all(name in str(err.value) for name in P.CORPORA)


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JAXLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert P.cache_dir() == tmp_path / "xdg" / "jaxlm"
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "mine"))
    assert P.cache_dir() == tmp_path / "mine"


def test_play_to_text_markdown() -> None:
    md = (
        "# Play\n\n## ACT I\n\n_Enter A and\nB_\n\n**ROMEO**  \n_\\[Aside]_  \n"
        "But soft!  \nWhat light\\--\n\n_Exit B_\n\nIt is the east.\n\n"
        "**First Citizen**  \nClubs!\n"
    )
    assert P.play_to_text(md) == (
        "ROMEO:\nBut soft!\nWhat light--\nIt is the east.\n\nFIRST CITIZEN:\nClubs!\n\n"
    )


def test_shakespeare(shared_cache: Path) -> None:
    corpus = prepare("shakespeare", cache=shared_cache, progress=False)
    assert corpus.test is None
    train, valid = corpus.train.read_text("utf-8"), corpus.valid.read_text("utf-8")
    assert len(train) > 4_000_000 and 50_000 < len(valid) < len(train) / 10
    assert len(SPEAKER.findall(valid)) > 200 and train.splitlines()[0].endswith(":")
    assert not re.search(r"\*\*|^#|\\\[|_", train + valid, re.M)  # no markdown left
    meta = json.loads((corpus.train.parent / "meta.json").read_text())
    train_plays, valid_plays = set(meta["train_plays"]), set(meta["valid_plays"])
    assert not train_plays & valid_plays and len(train_plays | valid_plays) == 38
    assert len(valid_plays) == 2


def test_kjv_holds_out_last_two_books(shared_cache: Path) -> None:
    corpus = prepare("kjv", cache=shared_cache, progress=False)
    valid = corpus.valid.read_text("utf-8").splitlines()
    assert len(valid) == 25 + 404  # Jude + Revelation verses
    assert valid[-1].startswith("The grace of our Lord Jesus Christ")
    assert len(corpus.train.read_text("utf-8").splitlines()) > 30_000
