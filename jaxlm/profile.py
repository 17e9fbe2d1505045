"""`jaxlm profile`: where one configuration's step time and memory go, and what to change.

Verdict order: input-bound (building batches takes longer than the step, so a prefetching
pipeline cannot hide it), else host-bound (dispatching the step takes most of its time), else
compute- or memory-bound by arithmetic intensity (XLA cost analysis FLOPs / bytes accessed)
against the device's ridge point (peak FLOP/s / memory bandwidth; measured on CPU)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import bench, perf, sharding, trace
from jaxlm.collectives import collective_bytes  # noqa: F401  (re-exported)
from jaxlm.config import Config

VANISHING, EXPLODING = 1e-6, 100.0  # per-layer grad norm vs the median of the layers


def _tree_bytes_per_device(tree: Any) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
        total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total


# ------------------------------------------------------------------------ gradient health

def layer_grad_norms(params: Any, grads: Any) -> dict[str, float]:
    """Global norm of the gradient per layer: top-level modules, with `layers_i` blocks (or a
    scanned stack's leading axis) one entry each."""
    groups: dict[str, float] = {}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        keys = [str(getattr(p, "key", p)) for p in path]
        g = np.asarray(g, np.float64)
        if keys[0] in ("decoder", "encoder") and len(keys) > 1 and keys[1] == "layers":
            for i in range(g.shape[0]):  # scanned: [layers, ...]
                name = f"{keys[0]}/layers_{i}"
                groups[name] = groups.get(name, 0.0) + float(np.sum(g[i] ** 2))
            continue
        name = "/".join(keys[:2]) if keys[0] in ("decoder", "encoder") else keys[0]
        groups[name] = groups.get(name, 0.0) + float(np.sum(g ** 2))
    return {k: v ** 0.5 for k, v in groups.items()}


def flag_layers(norms: dict[str, float]) -> dict[str, list[str]]:
    """Layers whose gradient norm is < 1e-6 × or > 100 × the median over layers."""
    med = statistics.median(norms.values()) if norms else 0.0
    return {"vanishing": [k for k, v in norms.items() if med > 0 and v < VANISHING * med],
            "exploding": [k for k, v in norms.items()
                          if not np.isfinite(v) or (med > 0 and v > EXPLODING * med)]}


def metrics_health(rows: list[dict[str, Any]], clip_norm: float) -> dict[str, Any]:
    """Clip rate (share of logged steps with grad_norm > clip_norm) and the grad-norm trend
    (ratio of the mean of the last third of logged norms to the first third)."""
    norms = [float(r["grad_norm"]) for r in rows if "grad_norm" in r]
    if not norms:
        return {"logged_steps": 0}
    finite = [n for n in norms if np.isfinite(n)]
    third = max(1, len(finite) // 3)
    first, last = finite[:third], finite[-third:]
    trend = (float(np.mean(last)) / max(float(np.mean(first)), 1e-30)) if finite else float("nan")
    return {"logged_steps": len(norms),
            "clip_rate": (sum(n > clip_norm for n in norms) / len(norms)) if clip_norm > 0
            else 0.0,
            "non_finite": len(norms) - len(finite),
            "grad_norm_first": float(np.mean(first)) if finite else float("nan"),
            "grad_norm_last": float(np.mean(last)) if finite else float("nan"),
            "grad_norm_trend": trend, "grad_norms": norms,
            "steps": [int(r["step"]) for r in rows if "grad_norm" in r]}


def run_layer_norms(run_dir: str | Path, cfg: Config, batch: Any) -> dict[str, float]:
    """Per-layer gradient norms of one batch on the run's newest checkpoint."""
    import jaxlm
    from jaxlm.families import registry

    lm = jaxlm.load(run_dir)
    loss_fn = registry.of(cfg.model).loss_fn(cfg, mask_id=getattr(lm.tokenizer, "mask_id",
                                                                   None))
    model = lm.model
    dev = jax.tree.map(jnp.asarray, batch)
    grads = jax.grad(lambda p: loss_fn(model.apply, p, dev)[0])(lm.params)
    return layer_grad_norms(lm.params, grads)


# ------------------------------------------------------------------------ the report

@dataclass
class Profile:
    verdict: str
    advice: str
    device_kind: str
    devices: int
    step_seconds: float
    host_batch_seconds: float
    put_seconds: float
    dispatch_seconds: float
    input_wait_fraction: float  # share of a step's period spent waiting for the next batch
    host_overhead_fraction: float  # dispatch time / step time
    flops_per_step: float
    bytes_accessed_per_step: float
    arithmetic_intensity: float
    ridge_point: float
    peak_flops_per_device: float
    memory_bandwidth_per_device: float
    peak_source: str
    communication_bytes: dict[str, int]
    memory: dict[str, int]
    gradients: dict[str, Any] = field(default_factory=dict)
    trace_file: str = ""  # a jax.profiler trace of a few more steps (--trace DIR)

    def table(self) -> str:
        mib = lambda b: f"{b / 2**20:9.2f} MiB"
        g = self.gradients
        lines = [
            f"verdict              {self.verdict.upper()}: {self.advice}",
            f"devices              {self.devices} × {self.device_kind}",
            f"step (median)        {1e3 * self.step_seconds:9.2f} ms",
            f"input batch          {1e3 * (self.host_batch_seconds + self.put_seconds):9.2f} ms "
            f"(build {1e3 * self.host_batch_seconds:.2f}, to device {1e3 * self.put_seconds:.2f})"
            f" -> waits for input {100 * self.input_wait_fraction:.0f}% of the time",
            f"host dispatch        {1e3 * self.dispatch_seconds:9.2f} ms "
            f"({100 * self.host_overhead_fraction:.0f}% of the step)",
            f"arithmetic intensity {self.arithmetic_intensity:9.2f} FLOP/byte vs ridge "
            f"{self.ridge_point:.2f} ({self.peak_flops_per_device / 1e9:.1f} GFLOP/s / "
            f"{self.memory_bandwidth_per_device / 1e9:.1f} GB/s, {self.peak_source})",
            "communication/step   " + ("  ".join(f"{k} {mib(v).strip()}" for k, v in
                                                 self.communication_bytes.items() if v)
                                       or "none"),
            "memory/device        " + "  ".join(f"{k} {mib(v).strip()}" for k, v in
                                                self.memory.items()),
        ]
        if g.get("logged_steps"):
            lines.append(f"gradients            clip rate {100 * g['clip_rate']:.0f}% of "
                         f"{g['logged_steps']} logged steps; grad norm "
                         f"{g['grad_norm_first']:.3g} -> {g['grad_norm_last']:.3g} "
                         f"(×{g['grad_norm_trend']:.2g})")
        for name, v in g.get("layer_grad_norms", {}).items():
            mark = (" VANISHING" if name in g["flags"]["vanishing"] else
                    " EXPLODING" if name in g["flags"]["exploding"] else "")
            lines.append(f"  {name:28s} {v:10.3g}{mark}")
        if g.get("warnings"):
            lines.append("warnings             " + "; ".join(g["warnings"]))
        if self.trace_file:
            lines.append(f"profiler trace       {self.trace_file}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(input_wait: float, host_frac: float, intensity: float, ridge: float,
             platform: str) -> tuple[str, str]:
    if input_wait > 0.0:
        return "input-bound", ("batches take longer to build than the step runs: prefetch "
                               "in background threads, pre-tokenize, or simplify the pipeline")
    # On CPU the step runs in the calling thread, so its "dispatch" is its compute.
    if host_frac > 0.5 and platform != "cpu":
        return "host-bound", ("dispatch takes most of the step: larger batches per step, "
                              "fewer Python-side syncs")
    if intensity >= ridge:
        return "compute-bound", ("matmul throughput limits: bfloat16 compute, fewer wasted "
                                 "FLOPs (causal-skipping attention kernels), more devices")
    return "memory-bound", ("memory traffic limits: larger batch or wider model per device, "
                            "fuse elementwise work, bfloat16 activations, less remat")


def profile(cfg: Config, *, steps: int = 10, warmup: int = 2,
            next_batch: Callable[[], Any] | None = None,
            run_dir: str | Path | None = None, trace_dir: str | Path | None = None) -> Profile:
    """The bottleneck report of `cfg`. `next_batch` yields host batches (default: random
    tokens); with `run_dir`, gradient health comes from its metrics and newest checkpoint;
    with `trace_dir`, a profiler trace of up to TRACE_STEPS more steps is written there."""
    setup = bench.compile_step(cfg)
    rng = np.random.default_rng(0)
    next_batch = next_batch or (lambda: setup.setup.synthetic_batch(rng))
    t = bench.time_steps(setup, steps, warmup, next_batch)
    traced = ("" if trace_dir is None else
              str(trace_steps(setup, next_batch, min(steps, TRACE_STEPS), trace_dir)))
    med = {k: statistics.median(v) for k, v in t.items()}
    n_dev = setup.mesh.size
    device = setup.mesh.devices.flat[0]
    peak, bw, source = perf.device_peak(cfg.model.dtype, device)
    counted = bench.counting_executable(setup)
    flops = perf.cost_flops(counted, n_dev)
    # Bytes of one device's program; intensity is per device, as the ridge point is.
    nbytes = perf.cost_bytes(counted, 1)
    intensity = (flops / n_dev) / max(nbytes, 1.0)
    ridge = peak / bw
    feed = med["host"] + med["put"]
    # The train loop dispatches asynchronously: the next batch is built while the step runs,
    # so the step waits only for the part of the batch time the step cannot hide.
    wait = max(0.0, feed - med["step"]) / max(feed, med["step"])
    host_frac = med["dispatch"] / max(med["step"], 1e-12)
    verdict, advice = _verdict(wait, host_frac, intensity, ridge, device.platform)
    mem = perf.peak_memory(setup.step)
    memory = {"params": _tree_bytes_per_device(setup.state.params),
              "opt_state": _tree_bytes_per_device(setup.state.opt_state),
              "activations": mem["temp_bytes"], "peak": mem["peak_bytes"]}
    gradients: dict[str, Any] = {}
    if run_dir is not None:
        gradients = gradient_health(run_dir, cfg, next_batch())
    return Profile(
        verdict=verdict, advice=advice, device_kind=device.device_kind, devices=n_dev,
        step_seconds=med["step"], host_batch_seconds=med["host"], put_seconds=med["put"],
        dispatch_seconds=med["dispatch"], input_wait_fraction=wait,
        host_overhead_fraction=host_frac, flops_per_step=flops,
        bytes_accessed_per_step=nbytes * n_dev, arithmetic_intensity=intensity,
        ridge_point=ridge, peak_flops_per_device=peak, memory_bandwidth_per_device=bw,
        peak_source=source, communication_bytes=collective_bytes(counted.as_text()),
        memory=memory, gradients=gradients, trace_file=traced)


TRACE_STEPS = 5  # enough to see the steady state; traces grow with every step


def trace_steps(setup: bench.Compiled, next_batch: Callable[[], Any], steps: int,
                log_dir: str | Path) -> Path:
    """Runs `steps` more train steps under a jax.profiler trace written to `log_dir`, each
    step annotated as the train loop does; returns the trace file."""
    state = setup.state
    with jax.set_mesh(setup.mesh):
        jax.block_until_ready(state)
        trace.start(log_dir)
        try:
            for i in range(steps):
                with trace.step(i + 1):
                    batch = sharding.host_batch_to_global(next_batch(), setup.mesh)
                    state, _ = setup.step(state, batch)
        finally:
            trace.stop(state)
    setup.state = state  # the old one was donated
    return trace.trace_files(log_dir)[-1]


def gradient_health(run_dir: str | Path, cfg: Config, batch: Any
                    ) -> dict[str, Any]:
    from jaxlm.train import rundir

    health = metrics_health(rundir.read_metrics(run_dir), cfg.optim.clip_norm)
    health["clip_norm"] = cfg.optim.clip_norm
    norms = run_layer_norms(run_dir, cfg, batch)
    health["layer_grad_norms"] = norms
    health["flags"] = flag_layers(norms)
    warnings = []
    if health.get("clip_rate", 0) > 0.5:
        warnings.append(f"{100 * health['clip_rate']:.0f}% of logged steps clipped "
                        "(grad_norm > optim.clip_norm): lower optim.lr or init_std")
    if health.get("grad_norm_trend", 1.0) > 10:
        warnings.append("gradient norm grew more than 10× over the run")
    if health.get("non_finite"):
        warnings.append(f"{health['non_finite']} logged steps had non-finite gradients")
    for kind in ("vanishing", "exploding"):
        if health["flags"][kind]:
            warnings.append(f"{kind} gradients in {', '.join(health['flags'][kind])}")
    health["warnings"] = warnings
    return health


def from_run(run_dir: str | Path, steps: int = 10, overrides: list[str] | None = None,
             trace_dir: str | Path | None = None) -> Profile:
    """Profiles a run directory's configuration on its own data pipeline."""
    from jaxlm.data import setup as data_setup
    from jaxlm.train import rundir

    cfg = rundir.load_config(run_dir, overrides or ())
    data = data_setup.build(cfg, Path(run_dir), progress=False)
    position = iter(range(10**9))

    def next_batch() -> Any:
        return data.train.batch(next(position))

    return profile(cfg, steps=steps, next_batch=next_batch, run_dir=run_dir,
                   trace_dir=trace_dir)


def figure(p: Profile, out: str | Path) -> Path:
    """A PNG: step time split, memory split, per-layer gradient norms, grad norm over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].barh(["step (device)", "dispatch (host)", "batch to device", "batch build"],
                  [1e3 * p.step_seconds, 1e3 * p.dispatch_seconds, 1e3 * p.put_seconds,
                   1e3 * p.host_batch_seconds], color=["C0", "C1", "C2", "C3"])
    ax[0, 0].set_xlabel("ms per step")
    ax[0, 0].set_title(f"{p.verdict} (intensity {p.arithmetic_intensity:.1f} vs ridge "
                       f"{p.ridge_point:.1f} FLOP/B)")
    mem = {k: v for k, v in p.memory.items() if k != "peak"}
    ax[0, 1].bar(list(mem), [v / 2**20 for v in mem.values()], color=["C0", "C1", "C2"])
    ax[0, 1].set_ylabel("MiB per device")
    ax[0, 1].set_title("memory")
    norms = p.gradients.get("layer_grad_norms", {})
    if norms:
        flags = p.gradients["flags"]
        colors = ["C3" if k in flags["exploding"] else "C4" if k in flags["vanishing"] else
                  "C0" for k in norms]
        ax[1, 0].bar(range(len(norms)), list(norms.values()), color=colors)
        ax[1, 0].set_xticks(range(len(norms)), list(norms), rotation=60, fontsize=7)
        ax[1, 0].set_yscale("log")
    ax[1, 0].set_title("gradient norm per layer (one batch)")
    if p.gradients.get("grad_norms"):
        ax[1, 1].plot(p.gradients["steps"], p.gradients["grad_norms"], label="grad norm")
        if p.gradients.get("clip_norm"):
            ax[1, 1].axhline(p.gradients["clip_norm"], color="C3", ls="--", label="clip")
        ax[1, 1].legend()
        ax[1, 1].set_yscale("log")
        ax[1, 1].set_xlabel("step")
    ax[1, 1].set_title(f"grad norm (clip rate {100 * p.gradients.get('clip_rate', 0):.0f}%)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
