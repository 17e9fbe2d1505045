"""FLOPs and MFU (formula vs traced matmuls vs XLA cost analysis), device peaks, `jaxlm bench`
and the bottleneck report of `jaxlm profile`."""

import itertools
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import bench, perf, profile, setup
from jaxlm import config as config_lib
from jaxlm.cli import main
from jaxlm.families import registry

TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "model.vocab_size=64", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8"]


def cfg_of(*overrides: str):
    return config_lib.load("tiny", list(overrides))


@pytest.mark.parametrize("scan", [False, True])
def test_formula_with_dense_attention_equals_the_traced_matmul_flops(scan):
    """Scanned and unrolled stacks alike (every family: tests/test_families.py)."""
    cfg = cfg_of(*TINY, f"model.scan_layers={str(scan).lower()}")
    s = setup.build(cfg)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    with jax.set_mesh(s.mesh):
        traced = perf.jaxpr_matmul_flops(s.train_step, s.abstract_state, s.abstract_batch())
    dense = s.flops_per_token(causal_halved=False)
    assert traced == pytest.approx(dense * tokens, rel=1e-9)
    # Causal halving removes exactly half of the attention term (the diagonal counted half).
    halved = s.flops_per_token()
    assert dense - halved == pytest.approx(6 * 2 * 32 * 32)


def test_mfu_from_the_formula_agrees_with_cost_analysis_within_10_percent():
    cfg = cfg_of("model.num_layers=2", "model.d_model=128", "model.num_heads=2",
                 "model.d_ff=512", "model.vocab_size=256", "model.max_seq_len=64",
                 "train.seq_len=64", "train.batch_size=8")
    r = bench.bench(cfg, steps=2, warmup=1)
    assert r.tokens_per_sec > 0 and r.peak_memory_bytes_per_device > 0
    # XLA counts more than the model's matmuls (softmax, norms, the masked half of causal
    # attention), never less; the optimizer update, which each of the 8 data-parallel
    # replicas repeats, is not model work and is taken out. The rest stays within 10%.
    assert r.cost_flops_per_token - r.optimizer_flops_per_token > r.flops_per_token_dense
    assert r.flops_per_token_dense > r.flops_per_token
    assert r.mfu == pytest.approx(r.mfu_cost_analysis, rel=0.10)


def _device(kind, platform):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize("kind,dtype,flops", [
    ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12), ("TPU v6 lite", "bfloat16", 918e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12), ("NVIDIA H100 80GB HBM3", "float32",
                                                     494.5e12),
    ("NVIDIA H200", "bfloat16", 989e12)])
def test_peak_table_by_device_kind(kind, dtype, flops):
    peak, bw, source = perf.device_peak(dtype, _device(kind, "tpu" if "TPU" in kind else "gpu"))
    assert peak == flops and bw > 1e11 and "table" in source


def _best_rate(fn, work: float, seconds: float = 1.5) -> float:
    """work / the fastest of repeated calls of fn over about `seconds`."""
    fn()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return work / best


