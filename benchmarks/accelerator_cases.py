"""The cases of benchmarks/accelerator.py, each a function returning a dict of figures."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import statistics
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import bench, perf
from jaxlm import config as config_lib
from jaxlm.families import registry
from jaxlm.models import attention as attn
from jaxlm.setup import StepSetup, build


def environment(smoke: bool) -> dict[str, Any]:
    dev = jax.devices()[0]
    peak, _, source = perf.device_peak("bfloat16", dev, seconds=0.5)
    # On CPU the peak is a measured matmul already; elsewhere it is the table's.
    matmul = peak if dev.platform == "cpu" else perf.measured_matmul_peak("bfloat16", 8192, 1.0)
    return {"date": datetime.date.today().isoformat(), "device": dev.device_kind,
            "platform": dev.platform, "devices": jax.device_count(), "jax": jax.__version__,
            "smoke": smoke, "peak_tflops": peak / 1e12, "peak_source": source,
            "matmul_tflops": matmul / 1e12}


def cudnn_unavailable() -> str | None:
    """Why cuDNN attention cannot run here, or None."""
    dev = jax.devices()[0]
    if dev.platform != "gpu" or "rocm" in getattr(dev.client, "platform_version", ""):
        return (f"cuDNN attention needs an NVIDIA GPU; the backend here is "
                f"'{jax.default_backend()}'")
    return None


def _load(config: str, overrides: list[str]) -> config_lib.Config:
    return config_lib.load(config, overrides)


def resolved_attention(config: str, overrides: list[str], attention: str) -> str:
    """What `attention` stands for with this model's dtype and head width, on this backend."""
    m = _load(config, overrides).model
    q = jnp.zeros((1, 1, 1, m.head_dim or m.d_model // m.num_heads), m.dtype)
    return attn.resolve_impl(attention, q, None, None)


def xla_flops_per_token(config: str, overrides: list[str],
                        verify: bool = False) -> dict[str, Any]:
    """XLA's FLOPs per token of the forward and backward pass (attention=xla, no remat, no
    optimizer), from the gradient compiled unrolled at 1, 2 and 3 layers and extrapolated to
    L. XLA's count of an unrolled stack grows quadratically in depth, not linearly (its
    second difference is constant), and three depths fix a quadratic exactly; `verify` also
    compiles all L layers and records that count beside it."""
    cfg = _load(config, overrides)
    L, tokens = cfg.model.num_layers, cfg.train.batch_size * cfg.train.seq_len

    def count(layers: int) -> float:
        return _gradient_flops(build(_load(config, [
            *overrides, f"model.num_layers={layers}", "model.scan_layers=false",
            "model.attention=xla", "model.remat=none"])))

    c1, c2, c3 = (count(n) for n in (1, 2, 3))
    total = c1 + (L - 1) * (c2 - c1) + (L - 1) * (L - 2) / 2 * (c3 - 2 * c2 + c1)
    out = {"flops_per_token": total / tokens, "depths_counted": [1, 2, 3]}
    if verify:
        out["direct_flops_per_token"] = count(L) / tokens
    return out


def _gradient_flops(setup: StepSetup) -> float:
    """XLA's FLOPs of the loss's gradient on one training batch (compiled, not run)."""
    def grads(params, batch):
        with nn.logical_axis_rules(setup.rules):
            return jax.grad(lambda p: setup.loss_fn(setup.model.apply, p, batch, rng=None,
                                                    deterministic=True)[0])(params)

    with jax.set_mesh(setup.mesh):
        compiled = jax.jit(grads).lower(setup.abstract_state.params,
                                        setup.abstract_batch()).compile()
    return perf.cost_flops(compiled, setup.mesh.size)


def bench_fitting(config: str, overrides: list[str], steps: int, warmup: int, peak: float,
                  xla_flops_per_tok: float | None) -> dict[str, Any]:
    """bench_case, once more at half the batch if the device runs out of memory."""
    try:
        return bench_case(config, overrides, steps, warmup, peak, xla_flops_per_tok)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
        error = f"{type(e).__name__}: {str(e)[:300]}"
    batch = _load(config, overrides).train.batch_size
    if not ("RESOURCE_EXHAUSTED" in error or "out of memory" in error.lower()) or batch < 2:
        raise RuntimeError(error)
    gc.collect()  # the failed attempt's buffers (its traceback is gone with the except block)
    out = bench_case(config, [*overrides, f"train.batch_size={batch // 2}"], steps, warmup,
                     peak, xla_flops_per_tok)
    return {**out, "batch_halved_from": batch, "first_error": error}


def bench_case(config: str, overrides: list[str], steps: int, warmup: int, peak: float,
               xla_flops_per_tok: float | None) -> dict[str, Any]:
    """`jaxlm bench`'s timing of one configuration, with both MFUs against `peak` FLOP/s
    per device."""
    cfg = _load(config, overrides)
    compiled = bench.compile_step(cfg)
    rng = np.random.default_rng(1)
    times = bench.time_steps(compiled, steps, warmup,
                             functools.partial(compiled.setup.synthetic_batch, rng))
    tokens = cfg.train.batch_size * cfg.train.seq_len
    step_s = statistics.median(times["step"])
    tps = tokens / step_s
    n = compiled.mesh.size
    fpt = compiled.setup.flops_per_token()
    mem = perf.peak_memory(compiled.step)["peak_bytes"]
    return {"tokens_per_step": tokens, "compile_s": compiled.compile_seconds,
            "step_ms": 1e3 * step_s, "tokens_per_sec": tps, "flops_per_token": fpt,
            "mfu_formula": perf.mfu(tps, fpt, peak, n),
            "mfu_xla": (perf.mfu(tps, xla_flops_per_tok, peak, n)
                        if xla_flops_per_tok else None),
            "peak_memory_gib": mem / 2**30, "dispatch_ms": 1e3 * statistics.median(
                times["dispatch"])}


def decode_case(config: str, overrides: list[str], batch: int, prompt_len: int,
                new_tokens: int) -> dict[str, Any]:
    """Greedy KV-cache decoding tokens/s (benchmarks/generation.py's measure)."""
    from generation import tokens_per_sec

    from jaxlm.generate import _decode_cached, unrolled_for_decoding

    m = dataclasses.replace(_load(config, overrides).model,
                            max_seq_len=prompt_len + new_tokens)
    model = registry.build_model(m)
    params = jax.jit(lambda k: model.init(k, *registry.of(m).init_inputs())["params"])(
        jax.random.PRNGKey(0))
    model, params = unrolled_for_decoding(model, params)
    tps = tokens_per_sec(_decode_cached, model, params, batch, prompt_len, new_tokens, 2)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "tokens_per_sec": tps}


def checkpoint_case(overrides: list[str], repeats: int) -> dict[str, Any]:
    """Save (blocking part, total) and restore of the train state (checkpoint_speed.py)."""
    from checkpoint_speed import save_restore_seconds

    with tempfile.TemporaryDirectory() as tmp:
        return save_restore_seconds(overrides, Path(tmp) / "ckpt", repeats=repeats)


def cudnn_check(shape: tuple[int, int, int, int, int]) -> dict[str, Any]:
    """cuDNN attention against the float32 reference on the same bfloat16 inputs: forward
    output and the gradients of q, k, v, causal and causal with packed segments; errors
    relative to the reference's largest magnitude."""
    B, T, N, K, H = shape
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=s), jnp.bfloat16)
               for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    cot = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
    seg = jnp.asarray(np.repeat(np.arange(4), -(-T // 4))[:T][None].repeat(B, 0), jnp.int32)
    masks = {"causal": attn.MaskSpec(causal=True),
             "causal+segments": attn.MaskSpec(q_segment_BT=seg, kv_segment_BS=seg, causal=True)}
    tol = 2e-2
    results = {}
    for name, mask in masks.items():
        def f(q, k, v, impl, mask=mask):
            out = attn.attention(q, k, v, mask, impl=impl).astype(jnp.float32)
            return jnp.sum(out * cot), out

        (_, ref), g_ref = jax.jit(jax.value_and_grad(
            functools.partial(f, impl="reference"), (0, 1, 2), has_aux=True))(q, k, v)
        (_, got), g_got = jax.jit(jax.value_and_grad(
            functools.partial(f, impl="cudnn"), (0, 1, 2), has_aux=True))(q, k, v)
        errs = {"forward": _rel_err(got, ref)}
        errs.update({n: _rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), g_got, g_ref)})
        results[name] = {**errs, "passed": all(e <= tol for e in errs.values())}
    return {"shape": f"B{B} T{T} N{N} K{K} H{H} bf16", "tolerance": tol, "results": results}


def _rel_err(got: jax.Array, ref: jax.Array) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
