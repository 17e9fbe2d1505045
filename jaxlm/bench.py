"""`jaxlm bench`: steady-state training speed of one configuration on synthetic data.

Random tokens of the configured vocabulary (no download, no tokenizer), the real sharded,
donated train step, and honest MFU: the PaLM formula's model FLOPs and, beside it, the FLOPs
XLA's cost analysis counts for the compiled step (optimizer, softmax, norms and the masked
half of causal attention included)."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np
import optax

from jaxlm import perf, sharding
from jaxlm.config import Config
from jaxlm.setup import StepSetup, build
from jaxlm.train import dispatch
from jaxlm.train.state import count_params


@dataclass
class Compiled:
    """A config's compiled train step with its initial state and one device batch: what
    bench and profile time."""

    setup: StepSetup
    state: Any
    step: Callable  # the compiled executable: step(state, batch) -> (state, metrics)
    compile_seconds: float
    batch: Any  # one device batch of the right shape

    @property
    def cfg(self) -> Config:
        return self.setup.cfg

    @property
    def mesh(self) -> Any:
        return self.setup.mesh


def compile_step(cfg: Config) -> Compiled:
    """The wired step of `cfg` (jaxlm.setup), its initial state and the AOT-compiled step on a
    batch of random tokens (timed compile)."""
    setup = build(cfg)
    state = setup.init_state()
    host = setup.synthetic_batch(np.random.default_rng(0))
    with jax.set_mesh(setup.mesh):
        batch = sharding.host_batch_to_global(host, setup.mesh)
        t0 = time.perf_counter()
        compiled = setup.train_step.lower(state, batch).compile()
        seconds = time.perf_counter() - t0
    return Compiled(setup, state, compiled, seconds, batch)


def time_rounds(setup: Compiled, steps: int, rounds: int, warmup: int,
                next_batch: Callable[[], Any]) -> list[float]:
    """Seconds per step of each of `rounds` rounds of `steps` steps dispatched as the
    training loop dispatches them (asynchronously, at most dispatch.STEPS_AHEAD queued), on
    `steps` device batches built before the timing: the step's own throughput, which no
    per-step drain of the device queue slows (a drain costs small steps a share of their
    time)."""
    with jax.set_mesh(setup.mesh):
        batches = [sharding.host_batch_to_global(next_batch(), setup.mesh)
                   for _ in range(steps)]
        state, seconds = setup.state, []
        for i in range(warmup):
            state, _ = setup.step(state, batches[i % steps])
        jax.block_until_ready(state)
        for _ in range(rounds):
            t0 = time.perf_counter()
            in_flight = dispatch.Window()
            for batch in batches:
                state, metrics = setup.step(state, batch)
                in_flight.add(metrics)
            jax.block_until_ready((state, metrics))
            seconds.append((time.perf_counter() - t0) / steps)
    setup.state = state  # the old one was donated
    return seconds


def time_steps(setup: Compiled, steps: int, warmup: int,
               next_batch: Callable[[], Any]) -> dict[str, list[float]]:
    """Runs warmup + steps train steps, each synchronised, and returns per-step seconds:
    `host` (building the host batch), `put` (host -> device), `dispatch` (the step call
    until it returns, asynchronously: host overhead), `step` (dispatch until the results
    are ready: device time)."""
    times: dict[str, list[float]] = {"host": [], "put": [], "dispatch": [], "step": []}
    state = setup.state
    with jax.set_mesh(setup.mesh):
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            host = next_batch()
            t1 = time.perf_counter()
            batch = sharding.host_batch_to_global(host, setup.mesh)
            jax.block_until_ready(batch)
            t2 = time.perf_counter()
            state, metrics = setup.step(state, batch)
            t3 = time.perf_counter()
            jax.block_until_ready((state, metrics))
            t4 = time.perf_counter()
            if i >= warmup:
                for k, v in (("host", t1 - t0), ("put", t2 - t1), ("dispatch", t3 - t2),
                             ("step", t4 - t2)):
                    times[k].append(v)
    setup.state = state  # the old one was donated
    return times


@dataclass
class BenchResult:
    preset: str
    family: str
    params: int
    devices: int
    device_kind: str
    dtype: str
    tokens_per_step: int
    steps: int  # timed steps (per round, with rounds)
    compile_seconds: float
    step_seconds_median: float
    tokens_per_sec: float
    flops_per_token: float  # PaLM formula, causal attention halved (model FLOPs)
    flops_per_token_dense: float  # the same with the dense attention XLA executes
    cost_flops_per_token: float  # XLA cost analysis of the whole compiled step
    optimizer_flops_per_token: float  # ... of the optimizer update alone (all replicas)
    barrier_flops_per_token: float  # the identity products of model.grad_barrier (traced)
    peak_flops_per_device: float
    peak_source: str
    mfu: float  # formula
    mfu_cost_analysis: float  # XLA's forward+backward FLOPs (step minus optimizer and
    # grad barrier: no model work) / peak
    hfu_cost_analysis: float  # all the FLOPs XLA counts for the step / peak
    peak_memory_bytes_per_device: int
    rounds: int = 1  # timed rounds of `steps` steps (the median round's step time)

    def table(self) -> str:
        gib = self.peak_memory_bytes_per_device / 2**30
        return "\n".join([
            f"model           {self.preset} ({self.family}), {self.params / 1e6:.2f}M params, "
            f"{self.dtype}",
            f"devices         {self.devices} × {self.device_kind}",
            f"tokens/step     {self.tokens_per_step:,}",
            f"compile         {self.compile_seconds:.2f} s",
            f"step (median)   {self.step_seconds_median * 1e3:.1f} ms (the median of "
            f"{self.rounds} rounds of {self.steps} steps)",
            f"tokens/s        {self.tokens_per_sec:,.0f}",
            f"FLOPs/token     {self.flops_per_token:.4g} (6N + 12·L·H·Q·T, causal halved); "
            f"dense attention {self.flops_per_token_dense:.4g}",
            f"XLA cost        {self.cost_flops_per_token:.4g} FLOPs/token for the step, of "
            f"which the optimizer {self.optimizer_flops_per_token:.4g}"
            + (f", the grad barrier {self.barrier_flops_per_token:.4g}"
               if self.barrier_flops_per_token else ""),
            f"peak            {self.peak_flops_per_device / 1e12:.3f} TFLOP/s per device "
            f"({self.peak_source})",
            f"MFU             {100 * self.mfu:.1f}% (formula)   "
            f"{100 * self.mfu_cost_analysis:.1f}% (XLA forward+backward)   "
            f"{100 * self.hfu_cost_analysis:.1f}% (all XLA FLOPs)",
            f"peak memory     {gib:.3f} GiB per device (compiled memory analysis)",
        ])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench(cfg: Config, steps: int = 20, warmup: int = 3, rounds: int = 3) -> BenchResult:
    """Compiles the train step of `cfg` and times `rounds` rounds of `steps` steady-state
    steps on random tokens; the step time is the median round's."""
    compiled = compile_step(cfg)
    rng = np.random.default_rng(1)
    per_step = time_rounds(compiled, steps, rounds, warmup,
                           functools.partial(compiled.setup.synthetic_batch, rng))
    return dataclasses.replace(summarize(compiled, {"step": per_step}), steps=steps,
                               rounds=rounds)


