"""The persistent compilation cache of jaxlm's commands: on under $JAXLM_CACHE/xla, read back
by the next process, off by variable or config key, and a directory JAX already has is kept.
Each case runs in a fresh process, since JAX fixes its cache when it first compiles."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Enables the cache as `jaxlm train` does and compiles one function; prints the directory
# and whether the compile was a cache hit (jax.monitoring's public event).
SCRIPT = """
import sys, jax, jax.numpy as jnp
from jaxlm import compile_cache
compile_cache.MIN_COMPILE_SECONDS = 0.0  # this small function compiles fast
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
path = compile_cache.enable(sys.argv[1] == "on")
jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((64, 64))).block_until_ready()
print("dir", path, "hit", bool(hits))
"""


def _run(tmp: Path, on: str = "on", **extra: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAXLM_"))}
    env.update(JAX_PLATFORMS="cpu", JAXLM_CACHE=str(tmp), **extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT, on], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_second_process_reads_what_the_first_compiled(tmp_path):
    assert _run(tmp_path) == f"dir {tmp_path / 'xla'} hit False"
    assert any((tmp_path / "xla").iterdir())  # the first process wrote its program
    assert _run(tmp_path) == f"dir {tmp_path / 'xla'} hit True"


def test_off_by_variable_or_key_and_a_jax_directory_is_kept(tmp_path):
    assert _run(tmp_path, JAXLM_COMPILATION_CACHE="off") == "dir None hit False"
    assert _run(tmp_path, on="off") == "dir None hit False"  # run.compile_cache=false
    assert not (tmp_path / "xla").exists()
    mine = tmp_path / "mine"
    assert _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(mine)) == f"dir {mine} hit False"
    assert not (tmp_path / "xla").exists()
