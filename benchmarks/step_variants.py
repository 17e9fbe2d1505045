"""Variants of jaxlm's train step on workload W, A/B in one process: each round times every
variant once (the order reversed every other round), so all see the same machine load.

    python benchmarks/step_variants.py [--rounds 6 --steps 4] [--variants default chunk64 ...]

Variants: `default` (the step as configured), `chunkN` (train.loss_chunk=N: the chunked
cross entropy), `noguard` (the step without its non-finite guard, to measure what the guard
costs), `xla-transpose` (projections differentiated by XLA's own transpose rule instead of
the CPU's written-out backward pass, jaxlm.models.matmul), `set:key=value,...` (any other
overrides). Each step is waited for and timed.
Reported per variant: tokens/s of the median and of the fastest step (under load the fastest
shows the step's own speed best), median process CPU seconds per step, each against the
first variant, and XLA's peak memory of the compiled step. The load average is printed
before each round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np
from workload_w import OVERRIDES, load_average

from jaxlm import config as config_lib
from jaxlm import perf, sharding
from jaxlm.models import matmul
from jaxlm.setup import StepSetup, build
from jaxlm.train.step import jit_train_step, make_train_step


def variant_setup(name: str) -> StepSetup:
    """The wired step of W for a variant name."""
    extra: list[str] = []
    if name.startswith("chunk"):
        extra = [f"train.loss_chunk={int(name[5:])}"]
    elif name.startswith("set:"):
        extra = name[4:].split(",")
    elif name not in ("default", "noguard", "xla-transpose"):
        raise SystemExit(f"unknown variant {name}")
    setup = build(config_lib.load("tiny", OVERRIDES + extra))
    if name == "noguard":
        step = make_train_step(setup.model, setup.tx, setup.schedule, loss_fn=setup.loss_fn,
                               grad_accum_steps=setup.cfg.optim.grad_accum_steps, guard=False)
        setup = dataclasses.replace(setup, train_step=jit_train_step(
            step, setup.state_shardings, setup.mesh, setup.rules))
    return setup


class Runner:
    """One variant: its state, device batches and compiled step."""

    def __init__(self, name: str, batches: list) -> None:
        self.name, self.setup = name, variant_setup(name)
        self.state = self.setup.init_state()
        backends = matmul.WRITTEN_OUT_BACKENDS
        if name == "xla-transpose":
            matmul.WRITTEN_OUT_BACKENDS = ()  # read when the step is traced, just below
        try:
            with jax.set_mesh(self.setup.mesh):
                self.batches = [sharding.host_batch_to_global(b, self.setup.mesh)
                                for b in batches]
                self.step = self.setup.train_step.lower(self.state, self.batches[0]).compile()
        finally:
            matmul.WRITTEN_OUT_BACKENDS = backends
        self.peak_bytes = perf.peak_memory(self.step)["peak_bytes"]

    def round(self, steps: int) -> tuple[list[float], float]:
        """(wall seconds of each step, process CPU seconds of all) for `steps` steps, each
        waited for: under load, the fastest step shows the step's own speed best."""
        state, walls = self.state, []
        with jax.set_mesh(self.setup.mesh):
            c0 = time.process_time()
            for i in range(steps):
                w0 = time.perf_counter()
                state, metrics = self.step(state, self.batches[i % len(self.batches)])
                jax.block_until_ready((state, metrics))
                walls.append(time.perf_counter() - w0)
            cpu = time.process_time() - c0
        self.state = state  # the old one was donated
        return walls, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["default", "chunk64", "noguard"])
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args()
    first = build(config_lib.load("tiny", OVERRIDES))
    rng = np.random.default_rng(0)
    host = [first.synthetic_batch(rng) for _ in range(4)]
    runners = [Runner(v, host) for v in args.variants]
    for r in runners:
        r.round(args.warmup)
    tokens = first.cfg.train.batch_size * first.cfg.train.seq_len
    rows: dict[str, dict[str, list[float]]] = {v: {"step": [], "cpu": []}
                                               for v in args.variants}
    loads = []
    for k in range(args.rounds):
        loads.append(load_average())
        for r in (runners if k % 2 == 0 else runners[::-1]):
            walls, cpu = r.round(args.steps)
            rows[r.name]["step"] += walls
            rows[r.name]["cpu"].append(cpu / args.steps)
        print(f"round {k + 1} (load {loads[-1]:.1f}): " + "  ".join(
            f"{v} {tokens * args.steps / sum(rows[v]['step'][-args.steps:]):,.0f}"
            for v in args.variants), flush=True)
    med = {v: {"tps": tokens / statistics.median(d["step"]), "best": tokens / min(d["step"]),
               "cpu": statistics.median(d["cpu"])} for v, d in rows.items()}
    base = med[args.variants[0]]
    print(f"\nW, {args.rounds} alternating rounds of {args.steps} steps, load "
          f"{min(loads):.1f}-{max(loads):.1f}\n")
    print("| variant | tokens/s (median step) | ×first | best step | ×first | CPU s/step | "
          "×first | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runners:
        m = med[r.name]
        print(f"| {r.name} | {m['tps']:,.0f} | {m['tps'] / base['tps']:.3f} | "
              f"{m['best']:,.0f} | {m['best'] / base['best']:.3f} | {m['cpu']:.2f} | "
              f"{m['cpu'] / base['cpu']:.3f} | {r.peak_bytes / 2**20:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": rows, "median": med, "loads": loads,
                       "peak_bytes": {r.name: r.peak_bytes for r in runners}}, f, indent=2)


if __name__ == "__main__":
    main()
