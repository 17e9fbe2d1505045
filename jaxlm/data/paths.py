"""Paths, local or in the cloud (`gs://`, `s3://`, ...), through one code path:
`etils.epath` (which orbax also uses): data files, token stores, run directories, converted
models. Local paths keep their fast paths (os.pread, glob). What only reads or writes local
files (HF tokenizers, safetensors, the profiler) goes through a local copy.

File fingerprints (the sha256 of the content, streamed) are remembered by (path, size,
mtime), so a second run over unchanged files does not read them again."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etils import epath

from jaxlm.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
# The cloud schemes etils.epath reads and writes, and the fsspec package each needs.
SCHEME_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_WILDCARD = re.compile(r"[*?\[]")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names a cloud location (`scheme://...`) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath for `path`; a local one with `~` expanded. DataError for a cloud scheme
    that epath does not know or whose file-system package is not installed."""
    text = os.fspath(path)
    if not is_remote(text):
        return epath.Path(os.path.expanduser(text))
    scheme = text.split("://", 1)[0]
    if scheme not in SCHEME_PACKAGES:
        raise DataError(f"'{text}': {scheme}:// paths are not supported; use a local path or "
                        f"{', '.join(s + '://' for s in SCHEME_PACKAGES)}")
    if not _backend_installed(scheme):
        raise DataError(f"'{text}': {scheme}:// paths need the {SCHEME_PACKAGES[scheme]} "
                        f"package (pip install {SCHEME_PACKAGES[scheme]})")
    return epath.Path(text)


def native(path: str | os.PathLike) -> Path | epath.Path:
    """What a function hands back to its caller: a local path as a pathlib.Path (which
    globs `**`), a cloud one as an epath."""
    return as_path(path) if is_remote(path) else Path(os.fspath(path))


@functools.cache
def _backend_installed(scheme: str) -> bool:
    """Whether epath can reach `scheme`: its fsspec package, or TensorFlow's file system."""
    return any(importlib.util.find_spec(p) is not None
               for p in (SCHEME_PACKAGES[scheme], "tensorflow"))


def copy_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies the files below `source` to `target` (either may be remote), replacing files
    of the same names."""
    src, dst = as_path(source), as_path(target)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            copy_tree(item, dst / item.name)
        else:
            (dst / item.name).write_bytes(item.read_bytes())


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """`path` as a local folder: itself, or a temporary copy of a remote one."""
    if not is_remote(path):
        yield Path(os.path.expanduser(os.fspath(path)))
        return
    with tempfile.TemporaryDirectory(prefix="jaxlm-") as tmp:
        copy_tree(path, tmp)
        yield Path(tmp)


@contextlib.contextmanager
def local_target(path: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write what belongs in `path`: itself, or a temporary folder whose
    files are copied to the remote `path` when the block ends without an error."""
    if not is_remote(path):
        yield Path(os.path.expanduser(os.fspath(path)))
        return
    tmp = tempfile.mkdtemp(prefix="jaxlm-")
    try:
        yield Path(tmp)
        copy_tree(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remote_glob(pattern: str) -> list[str]:
    parts = pattern.split("/")
    fixed = next((i for i, p in enumerate(parts) if _WILDCARD.search(p)), len(parts))
    root = as_path("/".join(parts[:fixed]))
    if fixed == len(parts):
        return [str(root)] if root.exists() else []
    return sorted(str(p) for p in root.glob("/".join(parts[fixed:])))


def _walk(root: epath.Path) -> list[str]:
    """The .txt/.jsonl/.json files below `root` (epath refuses `**` on cloud paths)."""
    scheme = str(root).split("://")[0] + "://" if is_remote(root) else ""
    found = []
    for folder, _, names in root.walk():
        folder = os.fspath(folder)  # fsspec walks cloud folders without their scheme
        folder = folder if folder.startswith(scheme) else scheme + folder
        found += [str(as_path(folder) / n) for n in names
                  if os.path.splitext(n)[1] in TEXT_SUFFIXES]
    return sorted(found)


def expand_files(patterns: list[str], what: str = "data file") -> list[str]:
    """Files named by `patterns`: paths, globs (`**` recursive) or directories (their
    .txt/.jsonl/.json files, recursively); local or cloud paths."""
    files: list[str] = []
    for pattern in patterns:
        if is_remote(pattern):
            matches = _remote_glob(pattern)
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        root = as_path(pattern)
        if not _WILDCARD.search(pattern) and root.is_dir():
            matches = _walk(root)
            if not matches:
                raise DataError(f"data directory '{pattern}' has no .txt/.jsonl files")
        if not matches:
            raise DataError(f"{what} '{pattern}' not found")
        files += [m for m in matches if not as_path(m).is_dir()]
    return files


def _stat(path: str) -> tuple[int, int]:
    """(size, modification time) of a file; nanoseconds locally, what the store gives else."""
    if is_remote(path):
        st = as_path(path).stat()
        return int(st.length), int(st.mtime)
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def sha256_file(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class Fingerprints:
    """sha256 of files, remembered in a JSON file by (absolute path, size, mtime)."""

    def __init__(self, memo: epath.Path | None):
        self.memo = memo
        self._known: dict[str, Any] = {}
        if memo is not None and memo.exists():
            try:
                self._known = json.loads(memo.read_text())
            except ValueError:  # a damaged memo only costs hashing again
                self._known = {}
        self._dirty = False

    def of(self, path: str) -> dict[str, Any]:
        """{"path", "size", "mtime", "sha256"} of `path`."""
        key = path if is_remote(path) else str(Path(path).resolve())
        try:
            size, mtime = _stat(path)
        except OSError as e:
            raise DataError(f"cannot read '{path}': {e.strerror or e}") from None
        known = self._known.get(key)
        if known and known["size"] == size and known["mtime"] == mtime:
            return {"path": path, **known}
        entry = {"size": size, "mtime": mtime, "sha256": sha256_file(path)}
        self._known[key], self._dirty = entry, True
        return {"path": path, **entry}

    def save(self) -> None:
        if not self._dirty or self.memo is None:
            return
        try:
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo.parent / f".{self.memo.name}.{os.getpid()}"
            tmp.write_text(json.dumps(self._known))
            tmp.replace(self.memo)
        except OSError:  # a read-only cache still works, it only hashes again next time
            pass
        self._dirty = False
