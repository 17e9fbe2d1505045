"""`jaxlm compile` on a TPU topology described by libtpu (skipped where libtpu is absent)."""

import importlib.util
import json

import pytest

from jaxlm import config as config_lib
from jaxlm.cli import main

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install 'jaxlm[tpu]')")


@needs_libtpu
@pytest.mark.slow
def test_compile_reports_per_chip_memory_and_fit(capsys):
    overrides = ["train.batch_size=8", "mesh.data=2", "mesh.fsdp=2"]
    code = main(["compile", "--topology", "v5e:2x2", "--json", *overrides])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"] is True
    assert report["chips"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "expert": 1,
                                                        "context": 1, "tensor": 1}
    assert report["device_kind"].startswith("TPU v5")
    # fsdp=2 halves the parameter bytes per chip (up to unsharded biases and norms).
    assert report["params_bytes_per_chip"] < 0.6 * report["params"] * 4
    assert report["opt_state_bytes_per_chip"] >= 2 * report["params_bytes_per_chip"]
    assert report["flops_per_step"] >= 6 * report["params"] * 8 * 64
    # The floor at the default config's own row length, whatever that becomes.
    train = config_lib.load(None, overrides).train
    assert report["flops_per_step"] >= 6 * report["params"] * train.batch_size * train.seq_len


@needs_libtpu
@pytest.mark.slow
def test_mixtral_8x7b_fits_a_v5p_slice_with_its_experts_split(capsys):
    """The published Mixtral 8x7B on 16 v5p chips: its 8 experts one per `expert` shard, the
    rest FSDP over 2, 16 rows of 1024 tokens (configs/mixtral-8x7b.yaml, as the README
    says); bfloat16 compute, float32 parameters and Adam state."""
    code = main(["compile", "--config", "mixtral-8x7b", "--topology", "v5p:2x2x4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"] is True, report
    assert report["mesh"] == {"data": 1, "fsdp": 2, "expert": 8, "context": 1,
                              "tensor": 1}
    assert 46.6e9 < report["params"] < 46.8e9  # 46.7B published
    # Experts (97% of the weights) split 16 ways (expert × fsdp), the rest 2 ways.
    assert report["params_bytes_per_chip"] < report["params"] * 4 / 12
    # Model FLOPs count the 2 active experts of 8: 6 × the 12.9B active parameters per token
    # (less the input embedding, a lookup: 12.75B), plus attention; not 6 × 46.7B.
    per_token = report["flops_per_step"] / (16 * 1024)
    assert 6 * 12.75e9 < per_token < 6 * 12.9e9, per_token


@needs_libtpu
@pytest.mark.slow
def test_llama3_8b_fits_one_v5p_host(capsys):
    """The published Llama 3 8B on 4 v5p chips (configs/llama3-8b.yaml): FSDP over all 4,
    bfloat16 compute, float32 parameters and Adam state, 8 rows of 2048 tokens."""
    code = main(["compile", "--config", "llama3-8b", "--topology", "v5p:2x2x1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"] is True, report
    assert report["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "context": 1,
                              "tensor": 1}
    assert report["params"] == 8_030_261_248  # the published checkpoint's count
    # Every float32 weight split 4 ways; Adam's two moments twice that.
    assert report["params_bytes_per_chip"] == report["params"]
    assert report["opt_state_bytes_per_chip"] >= 2 * report["params_bytes_per_chip"]
    assert report["total_bytes_per_chip"] < report["hbm_bytes_per_chip"]


def test_compile_with_a_bad_topology_exits_2(capsys):
    code = main(["compile", "--topology", "v99:1x1"])
    assert code == 2 and "v99:1x1" in capsys.readouterr().err
