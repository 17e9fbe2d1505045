"""jaxlm against HF transformers' PyTorch GPT-2 + torch.optim.AdamW and against a plain Flax
step written by hand (benchmarks/plain_flax_w.py) on workload W, alternating in one process,
plus the float32 matmul ceiling of this machine measured in the same run.

Workload W: GPT-2 shape, 4 layers, d_model 256, 4 heads, d_ff 1024, vocab 8192, seq 256,
global batch 16, float32, AdamW (lr 3e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1) with
global-norm clipping at 1.0, tied embeddings, no dropout. Random tokens; both sides train on
the same batches.

    python benchmarks/vs_torch.py [--rounds 5 --steps 10 --warmup 3 --json out.json]

Each round times `steps` steps of every system, the order rotated from round to round (jax
sides: wall time to the last step's result; torch: wall time of forward+backward+clip+step);
the load average is recorded before each round. Reported: median tokens/s over rounds per
system, jaxlm's ratio to each other, and achieved model FLOP/s (PaLM formula, the family's
`flops_per_token` via jaxlm.setup) as a fraction of the best float32 matmul FLOP/s (jax or
torch) measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from plain_flax_w import PlainRunner
from workload_w import BETAS, CLIP, EPS, LR, OVERRIDES, WD, B, D, F, H, L, T, V, load_average


def make_jaxlm(extra: list[str]):
    """The compiled train step (jaxlm.bench.compile_step, wired by jaxlm.setup.build) with
    its initial state."""
    from jaxlm import config as config_lib
    from jaxlm.bench import compile_step

    return compile_step(config_lib.load("tiny", OVERRIDES + extra))


def jaxlm_round(compiled, batches, steps: int) -> float:
    """Seconds for `steps` steps dispatched asynchronously (as the train loop does)."""
    from jaxlm import sharding

    state = compiled.state
    with jax.set_mesh(compiled.mesh):
        device_batches = [sharding.host_batch_to_global(b, compiled.mesh) for b in batches]
        jax.block_until_ready(device_batches)
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled.step(state, device_batches[i % len(device_batches)])
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - t0
    compiled.state = state  # the old one was donated
    return seconds


def make_torch():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H, n_inner=F,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      activation_function="gelu_new", tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(conf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    return model, opt


def torch_round(model, opt, batches, steps: int) -> float:
    import torch

    tensors = [torch.from_numpy(np.ascontiguousarray(b.inputs)).long() for b in batches]
    targets = [torch.from_numpy(np.ascontiguousarray(b.targets)).long() for b in batches]
    t0 = time.perf_counter()
    for i in range(steps):
        logits = model(tensors[i % len(tensors)]).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, V),
                                                 targets[i % len(targets)].view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return time.perf_counter() - t0


def matmul_ceiling(n: int = 1024, seconds: float = 2.0) -> dict[str, float]:
    """Best float32 n×n matmul FLOP/s through jax and through torch."""
    import torch

    from jaxlm.perf import measured_matmul_peak

    a = torch.ones(n, n)
    torch.mm(a, a)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    return {"jax": measured_matmul_peak("float32", n, seconds), "torch": 2.0 * n**3 / best}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _alternate(runs: dict, rounds: int, steps: int, tokens: int) -> tuple[dict, list]:
    """tokens/s of every system per round, the order rotated each round; and the loads."""
    tps: dict[str, list[float]] = {k: [] for k in runs}
    loads = []
    names = list(runs)
    for r in range(rounds):
        loads.append(load_average())
        for name in names[r % len(names):] + names[:r % len(names)]:
            tps[name].append(tokens / runs[name](steps))
        print(f"round {r + 1} (load {loads[-1]:.1f}): " + "   ".join(
            f"{k} {v[-1]:,.0f}" for k, v in tps.items()) + " tok/s", flush=True)
    return tps, loads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("overrides", nargs="*", help="extra jaxlm overrides (e.g. "
                   "model.scan_layers=true) to measure alternatives")
    args = p.parse_args()

    import torch
    import transformers

    compiled = make_jaxlm(args.overrides)
    rng = np.random.default_rng(0)
    batches = [compiled.setup.synthetic_batch(rng) for _ in range(4)]  # typed LMBatch
    plain = PlainRunner([(b.inputs, b.targets) for b in batches])
    model, opt = make_torch()
    runs = {"jaxlm": lambda n: jaxlm_round(compiled, batches, n), "plain_flax": plain.round,
            "torch": lambda n: torch_round(model, opt, batches, n)}
    for run in runs.values():
        run(args.warmup)
    tps, loads = _alternate(runs, args.rounds, args.steps, B * T * args.steps)
    ceiling = matmul_ceiling()
    med = {k: statistics.median(v) for k, v in tps.items()}
    fpt = compiled.setup.flops_per_token()
    peak = max(ceiling.values())
    result = {
        "workload": "W", "overrides": args.overrides,
        "tokens_per_sec": med, "ratio": med["jaxlm"] / med["torch"],
        "ratio_to_plain_flax": med["jaxlm"] / med["plain_flax"],
        "rounds": tps, "load_before_rounds": loads, "flops_per_token": fpt,
        "matmul_ceiling_flops": ceiling, "ceiling_tokens_per_sec": peak / fpt,
        "fraction_of_ceiling": {k: v * fpt / peak for k, v in med.items()},
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, torch threads "
                   f"{torch.get_num_threads()}, load average {min(loads):.1f}-"
                   f"{max(loads):.1f}",
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python":
                     platform.python_version()},
    }
    print("\n" + "   ".join(f"{k} {v:,.0f} tok/s" for k, v in med.items())
          + f"   jaxlm/torch {result['ratio']:.2f}×   jaxlm/plain "
          f"{result['ratio_to_plain_flax']:.2f}×")
    print(f"matmul ceiling (float32): jax {ceiling['jax'] / 1e9:.0f} GFLOP/s, torch "
          f"{ceiling['torch'] / 1e9:.0f} GFLOP/s -> {peak / fpt:,.0f} tok/s at "
          f"{fpt / 1e6:.1f} MFLOP/token")
    print("achieved / ceiling: " + ", ".join(
        f"{k} {100 * v:.0f}%" for k, v in result["fraction_of_ceiling"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
