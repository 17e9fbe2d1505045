"""Builds a token store (jaxlm.data.store): pieces tokenized in parallel, one worker process
per core, each writing its own shard; a progress bar with an ETA; resumable (complete
shards are kept) and guarded by a lock, so two processes never build the same store."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from jaxlm.data.errors import DataError
from jaxlm.data.paths import is_remote
from jaxlm.data.pieces import Piece
from jaxlm.data.sources import chunks, read_piece
from jaxlm.data.store import MANIFEST, TokenStore, shard_name, store_key, token_dtype

log = logging.getLogger(__name__)
ENCODE_GROUP = 16  # texts per tokenizer call: bounds a worker's memory


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 over the files the tokenizer saves (its full definition)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def encode_texts(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """Each text's own ids (no special tokens), through the tokenizer's batch path."""
    from jaxlm.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    if isinstance(tokenizer, HFTokenizer):
        out = tokenizer.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int64) for e in out]
    if isinstance(tokenizer, SentencePieceTokenizer):
        return [np.asarray(x, np.int64) for x in tokenizer.processor.encode(texts)]
    return [np.asarray(tokenizer.encode(t, add_special_tokens=False), np.int64) for t in texts]


def tokenize_piece(piece: Piece, tokenizer: Any, opts: dict[str, Any]
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(token ids, [docs, 2] (end, bytes) of the documents ending here, counts). Each
    document is followed by EOS when the tokenizer has one."""
    got = read_piece(piece, opts["text_field"], opts["utf8_errors"])
    eos, dtype = opts["eos_id"], np.dtype(opts["dtype"])
    flat = [(i, c) for i, text in enumerate(got.texts) for c in chunks(text)]
    ids: list[np.ndarray] = []
    for g in range(0, len(flat), ENCODE_GROUP):
        group = encode_texts(tokenizer, [c for _, c in flat[g:g + ENCODE_GROUP]])
        ids += [x.astype(dtype) for x in group]
    parts, docs, total, open_bytes = [], [], 0, 0
    for k, ((i, text), x) in enumerate(zip(flat, ids)):
        parts.append(x)
        total += len(x)
        open_bytes += len(text.encode("utf-8"))
        text_ends = k + 1 == len(flat) or flat[k + 1][0] != i
        if text_ends and got.ends[i]:
            if eos is not None:
                parts.append(np.asarray([eos], dtype))
                total += 1
            docs.append((total, open_bytes))
            open_bytes = 0
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    stats = {"tokens": int(total), "docs": len(docs), "tail_bytes": open_bytes,
             "replaced": got.replaced, "nonblank": any(t.strip() for t in got.texts),
             "source": piece.source, "extent": piece.stop - piece.start}
    return tokens, np.asarray(docs, np.int64).reshape(-1, 2), stats


def _write(path: epath.Path, data: bytes) -> None:
    """Writes whole or not at all where the file system renames atomically."""
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def write_shard(directory: epath.Path, index: int, piece: Piece, tokenizer: Any,
                opts: dict[str, Any]) -> dict[str, Any]:
    """Tokenizes `piece` into shard `index`; its .json (the counts) is written last."""
    tokens, docs, stats = tokenize_piece(piece, tokenizer, opts)
    name = shard_name(index)
    _write(directory / f"{name}.tok", tokens.tobytes())
    buffer = io.BytesIO()
    np.save(buffer, docs, allow_pickle=False)
    _write(directory / f"{name}.docs.npy", buffer.getvalue())
    _write(directory / f"{name}.json", json.dumps(stats).encode())
    return stats


def _completed(directory: epath.Path, indices: range | list[int]
               ) -> dict[int, dict[str, Any]]:
    done = {}
    for i in indices:
        path = directory / f"{shard_name(i)}.json"
        if path.exists():
            with contextlib.suppress(ValueError):
                done[i] = json.loads(path.read_text())
    return done


