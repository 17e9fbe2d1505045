"""Multislice meshes: each slice is one block of the data (or fsdp) axis, and in the compiled
train step only the data-parallel reductions cross slices; an FSDP split across slices sends
its gathers over DCN too (checked on simulated CPU slices and on a libtpu multislice topology)."""

import importlib.util
import json
from dataclasses import dataclass

import jax
import numpy as np
import pytest
from conftest import TINY_MODEL

from jaxlm import collectives, multislice, setup, sharding
from jaxlm import config as config_lib
from jaxlm.cli import main
from jaxlm.config import ConfigError, MeshConfig


@dataclass(frozen=True)
class FakeDevice:
    """What the mesh layout reads of a device: its id, slice and process."""

    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def _fake(num: int, slices: int) -> list[FakeDevice]:
    # Listed out of order, slice by slice interleaved, as a runtime may list them.
    per = num // slices
    return [FakeDevice(i, i // per) for i in np.random.default_rng(0).permutation(num)]


def _slices(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.slice_index)(grid)


def test_each_slice_is_one_block_of_the_data_axis():
    axes = sharding.MESH_AXES
    shape = tuple({"data": 4, "fsdp": 2, "tensor": 2}.get(a, 1) for a in axes)
    grid = multislice.device_grid(MeshConfig(dcn_data=-1), axes, shape, _fake(16, 2))
    assert grid.shape == shape
    slice_of = _slices(grid)
    data = axes.index("data")
    for i in range(4):  # data rows 0-1 in slice 0, rows 2-3 in slice 1: all of fsdp/tensor
        assert set(np.take(slice_of, i, axis=data).ravel()) == {i // 2}
    # fsdp across slices instead: each slice is one half of the fsdp axis.
    grid = multislice.device_grid(MeshConfig(dcn_data=1, dcn_fsdp=2), axes, shape,
                                  _fake(16, 2))
    fsdp = axes.index("fsdp")
    for i in range(2):
        assert set(np.take(_slices(grid), i, axis=fsdp).ravel()) == {i}
    assert sorted(d.id for d in grid.ravel()) == list(range(16))  # every device once


def test_one_slice_keeps_the_plain_mesh_and_bad_splits_are_config_errors():
    axes, shape = sharding.MESH_AXES, tuple(8 if a == "data" else 1 for a in sharding.MESH_AXES)
    one_slice = [FakeDevice(i, 0) for i in range(8)]
    assert multislice.device_grid(MeshConfig(), axes, shape, one_slice) is None
    with pytest.raises(ConfigError, match="devices are in 1 process; make"):
        multislice.device_grid(MeshConfig(dcn_data=2), axes, shape, one_slice)
    with pytest.raises(ConfigError, match="devices are in 2 slices"):
        multislice.device_grid(MeshConfig(dcn_data=4), axes, shape, _fake(8, 2))
    odd = tuple(2 if a == "fsdp" else 4 if a == "data" else 1 for a in axes)
    with pytest.raises(ConfigError, match=r"mesh.fsdp=2 does not split 4 ways"):
        multislice.device_grid(MeshConfig(dcn_data=1, dcn_fsdp=4), axes, odd, _fake(8, 4))
    with pytest.raises(ConfigError, match="dcn_data"):
        config_lib.load(None, ["mesh.dcn_data=0"])


def test_replica_groups_forms():
    line = "%ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={{0,1},{2,3}}, to_apply=%a"
    assert collectives.replica_groups(line, 4) == [[0, 1], [2, 3]]
    iota = "%ag = f32[8]{0} all-gather(f32[4]{0} %x), replica_groups=[2,2]<=[2,2]T(1,0), d={0}"
    assert collectives.replica_groups(iota, 4) == [[0, 2], [1, 3]]
    assert collectives.replica_groups("%r = f32[2]{0} all-reduce(%x), to_apply=%a", 3) == \
        [[0, 1, 2]]
    mesh = ("%g = f32[8]{0} all-gather(f32[4]{0} %x), replica_groups=mesh['axis_0'=2,"
            "'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}, dimensions={0}")
    assert collectives.replica_groups(mesh, 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert collectives.replica_groups(mesh.replace("{'axis_0'}", "{'axis_1'}"), 8) == \
        [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert collectives.dcn_bytes(line, [0, 0, 1, 1])["all-reduce"] == 0
    assert collectives.dcn_bytes(iota, [0, 0, 1, 1])["all-gather"] == 32


def _dcn_traffic(dcn_data: int, dcn_fsdp: int) -> dict[str, int]:
    """The cross-slice bytes of the tiny train step on 8 CPU devices laid out as 2 slices."""
    cfg = config_lib.load(None, [*TINY_MODEL, "mesh.data=4", "mesh.fsdp=2"])
    axes = sharding.MESH_AXES
    shape = sharding.mesh_shape(cfg.mesh, 8)
    fakes = multislice.device_grid(MeshConfig(dcn_data=dcn_data, dcn_fsdp=dcn_fsdp), axes,
                                   shape, _fake(8, 2))
    real = jax.devices()
    devices = [real[d.id] for d in fakes.ravel()]  # the same layout on real devices
    s = setup.build(cfg, devices=devices)
    assert s.mesh.devices.ravel().tolist() == devices
    slice_of = [d.slice_index for d in fakes.ravel()]
    return collectives.dcn_bytes(s.lower().compile().as_text(), slice_of)


def test_only_data_parallel_reductions_cross_slices():
    data_across = _dcn_traffic(dcn_data=2, dcn_fsdp=1)
    assert data_across["all-reduce"] > 0
    assert {k for k, v in data_across.items() if v} == {"all-reduce"}
    fsdp_across = _dcn_traffic(dcn_data=1, dcn_fsdp=2)  # FSDP's gathers now cross slices
    assert fsdp_across["all-gather"] > 0


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install 'jaxlm[tpu]')")


@needs_libtpu
@pytest.mark.slow
def test_aot_compile_on_two_tpu_slices(capsys):
    args = ["compile", "--topology", "v5p:2x2x2", "--slices", "2", "--json", *TINY_MODEL,
            "train.batch_size=16", "mesh.fsdp=4"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chips"] == 16 and report["slices"] == 2
    assert {k for k, v in report["dcn_bytes"].items() if v} == {"all-reduce"}
    assert main([*args, "mesh.dcn_data=1", "mesh.dcn_fsdp=2"]) == 0
    assert json.loads(capsys.readouterr().out)["dcn_bytes"]["all-gather"] > 0
