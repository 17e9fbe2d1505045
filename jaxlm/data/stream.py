"""Training on a streamed HF dataset (`data.streaming=true`): nothing is tokenized ahead.

Each process reads its own share of the rows (`split_dataset_by_node`: disjoint rows) in
blocks of BLOCK_DOCS documents, shuffled within each block by (seed, epoch, block) (HF
datasets reorders the shards at each epoch); each document is tokenized as it comes and
followed by EOS, and the documents make one token stream cut into windows of seq_len + 1
tokens (a step of seq_len). This process's batch at position p holds its windows
[p * rows, (p + 1) * rows).

Where the stream stands before a batch is a small JSON `cursor`: the epoch, the block, the
HF iterator's `state_dict()` at the block's start, the document within the block and the
tokens of it already read. Checkpoints keep every process's cursor (jaxlm.data.position), so
a resumed run reads on from there, bit-identical to a run that was never stopped; without
one (a run resumed on another number of processes) the stream is read again up to the
position. Without a 'validation' split, one document in round(1 / data.valid_fraction),
chosen by a hash of its text, is held out."""

from __future__ import annotations

import threading
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from jaxlm.config import Config, DataConfig
from jaxlm.data import hf
from jaxlm.data.batch import LMBatch
from jaxlm.data.build import encode_texts
from jaxlm.data.errors import DataError

BLOCK_DOCS = 1000  # documents shuffled together
ENCODE_DOCS = 64  # documents per tokenizer call
KEEP_CURSORS = 1024  # cursors of recent positions kept for checkpoints (prefetch runs ahead)
START = {"epoch": 0, "block": 0, "hf": None, "doc": 0, "skip": 0}

Cursor = dict[str, Any]


def held_out(text: str, every: int) -> bool:
    """Whether a streamed document is validation data (the same on every pass and host)."""
    return zlib.crc32(text.encode("utf-8")) % every == 0


class Documents:
    """This process's documents of one split, in blocks, from a cursor on (`hold`: keep
    only the documents held out for validation (> 0) or only the others (< 0), one in
    |hold|)."""

    def __init__(self, d: DataConfig, split: str, *, seed: int, shuffle: bool,
                 hold: int | None, process_index: int, process_count: int):
        self.dataset = hf.load(hf.spec_of(d, split), streaming=True)
        self.d, self.seed, self.shuffle, self.hold = d, seed, shuffle, hold
        self.rank, self.world = process_index, process_count

    def _rows(self, epoch: int, state: dict | None) -> tuple[Any, Iterator[str]]:
        """(this process's dataset, its documents) from the HF iterator state `state`
        (None: the start of the epoch)."""
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.dataset, rank=self.rank, world_size=self.world)
        ds.set_epoch(epoch)
        if state is not None:
            ds.load_state_dict(state)
        d, hold = self.d, self.hold

        def texts() -> Iterator[str]:
            for row in ds:
                if d.text_field not in row:
                    raise DataError(f"the dataset '{d.hf_path}' has no column "
                                    f"'{d.text_field}' (columns: {', '.join(row)}); set "
                                    "data.text_field")
                text = row[d.text_field]
                if text and (hold is None or held_out(str(text), abs(hold)) == (hold > 0)):
                    yield str(text)

        return ds, texts()

    def blocks(self, at: Cursor) -> Iterator[tuple[Cursor, list[str]]]:
        """(cursor of the block's start, its documents in training order) from the block
        of `at` on, epoch after epoch."""
        epoch, block, state = at["epoch"], at["block"], at["hf"]
        while True:
            ds, texts = self._rows(epoch, state)
            while docs := list(islice(texts, BLOCK_DOCS)):
                where = {"epoch": epoch, "block": block, "hf": state}
                if self.shuffle:
                    order = np.random.default_rng([self.seed, epoch, block]).permutation(
                        len(docs))
                    docs = [docs[i] for i in order]
                yield where, docs
                state, block = ds.state_dict(), block + 1  # just after the block's last row
            if block == 0:
                raise DataError("the streamed dataset has no text")
            epoch, block, state = epoch + 1, 0, None