def _start_workers(directory: epath.Path, todo: list[int], workers: int
                   ) -> list[subprocess.Popen]:
    """Worker processes (`python -m jaxlm.data.build`), piece i going to worker i mod n.
    Processes of their own (not multiprocessing): nothing re-imports the caller's script."""
    # One worker per core already: the tokenizer's own threads would oversubscribe.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return [subprocess.Popen([sys.executable, "-m", "jaxlm.data.build", str(directory),
                              ",".join(map(str, todo[w::workers]))],
                             env=env, stdout=subprocess.DEVNULL,
                             stderr=tempfile.TemporaryFile("w+"), text=True)
            for w in range(workers)]


def _last_error(proc: subprocess.Popen) -> str:
    err = proc.stderr
    if err is None:
        return "a tokenizer worker failed"
    err.seek(0)
    lines = err.read().strip().splitlines()
    return lines[-1] if lines else f"a tokenizer worker exited with code {proc.returncode}"


def _run_pieces(directory: epath.Path, pieces: list[Piece], tokenizer: Any,
                opts: dict[str, Any], workers: int, advance: Callable[[dict], None]
                ) -> dict[int, dict[str, Any]]:
    """Tokenizes the pieces not done yet (by `workers` processes when there are several);
    returns every piece's counts."""
    done = _completed(directory, range(len(pieces)))
    todo = [i for i in range(len(pieces)) if i not in done]
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            done[i] = write_shard(directory, i, pieces[i], tokenizer, opts)
            advance(done[i])
        return done
    procs = _start_workers(directory, todo, min(workers, len(todo)))
    try:
        while todo:
            time.sleep(0.2)
            for i, stats in _completed(directory, todo).items():
                done[i] = stats
                advance(stats)
            todo = [i for i in todo if i not in done]
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed and failed[0].returncode == 2:  # a user error, one line
                raise DataError(_last_error(failed[0]))
            if failed:
                raise RuntimeError(f"a tokenizer worker failed: {_last_error(failed[0])}")
            if todo and all(p.poll() == 0 for p in procs):
                raise DataError(f"tokenizer workers ended with pieces {todo} not written")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return done


