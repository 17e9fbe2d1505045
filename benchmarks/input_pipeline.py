"""Input pipeline throughput: is the input ever the bottleneck?

1. Tokens/s that one process's grain loader delivers from a token store: batch 8 x 1,024,
   random windows (grain's index shuffle), prefetch threads; the store of a generated
   plain-text corpus (--corpus-gb, written to a temporary folder and deleted after).
2. The store builder's tokenization rate (MB/s) with --workers worker processes, against
   HF tokenizers' own `encode_batch` on the same text with as many threads: a BPE of 8,192
   ids trained here, on --bpe-mb of the generated text; and the byte tokenizer's build of
   the whole corpus.

    python benchmarks/input_pipeline.py [--corpus-gb 0.2] [--bpe-mb 16] [--workers 2]

Prints a markdown table with the load average at the time (figures on a busy machine are
labelled as such).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from data_scale import generate  # the same generated text as benchmarks/data_scale.py

from jaxlm.data.pieces import PIECE_BYTES

BATCH, SEQ_LEN = 8, 1024


def build_store(files: list[str], root: Path, tokenizer, workers: int,
                piece_bytes: int = PIECE_BYTES):
    """(store, seconds) of tokenizing `files` (in pieces of `piece_bytes`) into a new store
    under `root`."""
    from etils import epath

    from jaxlm.data import build
    from jaxlm.data.paths import Fingerprints
    from jaxlm.data.sources import plan_files

    identity = {"files": [Fingerprints(None).of(f)["sha256"] for f in files]}
    t0 = time.perf_counter()
    store = build.ensure(epath.Path(root), identity, lambda: plan_files(files, piece_bytes),
                         tokenizer, workers=workers, quiet=True)
    return store, time.perf_counter() - t0


def loader_rate(store, seconds: float) -> float:
    """Tokens/s of batches (BATCH x SEQ_LEN) read through grain from the whole store."""
    from jaxlm.data.pipeline import LMBatches

    src = LMBatches(store.span(), SEQ_LEN, BATCH, seed=0)
    src.batch(0)  # starts the prefetch threads
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += 1
        src.batch(n)
    rate = n * BATCH * SEQ_LEN / (time.perf_counter() - t0)
    src.close()
    return rate


def bpe_rates(corpus: Path, root: Path, mb: int, workers: int) -> dict[str, float]:
    """MB/s of a BPE through HF tokenizers' encode_batch (the faster of 1 MB pieces and
    lines) and through the store builder, on the first `mb` MB of the corpus."""
    from jaxlm.data.sources import chunks
    from jaxlm.data.tokenizers import train_bpe

    text = (corpus / "part0.txt").read_bytes()[: mb << 20].decode(errors="ignore")
    text = text[: text.rfind("\n") + 1]
    sample = root / "bpe" / "sample.txt"
    sample.parent.mkdir(parents=True)
    sample.write_text(text)
    tok = train_bpe([text[: 4 << 20]], 8192)
    size = len(text.encode()) / 1e6
    direct = 0.0
    for parts in (chunks(text), text.splitlines(keepends=True)):
        t0 = time.perf_counter()
        tok.tokenizer.encode_batch_fast(parts, add_special_tokens=False)
        direct = max(direct, size / (time.perf_counter() - t0))
    # Pieces of 2 MB, so that every worker has some of the sample.
    _, seconds = build_store([str(sample)], root / "bpe-store", tok, workers, 2 << 20)
    return {"mb": size, "encode_batch": direct, "store": size / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-gb", type=float, default=0.2)
    ap.add_argument("--bpe-mb", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="loader measuring time")
    args = ap.parse_args()
    # encode_batch's thread pool as big as the builder's worker count (set before import).
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxlm.data.tokenizers import ByteTokenizer

    root = Path(tempfile.mkdtemp(prefix="jaxlm-input-pipeline-"))
    try:
        corpus = root / "corpus"
        generate(corpus, int(args.corpus_gb * 1e9))
        files = sorted(str(p) for p in corpus.iterdir())
        gb = sum(os.path.getsize(f) for f in files) / 1e9
        store, build_s = build_store(files, root / "stores", ByteTokenizer(), args.workers)
        print(f"byte store: {store.num_tokens:,} tokens in {build_s:.1f} s", file=sys.stderr)
        loader = loader_rate(store, args.seconds)
        bpe = bpe_rates(corpus, root, args.bpe_mb, args.workers)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the generated corpus is never kept
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}"
          + (" (measured under load)" if load[0] > 1.0 else ""))
    print("| measurement | rate |\n|---|---:|")
    print(f"| loader, batch {BATCH} x {SEQ_LEN}, one process, {gb:.2f} GB store | "
          f"{loader / 1e6:.1f} M tokens/s |")
    print(f"| byte store build, {args.workers} workers, {gb:.2f} GB | "
          f"{gb * 1e3 / build_s:.0f} MB/s |")
    print(f"| BPE 8,192: HF encode_batch, {args.workers} threads, {bpe['mb']:.0f} MB | "
          f"{bpe['encode_batch']:.2f} MB/s |")
    print(f"| BPE 8,192: store builder, {args.workers} workers | {bpe['store']:.2f} MB/s "
          f"({bpe['store'] / bpe['encode_batch']:.0%} of encode_batch) |")


if __name__ == "__main__":
    main()
