"""Batch sources: what the training loop reads. `batch(p)` is this process's rows of the
global batch at position p, a pure function of (seed, p), so a resumed run replays exactly
the batches an uninterrupted run would have seen. They read through grain (jaxlm.data.loader):
windows of a token stream (an array or a token store span), ready-made rows (packed
documents, prompt -> answer rows) and (source, target) pairs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np

from jaxlm.data.batch import Batch, seq2seq_batch, take_rows
from jaxlm.data.errors import DataError
from jaxlm.data.loader import Examples, GrainBatches, read_windows, window_starts
from jaxlm.data.paths import as_path, expand_files

__all__ = ["DataError", "expand_files"]


# ---------------------------------------------------------------- batches

class BatchSource(Protocol):
    """What the loop reads: batch(p) is this process's rows of the global batch at
    position p, a pure function of (seed, p), so a resumed run replays the same batches."""

    @property
    def batches_per_epoch(self) -> int: ...

    def batch(self, position: int) -> Batch: ...

    def state(self, position: int) -> Any:
        """What a checkpoint at `position` keeps besides it (JSON; a stream's cursor), or
        None where the batch is a pure function of the position."""

    def resume(self, position: int, state: Any) -> None:
        """Reads on at `position` from a checkpoint's `state`."""


class LMBatches(GrainBatches):
    """Windows of seq_len + 1 tokens of a token stream (an array, or a span of a token
    store: read by random access), shuffled by (seed, epoch)."""

    def __init__(self, tokens: Any, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        super().__init__(window_starts(len(tokens), seq_len, seed, shuffle),
                         read_windows(tokens, seq_len), batch_size, seed=seed,
                         shuffle=shuffle, process_index=process_index,
                         process_count=process_count)


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


def read_json_lines(files: list[str], parse: Callable[[Any, str], Any], what: str,
                    where: str = "{file}:{line}") -> list[Any]:
    """parse(record, where) of every JSON line of the files (local or cloud), in order;
    `where` names a line in errors. DataError for an unreadable file, a line that is not
    JSON, or no lines at all (`what`: what the files should hold)."""
    out = []
    for f in files:
        try:
            text = as_path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read '{f}': {e}") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            at = where.format(file=f, line=n)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{at}: not a JSON object ({e.msg})") from None
            out.append(parse(record, at))
    if not out:
        raise DataError(f"no {what} in {', '.join(files)}")
    return out


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


class PairBatches(GrainBatches):
    """Padded (source, target) pairs, shuffled by (seed, epoch)."""

    def __init__(self, src: np.ndarray, src_mask: np.ndarray, tgt: np.ndarray,
                 tgt_mask: np.ndarray, batch_size: int, start_id: int, **kw: Any):
        # src/tgt [N, S|T] padded; targets end with EOS where it fits
        self.src, self.src_mask, self.tgt, self.tgt_mask = src, src_mask, tgt, tgt_mask
        self.start_id = start_id

        def collate(ids):
            rows = np.asarray(ids)
            return seq2seq_batch(src[rows], tgt[rows], src_mask[rows], tgt_mask[rows],
                                 start_id)

        super().__init__(Examples(len(src)), collate, batch_size, **kw)

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


class RowBatches(GrainBatches):
    """Ready-made rows (prompt -> answer rows: every field [N, seq_len]), or rows made on
    demand (packed documents: `rows` has a length and `collate` makes a batch of row ids),
    shuffled by (seed, epoch)."""

    def __init__(self, rows: Batch | Any, batch_size: int, *,
                 collate: Callable[[Any], Batch] | None = None, **kw: Any):
        if collate is None:
            self.num_rows = len(jax.tree.leaves(rows)[0])
            collate = lambda ids: take_rows(rows, np.asarray(ids))  # noqa: E731
        else:
            self.num_rows = len(rows)
        super().__init__(Examples(self.num_rows), collate, batch_size, **kw)


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

    def state(self, position: int) -> Any:
        return self.source.state(position)

    def resume(self, position: int, state: Any) -> None:
        self.source.resume(position, state)


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
    end = ([tokenizer.eos_id] if tokenizer.eos_id is not None
           else tokenizer.encode("\n", add_special_tokens=False))
    before, after = tokenizer.input_affixes()
    cue = tokenizer.encode(ANSWER_CUE, add_special_tokens=False) + after
    n = len(pairs)
    rows = {"inputs": np.full((n, seq_len), pad, np.int32),
            "targets": np.full((n, seq_len), pad, np.int32),
            "loss_mask": np.zeros((n, seq_len), np.float32)}
    for i, (source, target) in enumerate(pairs):
        answer = (tokenizer.encode(" " + target.strip(), add_special_tokens=False)
                  + end)[:seq_len // 2]
        room = seq_len + 1 - len(answer) - len(cue) - len(before)
        context = (tokenizer.encode(source.rstrip(), add_special_tokens=False)[-room:]
                   if room > 0 else [])
        ids = before + context + cue + answer
        start = len(ids) - len(answer)  # index of the first answer token
        rows["inputs"][i, :len(ids) - 1] = ids[:-1]
        rows["targets"][i, :len(ids) - 1] = ids[1:]
        rows["loss_mask"][i, start - 1:len(ids) - 1] = 1.0
    return rows
