"""The token store: a corpus tokenized once into shards of token ids, read by random access.

    <root>/<key>/manifest.json     sources (path, size, mtime, sha256), tokenizer hash, counts;
                                   written last: a store without it is incomplete
    <root>/<key>/plan.json         the pieces being tokenized (kept for resuming)
    <root>/<key>/NNNNN.tok         token ids of piece N (uint16 if the vocabulary fits, else
                                   uint32), each document followed by EOS
    <root>/<key>/NNNNN.docs.npy    int64 [docs, 2]: token end (in the shard) and UTF-8 bytes of
                                   each document that ends in the shard
    <root>/<key>/NNNNN.json        the shard's counts; written last: the shard is complete

`key` hashes the sources' contents, the tokenizer and the reading options, so the same files
and tokenizer are never tokenized twice. The root is `data.store_dir`, else
`$JAXLM_CACHE/stores` (default ~/.cache/jaxlm/stores); local or cloud (epath). Reads are
positioned reads (os.pread locally): memory stays flat however large the store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from etils import epath

from jaxlm.data.paths import as_path, is_remote

FORMAT = 1
MANIFEST = "manifest.json"


def store_root(store_dir: str = "") -> epath.Path:
    """`store_dir`, else `$JAXLM_CACHE/stores`, else `$XDG_CACHE_HOME/jaxlm/stores`."""
    if store_dir:
        return as_path(store_dir)
    if os.environ.get("JAXLM_CACHE"):
        return as_path(os.environ["JAXLM_CACHE"]) / "stores"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return as_path(xdg) / "jaxlm" / "stores"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def store_key(identity: dict[str, Any]) -> str:
    """A short stable hash of what determines a store's contents."""
    text = json.dumps({"format": FORMAT, **identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def shard_name(index: int) -> str:
    return f"{index:05d}"


class _Reader:
    """Positioned reads of one shard file: os.pread locally (thread-safe, no mapping),
    a file object per thread elsewhere."""

    def __init__(self, path: epath.Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self._fd = None if is_remote(path) else os.open(os.fspath(path), os.O_RDONLY)
        self._local = threading.local()

    def read(self, start: int, stop: int) -> np.ndarray:
        size = self.dtype.itemsize
        if self._fd is not None:
            raw = os.pread(self._fd, (stop - start) * size, start * size)
        else:
            f = getattr(self._local, "f", None)
            if f is None:
                f = self._local.f = self.path.open("rb")
            f.seek(start * size)
            raw = f.read((stop - start) * size)
        return np.frombuffer(raw, self.dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also at interpreter exit
            self.close()


@dataclass
class TokenStore:
    """A complete store: its manifest, document index and shard readers."""

    directory: epath.Path
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        shards = self.manifest["shards"]
        self.dtype = np.dtype(self.manifest["dtype"])
        counts = np.array([s["tokens"] for s in shards], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])
        self._readers = [_Reader(self.directory / f"{shard_name(i)}.tok", self.dtype)
                         for i in range(len(shards))]
        self.doc_ends, self.doc_bytes = self._doc_index()

    @classmethod
    def open(cls, directory: epath.Path) -> TokenStore | None:
        """The store in `directory`, or None if it is missing or incomplete."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("format") != FORMAT or not manifest.get("complete"):
            return None
        return cls(directory, manifest)

    def _doc_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Global token end and UTF-8 bytes of every document."""
        ends, sizes, carry = [], [], 0
        for i, shard in enumerate(self.manifest["shards"]):
            with (self.directory / f"{shard_name(i)}.docs.npy").open("rb") as f:
                docs = np.load(f, allow_pickle=False)
            if len(docs):
                ends.append(docs[:, 0] + self.shard_starts[i])
                b = docs[:, 1].copy()
                b[0] += carry
                sizes.append(b)
                carry = 0
            carry += shard["tail_bytes"]
        if not ends:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(ends), np.concatenate(sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def num_docs(self) -> int:
        return len(self.doc_ends)

    @property
    def eos_id(self) -> int | None:
        return self.manifest["eos_id"]

    def doc_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.doc_ends[:-1]]).astype(np.int64)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop) as int32, across shards."""
        parts = []
        i = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.shard_starts[i + 1]))
            base = int(self.shard_starts[i])
            parts.append(self._readers[i].read(start - base, end - base))
            start, i = end, i + 1
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def span(self, start: int = 0, stop: int | None = None) -> TokenSpan:
        return TokenSpan(self, start, self.num_tokens if stop is None else stop)

    def close(self) -> None:
        for r in self._readers:
            r.close()


@dataclass(frozen=True)
class TokenSpan:
    """Tokens [start, stop) of a store, sliced like an array: `span[a:b]` reads int32 ids."""

    store: TokenStore
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> np.ndarray:
        a, b, step = index.indices(len(self))
        if step != 1:
            raise IndexError("a token span reads contiguous slices only")
        return self.store.read(self.start + a, self.start + max(a, b))

    def documents(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of the documents in the span, relative to it (cut at its edges)."""
        ends = self.store.doc_ends
        first = int(np.searchsorted(ends, self.start, side="right"))
        last = int(np.searchsorted(ends, self.stop, side="left"))
        inner = ends[first:last + 1] if last < len(ends) else ends[first:]
        stops = np.minimum(inner, self.stop) - self.start
        starts = np.concatenate([[0], stops[:-1]])
        keep = stops > starts
        return starts[keep].astype(np.int64), stops[keep].astype(np.int64)

    def num_bytes(self) -> int:
        """UTF-8 bytes of the text of the span (documents cut at its edges: in proportion)."""
        ends, sizes = self.store.doc_ends, self.store.doc_bytes
        starts = self.store.doc_starts()
        lo = np.maximum(starts, self.start)
        hi = np.minimum(ends, self.stop)
        share = np.clip(hi - lo, 0, None) / np.maximum(ends - starts, 1)
        return int(round(float((share * sizes).sum())))
