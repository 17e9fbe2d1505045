"""Decoding throughput: KV-cache decoding against full recomputation of the prefix.

    python benchmarks/generation.py [--new-tokens 256] [--batches 1 16] [--layers 4]

Greedy decoding of `--new-tokens` tokens after a 16-token prompt with a small GPT-2-shaped
model (random weights: speed does not depend on them). Prints a markdown table of generated
tokens per second (compile excluded: each setting runs once to compile, then is timed) and the
cached-over-full speedup.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.generate import _decode_cached, _decode_full
from jaxlm.models.transformer import build_model


def tokens_per_sec(fn, model, params, batch: int, prompt_len: int, new_tokens: int,
                   repeats: int) -> float:
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, prompt_len)),
                         jnp.int32)
    valid = jnp.ones_like(prompt, bool)
    kw = dict(max_new=new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    run = lambda: fn(model, params, prompt, valid, jax.random.PRNGKey(0), jnp.int32(-1), **kw)
    run().block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run().block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return batch * new_tokens / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    cfg = ModelConfig(num_layers=args.layers, d_model=args.d_model, num_heads=4,
                      d_ff=4 * args.d_model, vocab_size=256,
                      max_seq_len=args.prompt_len + args.new_tokens, attention="xla")
    model = build_model(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; GPT-2 shape, "
          f"{args.layers} layers, d_model {args.d_model}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy\n")
    print("| batch | KV cache (tokens/s) | full recompute (tokens/s) | speedup |")
    print("|---:|---:|---:|---:|")
    for b in args.batches:
        cached = tokens_per_sec(_decode_cached, model, params, b, args.prompt_len,
                                args.new_tokens, args.repeats)
        full = tokens_per_sec(_decode_full, model, params, b, args.prompt_len,
                              args.new_tokens, args.repeats)
        print(f"| {b} | {cached:,.0f} | {full:,.0f} | {cached / full:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
