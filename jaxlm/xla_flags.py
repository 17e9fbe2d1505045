"""Settings of JAX's CPU backend that a config chooses (`run.cpu_threaded_matmul`,
`run.cpu_devices`). They take effect only if set before JAX creates its backends, so commands
apply them right after reading the config; a choice the user made in the environment wins."""

from __future__ import annotations

import os

SINGLE_THREAD_MATMUL = "--xla_cpu_multi_thread_eigen=false"
DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


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


def apply_cpu_devices(count: int) -> bool:
    """Splits the host into `count` CPU devices, so a data-parallel step runs each device's
    share of the batch on its own core. Left alone (False) when count is 1, when
    JAX_NUM_CPU_DEVICES, XLA_FLAGS or jax.config already chose a count, or when a backend has
    started (the count is fixed then)."""
    if count == 1 or "JAX_NUM_CPU_DEVICES" in os.environ or DEVICE_COUNT_FLAG in os.environ.get(
            "XLA_FLAGS", ""):
        return False
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() or jax.config.jax_num_cpu_devices != -1:
        return False  # started, or a count was chosen in code (tests/conftest.py)
    jax.config.update("jax_num_cpu_devices", count)
    return True


def apply(threaded_matmul: bool, cpu_devices: int) -> None:
    """Both CPU settings of a config's `run` section."""
    apply_cpu_matmul_threads(threaded_matmul)
    apply_cpu_devices(cpu_devices)
