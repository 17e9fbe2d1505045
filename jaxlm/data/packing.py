"""Documents packed into rows on demand, for corpora of any size: row r holds next-token
pairs [r * seq_len, (r + 1) * seq_len) of all documents' pairs in order, exactly as
`pipeline.pack_documents` packs them, read from a token store span by random access."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxlm.data.batch import LMBatch
from jaxlm.data.errors import DataError


class PackedRows:
    """Packed rows of the documents [starts[i], stops[i]) of `tokens` (an array or a span).
    A document of n tokens gives n - 1 pairs; its segment id is 1 + its index; positions
    restart at each document and at each row; only the last row is padded."""

    def __init__(self, tokens: Any, starts: np.ndarray, stops: np.ndarray, seq_len: int):
        pairs = np.maximum(stops - starts - 1, 0)
        kept = np.nonzero(pairs > 0)[0]
        if not len(kept):
            raise DataError("no document has two tokens to pack")
        self.tokens, self.seq_len = tokens, seq_len
        self.segment = kept + 1
        self.first = starts[kept]
        self.cum = np.concatenate([[0], np.cumsum(pairs[kept])])  # pairs before each doc
        self.num_pairs = int(self.cum[-1])

    def __len__(self) -> int:
        return -(-self.num_pairs // self.seq_len)

    def row(self, r: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        out = {k: np.zeros(L, np.int32) for k in ("inputs", "targets", "segment_ids",
                                                  "positions")}
        a, b = r * L, min((r + 1) * L, self.num_pairs)
        d = int(np.searchsorted(self.cum, a, side="right")) - 1
        while d < len(self.first) and self.cum[d] < b:
            u, v = max(a, self.cum[d]) - self.cum[d], min(b, self.cum[d + 1]) - self.cum[d]
            ids = np.asarray(self.tokens[self.first[d] + u:self.first[d] + v + 1], np.int32)
            at = slice(int(self.cum[d] + u - a), int(self.cum[d] + v - a))
            out["inputs"][at], out["targets"][at] = ids[:-1], ids[1:]
            out["segment_ids"][at] = self.segment[d]
            out["positions"][at] = np.arange(v - u)
            d += 1
        out["positions"][b - a:] = np.arange(L - (b - a))  # padding: a segment 0 of its own
        return out

    def collate(self, ids: Sequence[int]) -> LMBatch:
        rows = [self.row(int(r)) for r in ids]
        stacked = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
        return LMBatch(loss_mask=(stacked["segment_ids"] > 0).astype(np.float32), **stacked)
