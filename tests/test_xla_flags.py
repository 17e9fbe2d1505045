"""run.cpu_threaded_matmul and run.cpu_devices: the CPU backend settings the commands make
before JAX starts a backend."""

import subprocess
import sys

import pytest

from jaxlm import xla_flags


def test_single_thread_matmul_added_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert xla_flags.apply_cpu_matmul_threads(False) == (
        "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false")
    assert xla_flags.apply_cpu_matmul_threads(False).count("multi_thread_eigen") == 1


def test_threaded_leaves_flags_and_user_choice_wins(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_flags.apply_cpu_matmul_threads(True) == ""
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    assert xla_flags.apply_cpu_matmul_threads(False) == "--xla_cpu_multi_thread_eigen=true"


def test_flag_reaches_a_fresh_backend():
    """Set before the backend starts, XLA accepts the flag (an unknown one aborts it)."""
    code = ("from jaxlm import xla_flags; xla_flags.apply_cpu_matmul_threads(False); "
            "import jax, jax.numpy as jnp; print(float((jnp.ones((64, 64)) @ jnp.ones(64)).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "4096.0"


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **env})


_COUNT = ("from jaxlm import xla_flags; print(xla_flags.apply_cpu_devices(2)); "
          "import jax; print(jax.device_count())")


def test_cpu_devices_split_a_fresh_host():
    out = _fresh_python(_COUNT)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["True", "2"]


@pytest.mark.parametrize("env", [{"JAX_NUM_CPU_DEVICES": "3"},
                                 {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}])
def test_a_device_count_in_the_environment_wins(env):
    out = _fresh_python(_COUNT, **env)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["False", "3"]


def test_cpu_devices_leave_a_started_backend_alone():
    """In this process conftest chose 8 devices and JAX has started: nothing changes."""
    import jax

    jax.devices()
    assert xla_flags.apply_cpu_devices(2) is False
    assert jax.device_count() == 8
    assert xla_flags.apply_cpu_devices(1) is False