class StreamBatches:
    """This process's windows of a document stream, `rows` per batch (see the module)."""

    def __init__(self, documents: Documents, tokenizer: Any, seq_len: int, rows: int,
                 batches_per_epoch: int):
        self.documents, self.tokenizer = documents, tokenizer
        self.seq_len, self.rows, self.batches_per_epoch = seq_len, rows, batches_per_epoch
        self.bytes_read = self.tokens_read = 0
        self._it: Iterator[tuple[LMBatch, Cursor]] | None = None
        self._next = -1
        self._cursors: dict[int, Cursor] = {0: START}  # position -> where its batch starts
        self._pinned = {0}
        self._lock = threading.Lock()

    def _tokens(self, at: Cursor) -> Iterator[tuple[Cursor, np.ndarray]]:
        """(cursor of its first token, ids + EOS) of each document from `at` on."""
        eos = np.asarray([] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id],
                         np.int32)
        first = True
        for where, docs in self.documents.blocks(at):
            start = at["doc"] if first else 0
            for g in range(start, len(docs), ENCODE_DOCS):
                group = docs[g:g + ENCODE_DOCS]
                for k, (text, ids) in enumerate(zip(group, encode_texts(self.tokenizer, group))):
                    ids = np.concatenate([ids.astype(np.int32), eos])
                    skip = at["skip"] if first else 0
                    first = False
                    self.bytes_read += len(text.encode("utf-8"))
                    self.tokens_read += len(ids)
                    yield {**where, "doc": g + k, "skip": skip}, ids[skip:]
            first = False

    def _batches(self, at: Cursor) -> Iterator[tuple[LMBatch, Cursor]]:
        """(batch, cursor of the next batch) from `at` on. Token indices count from `at`:
        `head` is that of buf[0], `starts` holds (index of its first token, cursor) of the
        documents from the one that holds buf[0] on."""
        L, rows = self.seq_len, self.rows
        buf, parts, head, end, windows = np.zeros(0, np.int32), [], 0, 0, []
        starts: deque[tuple[int, Cursor]] = deque()
        for where, ids in self._tokens(at):
            starts.append((end, where))
            parts.append(ids)
            end += len(ids)
            if end - head < L + 1:
                continue
            buf = np.concatenate([buf, *parts])
            parts = []
            while len(buf) >= L + 1:
                windows.append(buf[:L + 1])
                buf, head = buf[L:], head + L
                while len(starts) > 1 and starts[1][0] <= head:
                    starts.popleft()
                if len(windows) == rows:
                    w = np.stack(windows)
                    windows = []
                    first, c = starts[0]
                    yield (LMBatch(inputs=w[:, :-1], targets=w[:, 1:],
                                   loss_mask=np.ones((rows, L), np.float32)),
                           {**c, "skip": c["skip"] + head - first})

    def _advance(self, position: int) -> LMBatch:
        assert self._it is not None
        batch, after = next(self._it)
        with self._lock:
            self._cursors[position + 1] = after
            old = position + 1 - KEEP_CURSORS
            if old not in self._pinned:
                self._cursors.pop(old, None)
        return batch

    def batch(self, position: int) -> LMBatch:
        """The batch at `position`: the next one, or read from the nearest known cursor."""
        if self._it is None or position != self._next:
            with self._lock:
                start = max(p for p in self._cursors if p <= position)
                at = self._cursors[start]
            self._it = self._batches(at)
            for p in range(start, position):  # no cursor at `position`: read up to it
                self._advance(p)
        self._next = position + 1
        return self._advance(position)

    def state(self, position: int) -> Cursor | None:
        """The cursor of the batch at `position` (a checkpoint's), once the batch before it
        was read; None if it was not."""
        with self._lock:
            return self._cursors.get(position)

    def resume(self, position: int, cursor: Cursor) -> None:
        """Reads on from `cursor` at `position` (a checkpoint's)."""
        with self._lock:
            self._cursors[position] = cursor
            self._pinned.add(position)
        self._it, self._next = None, -1


@dataclass
class Streams:
    train: StreamBatches
    valid: StreamBatches
    bytes_per_token: float
    description: str


def streams(cfg: Config, tokenizer: Any, process_index: int, process_count: int) -> Streams:
    """The training and validation streams of `cfg.data` (see the module)."""
    d, t = cfg.data, cfg.train
    if t.batch_size % process_count:
        raise DataError(f"train.batch_size={t.batch_size} is not divisible by the "
                        f"{process_count} processes")
    rows = t.batch_size // process_count
    valid_split = hf.valid_split(d)
    every = max(2, round(1 / d.valid_fraction))
    proc = dict(process_index=process_index, process_count=process_count)
    train = StreamBatches(Documents(d, d.split, seed=cfg.seed, shuffle=True,
                                    hold=None if valid_split else -every, **proc),
                          tokenizer, t.seq_len, rows, 1 << 30)
    valid = StreamBatches(Documents(d, valid_split or d.split, seed=cfg.seed, shuffle=False,
                                    hold=None if valid_split else every, **proc),
                          tokenizer, t.seq_len, rows, t.eval_batches)
    for i in range(t.eval_batches):  # what evaluation reads: its bytes per token
        valid.batch(i)
    held = f"split '{valid_split}'" if valid_split else f"1 in {every} documents held out"
    return Streams(train, valid, valid.bytes_read / max(valid.tokens_read, 1),
                   f"streaming {d.hf_path} (split '{d.split}'; validation: {held})")
