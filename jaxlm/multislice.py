"""Meshes across slices: which mesh axes cross the data-center network (DCN).

A multislice TPU run joins several slices whose chips talk over fast links (ICI) inside a
slice and over the much slower DCN between slices. `mesh.dcn_data` and `mesh.dcn_fsdp` say how
many ways of the data and fsdp axes go across slices; every other split stays inside a slice,
so with the default (data across slices) only the data-parallel gradient reductions cross DCN.
On platforms without slices (GPU, CPU) an explicit DCN split treats each process (host) as one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxlm.config import ConfigError, MeshConfig

# Mesh axis -> the config key of its DCN split; axes not named here stay inside a slice.
DCN_KEYS = {"data": "dcn_data", "fsdp": "dcn_fsdp"}


def granule_attr(devices: Sequence[Any]) -> str:
    """`slice_index` where the devices span several slices, else `process_index`."""
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        return "slice_index"
    return "process_index"


def num_granules(devices: Sequence[Any], attr: str) -> int:
    return len({getattr(d, attr, 0) for d in devices})


def dcn_shape(cfg: MeshConfig, axes: Sequence[str], shape: Sequence[int],
              devices: Sequence[Any]) -> tuple[int, ...] | None:
    """How many ways each mesh axis crosses DCN, or None for a mesh inside one slice.
    `dcn_data=-1` takes the slices left over by `dcn_fsdp` on a multislice TPU, else 1."""
    explicit = cfg.dcn_data > 1 or cfg.dcn_fsdp > 1
    attr = granule_attr(devices)
    if attr == "process_index" and not explicit:
        return None  # one slice (or hosts that were not asked to split): no DCN axes
    granules = num_granules(devices, attr)
    dcn_data = cfg.dcn_data
    if dcn_data == -1:
        dcn_data = max(granules // cfg.dcn_fsdp, 1)
    wanted = {"data": dcn_data, "fsdp": cfg.dcn_fsdp}
    dcn = tuple(wanted.get(a, 1) for a in axes)
    what = "slices" if attr == "slice_index" else "processes"
    if math.prod(dcn) != granules:
        unit = {"slices": "slice", "processes": "process"}[what] if granules == 1 else what
        raise ConfigError(f"mesh.dcn_data × mesh.dcn_fsdp = {dcn_data} × {cfg.dcn_fsdp} but the "
                          f"devices are in {granules} {unit}; make the product {granules}")
    for axis, size, ways in zip(axes, shape, dcn):
        if size % ways:
            raise ConfigError(f"mesh.{axis}={size} does not split {ways} ways across {what} "
                              f"(mesh.{DCN_KEYS[axis]}={ways}); choose a multiple of {ways}")
    return dcn if math.prod(dcn) > 1 else None


def device_grid(cfg: MeshConfig, axes: Sequence[str], shape: Sequence[int],
                devices: Sequence[Any]) -> np.ndarray | None:
    """The devices laid out as `shape` with the DCN splits outermost on their axes (each
    slice a contiguous block), or None when no axis crosses DCN."""
    dcn = dcn_shape(cfg, axes, shape, devices)
    if dcn is None:
        return None
    from jax.experimental import mesh_utils

    ici = tuple(s // d for s, d in zip(shape, dcn))
    try:
        return mesh_utils.create_hybrid_device_mesh(
            ici, dcn, list(devices), process_is_granule=granule_attr(devices) != "slice_index",
            allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError) as e:
        raise ConfigError(f"cannot lay out mesh {dict(zip(axes, shape))} over the slices with "
                          f"DCN splits {dict(zip(axes, dcn))}: {str(e).splitlines()[0]}") from None
