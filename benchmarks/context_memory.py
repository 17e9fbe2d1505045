"""Context parallelism: per-device memory of the train step against sequence length and
mesh.context, the longest length that fits a per-device budget, and how evenly the ring's
shards share the causal work with and without the zig-zag order.

    python benchmarks/context_memory.py [--lengths 4096 ...] [--contexts 1 2 4 8]
        [--budget-gib 2] [--skip-balance]

Memory: XLA's memory analysis of the compiled train step (forward, backward, AdamW) on a
mesh of `context` CPU devices, batch 1, compile only (`lower().compile().memory_analysis()`,
nothing runs): temporaries (activations and workspace) and arguments (parameters, optimizer
state, batch), per device. Balance: each shard's share of a ring attention's forward and
backward pass, run alone on one device (`ring.one_shard`) and timed, and the tiles the
kernel visits per shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import setup
from jaxlm.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig, validate
from jaxlm.models.kernels import ring

MODEL = ModelConfig(preset="llama", num_layers=4, d_model=512, num_heads=8, num_kv_heads=8,
                    d_ff=1536, vocab_size=256, position="rope", norm="rmsnorm",
                    activation="silu", gated_mlp=True, use_bias=False, max_seq_len=1 << 20,
                    attention="chunked", scan_layers=True)
MIB = 2**20
jax.config.update("jax_num_cpu_devices", 8)  # simulated devices for the context axis on CPU


@functools.cache
def step_memory(length: int, context: int, strategy: str) -> dict[str, float]:
    """Per-device MiB of the compiled train step for one sequence of `length` tokens."""
    cfg = Config(model=dataclasses.replace(MODEL, context_attention=strategy),
                 optim=OptimConfig(), train=TrainConfig(steps=100, batch_size=1, seq_len=length),
                 mesh=MeshConfig(data=1, context=context))
    validate(cfg)
    s = setup.build(cfg, devices=jax.devices()[:context])
    t0 = time.perf_counter()
    mem = s.lower().compile().memory_analysis()
    return {"temp": mem.temp_size_in_bytes / MIB, "args": mem.argument_size_in_bytes / MIB,
            "compile_s": time.perf_counter() - t0}


def longest_fitting(context: int, budget_mib: float) -> int:
    """The longest length (a multiple of 1024 × context) whose ring train step needs at most
    `budget_mib` per device (arguments + temporaries): doubling, then halving the gap."""
    step = 1024 * context
    fits = lambda n: sum(step_memory(n, context, "ring")[k] for k in ("temp", "args")) \
        <= budget_mib
    if not fits(step):
        return 0
    lo = step
    while fits(2 * lo):
        lo *= 2
    hi = 2 * lo
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def shard_times(shards: int, chunks: int, local: int, repeats: int = 7) -> tuple:
    """(query-key pairs in the tiles each shard's forward computes, seconds each shard's
    forward + backward takes)."""
    heads, width = MODEL.num_heads, MODEL.d_model // MODEL.num_heads
    settings = ring.Ring(axis=("context",), layout=ring.Layout(shards, chunks), causal=True,
                         window=0, scale=width ** -0.5, cap=0.0)
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.normal(size=(1, local, heads, width)), jnp.float32)
                   for _ in range(4))
    run = jax.jit(lambda q, k, v, do, me: ring.one_shard(q, k, v, {}, do, settings, me))
    jax.block_until_ready(run(q, k, v, do, jnp.int32(0)))
    seconds = np.full(shards, np.inf)
    for _ in range(repeats):  # round robin: a busy spell of the machine hits every shard
        for me in range(shards):
            t0 = time.perf_counter()
            jax.block_until_ready(run(q, k, v, do, jnp.int32(me)))
            seconds[me] = min(seconds[me], time.perf_counter() - t0)
    return ring.pairs_computed(settings, local * shards), seconds


def memory_tables(lengths: list[int], contexts: list[int], budget_gib: float) -> None:
    rows = {}
    for n in lengths:
        for c in contexts:
            for strategy in (("ring", "allgather") if c > 1 else ("ring",)):
                rows[n, c, strategy] = step_memory(n, c, strategy)
                r = rows[n, c, strategy]
                print(f"  T={n:6d} context={c} {strategy:9s}: temp {r['temp']:9.1f} MiB, args "
                      f"{r['args']:7.1f} MiB (compiled in {r['compile_s']:.1f} s)", flush=True)
    print("\nPer-device temporaries (MiB), ring / allgather:\n")
    print("| T | " + " | ".join(f"context {c}" for c in contexts) + " |")
    print("|---:|" + "---:|" * len(contexts))
    for n in lengths:
        cells = []
        for c in contexts:
            ring_mib = rows[n, c, "ring"]["temp"]
            cells.append(f"{ring_mib:,.0f}" if c == 1 else
                         f"{ring_mib:,.0f} / {rows[n, c, 'allgather']['temp']:,.0f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    args = {c: rows[lengths[0], c, "ring"]["args"] for c in contexts}
    print("\nArguments per device (MiB): "
          + ", ".join(f"context {c}: {a:,.1f}" for c, a in args.items()))
    budget = budget_gib * 1024
    print(f"\nLongest trainable length (ring), {budget_gib:g} GiB per device:\n")
    print("| context | longest T | ×context 1 |")
    print("|---:|---:|---:|")
    base = None
    for c in contexts:
        longest = longest_fitting(c, budget)
        base = base or longest
        print(f"| {c} | {longest:,} | {longest / base:.2f} |" if base else f"| {c} | 0 | |",
              flush=True)


def balance_table(shards_list: list[int], locals_: list[int]) -> None:
    print(f"\nRing attention, causal, {MODEL.num_heads} heads of "
          f"{MODEL.d_model // MODEL.num_heads}: each shard's forward + backward alone\n")
    print("| shards | tokens per shard | order | M query-key pairs per shard (min–max) | "
          "seconds per shard (min–max) | max / mean | slowest shard |")
    print("|---:|---:|---|---|---|---:|---:|")
    for n in shards_list:
        for local in locals_:
            slowest = {}
            for name, chunks in (("contiguous", 1), ("zig-zag", 2)):
                pairs, secs = shard_times(n, chunks, local)
                slowest[name] = secs.max()
                print(f"| {n} | {local} | {name} | {pairs.min() / 1e6:.1f}–"
                      f"{pairs.max() / 1e6:.1f} | {secs.min():.3f}–{secs.max():.3f} | "
                      f"{secs.max() / secs.mean():.2f} | {secs.max():.3f} s |", flush=True)
            print(f"| {n} | {local} | zig-zag speed-up of the slowest shard | | | | "
                  f"{slowest['contiguous'] / slowest['zig-zag']:.2f}× |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--budget-gib", type=float, default=2.0)
    p.add_argument("--balance-shards", type=int, nargs="+", default=[4, 8])
    p.add_argument("--balance-local", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-balance", action="store_true")
    args = p.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} "
          f"devices, {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"model: {MODEL.num_layers} layers, d_model {MODEL.d_model}, {MODEL.num_heads} heads, "
          f"d_ff {MODEL.d_ff}, SwiGLU, RoPE, float32, attention=chunked, batch 1\n")
    if not args.skip_memory:
        memory_tables(args.lengths, args.contexts, args.budget_gib)
    if not args.skip_balance:
        balance_table(args.balance_shards, args.balance_local)


if __name__ == "__main__":
    main()
