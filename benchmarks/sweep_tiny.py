"""A sweep of the default recipe (`configs/tiny.yaml`: a GPT-2-shaped byte-level model trained
from scratch on Shakespeare, two plays held out) under a time budget per run.

    python benchmarks/sweep_tiny.py [--budget 290 | --steps N] [--axes lr warmup ...]
                                    [--limit N] [--out sweep.jsonl] [--workdir DIR]
                                    [--base k=v ...]

Each run is `jaxlm train --config tiny` in a fresh process with `train.time_budget=BUDGET`
(its steps are planned from the measured step time, its schedule decayed over them) and the
run's overrides. Axes are swept one after the other, greedily: each axis's values are tried
on the best recipe found so far, and its winner is kept for the next axis. Reported per run:
the planned steps, the process's wall time (start-up and compiling included), the held-out
loss of its last evaluation (nats per byte), tokens/s and the load average at its start.
Rows go to `--out` as they finish (JSON lines); a rerun with the same `--out` skips the runs
it already holds, so an interrupted sweep resumes. The table is printed at the end.
Run it on a machine with nothing else running: the budget makes the result depend on speed.
With `--steps N` every run trains exactly N steps instead (no budget): its loss then does not
depend on the machine or its load, so runs may share the machine; compare shapes of different
speed at the step counts that take the same time (`jaxlm bench` gives the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _context(batch: int, seq: int) -> tuple[str, list[str]]:
    return f"batch {batch} × {seq}", [f"train.batch_size={batch}", f"train.seq_len={seq}",
                                      f"model.max_seq_len={seq}"]


def _shape(layers: int, width: int, heads: int) -> tuple[str, list[str]]:
    return f"{layers} × {width}", [f"model.num_layers={layers}", f"model.d_model={width}",
                                   f"model.num_heads={heads}", f"model.d_ff={4 * width}"]


# The axes in the order they are swept; each value is (label, overrides).
AXES: dict[str, list[tuple[str, list[str]]]] = {
    "context": [_context(8, 64), _context(16, 64), _context(4, 64), _context(8, 128),
                _context(16, 128), _context(32, 128), _context(16, 32)],
    "lr": [(f"lr {lr:g}", [f"optim.lr={lr:g}"]) for lr in (1e-3, 2e-3, 3e-3, 5e-3, 8e-3)],
    "warmup": [(f"warmup {w}", [f"optim.warmup_steps={w}"]) for w in (0, 50, 100, 300, 1000)],
    "schedule": [(f"cosine to {r:g}·lr", [f"optim.min_lr_ratio={r:g}"])
                 for r in (0.0, 0.1, 0.3)],
    "shape": [_shape(2, 96, 4), _shape(3, 96, 4), _shape(4, 96, 4), _shape(4, 128, 4),
              _shape(3, 128, 4), _shape(4, 64, 4), _shape(6, 128, 4), _shape(2, 192, 6),
              _shape(4, 192, 6), _shape(6, 96, 4), _shape(8, 96, 4)],
    "weight_decay": [(f"weight decay {wd:g}", [f"optim.weight_decay={wd:g}"])
                     for wd in (0.0, 0.1, 0.3)],
    "b2": [(f"b2 {b:g}", [f"optim.b2={b:g}"]) for b in (0.95, 0.99)],
}
# Where the greedy sweep starts: the faster recipe (more, smaller steps).
BASE = [*_context(8, 64)[1], "optim.lr=2e-3", "optim.warmup_steps=100"]
# Kept in every run: what the shipped default does besides training (evaluations, saves).
FIXED = ["train.eval_every=1000", "train.eval_batches=16", "checkpoint.every=1000"]


def merge(base: list[str], overrides: list[str]) -> list[str]:
    """`base` with each key that `overrides` sets replaced (the last value of a key wins)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [b for b in base if b.split("=", 1)[0] not in keys] + list(overrides)


def run_one(overrides: list[str], budget: float, workdir: Path, name: str,
            steps: int = 0) -> dict:
    """One `jaxlm train` in its own process; the result row (or its error). `steps` > 0
    trains exactly that many steps instead of planning them from `budget`."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    length = ([f"train.steps={steps}", "train.time_budget=0"] if steps
              else ["train.steps=1000000", f"train.time_budget={budget:g}"])
    cmd = [sys.executable, "-m", "jaxlm", "train", "--config", "tiny", f"run.dir={run_dir}",
           *FIXED, *length, *overrides]
    load = os.getloadavg()[0]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    run_dir.with_suffix(".log").write_text(out.stdout + out.stderr)
    row = {"name": name, "overrides": overrides, "budget": 0 if steps else budget,
           "wall": round(wall, 1),
           "load": round(load, 2), "run_dir": str(run_dir), "code": out.returncode}
    if out.returncode != 0:
        return {**row, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**row, "steps": summary["steps"], "eval_loss": summary["eval_loss"],
            "tokens_per_sec": round(summary["tokens_per_sec"]), "sample": summary.get("sample")}


def sweep(args: argparse.Namespace, done: dict[str, dict], out: Path) -> list[dict]:
    """Greedy, axis by axis, from BASE (+ --base); at most `args.limit` runs."""
    best, rows = merge(BASE, args.base), []
    for axis in args.axes:
        tried = []
        for label, overrides in AXES[axis]:
            if args.limit and len(rows) >= args.limit:
                return rows
            recipe = merge(best, overrides)
            key = " ".join(recipe) + (f" steps={args.steps}" if args.steps else "")
            row = done.get(key)
            if row is None or "error" in row:  # failed runs are tried again
                row = done[key] = run_one(recipe, args.budget, args.workdir, label, args.steps)
                with out.open("a") as f:
                    f.write(json.dumps({"key": key, **row}) + "\n")
            print(f"{axis:12s} {label:22s} {_result(row)}", file=sys.stderr, flush=True)
            rows.append({**row, "axis": axis})
            tried.append((row.get("eval_loss", float("inf")), recipe))
        best = min(tried, key=lambda t: t[0])[1]
    print("best recipe: " + " ".join(best), file=sys.stderr)
    return rows


def _result(row: dict) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    return (f"loss {row['eval_loss']:.4f}  steps {row['steps']}  wall {row['wall']:.0f} s  "
            f"load {row['load']:.1f}")


def table(rows: list[dict]) -> str:
    lines = ["| axis | run | steps | wall (s) | held-out loss | tokens/s | load |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['axis']} | {r['name']} | - | {r['wall']:.0f} | failed: "
                         f"{r['error'][:60]} | - | {r['load']:.1f} |")
            continue
        lines.append(f"| {r['axis']} | {r['name']} | {r['steps']} | {r['wall']:.0f} | "
                     f"{r['eval_loss']:.4f} | {r['tokens_per_sec']:,} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--budget", type=float, default=290.0,
                        help="train.time_budget per run (s)")
    length.add_argument("--steps", type=int, default=0,
                        help="train exactly this many steps per run instead of a budget")
    ap.add_argument("--axes", nargs="+", choices=list(AXES), default=list(AXES),
                    help="axes to sweep, in this order")
    ap.add_argument("--limit", type=int, default=0, help="stop after N runs (0 = all)")
    ap.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides on top of the starting recipe")
    ap.add_argument("--out", type=Path, default=Path("sweep_tiny.jsonl"),
                    help="results, one JSON line per run; reruns skip what it holds")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the run directories go (default: a new temporary folder)")
    args = ap.parse_args()
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jaxlm-sweep-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            done[row.pop("key")] = row
    print(table(sweep(args, done, args.out)))


if __name__ == "__main__":
    main()
