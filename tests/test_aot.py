"""`jaxlm compile` on a TPU topology described by libtpu (skipped where libtpu is absent)."""

import importlib.util
import json

import pytest

from jaxlm.cli import main

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install 'jaxlm[tpu]')")


@needs_libtpu
@pytest.mark.slow
def test_compile_reports_per_chip_memory_and_fit(capsys):
    code = main(["compile", "--topology", "v5e:2x2", "--json", "train.batch_size=8",
                 "mesh.data=2", "mesh.fsdp=2"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"] is True
    assert report["chips"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["device_kind"].startswith("TPU v5")
    # fsdp=2 halves the parameter bytes per chip (up to unsharded biases and norms).
    assert report["params_bytes_per_chip"] < 0.6 * report["params"] * 4
    assert report["opt_state_bytes_per_chip"] >= 2 * report["params_bytes_per_chip"]
    assert report["flops_per_step"] >= 6 * report["params"] * 8 * 128


def test_compile_with_a_bad_topology_exits_2(capsys):
    code = main(["compile", "--topology", "v99:1x1"])
    assert code == 2 and "v99:1x1" in capsys.readouterr().err