def _worker_main(directory: str, indices: str) -> int:
    """A worker process: tokenizes the given pieces of the store being built in
    `directory`; a user error is one line on stderr and exit code 2."""
    from jaxlm.data.tokenizers import load_tokenizer

    root = epath.Path(directory)
    try:
        opts = json.loads((root / "opts.json").read_text())
        pieces = [Piece(**p) for p in json.loads((root / "plan.json").read_text())["pieces"]]
        tokenizer = load_tokenizer(root / "tokenizer")
        parent = os.getppid()
        for i in (int(x) for x in indices.split(",") if x):
            if os.getppid() != parent:  # the build was killed: leave the rest to its resume
                return 1
            write_shard(root, i, pieces[i], tokenizer, opts)
    except DataError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _lock(root: epath.Path, key: str, say: Callable[[str], None]) -> Iterator[None]:
    """Holds `<root>/<key>.lock` (released if the holder dies, even by SIGKILL). Cloud roots
    have no lock: two builders there write the same bytes."""
    if is_remote(root):
        yield
        return
    import fcntl

    fd = os.open(os.fspath(root / f"{key}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is building the token store {root / key}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _say(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            print(f"jaxlm: {msg}", file=sys.stderr, flush=True)

    return say


def _plan(directory: epath.Path, plan: Callable[[], list[Piece]]) -> list[Piece]:
    """The saved plan of an interrupted build, else a new one (saved before any shard)."""
    path = directory / "plan.json"
    if path.exists():
        return [Piece(**p) for p in json.loads(path.read_text())["pieces"]]
    pieces = plan()
    _write(path, json.dumps({"pieces": [p.to_json() for p in pieces]}).encode())
    return pieces


def _save_tokenizer(directory: epath.Path, tokenizer: Any) -> None:
    target = directory / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for p in Path(tmp).iterdir():
            (target / p.name).write_bytes(p.read_bytes())


def ensure(root: epath.Path, identity: dict[str, Any], plan: Callable[[], list[Piece]],
           tokenizer: Any, *, sources: list[dict[str, Any]] | None = None,
           text_field: str = "text", utf8_errors: str = "replace", workers: int = 0,
           quiet: bool = False, description: str = "the corpus") -> TokenStore:
    """The store of `identity` (what the sources hold: content hashes, not paths)
    tokenized by `tokenizer`: opened if it exists, else built (or finished, after an
    interruption) from `plan()`'s pieces. `sources` (paths, sizes, hashes) go into the
    manifest."""
    say = _say(quiet)
    key = store_key({**identity, "tokenizer": tokenizer_hash(tokenizer),
                     "text_field": text_field, "utf8_errors": utf8_errors})
    directory = root / key
    if (store := TokenStore.open(directory)) is not None:
        return store
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _lock(root, key, say):
            if (store := TokenStore.open(directory)) is not None:
                return store
            opts = {"text_field": text_field, "utf8_errors": utf8_errors,
                    "eos_id": tokenizer.eos_id, "dtype": token_dtype(tokenizer.vocab_size).name}
            try:
                return _build(directory, plan, tokenizer, opts, workers or default_workers(),
                              sources or [], say, quiet, description)
            except DataError:  # bad data: nothing worth resuming
                directory.rmtree(missing_ok=True)
                raise
    except OSError as e:
        raise DataError(f"cannot write the token store in '{root}' ({e.strerror or e}); set "
                        "JAXLM_CACHE or data.store_dir to a writable folder") from None


def _build(directory: epath.Path, plan: Callable[[], list[Piece]], tokenizer: Any,
           opts: dict[str, Any], workers: int, sources: list[dict[str, Any]],
           say: Callable[[str], None], quiet: bool, description: str) -> TokenStore:
    from jaxlm.progress import bar

    directory.mkdir(parents=True, exist_ok=True)
    pieces = _plan(directory, plan)
    if not pieces:
        raise DataError(f"no text in {description}: the corpus is empty")
    _save_tokenizer(directory, tokenizer)
    _write(directory / "opts.json", json.dumps(opts).encode())
    done = _completed(directory, range(len(pieces)))
    total = sum(p.stop - p.start for p in pieces)
    unit, scale = ("rows", 1.0) if pieces[0].kind == "hf" else ("MB", 1e-6)
    resumed = f", {len(done)} of {len(pieces)} pieces already done" if done else ""
    say(f"tokenizing {description} ({total * scale:,.1f} {unit}, {len(pieces)} pieces, "
        f"{min(workers, len(pieces) - len(done))} workers{resumed}) into {directory}")
    t0 = time.time()
    with bar(total=round(total * scale, 1), desc="tokenize", unit=unit, quiet=quiet,
             leave=False) as b:
        b.update(round(sum(s["extent"] for s in done.values()) * scale, 1))
        done = _run_pieces(directory, pieces, tokenizer, opts, workers,
                           lambda s: b.update(round(s["extent"] * scale, 1)))
    shards = [done[i] for i in range(len(pieces))]
    if not any(s["nonblank"] for s in shards):
        raise DataError(f"no text in {description}: the corpus is empty")
    _warn_replaced(shards)
    manifest = {"format": 1, "complete": True, "key": directory.name, **opts,
                "vocab_size": tokenizer.vocab_size, "description": description,
                "sources": sources, "shards": shards,
                "tokens": sum(s["tokens"] for s in shards),
                "docs": sum(s["docs"] for s in shards),
                "seconds": round(time.time() - t0, 2)}
    _write(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    say(f"token store: {manifest['tokens']:,} tokens (documents: {manifest['docs']:,}) in "
        f"{manifest['seconds']:.1f} s")
    return TokenStore(directory, manifest)


def _warn_replaced(shards: list[dict[str, Any]]) -> None:
    bad: dict[str, int] = {}
    for s in shards:
        if s["replaced"]:
            bad[s["source"]] = bad.get(s["source"], 0) + s["replaced"]
    for source, n in bad.items():
        log.warning("%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD", source, n)


if __name__ == "__main__":
    sys.exit(_worker_main(*sys.argv[1:3]))
