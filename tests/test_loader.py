"""The grain loader: the batch at a position is a pure function of (seed, position),
whether read ahead by the prefetch threads or on its own; an epoch visits every window
once; a token store span reads like the array it holds."""

import numpy as np

from jaxlm.data import build
from jaxlm.data.paths import Fingerprints, as_path
from jaxlm.data.pipeline import LMBatches
from jaxlm.data.sources import plan_files
from jaxlm.data.tokenizers import ByteTokenizer

L, B = 16, 8


def test_batch_at_a_position_is_pure_with_or_without_prefetch():
    tokens = np.arange(20_000, dtype=np.int32)
    ahead = LMBatches(tokens, L, B, seed=5)
    order = [0, 1, 2, 3, 40, 41, 7, 8, 9, 0]  # sequential, a jump (rollback, resume), back
    got = [ahead.batch(p).inputs for p in order]
    for p, inputs in zip(order, got):
        alone = LMBatches(tokens, L, B, seed=5)  # a fresh process resuming at p
        alone._prefetch = 0
        np.testing.assert_array_equal(alone.batch(p).inputs, inputs)
    other = LMBatches(tokens, L, B, seed=6)
    assert not np.array_equal(other.batch(0).inputs, got[0])
    ahead.close()


def test_an_epoch_visits_every_window_once_at_a_random_offset():
    tokens = np.arange(4_000, dtype=np.int32)
    src = LMBatches(tokens, L, B, seed=1)
    n = (len(tokens) - L) // L
    starts = np.concatenate([src.batch(p).inputs[:, 0] for p in range(n // B)])
    offset = starts.min()
    assert 0 <= offset < L and len(set(starts.tolist())) == len(starts)
    assert set(starts.tolist()) <= set((offset + L * np.arange(n)).tolist())
    b = src.batch(3)
    np.testing.assert_array_equal(b.targets, b.inputs + 1)  # next-token pairs of one window
    valid = LMBatches(tokens, L, B, shuffle=False)
    np.testing.assert_array_equal(valid.batch(1).inputs[:, 0], L * np.arange(B, 2 * B))


def test_a_store_span_reads_like_its_array(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of the corpus\n" for i in range(3000)))
    store = build.ensure(as_path(tmp_path / "s"),
                         {"files": [Fingerprints(None).of(str(text))["sha256"]]},
                         lambda: plan_files([str(text)], 8192), ByteTokenizer(), quiet=True)
    span = store.span(100, store.num_tokens - 50)
    array = np.asarray(span[:])
    for p in (0, 3, 250):
        for k in range(2):  # each process's rows, as two processes would read them
            a = LMBatches(span, L, B, seed=2, process_index=k, process_count=2).batch(p)
            b = LMBatches(array, L, B, seed=2, process_index=k, process_count=2).batch(p)
            np.testing.assert_array_equal(a.inputs, b.inputs)
            assert a.inputs.shape == (B // 2, L) and a.inputs.dtype == np.int32
