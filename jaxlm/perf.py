"""FLOPs per token, device peaks, and MFU.

Model FLOPs follow PaLM (appendix B): per trained token, 6·N for the matmuls of the forward
and backward passes plus 12·L·H·Q·T for attention scores and values (L attention layers,
H heads of width Q, context T), halved when the attention is causal: MFU counts the work
the model needs, not the masked-out half a dense kernel computes anyway. Each family spec
(jaxlm.families) applies these pieces to what its stacks see: encoder and decoder lengths
separately, banded layers by their window.

N counts the matmul weights: every projection kernel, and the token embedding table only when
it is tied to the output projection (then it *is* the [D, V] logits matmul). Lookup-only
tables (learned positions, an untied token table, T5's relative bias) are no matmul and are
left out, and so are biases and norm scales (elementwise; < 1% of N at usual widths). With
this N the formula with dense attention equals the dot_general FLOPs of the traced step
exactly (`jaxpr_matmul_flops`; tests/test_perf.py checks it). MoE expert kernels count over
the tokens routed to them (k of E experts per token), as their grouped matmuls compute.

Peaks: a per-device table (dense, no sparsity) keyed by `device_kind`; on CPU, a matrix
product measured at start. Nothing assumes a particular machine.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.layers import GRAD_BARRIER_SCOPE

# device_kind substring -> {dtype: peak FLOP/s per chip}, HBM bandwidth (bytes/s).
# float32 on TPU runs the MXU at default precision (bf16 passes), on A100/H100/H200 JAX's
# default float32 matmul precision uses TF32 tensor cores: the table lists what a float32
# step at default precision can reach.
_T = 1e12
DEVICE_PEAKS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275 * _T, "float32": 275 * _T, "hbm_bw": 1.2e12},
    "TPU v5 lite": {"bfloat16": 197 * _T, "float32": 197 * _T, "hbm_bw": 0.819e12},
    "TPU v5e": {"bfloat16": 197 * _T, "float32": 197 * _T, "hbm_bw": 0.819e12},
    "TPU v5p": {"bfloat16": 459 * _T, "float32": 459 * _T, "hbm_bw": 2.765e12},
    "TPU v5": {"bfloat16": 459 * _T, "float32": 459 * _T, "hbm_bw": 2.765e12},
    "TPU v6 lite": {"bfloat16": 918 * _T, "float32": 918 * _T, "hbm_bw": 1.64e12},
    "TPU v6e": {"bfloat16": 918 * _T, "float32": 918 * _T, "hbm_bw": 1.64e12},
    "H200": {"bfloat16": 989 * _T, "float32": 494.5 * _T, "hbm_bw": 4.8e12},
    "H100 PCIe": {"bfloat16": 756 * _T, "float32": 378 * _T, "hbm_bw": 2.0e12},
    "H100": {"bfloat16": 989 * _T, "float32": 494.5 * _T, "hbm_bw": 3.35e12},
    "A100-SXM4-40GB": {"bfloat16": 312 * _T, "float32": 156 * _T, "hbm_bw": 1.555e12},
    "A100-PCIE-40GB": {"bfloat16": 312 * _T, "float32": 156 * _T, "hbm_bw": 1.555e12},
    "A100": {"bfloat16": 312 * _T, "float32": 156 * _T, "hbm_bw": 2.039e12},
}


# ------------------------------------------------------------------------- model FLOPs

def _size(x: Any) -> int:
    return int(np.prod(x.shape)) if x.shape else 1


def matmul_weights(params: Any, tie_embeddings: bool) -> list[tuple[tuple[str, ...], int]]:
    """(key path, size) of every matmul weight: each `kernel`, and the token table when it is
    tied to the output projection. See the module doc for what is left out and why."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        if keys[-1] == "kernel" or (keys[-1] == "embedding" and tie_embeddings):
            out.append((keys, _size(leaf)))
    return out


def causal_keys(length: int, window: int, halved: bool = True) -> float:
    """Keys one query attends to on average in a causal layer of `length` positions whose
    band is `window` wide (window >= length: plain causal), the diagonal counted half, so a
    plain causal layer counts length / 2. Not `halved`: all `length` keys, as a dense kernel
    computes them."""
    if not halved:
        return float(length)
    w = min(window, length)
    return (w * (w + 1) / 2 + (length - w) * w) / length - 0.5


def attention_flops(width: int, queries: int, keys_per_query: float) -> float:
    """Forward + backward FLOPs of scores and values: 12 · (heads × head width) per
    query-key pair."""
    return 12.0 * width * queries * keys_per_query


# ------------------------------------------------------------------------- peaks