def test_cpu_peak_is_measured():
    """The CPU peak is a real measurement: it agrees with the test's own timing of a matrix
    product and a memory copy (within a factor for the load others put on the machine), and
    each of the 8 simulated devices gets an eighth of what the process measured."""
    perf.measured_matmul_peak.cache_clear()  # measured now, next to the reference below
    peak, bw, source = perf.device_peak("float32", jax.devices()[0])
    n_dev = jax.local_device_count()
    assert "measured" in source and n_dev == 8
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    ref_flops = _best_rate(lambda: jax.block_until_ready(mm(a, a)), 2.0 * n**3)
    assert ref_flops / 4 < peak * n_dev < ref_flops * 4, (peak * n_dev, ref_flops)
    src = np.ones(64 * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    ref_bw = _best_rate(lambda: np.copyto(dst, src), 2.0 * src.nbytes, seconds=0.5)
    assert ref_bw / 4 < bw * n_dev < ref_bw * 4, (bw * n_dev, ref_bw)


def test_cpu_peak_arithmetic_under_a_fake_clock(monkeypatch):
    """Every timed call takes exactly 10 ms: an n×n product is 2n³ FLOPs, a copy moves its
    bytes twice (read and write), and the process figure is split over the devices."""
    ticks = itertools.count(0.0, 0.01)
    monkeypatch.setattr(perf, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert perf.measured_matmul_peak.__wrapped__("float32", n=64, seconds=0.1) == \
        pytest.approx(2 * 64**3 / 0.01)
    assert perf.measured_memory_bandwidth.__wrapped__(mib=1) == pytest.approx(2 * 2**20 / 0.01)
    monkeypatch.setattr(perf, "measured_matmul_peak", lambda dtype, **kw: 8e9)
    monkeypatch.setattr(perf, "measured_memory_bandwidth", lambda: 16e9)
    peak, bw, _ = perf.device_peak("float32", jax.devices()[0])
    assert (peak, bw) == (1e9, 2e9)


def test_collective_bytes_from_hlo_text():
    hlo = "\n".join([
        "  %all-reduce.1 = f32[256,32]{1,0} all-reduce(%p), replica_groups={}",
        "  %ag = (f32[4,8]{1,0}, f32[32,8]{1,0}) all-gather-start(%x), dimensions={0}",
        "  %agd = f32[32,8]{1,0} all-gather-done(%ag)",
        "  %t = (bf16[16]{0}, s32[2]{0}) all-reduce(%a, %b), to_apply=%sum",
        "  %cp = f32[10]{0} collective-permute(%y), source_target_pairs={{0,1}}"])
    out = profile.collective_bytes(hlo)
    assert out["all-reduce"] == 256 * 32 * 4 + 16 * 2 + 2 * 4
    assert out["all-gather"] == 32 * 8 * 4
    assert out["collective-permute"] == 40 and out["reduce-scatter"] == 0


def _slow_batches(cfg, seconds):
    rng = np.random.default_rng(0)

    def next_batch():
        time.sleep(seconds)
        return registry.of(cfg.model).synthetic_batch(cfg, rng)
    return next_batch


def test_input_starved_configuration_is_input_bound():
    cfg = cfg_of(*TINY)
    p = profile.profile(cfg, steps=3, warmup=1, next_batch=_slow_batches(cfg, 0.2))
    assert p.verdict == "input-bound"
    assert p.input_wait_fraction > 0.5
    # Without the sleep this tiny model would be memory-bound: few FLOPs per byte moved.
    assert p.arithmetic_intensity < p.ridge_point
    # Eight data-parallel devices: the gradients are all-reduced every step.
    assert p.devices == 8 and p.communication_bytes["all-reduce"] >= p.memory["params"]


def test_large_matmul_configuration_is_compute_bound():
    # FSDP over the 8 devices: each holds 1/8 of the optimizer state, whose update is
    # memory-bound, and a quarter of the 4,096 tokens per step, whose matmuls are not.
    big = cfg_of("model.num_layers=1", "model.d_model=512", "model.num_heads=4",
                 "model.d_ff=2048", "model.vocab_size=256", "model.max_seq_len=128",
                 "train.seq_len=128", "train.batch_size=32", "mesh.data=1", "mesh.fsdp=-1")
    p = profile.profile(big, steps=2, warmup=1)
    assert p.verdict == "compute-bound", p.table()
    assert p.arithmetic_intensity > p.ridge_point


def test_layer_flags():
    norms = {"embed": 1.0, "decoder/layers_0": 2.0, "decoder/layers_1": 1e-9,
             "decoder/layers_2": 500.0, "ln_final": 1.5}
    flags = profile.flag_layers(norms)
    assert flags == {"vanishing": ["decoder/layers_1"], "exploding": ["decoder/layers_2"]}


@pytest.fixture(scope="module")
def exploding_run(tmp_path_factory):
    from conftest import corpus

    tmp = tmp_path_factory.mktemp("explode")
    run = tmp / "run"
    assert main(["train", "--quiet", f"run.dir={run}", f"data.files={corpus(tmp)}",
                 "train.steps=8", "train.eval_every=0", "train.log_every=1",
                 "train.eval_batches=1", "checkpoint.every=8", "model.init_std=30",
                 "optim.warmup_steps=1", *TINY[:-4], "model.vocab_size=260",
                 "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8"]) == 0
    return run


def test_gradient_health_flags_an_exploding_run(exploding_run, tmp_path, capsys):
    from jaxlm.train import rundir

    rows = [r for r in rundir.read_metrics(exploding_run) if "loss" in r]
    assert all(0 < r["mfu"] < 1 for r in rows)  # the train loop logs MFU
    png = tmp_path / "profile.png"
    assert main(["profile", "--run", str(exploding_run), "--steps", "2", "--json",
                 "--out", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    g = report["gradients"]
    assert g["clip_rate"] == 1.0 and g["grad_norm_first"] > 100
    assert any("clipped" in w for w in g["warnings"])
    assert set(g["layer_grad_norms"]) >= {"embed", "decoder/layers_0", "decoder/layers_1"}
    assert png.stat().st_size > 10_000


def test_bench_cli_json(capsys):
    t0 = time.perf_counter()
    assert main(["bench", "--steps", "2", "--warmup", "1", "--json", *TINY]) == 0
    wall = time.perf_counter() - t0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens_per_step"] == 8 * 32 and (r["steps"], r["rounds"]) == (2, 3)
    assert r["devices"] == 8
    # The compile and the two timed steps happened inside the command's wall time; tokens/s
    # is a step's tokens over the median step time.
    assert 0 < r["compile_seconds"] < wall and 0 < 2 * r["step_seconds_median"] < wall
    assert r["tokens_per_sec"] == pytest.approx(256 / r["step_seconds_median"], rel=1e-9)
    # MFU: model FLOP/s over the peak of all 8 devices (this process's measured CPU peak),
    # below what XLA counts for the step and below 1.
    peak, _, source = perf.device_peak("float32", jax.devices()[0])
    assert r["peak_flops_per_device"] == peak and r["peak_source"] == source
    assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * r["flops_per_token"] / (8 * peak),
                                     rel=1e-9)
    assert 0 < r["mfu"] < r["mfu_cost_analysis"] < r["hfu_cost_analysis"] < 1
    # Causal attention halves the scores and values term 12·L·d·T of 2 layers, T = 32.
    assert r["flops_per_token_dense"] - r["flops_per_token"] == pytest.approx(6 * 2 * 32 * 32)
