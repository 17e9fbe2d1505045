"""Batches through grain: random access into examples (windows of a token store, packed
rows, in-memory rows), shuffled by (seed, epoch), batched, each process taking its rows of
the global batch, prefetched by background threads.

The batch at position p is a pure function of (seed, p): grain's index shuffle gives example
`p * batch_size + r` of the repeated, shuffled stream without materialising a permutation, so
a resumed run (on any number of processes) replays exactly the batches it would have seen,
and memory does not grow with the corpus. The position is the grain iterator's state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data.batch import Batch, LMBatch
from jaxlm.data.errors import DataError

PREFETCH_THREADS = 2
PREFETCH_BATCHES = 4


class Examples(grain.MapDataset):
    """Example ids of one epoch of `n` examples; index i of the repeated stream is example
    i mod n of epoch i // n, mapped to an id by `at(epoch, j)` (default: j)."""

    def __init__(self, n: int, at: Callable[[int, int], int] | None = None):
        super().__init__()
        self.n, self.at = n, at

    def __len__(self) -> int:
        return self.n

    def __str__(self) -> str:
        return f"Examples(n={self.n})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(int(index), self.n)
        return j if self.at is None else self.at(epoch, j)


def window_starts(num_tokens: int, seq_len: int, seed: int, shuffle: bool) -> Examples:
    """Starts of fixed windows of seq_len + 1 tokens (a step of seq_len), shifted in each
    epoch by a random offset < seq_len when shuffling (so windows see new boundaries)."""
    n = (num_tokens - seq_len if shuffle else num_tokens - 1) // seq_len
    if n < 1:
        raise DataError(f"the corpus has {num_tokens} tokens, fewer than one sequence of "
                        f"train.seq_len={seq_len}+1")
    offsets: dict[int, int] = {}

    def at(epoch: int, j: int) -> int:
        if epoch not in offsets:
            offsets[epoch] = (int(np.random.default_rng([seed, epoch, 1]).integers(seq_len))
                              if shuffle else 0)
        return offsets[epoch] + j * seq_len

    return Examples(n, at)


def read_windows(tokens: Any, seq_len: int) -> Callable[[Sequence[int]], LMBatch]:
    """Collates window starts into an LMBatch (`tokens`: an array or a store span)."""

    def collate(starts: Sequence[int]) -> LMBatch:
        windows = np.stack([np.asarray(tokens[s:s + seq_len + 1], np.int32) for s in starts])
        return LMBatch(inputs=windows[:, :-1], targets=windows[:, 1:],
                       loss_mask=np.ones((len(starts), seq_len), np.float32))

    return collate


class GrainBatches:
    """This process's rows of the global batch at a position: examples (shuffled by
    (seed, epoch) when `shuffle`), repeated, batched `batch_size // process_count` at a
    time, global batch p being local batches p * process_count + process_index."""

    def __init__(self, examples: grain.MapDataset, collate: Callable[[Sequence[int]], Batch],
                 batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1,
                 prefetch: int = PREFETCH_BATCHES):
        if batch_size % process_count:
            raise DataError(f"train.batch_size={batch_size} is not divisible by the "
                            f"{process_count} processes")
        self.num_examples, self.batch_size, self.shuffle = len(examples), batch_size, shuffle
        ds = examples.shuffle(seed % 2**32) if shuffle else examples
        per = batch_size // process_count
        self.dataset = ds.repeat().batch(per, batch_fn=collate)[process_index::process_count]
        self._prefetch = prefetch
        self._iter: Any = None
        self._next = -1

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_examples // self.batch_size)

    def batch(self, position: int) -> Batch:
        """The batch at `position`; the next positions are read ahead in the background."""
        if not self._prefetch:
            return self.dataset[position]
        if self._iter is None:
            options = grain.ReadOptions(num_threads=PREFETCH_THREADS,
                                        prefetch_buffer_size=self._prefetch)
            self._iter = iter(self.dataset.to_iter_dataset(options))
        if position != self._next:
            self._iter.set_state({"next_index": position})
        self._next = position + 1
        return next(self._iter)

    def state(self, position: int) -> None:
        """Nothing besides the position: the batch at it is a pure function of it."""
        return None

    def resume(self, position: int, state: Any) -> None:
        """Nothing to restore (see `state`)."""

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()
            self._iter = None