def _time_best(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 1024, seconds: float = 1.5) -> float:
    """FLOP/s of a jitted n×n matrix product on the default device, best of repeats run for
    about `seconds` (a ceiling for this machine's dense compute at that dtype)."""
    a = jnp.ones((n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda x, y: x @ y)
    once = _time_best(mm, a, a, repeats=1)
    reps = max(3, min(50, int(seconds / max(once, 1e-6))))
    return 2.0 * n**3 / _time_best(mm, a, a, repeats=reps)


@functools.cache
def measured_memory_bandwidth(mib: int = 128) -> float:
    """Host memory bytes/s, STREAM-copy style: numpy copies a `mib` MiB float32 array (larger
    than the caches), best of 5, counting the bytes read and written. XLA's own elementwise
    loops on CPU run on fewer threads and would understate what the memory system gives."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * src.nbytes / best


def _table_entry(kind: str) -> dict[str, float] | None:
    for key in sorted(DEVICE_PEAKS, key=len, reverse=True):  # longest match first
        if key.lower() in kind.lower():
            return DEVICE_PEAKS[key]
    return None


def device_flops(dtype: str = "float32", device: Any = None, seconds: float = 1.5) -> float:
    """Peak FLOP/s of one device for the compute dtype: the table for known accelerators, a
    measured matrix product on CPU (and unknown devices), `seconds` long."""
    device = device or jax.devices()[0]
    entry = _table_entry(device.device_kind)
    if entry is not None and device.platform != "cpu":
        return entry.get(dtype, entry["bfloat16"])
    # One CPU "device" of a simulated multi-device mesh shares the same cores: the measured
    # figure is for the whole process, so split it evenly.
    share = max(1, jax.local_device_count()) if device.platform == "cpu" else 1
    return measured_matmul_peak(dtype, seconds=seconds) / share


def device_peak(dtype: str = "float32", device: Any = None,
                seconds: float = 1.5) -> tuple[float, float, str]:
    """(peak FLOP/s per device, memory bytes/s per device, source) for the compute dtype:
    the table for known accelerators, measurements on CPU (and unknown devices)."""
    device = device or jax.devices()[0]
    entry = _table_entry(device.device_kind)
    flops = device_flops(dtype, device, seconds)
    if entry is not None and device.platform != "cpu":
        return flops, entry["hbm_bw"], f"table ({device.device_kind})"
    share = max(1, jax.local_device_count()) if device.platform == "cpu" else 1
    return flops, measured_memory_bandwidth() / share, \
        f"measured {dtype} matmul on {device.device_kind}"


def mfu(tokens_per_sec: float, flops_per_tok: float, peak_per_device: float,
        num_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' summed peak."""
    return tokens_per_sec * flops_per_tok / (peak_per_device * num_devices)


# ------------------------------------------------------------------------- compiled analysis

def cost_flops(compiled: Any, num_devices: int) -> float:
    """Total FLOPs of one call from XLA's cost analysis (it reports one device's program)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) * num_devices


def cost_bytes(compiled: Any, num_devices: int) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("bytes accessed", 0.0)) * num_devices


def peak_memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes from XLA's memory analysis; donated arguments alias the outputs, so
    the peak is about arguments + temporaries."""
    mem = compiled.memory_analysis()
    arg, tmp = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    out, alias = int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes)
    return {"argument_bytes": arg, "temp_bytes": tmp, "output_bytes": out,
            "alias_bytes": alias, "peak_bytes": arg + tmp + out - alias}


def jaxpr_matmul_flops(fn: Callable, *args: Any, barrier: bool = False) -> float:
    """FLOPs of every dot_general in the traced program of fn(*args), loop bodies multiplied
    by their trip counts: the matmul work exactly, without elementwise ops. The identity
    products of model.grad_barrier are no model work and are left out; `barrier=True` counts
    them alone instead."""
    closed = jax.make_jaxpr(fn)(*args)
    return _count_dots(closed.jaxpr, barrier)


def _ragged_dot_flops(eqn: Any) -> float:
    """A grouped matmul: every lhs element meets the rhs columns of one group only (rhs dims
    neither contracted, batched nor the group dim), in all three modes autodiff uses."""
    nums = eqn.params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = nums.dot_dimension_numbers
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    skip = set(rc) | set(rb) | set(nums.rhs_group_dimensions)
    return 2.0 * math.prod(lhs) * math.prod(n for d, n in enumerate(rhs) if d not in skip)


def _count_dots(jaxpr: Any, barrier: bool) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        is_dot = eqn.primitive.name in ("dot_general", "ragged_dot_general")
        if is_dot and (GRAD_BARRIER_SCOPE in str(eqn.source_info.name_stack)) != barrier:
            continue  # counted in the other mode
        if eqn.primitive.name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contract = math.prod(lhs[d] for d in lc)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contract
            continue
        if eqn.primitive.name == "ragged_dot_general":  # MoE experts: each row meets 1 group
            total += _ragged_dot_flops(eqn)
            continue
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    total += times * _count_dots(inner, barrier)
    return total
