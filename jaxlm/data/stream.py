"""Training on a streamed HF dataset (`data.streaming=true`): nothing is tokenized ahead.

Each process reads its own share of the documents (`split_dataset_by_node`: disjoint rows),
tokenizes them as they come (each followed by EOS), joins them and cuts windows of
seq_len + 1 tokens (a step of seq_len); its batch at position p holds its windows
[p * rows, (p + 1) * rows). That is a pure function of (seed, p): a resumed run reads the
stream again up to its position (cheap for the byte tokenizer; for long runs on a fixed
dataset, prefer the token store). Without a 'validation' split, one document in
round(1 / data.valid_fraction), chosen by a hash of its text, is held out."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlm.config import Config, DataConfig
from jaxlm.data import hf
from jaxlm.data.batch import LMBatch
from jaxlm.data.build import encode_texts
from jaxlm.data.errors import DataError

SHUFFLE_BUFFER = 1000  # documents
ENCODE_DOCS = 64


def held_out(text: str, every: int) -> bool:
    """Whether a streamed document is validation data (the same on every pass and host)."""
    return zlib.crc32(text.encode("utf-8")) % every == 0


def stream_documents(d: DataConfig, split: str, *, seed: int, shuffle: bool, hold: int | None,
                     process_index: int, process_count: int
                     ) -> Callable[[int], Iterator[str]]:
    """epoch -> this process's documents of the split (`hold`: keep only the documents
    held out for validation (> 0) or only the others (< 0), one in |hold|)."""
    from datasets.distributed import split_dataset_by_node

    ds = hf.load(hf.spec_of(d, split), streaming=True)
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32, buffer_size=SHUFFLE_BUFFER)
    ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)

    def documents(epoch: int) -> Iterator[str]:
        ds.set_epoch(epoch)
        for row in ds:
            if d.text_field not in row:
                raise DataError(f"the dataset '{d.hf_path}' has no column '{d.text_field}' "
                                f"(columns: {', '.join(row)}); set data.text_field")
            text = row[d.text_field]
            if text and (hold is None or held_out(str(text), abs(hold)) == (hold > 0)):
                yield str(text)

    return documents


class StreamBatches:
    """This process's windows of a document stream, `rows` per batch (see the module)."""

    def __init__(self, documents: Callable[[int], Iterator[str]], tokenizer: Any,
                 seq_len: int, rows: int, batches_per_epoch: int):
        self.documents, self.tokenizer = documents, tokenizer
        self.seq_len, self.rows, self.batches_per_epoch = seq_len, rows, batches_per_epoch
        self.bytes_read = self.tokens_read = 0
        self._it: Iterator[LMBatch] | None = None
        self._next = -1

    def _token_groups(self) -> Iterator[np.ndarray]:
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        epoch = 0
        while True:
            docs, seen = [], False
            for text in self.documents(epoch):
                docs.append(text)
                if len(docs) == ENCODE_DOCS:
                    yield from self._encode(docs, eos)
                    docs, seen = [], True
            if docs:
                yield from self._encode(docs, eos)
                seen = True
            if not seen:
                raise DataError("the streamed dataset has no text")
            epoch += 1

    def _encode(self, docs: list[str], eos: list[int]) -> Iterator[np.ndarray]:
        for text, ids in zip(docs, encode_texts(self.tokenizer, docs)):
            self.bytes_read += len(text.encode("utf-8"))
            self.tokens_read += len(ids) + len(eos)
            yield np.concatenate([ids.astype(np.int32), np.asarray(eos, np.int32)])

    def _batches(self) -> Iterator[LMBatch]:
        L, buf, windows = self.seq_len, np.zeros(0, np.int32), []
        for ids in self._token_groups():
            buf = np.concatenate([buf, ids])
            while len(buf) >= L + 1:
                windows.append(buf[:L + 1])
                buf = buf[L:]
                if len(windows) == self.rows:
                    w = np.stack(windows)
                    windows = []
                    yield LMBatch(inputs=w[:, :-1], targets=w[:, 1:],
                                  loss_mask=np.ones((self.rows, L), np.float32))

    def batch(self, position: int) -> LMBatch:
        """The batch at `position`: the next one, or the stream read again up to it."""
        if self._it is None or position != self._next:
            self._it = self._batches()
            for _ in range(position):
                next(self._it)
        self._next = position + 1
        return next(self._it)


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
    train = StreamBatches(stream_documents(d, d.split, seed=cfg.seed, shuffle=True,
                                           hold=None if valid_split else -every, **proc),
                          tokenizer, t.seq_len, rows, 1 << 30)
    valid = StreamBatches(stream_documents(d, valid_split or d.split, seed=cfg.seed,
                                           shuffle=False, hold=None if valid_split else every,
                                           **proc),
                          tokenizer, t.seq_len, rows, t.eval_batches)
    for i in range(t.eval_batches):  # what evaluation reads: its bytes per token
        valid.batch(i)
    held = f"split '{valid_split}'" if valid_split else f"1 in {every} documents held out"
    return Streams(train, valid, valid.bytes_read / max(valid.tokens_read, 1),
                   f"streaming {d.hf_path} (split '{d.split}'; validation: {held})")
