"""Chat SFT on synthetic tasks: held-out exact match of a base model and of its SFT.

    python benchmarks/sft_tiny.py [--base runs/tiny] [--sft runs/sft-tiny] [--examples 200]

Runs what the README gives, skipping a run whose directory already holds a finished one:
    jaxlm train model.num_layers=4 model.d_model=128 model.d_ff=512 model.max_seq_len=128 \
        train.seq_len=128 run.dir=BASE   (the default recipe at the base's shape)
    jaxlm train --config sft-tiny model.init_from=BASE run.dir=SFT
then scores greedy replies of both models, through the same chat template, on chat-tasks'
held-out conversations (whose prompts never occur in training): exact match overall and per
task, with each run's wall time and the machine's load (`uptime`) before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import jaxlm
from jaxlm import config as config_lib
from jaxlm.data import chat, chat_tasks
from jaxlm.dialogue import exact_match
from jaxlm.train import rundir


def base_shape() -> list[str]:
    """Overrides that give the base the shape configs/sft-tiny.yaml repeats (init_from
    refuses another): 4 × 128, the default recipe's until 2026-12-04."""
    model = config_lib.load("sft-tiny").model
    return [f"model.num_layers={model.num_layers}", f"model.d_model={model.d_model}",
            f"model.num_heads={model.num_heads}", f"model.d_ff={model.d_ff}"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def train(run: Path, args: list[str]) -> float:
    """Trains unless `run` holds a finished run; the run's wall seconds."""
    summary = run / rundir.SUMMARY_FILE
    if not summary.exists():
        subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", *args, f"run.dir={run}",
                        "run.quiet=true"], check=True)
    return float(json.loads(summary.read_text())["wall_seconds"])


def score(run: Path, rows: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Exact match (0..100) overall and per task of the run's greedy replies."""
    chats = [chat.check_messages(r, "heldout") for r in rows]
    results, replies = exact_match(jaxlm.load(run), chats, max_new_tokens=max_new_tokens)
    out = {"all": results["exact_match"]}
    for task in chat_tasks.TASKS:
        mine = [(r, p) for r, p in zip(rows, replies, strict=True) if r["task"] == task]
        out[task] = 100.0 * sum(p == r["answer"] for r, p in mine) / max(len(mine), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/tiny-128", help="base run directory")
    ap.add_argument("--sft", default="runs/sft-tiny", help="SFT run directory")
    ap.add_argument("--examples", type=int, default=200, help="held-out conversations")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="longest reply")
    ap.add_argument("overrides", nargs="*", help="overrides of the SFT run (key=value)")
    args = ap.parse_args()
    base, sft = Path(args.base), Path(args.sft)
    print(f"load before: {uptime()}", flush=True)
    walls = {"base": train(base, [*base_shape(), "model.max_seq_len=128",
                                   "train.seq_len=128"]),
             "sft": train(sft, ["--config", "sft-tiny", f"model.init_from={base}",
                                *args.overrides])}
    heldout = chat_tasks.ensure().heldout
    rows = [json.loads(x) for x in heldout.read_text().splitlines()][:args.examples]
    print(f"load after training: {uptime()}", flush=True)
    tasks = list(chat_tasks.TASKS)
    print(f"\n{len(rows)} held-out conversations ({heldout})\n")
    print("| model | steps | train wall (s) | exact match | " + " | ".join(tasks) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(tasks))
    for name, run in (("base", base), ("sft", sft)):
        got = score(run, rows, args.max_new_tokens)
        steps = rundir.load_config(run).train.steps
        print(f"| {name} ({run}) | {steps} | {walls[name]:.0f} | "
              f"{got['all']:.1f} | " + " | ".join(f"{got[t]:.1f}" for t in tasks) + " |",
              flush=True)
    print(f"\nload after scoring: {uptime()}")


if __name__ == "__main__":
    main()
