"""Device mesh from config, the logical-axis rules, and shardings for state and batches.

Model code names logical axes only; this table is the one place that maps them to the
mesh axes `data`, `fsdp` and `tensor`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical axis, mesh axes). Weights: embed over fsdp (FSDP), heads/mlp/vocab over tensor
# (column-then-row split). Activations: batch over data×fsdp, the tensor-split dims over tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 entries so that data × fsdp × tensor == num_devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    fixed = math.prod(s for s in sizes if s != -1)
    if len(fill) > 1:
        # Only the first -1 fills; the others become 1.
        for i in fill[1:]:
            sizes[i] = 1
        fill = fill[:1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; adjust mesh.data/mesh.fsdp/mesh.tensor"
            )
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh data×fsdp×tensor = {sizes[0]}×{sizes[1]}×{sizes[2]} = {math.prod(sizes)} "
            f"but there are {num_devices} devices; set one axis to -1 to fill"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    if devices is jax.devices() or len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)


def logical_to_sharding(logical_specs: Any, mesh: Mesh) -> Any:
    """A pytree of logical PartitionSpecs -> NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process passes its own rows; returns global arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


def check_model_fits_mesh(model_cfg, mesh: Mesh) -> None:
    """Dimensions split over `tensor` (heads, kv heads, mlp, vocab) and `fsdp` (embed) must
    divide evenly; says which one does not, and how to fix it."""
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    kv = model_cfg.num_kv_heads or model_cfg.num_heads
    checks = [("model.num_heads", model_cfg.num_heads, t, "mesh.tensor"),
              ("model.num_kv_heads", kv, t, "mesh.tensor"),
              ("model.d_ff", model_cfg.d_ff, t, "mesh.tensor"),
              ("model.vocab_size", model_cfg.vocab_size, t, "mesh.tensor"),
              ("model.d_model", model_cfg.d_model, f, "mesh.fsdp")]
    for key, size, parts, axis in checks:
        if size % parts:
            raise ConfigError(f"{key}={size} is not divisible by {axis}={parts}; "
                              f"choose a {axis} that divides it (or pad {key})")
