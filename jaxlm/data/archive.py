"""Corpus archives read safely, and the types corpus extractors share (a leaf module:
the corpus registry in prepare.py and the extractors in bigbench.py / parallel.py import
it, not each other)."""

from __future__ import annotations

import posixpath
import re
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple


class PrepareError(Exception):
    """A user-facing failure while preparing a corpus."""


class Splits(NamedTuple):
    """What an extractor returns: split texts plus extra facts for meta.json."""

    train: str
    valid: str
    test: str | None = None
    info: dict[str, Any] | None = None


# ---------------------------------------------------------------- archive safety

def check_member_name(name: str) -> str:
    """Return ``name`` normalized, or raise if it is absolute or climbs out with ``..``."""
    unified = name.replace("\\", "/")
    parts = unified.split("/")
    if not name or unified.startswith("/") or re.match(r"^[A-Za-z]:", unified) or ".." in parts:
        raise PrepareError(f"refusing unsafe archive member {name!r}")
    return posixpath.normpath(unified)


def safe_extract_member(archive: zipfile.ZipFile | tarfile.TarFile, name: str) -> bytes:
    """Read one regular-file member into memory; refuse unsafe paths, links and specials."""
    check_member_name(name)
    try:
        if isinstance(archive, tarfile.TarFile):
            member = archive.getmember(name)
            if not member.isfile():  # symlinks, hardlinks, devices, directories
                raise PrepareError(f"refusing archive member {name!r}: not a regular file")
            fh = archive.extractfile(member)
            assert fh is not None
            return fh.read()
        info = archive.getinfo(name)
        if stat.S_ISLNK(info.external_attr >> 16) or info.is_dir():
            raise PrepareError(f"refusing archive member {name!r}: not a regular file")
        return archive.read(info)
    except KeyError:
        raise PrepareError(f"archive has no member {name!r}") from None


class Archive:
    """Read-only view of a wheel/zip or tar (a context manager); reads go through the guard."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if zipfile.is_zipfile(path):
            self._f: zipfile.ZipFile | tarfile.TarFile = zipfile.ZipFile(path)
            self._names = [i.filename for i in self._f.infolist() if not i.is_dir()]
        else:
            self._f = tarfile.open(path, "r:*")
            self._names = [m.name for m in self._f.getmembers() if m.isfile()]

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> bytes:
        return safe_extract_member(self._f, name)

    def find(self, relpath: str) -> str:
        """The one member equal to ``relpath`` or ending in ``/relpath`` (sdist top dir)."""
        hits = [n for n in self._names if n == relpath or n.endswith("/" + relpath)]
        if len(hits) != 1:
            raise PrepareError(f"{self.path.name}: expected one {relpath!r}, found {len(hits)}")
        return hits[0]

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()
