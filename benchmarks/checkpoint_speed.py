"""Checkpoint save (blocking part and total) and restore time for a ~124M-parameter GPT-2
train state (params + AdamW moments, ~1.5 GB) on this machine. Prints a markdown table.

    python benchmarks/checkpoint_speed.py [--dir /tmp/ckpt_bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm import config as config_lib
from jaxlm import setup
from jaxlm.checkpoint import Checkpointer
from jaxlm.train.state import count_params

GPT2_124M = ["model.preset=gpt2", "model.num_layers=12", "model.d_model=768",
             "model.num_heads=12", "model.d_ff=3072", "model.vocab_size=50257",
             "model.max_seq_len=1024", "train.seq_len=128", "model.scan_layers=true",
             "mesh.data=1", "train.steps=10", "seed=0"]


def save_restore_seconds(overrides: list[str], root: Path, repeats: int) -> dict[str, Any]:
    """Median seconds of an asynchronous save (blocking part, total until committed) and of
    a restore of the train state of `overrides` on one device, with its size."""
    cfg = config_lib.load(None, overrides)
    s = setup.build(cfg, devices=jax.devices()[:1])
    shutil.rmtree(root, ignore_errors=True)
    with jax.set_mesh(s.mesh):
        state = s.init_state()
        jax.block_until_ready(state)
        blocking, total, restore = [], [], []
        for r in range(repeats):
            ckpt = Checkpointer(root, keep=1, async_save=True)
            t0 = time.perf_counter()
            ckpt.save(r, state, {"position": r}, force=True)
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            blocking.append(t1 - t0)
            total.append(t2 - t0)
            t3 = time.perf_counter()
            _, restored, _ = ckpt.restore(s.abstract_state)
            jax.block_until_ready(restored)
            restore.append(time.perf_counter() - t3)
            ckpt.close()
            del restored
    shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    return {"params": count_params(state.params),
            "bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
            "save_blocking_s": med(blocking), "save_total_s": med(total),
            "restore_s": med(restore), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/jaxlm_ckpt_bench")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    r = save_restore_seconds(GPT2_124M, Path(args.dir), args.repeats)
    print(f"| state | {r['params'] / 1e6:.0f}M params, {r['bytes'] / 1e9:.2f} GB "
          f"(params + AdamW) |")
    print("|---|---|")
    print(f"| save, blocking part (median of {args.repeats}) | {r['save_blocking_s']:.2f} s |")
    print(f"| save, total until committed | {r['save_total_s']:.2f} s |")
    print(f"| restore | {r['restore_s']:.2f} s |")
    print(f"| machine | {platform.machine()}, {jax.device_count()} CPU device(s), "
          f"jax {jax.__version__}, orbax {ocp.__version__} |")


if __name__ == "__main__":
    main()
