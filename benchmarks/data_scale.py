"""Data at scale: a generated plain-text corpus (six files; never kept) trained on with
`jaxlm train data.files=DIR`. The first run builds the token store; a second run with a new
run directory reuses it: its time to the first step and the peak resident memory of both
runs' training processes are measured (psutil, every 50 ms); then, in this process, the
seconds from a config to the first batch with the store present, and the loader's tokens/s
from the store (batch 8 x 1,024, one process); last, BPE tokenization MB/s of the store
builder against HF tokenizers' own encode_batch. Prints a markdown table.

    python benchmarks/data_scale.py --gb 0.2 --gb 1 [--dir /tmp/jaxlm_data_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

FILES = 6
MODEL = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=256",
         "model.max_seq_len=128", "train.seq_len=128", "train.batch_size=8", "train.steps=5",
         "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
         "checkpoint.every=1000", "run.quiet=true"]


def generate(folder: Path, total_bytes: int) -> None:
    """Six files of lines of pseudo-words; each 8 MB block starts with its own header, so
    no two blocks are the same text."""
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    words = ["".join(map(chr, rng.choice(letters, rng.integers(2, 9)))) for _ in range(5000)]
    lines = [" ".join(rng.choice(words, rng.integers(4, 16))) for _ in range(150_000)]
    block = ("\n".join(lines) + "\n").encode()[: 8 << 20]
    folder.mkdir(parents=True, exist_ok=True)
    per_file = total_bytes // FILES
    for f in range(FILES):
        with open(folder / f"part{f}.txt", "wb") as out:
            written, i = 0, 0
            while written < per_file:
                header = f"Block {i} of part {f}.\n".encode()
                out.write(header + block)
                written += len(header) + len(block)
                i += 1


def run_train(run_dir: Path, corpus: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds to the first logged step and peak RSS (MB) of a `jaxlm train` process."""
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", f"run.dir={run_dir}",
           f"data.files={corpus}", *MODEL]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    ps, peak, first = psutil.Process(proc.pid), 0, None
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        if first is None and metrics.exists() and '"step": 1' in metrics.read_text():
            first = time.perf_counter() - t0
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"train failed:\n{err}")
    return {"first_step_s": first or float("nan"), "total_s": time.perf_counter() - t0,
            "peak_rss_mb": peak / 2**20}


def manifests(cache: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in (cache / "stores").glob("*/manifest.json")}


def data_ready_s(corpus: Path, run_dir: Path) -> float:
    """Seconds from a config to the batch sources of a run (the store exists)."""
    from jaxlm.config import load
    from jaxlm.data import setup as data_setup

    cfg = load(None, [f"data.files={corpus}", *MODEL])
    t0 = time.perf_counter()
    data = data_setup.build(cfg, run_dir, progress=False)
    data.train.batch(0)
    return time.perf_counter() - t0


def loader_rate(cache: Path, seconds: float = 5.0) -> float:
    """Tokens/s the grain loader delivers from the biggest store (batch 8 x 1,024)."""
    from etils import epath

    from jaxlm.data.pipeline import LMBatches
    from jaxlm.data.store import TokenStore

    stores = [TokenStore.open(epath.Path(p.parent))
              for p in (cache / "stores").glob("*/manifest.json")]
    store = max(stores, key=lambda s: s.num_tokens)
    src = LMBatches(store.span(), 1024, 8, seed=0)
    src.batch(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += 1
        src.batch(n)
    rate = n * 8 * 1024 / (time.perf_counter() - t0)
    src.close()
    return rate


def tokenizer_rates(root: Path, mb: int = 16) -> dict[str, float]:
    """MB/s of a BPE (8,192 ids, trained here) through HF tokenizers' own encode_batch on
    all cores (of 1 MB pieces or of lines, the faster), and through the store builder (one
    worker process per core, 2 MB pieces)."""
    from etils import epath

    from jaxlm.data import build
    from jaxlm.data.paths import Fingerprints
    from jaxlm.data.sources import chunks, plan_files
    from jaxlm.data.tokenizers import train_bpe

    generate(root / "bpe", mb << 20)
    files = sorted(str(p) for p in (root / "bpe").iterdir())
    text = "".join(Path(f).read_text() for f in files)
    tok = train_bpe([text[: 4 << 20]], 8192)
    direct = 0.0
    for parts in (chunks(text), text.splitlines(keepends=True)):  # the faster of the two
        t0 = time.perf_counter()
        tok.tokenizer.encode_batch_fast(parts, add_special_tokens=False)
        direct = max(direct, len(text.encode()) / 1e6 / (time.perf_counter() - t0))
    fp = Fingerprints(None)
    t0 = time.perf_counter()
    build.ensure(epath.Path(root / "bpe-store"), {"files": [fp.of(f)["sha256"] for f in files]},
                 lambda: plan_files(files, 2 << 20), tok, quiet=True)
    store = len(text.encode()) / 1e6 / (time.perf_counter() - t0)
    return {"encode_batch": direct, "store": store}


def measure(gb: float, root: Path) -> dict[str, float]:
    shutil.rmtree(root, ignore_errors=True)
    corpus, cache = root / "corpus", root / "cache"
    generate(corpus, int(gb * 1e9))
    env = {**os.environ, "JAXLM_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    first = run_train(root / "run1", corpus, env)
    built = manifests(cache)
    assert len(built) == 1, built
    build_s = json.loads(Path(next(iter(built))).read_text())["seconds"]
    second = run_train(root / "run2", corpus, env)
    assert manifests(cache) == built  # the second run built nothing
    os.environ["JAXLM_CACHE"] = str(cache)
    return {"gb": gb, "build_s": build_s, "build_mb_s": gb * 1e3 / build_s,
            "run1_first_step": first["first_step_s"], "run1_rss": first["peak_rss_mb"],
            "run2_first_step": second["first_step_s"], "run2_rss": second["peak_rss_mb"],
            "data_ready": data_ready_s(corpus, root / "run3"), "loader": loader_rate(cache)}


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, action="append", help="corpus sizes (default 0.2)")
    ap.add_argument("--dir", default="/tmp/jaxlm_data_scale")
    args = ap.parse_args()
    root = Path(args.dir)
    rows = []
    try:
        for gb in args.gb or [0.2]:
            rows.append(measure(gb, root))
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the generated corpus is never kept
    try:
        rates = tokenizer_rates(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()
    print(f"measured under load (load average {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}) "
          f"on {os.cpu_count()} cores")
    print("| corpus | store build (MB/s) | run 1: first step, peak RSS | run 2: first step, "
          "peak RSS | data ready | loader tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gb']:g} GB | {r['build_s']:.0f} s ({r['build_mb_s']:.0f}) | "
              f"{r['run1_first_step']:.0f} s, {r['run1_rss']:,.0f} MB | "
              f"{r['run2_first_step']:.1f} s, {r['run2_rss']:,.0f} MB | "
              f"{r['data_ready']:.2f} s | {r['loader'] / 1e6:.1f} M |")
    print(f"\nBPE (8,192 ids): HF encode_batch {rates['encode_batch']:.2f} MB/s on all cores; "
          f"store builder {rates['store']:.2f} MB/s "
          f"({rates['store'] / rates['encode_batch']:.0%} of it)")


if __name__ == "__main__":
    main()
