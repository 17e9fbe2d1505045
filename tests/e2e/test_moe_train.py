"""An MoE preset (mixtral-tiny) trains through `jaxlm train` on one device and on an FSDP ×
expert mesh of 8 simulated devices with the same losses, and logs its router losses."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import corpus

from jaxlm.cli import main
from jaxlm.train import rundir

ROOT = Path(__file__).resolve().parents[2]
RUN = ["model.preset=mixtral-tiny", "model.num_layers=2", "model.d_model=32",
       "model.num_heads=4", "model.d_ff=64", "model.vocab_size=260", "model.max_seq_len=32",
       "train.seq_len=32", "train.batch_size=8", "train.steps=3", "train.log_every=1",
       "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=100", "optim.lr=3e-3",
       "optim.warmup_steps=1", "model.router_z_loss=0.001", "run.quiet=true"]


def _rows(run: Path) -> list[dict]:
    return [r for r in rundir.read_metrics(run) if "loss" in r]


def test_moe_trains_alike_on_one_device_and_an_fsdp_expert_mesh(tmp_path):
    data = corpus(tmp_path)
    one, mesh = tmp_path / "one", tmp_path / "fsdp_expert"
    # One device: a process of its own (this one has 8), running beside the mesh run.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    single = subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", f"run.dir={one}", f"data.files={data}",
         *RUN], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    assert main(["train", f"run.dir={mesh}", f"data.files={data}", *RUN, "mesh.data=1",
                 "mesh.fsdp=2", "mesh.expert=4"]) == 0
    out = single.communicate(timeout=600)[0]
    assert single.returncode == 0, out

    ref, got = _rows(one), _rows(mesh)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    for key in ("loss", "moe_aux_loss", "moe_z_loss"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-5,
                                   err_msg=key)
    # The load-balancing loss is k = 2 for a uniform routing, up to E = 4 for a collapsed one.
    assert all(1.5 < r["moe_aux_loss"] < 4 for r in got), got
    assert all(r["moe_z_loss"] > 0 for r in got)
