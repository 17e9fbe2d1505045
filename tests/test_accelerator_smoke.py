"""benchmarks/accelerator.py in its CPU smoke mode (tiny sizes), so the script that records
the accelerator table never rots: every section runs or says why it was skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "accelerator.py"), "--smoke", "--out", str(out),
         "--models", "gpt2-124m", "--remats", "none", "--budget", "600"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "accelerator.json").read_text()), (out / "accelerator.md")


def _case(data, section, name=None):
    return [c for c in data["cases"] if c["section"] == section
            and (name is None or c["case"] == name)]


def test_every_section_runs_or_says_why_not(smoke):
    data, md = smoke
    assert not [c for c in data["cases"] if c["status"] == "error"], data["cases"]
    (ckpt,) = _case(data, "checkpoint")
    assert ckpt["status"] == "ok" and ckpt["restore_s"] > 0 and ckpt["save_total_s"] > 0
    gens = _case(data, "generation")
    assert [g["batch"] for g in gens] == [1, 2] and all(g["tokens_per_sec"] > 0 for g in gens)
    (check,) = _case(data, "cudnn_check")
    assert check["status"] == "skipped" and "NVIDIA GPU" in check["reason"]
    text = md.read_text()
    for header in ("MFU formula", "KV cache", "checkpoint", "cuDNN attention"):
        assert header in text


def test_bench_records_speed_both_mfus_and_the_cudnn_skip(smoke):
    data, _ = smoke
    (xla,) = _case(data, "bench", "gpt2-124m attention=xla remat=none")
    assert xla["status"] == "ok" and xla["tokens_per_sec"] > 0
    assert 0 < xla["mfu_formula"] < 1.5
    # XLA also counts softmax, norms and the masked half of attention: more, not wildly so.
    assert 1.0 < xla["mfu_xla"] / xla["mfu_formula"] < 2.0
    (cudnn,) = _case(data, "bench", "gpt2-124m attention=cudnn remat=none")
    assert cudnn["status"] == "skipped" and "NVIDIA GPU" in cudnn["reason"]
    (auto,) = _case(data, "bench", "gpt2-124m attention=auto remat=none")
    assert auto["same_as"] == xla["case"] and "auto is xla" in auto["reason"]


def test_xla_flops_extrapolated_from_three_depths_equal_the_full_count(smoke):
    data, _ = smoke
    (flops,) = _case(data, "xla_flops", "gpt2-124m")  # 4 layers in the smoke
    assert flops["flops_per_token"] == pytest.approx(flops["direct_flops_per_token"], rel=1e-6)


def test_only_an_out_of_memory_case_runs_again_at_half_the_batch(monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    import accelerator_cases as cases

    calls = []

    def bench_case(config, overrides, *args):
        calls.append(overrides[-1])
        if len(calls) == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return {"tokens_per_sec": 1.0}

    monkeypatch.setattr(cases, "bench_case", bench_case)
    out = cases.bench_fitting("tiny", ["train.batch_size=8"], 1, 1, 1.0, None)
    assert calls == ["train.batch_size=8", "train.batch_size=4"]
    assert out["batch_halved_from"] == 8 and "RESOURCE_EXHAUSTED" in out["first_error"]

    def broken(*args):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(cases, "bench_case", broken)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        cases.bench_fitting("tiny", ["train.batch_size=8"], 1, 1, 1.0, None)
