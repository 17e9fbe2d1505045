"""Peak resident memory of loading a bfloat16 HF checkpoint: `jaxlm.load(dir, dtype=...)`
(lazy: one tensor at a time, straight into its sharding) against reading the whole
checkpoint into float32 first (what jaxlm did before). Prints a markdown table.

The checkpoint is a Llama shape with random weights (~414 MB in bfloat16, 12 layers,
d_model 1024, 32k vocabulary), written in 200 MB shards with model.safetensors.index.json
to --dir (outside the repository; never committed). Each measurement runs in a fresh
process: baseline = its resident memory (VmRSS) after importing jax and jaxlm and starting
the backend; peak = its high-water mark (VmHWM) after loading.

    python benchmarks/load_memory.py [--dir /tmp/jaxlm_load_bench] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxlm.convert.lazy import Lazy
from jaxlm.convert.safetensors_files import write_shards

D, F, HEADS, KV_HEADS, VOCAB = 1024, 2816, 16, 8, 32000


def _shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM tensor names and shapes."""
    hd = D // HEADS
    out = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,),
           "lm_head.weight": (VOCAB, D)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (HEADS * hd, D),
                    p + "self_attn.k_proj.weight": (KV_HEADS * hd, D),
                    p + "self_attn.v_proj.weight": (KV_HEADS * hd, D),
                    p + "self_attn.o_proj.weight": (D, HEADS * hd),
                    p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                    p + "mlp.down_proj.weight": (D, F),
                    p + "input_layernorm.weight": (D,),
                    p + "post_attention_layernorm.weight": (D,)})
    return out


def write_checkpoint(out: Path, layers: int) -> int:
    """Random bfloat16 tensors (generated one shard at a time) + config.json; bytes."""
    out.mkdir(parents=True, exist_ok=True)
    recipes = {}
    for seed, (name, shape) in enumerate(_shapes(layers).items()):
        def draw(_dtype, shape=shape, seed=seed):
            x = np.random.default_rng(seed).standard_normal(shape, np.float32) * 0.02
            return x.astype(ml_dtypes.bfloat16)
        recipes[name] = Lazy(shape, ml_dtypes.bfloat16, name, compute=draw)
    write_shards(recipes, out, dtype=ml_dtypes.bfloat16, max_shard_bytes=200 * 10**6)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": F,
              "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def _status() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def _eager(path: Path):
    """The former path: every tensor into a float32 dict, converted, then on device."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from jaxlm.convert import family_module
    from jaxlm.convert.hf import model_config_from_hf, read_hf_config

    hf = read_hf_config(path)
    cfg = model_config_from_hf(hf, scan_layers=False)
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    params = family_module(hf["model_type"]).params_from_hf(tensors, cfg)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)


def child(path: Path, mode: str) -> None:
    """One measurement, in this (fresh) process; prints a JSON line."""
    import jax

    import jaxlm
    import jaxlm.api  # noqa: F401  (imported before the baseline, as a session would have)
    from jaxlm import weights
    from jaxlm.config import MeshConfig

    jax.devices()
    base = _status()["VmRSS"]
    t0 = time.perf_counter()
    if mode == "eager":
        params = _eager(path)
    elif mode == "lazy-scanned":
        import dataclasses

        from jaxlm import sharding

        cfg = dataclasses.replace(weights.model_config_of(path), scan_layers=True,
                                  param_dtype="bfloat16", dtype="bfloat16")
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
        params = weights.read_params(path, cfg, weights.target_params(cfg, mesh))
    else:
        params = jaxlm.load(path, dtype="bfloat16").params
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    loaded = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    print(json.dumps({"mode": mode, "baseline": base, "peak": _status()["VmHWM"],
                      "loaded": loaded, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/jaxlm_load_bench")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = Path(args.dir)
    if args.child:
        return child(path, args.child)
    if not (path / "config.json").exists():
        write_checkpoint(path, args.layers)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    print(f"checkpoint: {size:,.0f} MiB bfloat16 in {len(list(path.glob('*.safetensors')))} "
          f"shards; load average {os.getloadavg()[0]:.1f}\n")
    print("| path | baseline MiB | peak MiB | peak − baseline | ÷ checkpoint | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("lazy", "lazy-scanned", "eager"):
        out = subprocess.run([sys.executable, __file__, "--dir", str(path), "--child", mode],
                             capture_output=True, text=True, env=env, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        grow = r["peak"] - r["baseline"]
        print(f"| {mode} | {r['baseline']:,.0f} | {r['peak']:,.0f} | {grow:,.0f} | "
              f"{grow / size:.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
