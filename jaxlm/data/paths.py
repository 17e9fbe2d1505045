"""Data paths, local or in the cloud (`gs://`, `s3://`, ...), through one code path:
`etils.epath` (which orbax also uses). Local paths keep their fast paths (os.pread, glob).

File fingerprints (the sha256 of the content, streamed) are remembered by (path, size,
mtime), so a second run over unchanged files does not read them again."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from etils import epath

from jaxlm.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
_WILDCARD = re.compile(r"[*?\[]")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names a cloud location (`scheme://...`) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath for `path`; a local one with `~` expanded."""
    text = os.fspath(path)
    return epath.Path(text) if is_remote(text) else epath.Path(os.path.expanduser(text))


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
