"""The training loop's overhead: `jaxlm train` tokens/s against `jaxlm bench` for the same
config, as a user runs them (one process each), alternating.

    python benchmarks/loop_overhead.py [--config tiny] [--w] [--rounds 3] [--steps 100]
        [--prefetch 2 0] [key=value ...]

`--w` adds workload W's overrides (benchmarks/workload_w.py). `jaxlm bench` times three
rounds of asynchronously dispatched steps on random tokens (the median round); `jaxlm train`
runs the real loop on the config's data with evaluation only at the end and no checkpoint
before it, and its tokens/s
is that of its metrics rows after the first (which holds the compile): total tokens over
total time of those log intervals. One `train` per value of `--prefetch` (train.prefetch).
The order of the commands rotates from round to round; the load average is recorded before
each command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from workload_w import OVERRIDES as W_OVERRIDES
from workload_w import load_average

ENV = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def bench_tps(config: str, overrides: list[str], steps: int) -> float:
    out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "bench", "--config", config,
                          "--steps", str(steps), "--json", *overrides],
                         env=ENV, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out[out.index("{"):])["tokens_per_sec"])


def train_tps(config: str, overrides: list[str], steps: int, log_every: int,
              prefetch: int) -> float:
    """Tokens/s of a `jaxlm train` run's log intervals after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", "--config", config,
                        *overrides, f"run.dir={tmp}/run", f"train.steps={steps}",
                        f"train.log_every={log_every}", "train.eval_every=0",
                        "train.eval_batches=1", f"checkpoint.every={steps}",
                        f"train.prefetch={prefetch}", "run.quiet=true"],
                       env=ENV, capture_output=True, text=True, check=True)
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").open()]
    rows = [r for r in rows if "tokens_per_sec" in r]
    steps_of = [b["step"] - a["step"] for a, b in zip(rows, rows[1:])]
    seconds_per_token = sum(n / r["tokens_per_sec"] for n, r in zip(steps_of, rows[1:]))
    return sum(steps_of) / seconds_per_token  # the tokens per step cancel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--w", action="store_true", help="workload W's overrides")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="train steps (bench: a fifth)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--prefetch", type=int, nargs="+", default=[2, 0])
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    overrides = [*(W_OVERRIDES if args.w else []), *args.overrides]
    runs = {"bench": lambda: bench_tps(args.config, overrides, max(args.steps // 5, 5))}
    for k in args.prefetch:
        runs[f"train prefetch={k}"] = (lambda k=k: train_tps(
            args.config, overrides, args.steps, args.log_every, k))
    names, tps, loads = list(runs), {k: [] for k in runs}, {k: [] for k in runs}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            loads[name].append(load_average())
            tps[name].append(runs[name]())
        print(f"round {r + 1}: " + "   ".join(
            f"{k} {v[-1]:,.0f} (load {loads[k][-1]:.1f})" for k, v in tps.items()), flush=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    print(f"\n{args.config}{' + W' if args.w else ''}, {args.rounds} rounds, load "
          f"{min(min(v) for v in loads.values()):.1f}-{max(max(v) for v in loads.values()):.1f}")
    print("| command | tokens/s (median) | ×bench | rounds |")
    print("|---|---:|---:|---|")
    for k, v in tps.items():
        print(f"| {k} | {med[k]:,.0f} | {med[k] / med['bench']:.3f} | "
              f"{' '.join(f'{x:,.0f}' for x in v)} |")


if __name__ == "__main__":
    main()
