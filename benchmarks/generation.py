"""Decoding throughput: KV-cache decoding against full recomputation of the prefix.

    python benchmarks/generation.py [--new-tokens 256] [--batches 1 16] [--layers 4]

Greedy decoding of `--new-tokens` tokens with random weights (speed does not depend on them):
a small GPT-2-shaped decoder after a 16-token prompt, then an encoder-decoder of the same
width (the original Transformer's layout, pre-norm) from a 32-token source. Prints markdown
tables of generated tokens per second (compile excluded: each setting runs once to compile,
then is timed) and the cached-over-full speedup.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.families import registry
from jaxlm.generate import (
    _decode_cached,
    _decode_full,
    _seq2seq_full,
    _seq2seq_sample,
    unrolled_for_decoding,
)


def _best_tokens_per_sec(run, tokens: int, repeats: int) -> float:
    run().block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run().block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return tokens / best


def tokens_per_sec(fn, model, params, batch: int, prompt_len: int, new_tokens: int,
                   repeats: int) -> float:
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, prompt_len)),
                         jnp.int32)
    valid = jnp.ones_like(prompt, bool)
    kw = dict(max_new=new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    run = lambda: fn(model, params, prompt, valid, jax.random.PRNGKey(0), jnp.int32(-1), **kw)
    return _best_tokens_per_sec(run, batch * new_tokens, repeats)


def seq2seq_tokens_per_sec(fn, model, params, batch: int, source_len: int, new_tokens: int,
                           repeats: int) -> float:
    src = jnp.asarray(np.random.default_rng(0).integers(1, 256, (batch, source_len)),
                      jnp.int32)
    valid = jnp.ones_like(src, bool)
    kw = dict(max_new=new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    run = lambda: fn(model, params, src, valid, jax.random.PRNGKey(0), jnp.int32(0),
                     jnp.int32(-1), **kw)
    return _best_tokens_per_sec(run, batch * new_tokens, repeats)


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
    model = registry.build_model(cfg)
    params = model.init(jax.random.PRNGKey(0), *registry.of(cfg).init_inputs())["params"]
    scanned = tokens_per_sec(_decode_cached, model, params, 1, args.prompt_len,
                             args.new_tokens, args.repeats)
    model, params = unrolled_for_decoding(model, params)  # as generate_ids does
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
    print(f"\n(KV cache through the scanned stack itself, batch 1: {scanned:,.0f} tokens/s)")

    from jaxlm.config import load

    mt = load("tiny", ["model.preset=transformer", "model.norm_position=pre",
                       f"model.num_layers={args.layers}", f"model.d_model={args.d_model}",
                       "model.num_heads=4", f"model.d_ff={4 * args.d_model}",
                       "model.vocab_size=256", f"model.max_seq_len={args.new_tokens + 1}",
                       "model.attention=xla"]).model
    model = registry.build_model(mt)
    params = model.init(jax.random.PRNGKey(0), *registry.of(mt).init_inputs())["params"]
    print(f"\nencoder-decoder, {args.layers}+{args.layers} layers, d_model {args.d_model}; "
          f"source 32 tokens, {args.new_tokens} new tokens, greedy\n")
    print("| batch | KV cache (tokens/s) | full recompute (tokens/s) | speedup |")
    print("|---:|---:|---:|---:|")
    for b in args.batches:
        cached = seq2seq_tokens_per_sec(_seq2seq_sample, model, params, b, 32,
                                        args.new_tokens, args.repeats)
        full = seq2seq_tokens_per_sec(_seq2seq_full, model, params, b, 32, args.new_tokens,
                                      args.repeats)
        print(f"| {b} | {cached:,.0f} | {full:,.0f} | {cached / full:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
