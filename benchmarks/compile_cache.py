"""Start-up time saved by the persistent compilation cache (jaxlm.compile_cache): the default
config's first train step (build, initialise, compile, run: what a run waits for before its
first step), and the wall time of `jaxlm train train.steps=1` on it, in a fresh process with
an empty cache (cold) and again in another fresh process with the first one's cache (warm).

    python benchmarks/compile_cache.py [--rounds 2]

Each round uses a new cache directory. Prints `uptime` first (the figures move with the
machine's load) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# In the child: the default config's first step, cache in argv[1].
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import jax, numpy as np
from jaxlm import compile_cache, config, setup, sharding
compile_cache.enable(directory=sys.argv[1])
cfg = config.load(None, [])
s = setup.build(cfg)
state = s.init_state()
with jax.set_mesh(s.mesh):
    batch = sharding.host_batch_to_global(s.synthetic_batch(np.random.default_rng(0)), s.mesh)
    t1 = time.perf_counter()
    state, metrics = s.train_step(state, batch)
    jax.block_until_ready((state, metrics))
t2 = time.perf_counter()
print(json.dumps({"first_step": t2 - t1, "to_first_step": t2 - t0}))
"""


def _env(cache_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    return {**env, "JAXLM_CACHE": str(cache_root), "JAX_PLATFORMS": "cpu"}


def first_step(cache: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(cache)], cwd=ROOT, text=True,
                         capture_output=True, check=True, env=_env(cache.parent))
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_seconds(cache_root: Path, run_dir: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", "train.steps=1",
                    "train.eval_batches=1", "run.quiet=true", f"run.dir={run_dir}"],
                   cwd=ROOT, check=True, capture_output=True, env=_env(cache_root))
    return time.perf_counter() - t0


def one_round(tmp: Path) -> dict[str, float]:
    """Cold then warm, on a cache root that shares the prepared corpora of the real one."""
    from jaxlm.data.prepare import cache_dir

    root = tmp / "cache"
    root.mkdir()
    (root / "corpora").symlink_to(cache_dir() / "corpora")
    r = {}
    for kind in ("cold", "warm"):
        r[f"step_{kind}"] = first_step(root / "xla")["to_first_step"]
    for xla in (root / "xla").iterdir():  # the CLI's round starts from an empty cache too
        xla.unlink()
    for kind in ("cold", "warm"):
        r[f"cli_{kind}"] = cli_seconds(root, tmp / f"run_{kind}")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            rounds.append(one_round(Path(tmp)))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("\n| measure | round | cold cache (s) | warm cache (s) | saved (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, key in (("start to first step done", "step"), ("`jaxlm train train.steps=1`",
                                                             "cli")):
        for i, r in enumerate(rounds, 1):
            cold, warm = r[f"{key}_cold"], r[f"{key}_warm"]
            print(f"| {name} | {i} | {cold:.1f} | {warm:.1f} | {cold - warm:.1f} |")
    saved = [r["step_cold"] - r["step_warm"] for r in rounds]
    print(f"\nmedian saved before the first step: {statistics.median(saved):.1f} s")


if __name__ == "__main__":
    main()
