"""Text -> token arrays -> deterministic, checkpointable language-model batches.

The batch at global position p is a pure function of (seed, p): epoch = p // batches_per_epoch
picks a window offset and a permutation of fixed-length windows. Resuming at position p
therefore replays exactly the batches an uninterrupted run would have seen. Each process
materialises only its own rows of the global batch.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import jax
import numpy as np

from jaxlm.config import DataConfig
from jaxlm.data.batch import Batch, LMBatch, Seq2SeqBatch, seq2seq_batch, take_rows

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad or missing training data; the CLI prints it and exits with code 2."""


# ---------------------------------------------------------------- reading text

def expand_files(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if Path(pattern).is_dir():
            matches = sorted(str(p) for p in Path(pattern).rglob("*")
                             if p.suffix in (".txt", ".jsonl", ".json") and p.is_file())
            if not matches:
                raise DataError(f"data directory '{pattern}' has no .txt/.jsonl files")
        if not matches:
            raise DataError(f"data file '{pattern}' not found")
        files += [m for m in matches if Path(m).is_file()]
    return files


def _read_text_file(path: str, utf8_errors: str) -> list[str]:
    """One document per .txt file via HF datasets; bytes that are not UTF-8 are replaced
    (and counted in a warning) or refused, as data.utf8_errors says."""
    import datasets

    raw = Path(path).read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if utf8_errors == "error":
            raise DataError(f"'{path}' is not valid UTF-8 (byte {e.start}); fix the file or "
                            "set data.utf8_errors=replace") from None
        bad = raw.decode("utf-8", errors="replace").count("\ufffd")
        log.warning("%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD", path, bad)
    ds = datasets.load_dataset("text", data_files=path, split="train", sample_by="document",
                               encoding_errors="replace")
    return ds["text"]


def read_texts(files: list[str], text_field: str = "text",
               utf8_errors: str = "replace") -> list[str]:
    """Documents from local .txt (one document per file) or .jsonl/.json files, via HF datasets."""
    import datasets

    datasets.disable_progress_bars()
    docs: list[str] = []
    for f in files:
        if f.endswith((".jsonl", ".json")):
            try:
                ds = datasets.load_dataset("json", data_files=f, split="train")
            except Exception as e:  # datasets raises many types for malformed json
                raise DataError(f"could not read '{f}' as JSON lines: {str(e)[:200]}") from None
            if text_field not in ds.column_names:
                raise DataError(f"'{f}' has no field '{text_field}' (fields: "
                                f"{', '.join(ds.column_names)}); set data.text_field")
            docs += [t for t in ds[text_field] if t]
        else:
            docs += [t for t in _read_text_file(f, utf8_errors) if t]
    if not any(d.strip() for d in docs):
        raise DataError(f"no text in {', '.join(files)}: the corpus is empty")
    return docs


@dataclass
class TextSplits:
    train: list[str]
    valid: list[str]
    source: str


def load_text(cfg: DataConfig, progress: bool = True) -> TextSplits:
    """Training and validation documents from local files or a prepared corpus."""
    if cfg.files:
        train_docs = read_texts(expand_files(cfg.files), cfg.text_field, cfg.utf8_errors)
        if cfg.valid_files:
            valid_docs = read_texts(expand_files(cfg.valid_files), cfg.text_field,
                                    cfg.utf8_errors)
        else:
            train_docs, valid_docs = _hold_out(train_docs, cfg.valid_fraction)
        return TextSplits(train_docs, valid_docs, ",".join(cfg.files))
    from jaxlm.data.prepare import prepare

    corpus = prepare(cfg.name, progress=progress)
    return TextSplits([corpus.train.read_text("utf-8")], [corpus.valid.read_text("utf-8")],
                      f"prepared:{cfg.name}")


def _hold_out(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Last `fraction` of the documents (or of the characters, for one document)."""
    if len(docs) >= 20:
        n = max(1, int(len(docs) * fraction))
        return docs[:-n], docs[-n:]
    text = "\n".join(docs)
    cut = int(len(text) * (1 - fraction))
    if cut <= 0 or cut >= len(text):
        raise DataError("the corpus is too small to hold out a validation split")
    return [text[:cut]], [text[cut:]]


def tokenize(docs: list[str], tokenizer, progress: bool = False) -> np.ndarray:
    """Concatenated token ids of all documents, separated by EOS where the tokenizer has one
    (`progress`: a bar over the documents when stderr is a terminal)."""
    from jaxlm.progress import bar

    parts = []
    for doc in bar(docs, desc="tokenize", unit="doc", quiet=not progress, leave=False):
        parts.append(np.asarray(tokenizer.encode(doc), dtype=np.int32))
        if tokenizer.eos_id is not None and len(docs) > 1:
            parts.append(np.asarray([tokenizer.eos_id], dtype=np.int32))
    tokens = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    return tokens


# ---------------------------------------------------------------- batches

class BatchSource(Protocol):
    """What the loop reads: batch(p) is this process's rows of the global batch at
    position p, a pure function of (seed, p), so a resumed run replays the same batches."""

    @property
    def batches_per_epoch(self) -> int: ...

    def batch(self, position: int) -> Batch: ...


@dataclass
class LMBatches:
    """Fixed-length windows of a token stream, shuffled per epoch; batch(p) is pure in p."""

    tokens: np.ndarray
    seq_len: int
    batch_size: int  # global
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        if self.batch_size % self.process_count:
            raise DataError(f"train.batch_size={self.batch_size} is not divisible by the "
                            f"{self.process_count} processes")
        if self.num_windows(0) < 1:
            raise DataError(f"the corpus has {len(self.tokens)} tokens, fewer than one "
                            f"sequence of train.seq_len={self.seq_len}+1")

    def _offset(self, epoch: int) -> int:
        if not self.shuffle:
            return 0
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(self.seq_len))

    def num_windows(self, epoch: int) -> int:
        return (len(self.tokens) - 1 - self._offset(epoch)) // self.seq_len

    @property
    def batches_per_epoch(self) -> int:
        # Smallest over epochs' offsets, so every epoch has the same number of batches.
        return max(1, (len(self.tokens) - self.seq_len) // self.seq_len // self.batch_size)

    def rows(self, position: int) -> np.ndarray:
        """Window indices of the global batch at `position` (all processes)."""
        epoch, index = divmod(position, self.batches_per_epoch)
        n = self.num_windows(epoch)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        idx = np.arange(index * self.batch_size, (index + 1) * self.batch_size) % n
        return order[idx]

    def batch(self, position: int) -> LMBatch:
        """This process's rows of the global batch at `position`."""
        rows = self.rows(position)
        per = self.batch_size // self.process_count
        rows = rows[self.process_index * per:(self.process_index + 1) * per]
        starts = self._offset(position // self.batches_per_epoch) + rows * self.seq_len
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        return LMBatch(inputs=windows[:, :-1], targets=windows[:, 1:],
                       loss_mask=np.ones((len(rows), self.seq_len), np.float32))


def pack_documents(docs: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Packs documents into rows of `seq_len` next-token pairs with segment ids and restarted
    positions, so attention (given segment_ids_BT and positions_BT) never crosses documents.

    Each document of n tokens gives n - 1 (input, target) pairs; pairs run on from row to row,
    a document cut at a row's end continuing as a new segment (positions from 0) in the next
    row. Every pair appears once, and only the last row is padded (segment 0, loss_mask 0).
    Segment ids are 1 + the document's index in `docs`.
    Returns inputs, targets, segment_ids, positions [R, seq_len] int32 and loss_mask float32.
    """
    kept = [(i + 1, np.asarray(d, np.int32)) for i, d in enumerate(docs) if len(d) > 1]
    if not kept:
        raise DataError("no document has two tokens to pack")
    inputs = np.concatenate([d[:-1] for _, d in kept])
    targets = np.concatenate([d[1:] for _, d in kept])
    doc_id = np.concatenate([np.full(len(d) - 1, i, np.int32) for i, d in kept])
    n = len(inputs)
    rows = -(-n // seq_len)
    pad = rows * seq_len - n

    def grid(x, fill=0):
        return np.concatenate([x, np.full(pad, fill, x.dtype)]).reshape(rows, seq_len)

    seg = grid(doc_id)
    # A segment starts where the id changes or a row begins; positions count from there.
    starts = np.ones_like(seg, bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    idx = np.broadcast_to(np.arange(seq_len), seg.shape)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return {"inputs": grid(inputs), "targets": grid(targets), "segment_ids": seg,
            "positions": (idx - last_start).astype(np.int32),
            "loss_mask": (seg > 0).astype(np.float32)}


def read_pairs(files: list[str], source_field: str, target_field: str) -> list[tuple[str, str]]:
    """(source, target) pairs from .jsonl files, for translation-style training."""
    import datasets

    datasets.disable_progress_bars()
    pairs: list[tuple[str, str]] = []
    for f in files:
        try:
            ds = datasets.load_dataset("json", data_files=f, split="train")
        except Exception as e:  # datasets raises many types for malformed json
            raise DataError(f"could not read '{f}' as JSON lines: {str(e)[:200]}") from None
        missing = {source_field, target_field} - set(ds.column_names)
        if missing:
            raise DataError(f"'{f}' lacks field(s) {', '.join(sorted(missing))}; set "
                            "data.source_field / data.target_field")
        pairs += [(a, b) for a, b in zip(ds[source_field], ds[target_field]) if a and b]
    if not pairs:
        raise DataError(f"no (source, target) pairs in {', '.join(files)}")
    return pairs


def _local_rows(src, n: int, position: int) -> np.ndarray:
    """This process's row indices of the global batch at `position` over `n` examples
    shuffled per epoch by (seed, epoch): a pure function of the position."""
    epoch, index = divmod(position, src.batches_per_epoch)
    order = (np.random.default_rng([src.seed, epoch]).permutation(n) if src.shuffle
             else np.arange(n))
    rows = order[np.arange(index * src.batch_size, (index + 1) * src.batch_size) % n]
    per = src.batch_size // src.process_count
    return rows[src.process_index * per:(src.process_index + 1) * per]


@dataclass
class PairBatches:
    """Padded (source, target) pairs, shuffled per epoch; batch(p) is pure in p."""

    src: np.ndarray  # [N, S] padded with pad_id
    src_mask: np.ndarray
    tgt: np.ndarray  # [N, T] padded; ends with EOS where it fits
    tgt_mask: np.ndarray
    batch_size: int
    start_id: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], tokenizer, seq_len: int, batch_size: int,
                   start_id: int, **kw) -> PairBatches:
        """Sources and targets as the tokenizer's own special-token rules make them (as HF's
        `tokenizer(source, text_target=target)`; without rules: text + EOS), each target
        ending in EOS so that the model learns to stop."""
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        eos = tokenizer.eos_id

        def target(text):
            ids = tokenizer.encode_input(text, whole=True)
            return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids

        def pad_to(seqs):
            arr = np.full((len(seqs), seq_len), pad, np.int32)
            mask = np.zeros((len(seqs), seq_len), np.float32)
            for i, ids in enumerate(seqs):
                ids = ids[:seq_len]
                arr[i, :len(ids)] = ids
                mask[i, :len(ids)] = 1.0
            return arr, mask

        src, src_mask = pad_to([tokenizer.encode_input(a, whole=True) for a, _ in pairs])
        tgt, tgt_mask = pad_to([target(b) for _, b in pairs])
        return cls(src, src_mask, tgt, tgt_mask, batch_size, start_id, **kw)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.src) // self.batch_size)

    def batch(self, position: int) -> Seq2SeqBatch:
        rows = _local_rows(self, len(self.src), position)
        return seq2seq_batch(self.src[rows], self.tgt[rows], self.src_mask[rows],
                             self.tgt_mask[rows], self.start_id)


@dataclass
class RowBatches:
    """Batches of ready-made rows (e.g. packed documents), shuffled per epoch; pure in p."""

    rows: Batch  # every field [N, seq_len]
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1

    @property
    def num_rows(self) -> int:
        return len(jax.tree.leaves(self.rows)[0])

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_rows // self.batch_size)

    def batch(self, position: int) -> Batch:
        return take_rows(self.rows, _local_rows(self, self.num_rows, position))


@dataclass
class MappedBatches:
    """Another source's batches passed through `fn` (plain-text windows laid out for a
    family's objective)."""

    source: BatchSource
    fn: Callable[[Batch], Batch]

    @property
    def batches_per_epoch(self) -> int:
        return self.source.batches_per_epoch

    def batch(self, position: int) -> Batch:
        return self.fn(self.source.batch(position))


def packed_rows(docs: list[str], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Each document (ending in EOS where the tokenizer has one) packed into rows."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return pack_documents([np.asarray(tokenizer.encode(d) + eos, np.int32) for d in docs],
                          seq_len)


ANSWER_CUE = "\nAnswer:"


def answer_prompt(source: str) -> str:
    """What a decoder-only model reads before the target of a (source, target) pair; its
    answer is the continuation up to the first newline."""
    return source.rstrip() + ANSWER_CUE


def prompted_rows(pairs: list[tuple[str, str]], tokenizer, seq_len: int
                  ) -> dict[str, np.ndarray]:
    """Decoder-only rows for (source, target) pairs: answer_prompt(source) as generation
    encodes it (within the tokenizer's own special tokens, e.g. Llama's BOS), " target", EOS
    (or a newline). The loss covers only the target and its end. A source too long for the
    row loses its beginning, as generation would cut it, never the cue or the target."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    end = [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode("\n")
    before, after = tokenizer.input_affixes()
    cue = tokenizer.encode(ANSWER_CUE) + after
    n = len(pairs)
    rows = {"inputs": np.full((n, seq_len), pad, np.int32),
            "targets": np.full((n, seq_len), pad, np.int32),
            "loss_mask": np.zeros((n, seq_len), np.float32)}
    for i, (source, target) in enumerate(pairs):
        answer = (tokenizer.encode(" " + target.strip()) + end)[:seq_len // 2]
        room = seq_len + 1 - len(answer) - len(cue) - len(before)
        context = tokenizer.encode(source.rstrip())[-room:] if room > 0 else []
        ids = before + context + cue + answer
        start = len(ids) - len(answer)  # index of the first answer token
        rows["inputs"][i, :len(ids) - 1] = ids[:-1]
        rows["targets"][i, :len(ids) - 1] = ids[1:]
        rows["loss_mask"][i, start - 1:len(ids) - 1] = 1.0
    return rows
