"""run.cpu_threaded_matmul: XLA_FLAGS as the commands set it before JAX starts a backend."""

import subprocess
import sys

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