def counting_executable(setup: Compiled) -> Any:
    """The compiled step whose cost analysis counts every layer. XLA counts a loop body once,
    so a scanned layer stack is compiled again unrolled (abstract inputs; nothing runs)."""
    cfg = setup.cfg
    if not (cfg.model.scan_layers and cfg.model.num_layers > 1):
        return setup.step
    unrolled = build(dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, scan_layers=False)))
    return unrolled.lower().compile()


def cost_analysis_flops(setup: Compiled) -> float:
    """XLA's FLOPs for one step, all devices, every layer counted."""
    return perf.cost_flops(counting_executable(setup), setup.mesh.size)


def optimizer_flops(setup: StepSetup) -> float:
    """XLA's FLOPs for the optimizer update alone (clip + AdamW), summed over the devices:
    with replicated parameters every data-parallel replica does the whole update."""
    tx, a = setup.tx, setup.abstract_state

    def update(grads, opt_state, params):
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    with jax.set_mesh(setup.mesh):
        compiled = jax.jit(update).lower(a.params, a.opt_state, a.params).compile()
    return perf.cost_flops(compiled, setup.mesh.size)


def barrier_flops(setup: StepSetup) -> float:
    """FLOPs of model.grad_barrier's identity products in one step (0 when it is off)."""
    if not setup.cfg.model.grad_barrier:
        return 0.0
    with jax.set_mesh(setup.mesh):
        return perf.jaxpr_matmul_flops(setup.train_step, setup.abstract_state,
                                       setup.abstract_batch(), barrier=True)


def summarize(setup: Compiled, times: dict[str, list[float]]) -> BenchResult:
    """The result of timed steps: `times["step"]` holds seconds per step (of single steps
    or of rounds)."""
    cfg = setup.cfg
    n_dev = setup.mesh.size
    tokens = cfg.train.batch_size * cfg.train.seq_len
    med = statistics.median(times["step"])
    tps = tokens / med
    fpt = setup.setup.flops_per_token()
    peak, _, source = perf.device_peak(cfg.model.dtype, setup.mesh.devices.flat[0])
    cost_fpt = cost_analysis_flops(setup) / tokens
    opt_fpt = optimizer_flops(setup.setup) / tokens
    barrier_fpt = barrier_flops(setup.setup) / tokens
    return BenchResult(
        preset=cfg.model.preset, family=cfg.model.family,
        params=count_params(setup.setup.abstract_state.params),
        devices=n_dev, device_kind=setup.mesh.devices.flat[0].device_kind,
        dtype=cfg.model.dtype, tokens_per_step=tokens, steps=len(times["step"]),
        compile_seconds=setup.compile_seconds, step_seconds_median=med, tokens_per_sec=tps,
        flops_per_token=fpt,
        flops_per_token_dense=setup.setup.flops_per_token(causal_halved=False),
        cost_flops_per_token=cost_fpt, optimizer_flops_per_token=opt_fpt,
        barrier_flops_per_token=barrier_fpt,
        peak_flops_per_device=peak, peak_source=source, mfu=perf.mfu(tps, fpt, peak, n_dev),
        mfu_cost_analysis=perf.mfu(tps, cost_fpt - opt_fpt - barrier_fpt, peak, n_dev),
        hfu_cost_analysis=perf.mfu(tps, cost_fpt, peak, n_dev),
        peak_memory_bytes_per_device=perf.peak_memory(setup.step)["peak_bytes"])
