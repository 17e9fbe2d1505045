"""Compile time of the train step against depth, with the layers scanned (nn.scan: one
traced block whatever the depth) and unrolled (one traced block per layer).

    python benchmarks/compile_time.py [--layers 4 32] [--repeats 3]

Prints a markdown table: the best of `repeats` compiles (lower + XLA compile) per setting,
and the 32-to-4-layer ratio. Nothing runs, so it works on a laptop CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax

from jaxlm import setup
from jaxlm.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig, validate

MODEL = ModelConfig(d_model=256, num_heads=4, d_ff=1024, vocab_size=256, max_seq_len=256,
                    attention="xla")


def compile_seconds(model: ModelConfig, batch: int = 8, seq_len: int = 256) -> float:
    cfg = Config(model=model, optim=OptimConfig(),
                 train=TrainConfig(steps=100, batch_size=batch, seq_len=seq_len),
                 mesh=MeshConfig(data=1))
    validate(cfg)
    # setup.build wires fresh jitted functions each time, so no tracing or compilation cache
    # is reused.
    s = setup.build(cfg, devices=jax.devices()[:1])
    t0 = time.perf_counter()
    s.lower().compile()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs=2, default=[4, 32])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    jax.config.update("jax_compilation_cache_dir", None)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; model d_model "
          f"{MODEL.d_model}, {MODEL.num_heads} heads, batch 8 × 256 tokens\n")
    results = {}
    for scan in (True, False):
        for n in args.layers:
            cfg = dataclasses.replace(MODEL, num_layers=n, scan_layers=scan)
            times = [compile_seconds(cfg) for _ in range(args.repeats)]
            results[scan, n] = min(times)
            print(f"  scan_layers={scan!s:5s} {n:3d} layers: "
                  f"{', '.join(f'{t:.1f}' for t in times)} s", flush=True)
    small, big = args.layers
    print(f"\n| scan_layers | {small} layers (s) | {big} layers (s) | ratio |")
    print("|---|---:|---:|---:|")
    for scan in (True, False):
        a, b = results[scan, small], results[scan, big]
        print(f"| {scan} | {a:.1f} | {b:.1f} | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
