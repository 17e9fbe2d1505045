"""JAX's persistent compilation cache for jaxlm's commands: a resume or a second run of the
same configuration loads its compiled programs from disk instead of compiling them again.

The cache lives in $JAXLM_CACHE/xla (default ~/.cache/jaxlm/xla). JAXLM_COMPILATION_CACHE=off
or `run.compile_cache=false` turns it off; a cache directory already given to JAX
(JAX_COMPILATION_CACHE_DIR, jax.config) is left as it is."""

from __future__ import annotations

import os
from pathlib import Path

import jax

SUBDIR = "xla"
# Compiles shorter than this are not worth a file (eager ops, small helpers); a CPU train
# step of the smallest presets compiles for longer.
MIN_COMPILE_SECONDS = 0.5


def disabled_by_env() -> bool:
    return os.environ.get("JAXLM_COMPILATION_CACHE", "").strip().lower() in (
        "off", "0", "false", "no")


def enable(on: bool = True, directory: str | Path | None = None) -> Path | None:
    """Turns the cache on in `directory` (default $JAXLM_CACHE/xla) and returns it, or None
    when it is off. Must run before anything is compiled to take effect."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)  # the user's (or the test suite's) own cache: keep it
    if not on or disabled_by_env():
        return None
    from jaxlm.data.prepare import cache_dir

    path = Path(directory) if directory is not None else cache_dir() / SUBDIR
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache only costs compile time
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
