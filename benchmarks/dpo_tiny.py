"""DPO end to end on CPU: the chain base -> chat SFT -> DPO of configs/dpo-tiny.yaml, and the
held-out preference metrics before and after DPO.

    python benchmarks/dpo_tiny.py [--workdir DIR] [--dpo k=v ...]

In DIR (default: the current directory) it runs, as a user would,
  jaxlm train model.num_layers=4 model.d_model=128 model.d_ff=512 model.max_seq_len=128 \
      train.seq_len=128 run.dir=runs/tiny-128   (the base)
  jaxlm train --config sft-tiny     -> runs/sft-tiny  (chat SFT on the chat tasks)
  jaxlm train --config dpo-tiny     -> runs/dpo-tiny  (DPO on data.name=chat-preferences)
each a fresh process (a run directory that already holds a finished run just resumes at its
end, so a rerun only redoes what is missing). Before DPO, the held-out pairs are scored with
the SFT model as both policy and reference (what DPO starts from); after, the DPO run's last
evaluation. Reported: eval_dpo_accuracy (share of pairs whose chosen reward beats the
rejected one: 0 before, as every reward is 0 then), eval_dpo_logp_accuracy (the policy's own
preference: summed log-probability of the chosen reply above the rejected one's),
eval_dpo_reward_margin, eval_dpo_chosen_nll (the chosen replies' NLL per token) and the loss
(DPO + dpo.sft_weight · that NLL); then the same per task, with the exact match of
greedy replies (jaxlm.dialogue.exact_match) of the SFT and the DPO model on those held-out
prompts; wall time and `uptime` load of each command.
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

from sft_tiny import base_shape

COLUMNS = ("eval_dpo_accuracy", "eval_dpo_logp_accuracy", "eval_dpo_reward_margin",
           "eval_dpo_chosen_nll", "eval_loss")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(cmd: list[str], cwd: Path) -> dict[str, object]:
    """Runs a jaxlm command; its wall seconds and the load average when it started."""
    load, t0 = load_average(), time.time()
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "jaxlm", *cmd], cwd=cwd, check=True)
    return {"command": " ".join(["jaxlm", *cmd]), "seconds": round(time.time() - t0, 1),
            "load": load}


def before_dpo(cwd: Path, overrides: list[str]) -> dict[str, float]:
    """Held-out metrics of the DPO run's starting point: the SFT model as the policy and as
    the reference (the state `jaxlm train --config dpo-tiny` begins with)."""
    import jax

    from jaxlm import config as config_lib
    from jaxlm import weights
    from jaxlm.data import setup as data_setup
    from jaxlm.evaluate import heldout_metrics
    from jaxlm.setup import build

    os.chdir(cwd)  # the config's model.init_from is relative to where a user runs it
    cfg = config_lib.load("dpo-tiny", overrides, read_checkpoint=weights.checkpoint_config)
    with tempfile.TemporaryDirectory() as tmp:
        data = data_setup.build(cfg, Path(tmp), progress=False)
    setup = build(cfg)
    with jax.set_mesh(setup.mesh):
        state = weights.fine_tune_state(setup)
        batches = min(cfg.train.eval_batches, data.valid.batches_per_epoch)
        return heldout_metrics(setup.eval_step, setup.eval_inputs(state), data, setup.mesh,
                               batches)


def per_task(cwd: Path, beta: float) -> list[tuple[str, int, float, float, float, float, float]]:
    """Per task of the held-out pairs: (task, pairs, SFT preference, DPO reward accuracy,
    DPO preference, SFT exact match, DPO exact match), shares in 0..1."""
    import jax
    import numpy as np

    import jaxlm
    from jaxlm import dpo
    from jaxlm.data import chat_preferences
    from jaxlm.data.preference import preference_rows, read_preferences
    from jaxlm.dialogue import exact_match

    heldout = chat_preferences.ensure().heldout
    records = [json.loads(line) for line in heldout.read_text().splitlines()]
    pairs = read_preferences([str(heldout)])
    models = {w: jaxlm.load(cwd / "runs" / r) for w, r in (("sft", "sft-tiny"),
                                                          ("dpo", "dpo-tiny"))}
    rows, _ = preference_rows(pairs, models["sft"].tokenizer, models["sft"].config.train.seq_len)
    logps = jax.jit(lambda p, r: dpo.response_logps(models["sft"].model.apply, p, r))
    lp = {(w, side): np.asarray(logps(m.params, getattr(rows, side)))
          for w, m in models.items() for side in ("chosen", "rejected")}
    reward = {side: beta * (lp["dpo", side] - lp["sft", side]) for side in ("chosen", "rejected")}
    chats = [r["prompt"] + [{"role": "assistant", "content": r["chosen"]}] for r in records]
    right = {w: np.array([reply == c[-1]["content"] for reply, c in zip(
        exact_match(m, chats)[1], chats, strict=True)]) for w, m in models.items()}
    out = []
    for task in sorted({r["task"] for r in records}) + ["all"]:
        i = np.array([task in ("all", r["task"]) for r in records])
        out.append((task, int(i.sum()),
                    float(np.mean(lp["sft", "chosen"][i] > lp["sft", "rejected"][i])),
                    float(np.mean(reward["chosen"][i] > reward["rejected"][i])),
                    float(np.mean(lp["dpo", "chosen"][i] > lp["dpo", "rejected"][i])),
                    float(right["sft"][i].mean()), float(right["dpo"][i].mean())))
    return out


def after_dpo(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_dpo_accuracy" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=".", help="where runs/ is (or will be)")
    p.add_argument("--dpo", nargs="*", default=[], help="overrides of the DPO run (k=v)")
    args = p.parse_args()
    cwd = Path(args.workdir).absolute()
    cwd.mkdir(parents=True, exist_ok=True)
    commands = [run(["train", *base_shape(), "model.max_seq_len=128", "train.seq_len=128",
                     "run.dir=runs/tiny-128", "run.quiet=true"], cwd),
                run(["train", "--config", "sft-tiny", "run.quiet=true"], cwd)]
    before = before_dpo(cwd, args.dpo)
    commands.append(run(["train", "--config", "dpo-tiny", "run.quiet=true", *args.dpo], cwd))
    after = after_dpo(cwd / "runs" / "dpo-tiny")
    print("| held-out pairs | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, row in (("before DPO (SFT model = policy = reference)", before),
                      (f"after DPO ({after['step']} steps)", after)):
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    print()
    from jaxlm.train import rundir

    beta = rundir.load_config(cwd / "runs" / "dpo-tiny").dpo.beta
    print("| task | pairs | SFT prefers chosen | DPO reward acc. | DPO prefers chosen | "
          "SFT exact match | DPO exact match |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for task, n, *shares in per_task(cwd, beta):
        print(f"| {task} | {n} | " + " | ".join(f"{100 * x:.1f}%" for x in shares) + " |")
    print()
    print("| command | wall s | load at start (1/5/15 min) |")
    print("|---|---:|---|")
    for c in commands:
        print(f"| `{c['command']}` | {c['seconds']} | {c['load']} |")


if __name__ == "__main__":
    main()
