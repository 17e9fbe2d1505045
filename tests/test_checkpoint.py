"""Checkpoints: restore onto other meshes, skip a damaged newest checkpoint, refuse another
model by name, keep policy, params-only export."""

import logging

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.api import export
from jaxlm.checkpoint import Checkpointer, CheckpointError
from jaxlm.cli import main
from jaxlm.config import MeshConfig
from jaxlm.families.registry import build_model
from jaxlm.optim import make_optimizer
from jaxlm.train.state import init_state, state_shardings

SHAPE = ["model.num_layers=2", "model.d_model=64", "model.num_heads=8", "model.d_ff=128",
         "model.vocab_size=128", "model.max_seq_len=32", "train.seq_len=32"]


def _setup(mesh_shape, devices=None, extra=()):
    cfg = config_lib.load(None, SHAPE + list(extra))
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), devices or jax.devices())
    model = build_model(cfg.model)
    return model, make_optimizer(cfg.optim, 10), mesh


def _save(tmp_path, mesh_shape=(8, 1, 1), steps=(1,), **kw):
    model, tx, mesh = _setup(mesh_shape)
    ckpt = Checkpointer(tmp_path / "ck", async_save=False, **kw)
    with jax.set_mesh(mesh):
        state = init_state(model, tx, mesh, seed=1)
        for s in steps:
            state = state.replace(step=jax.numpy.asarray(s, jax.numpy.int32))
            ckpt.save(s, state, {"position": s})
    ckpt.close()
    return jax.device_get(state)


@pytest.mark.parametrize("mesh_shape, n_devices", [((2, 2, 2), 8), ((1, 1, 1), 1),
                                                   ((1, 2, 4), 8)])
def test_restore_onto_another_mesh(tmp_path, mesh_shape, n_devices):
    saved = _save(tmp_path)
    model, tx, mesh = _setup(mesh_shape, jax.devices()[:n_devices])
    with jax.set_mesh(mesh):
        abstract, _ = state_shardings(model, tx, mesh)
        step, restored, data = Checkpointer(tmp_path / "ck").restore(abstract)
    assert step == 1 and data == {"position": 1}
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, np.asarray(b))
    q = restored.params["decoder"]["layers_0"]["attn"]["query"]["kernel"]
    assert q.sharding.mesh.shape == mesh.shape


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    _save(tmp_path, steps=(1, 2))
    newest = tmp_path / "ck" / "2" / "state"
    damaged = 0
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 10)  # truncate and corrupt
            damaged += 1
    assert damaged
    model, tx, mesh = _setup((8, 1, 1))
    with jax.set_mesh(mesh), caplog.at_level(logging.WARNING):
        abstract, _ = state_shardings(model, tx, mesh)
        step, _, data = Checkpointer(tmp_path / "ck").restore(abstract)
    assert step == 1 and data == {"position": 1}
    assert "skipped unreadable checkpoint" in caplog.text and "2" in caplog.text


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    _save(tmp_path)
    model, tx, mesh = _setup((8, 1, 1), extra=["model.d_ff=256"])
    with jax.set_mesh(mesh):
        abstract, _ = state_shardings(model, tx, mesh)
        with pytest.raises(CheckpointError) as e:
            Checkpointer(tmp_path / "ck").restore(abstract)
    msg = str(e.value)
    # The first parameter (in tree order) that differs, named with both shapes.
    assert "is of another model: parameter ['decoder']['layers_0']['mlp']['wi']['bias'] has " \
           "shape (128,) in the checkpoint but (256,) in this model" in msg, msg


def test_keep_newest_and_every_kth(tmp_path):
    _save(tmp_path, steps=range(1, 11), keep=2, keep_period=4)
    assert Checkpointer(tmp_path / "ck").steps() == [4, 8, 9, 10]


def test_export_is_params_only_and_loads(tmp_path):
    data = tmp_path / "c.txt"
    data.write_text("to be or not to be, that is the question.\n" * 200)
    run = tmp_path / "run"
    assert main(["train", f"run.dir={run}", f"data.files={data}", "train.steps=2",
                 "train.batch_size=8", "model.vocab_size=260", *SHAPE[:4],
                 "model.max_seq_len=32", "train.seq_len=32", "run.quiet=true"]) == 0
    out = export(run, tmp_path / "exported")
    full, small = jaxlm.load(run), jaxlm.load(out)
    tokens = [[1, 2, 3, 4, 5]]
    np.testing.assert_array_equal(np.asarray(full(tokens)), np.asarray(small(tokens)))
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert size(out) < size(run / "checkpoints") / 2  # no optimizer state
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2  # never overwrites
