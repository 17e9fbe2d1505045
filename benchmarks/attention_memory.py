"""Peak temporary memory of the compiled train step against sequence length, per attention
implementation: `xla` holds the [T, T] logits (quadratic), `chunked` holds one tile at a
time (linear). Compile only (nothing runs), so it works on a laptop CPU up to 16k tokens.

    python benchmarks/attention_memory.py [--lengths 512 1024 ...] [--impls xla chunked]

Prints a markdown table: XLA's memory analysis of the whole jitted step (forward, backward
and AdamW update) of a small model at batch 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import jax

from jaxlm import setup
from jaxlm.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig, validate

MODEL = ModelConfig(num_layers=2, d_model=256, num_heads=4, d_ff=1024, vocab_size=256,
                    position="rope", max_seq_len=16384, scan_layers=True)


def step_memory(model: ModelConfig, seq_len: int, batch: int = 1) -> dict[str, float]:
    """Compiles the train step for [batch, seq_len] tokens; returns MiB and seconds."""
    cfg = Config(model=model, optim=OptimConfig(),
                 train=TrainConfig(steps=100, batch_size=batch, seq_len=seq_len),
                 mesh=MeshConfig(data=1))
    validate(cfg)
    s = setup.build(cfg, devices=jax.devices()[:1])
    t0 = time.perf_counter()
    compiled = s.lower().compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mib = lambda n: n / 2**20
    return {"temp": mib(mem.temp_size_in_bytes), "args": mib(mem.argument_size_in_bytes),
            "compile_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--impls", nargs="+", default=["xla", "chunked"])
    args = p.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"model: {MODEL.num_layers} layers, d_model {MODEL.d_model}, {MODEL.num_heads} heads, "
          f"batch 1, float32; temporary memory of the compiled train step in MiB\n")
    rows = {}
    for impl in args.impls:
        cfg = dataclasses.replace(MODEL, attention=impl)
        for n in args.lengths:
            rows[impl, n] = step_memory(cfg, n)
            print(f"  {impl:8s} T={n:6d}: {rows[impl, n]['temp']:10.1f} MiB "
                  f"(compiled in {rows[impl, n]['compile_s']:.1f} s)", flush=True)
    print("\n| T | " + " | ".join(f"{i} temp MiB | ×prev" for i in args.impls) + " |")
    print("|---:|" + "---:|---:|" * len(args.impls))
    for k, n in enumerate(args.lengths):
        cells = []
        for impl in args.impls:
            cur = rows[impl, n]["temp"]
            prev = rows[impl, args.lengths[k - 1]]["temp"] if k else None
            cells += [f"{cur:,.1f}", f"{cur / prev:.2f}" if prev else ""]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
