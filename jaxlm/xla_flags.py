"""XLA flags that a config chooses; they take effect only if set before JAX creates its
backends, so commands apply them right after reading the config."""

from __future__ import annotations

import os

SINGLE_THREAD_MATMUL = "--xla_cpu_multi_thread_eigen=false"


def apply_cpu_matmul_threads(threaded: bool) -> str:
    """With `threaded` false, the CPU backend runs each matmul on one thread (small models
    step faster: their matmuls are too small to split across cores, and the other core is
    left to independent ops and the host loop). A choice the user already made in XLA_FLAGS
    is kept. Returns XLA_FLAGS as it is now."""
    flags = os.environ.get("XLA_FLAGS", "")
    if not threaded and "xla_cpu_multi_thread_eigen" not in flags:
        flags = f"{flags} {SINGLE_THREAD_MATMUL}".strip()
        os.environ["XLA_FLAGS"] = flags
    return flags
