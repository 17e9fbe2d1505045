"""Device mesh from config, the logical-axis rules, and shardings for state and batches.

Model code names logical axes only; LOGICAL_RULES is the one table that maps them to the
mesh axes `data`, `fsdp`, `expert`, `context` and `tensor`. A config extends or overrides it
with `mesh.rules` (`["embed=tensor", "mlp=fsdp+tensor", "vocab="]`), and kernels that shard by
hand ask the active table (`mesh_axes_for`) instead of naming mesh axes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm import multislice
from jaxlm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# The expert axis splits the MoE experts, and (as in MaxText) the batch everywhere else: without
# experts, or outside the MoE layers, it is one more data-parallel axis.
BATCH_AXES = ("data", "fsdp", "expert")
# Context parallelism splits every sequence: the token axis of activations and of batches.
LENGTH_AXES = ("context",)

def target_platform() -> str:
    """The platform of the program being traced: that of the current mesh's devices (an
    ahead-of-time compile on a CPU host for a TPU topology is 'tpu'), else JAX's default
    backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def length_sharded() -> bool:
    """Whether the current mesh splits the token axis of activations (context parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and any(mesh.shape.get(a, 1) > 1 for a in LENGTH_AXES)


# (logical axis, mesh axes). Weights: embed over fsdp (FSDP), heads/mlp/vocab over tensor
# (column-then-row split), MoE experts over expert. Activations: batch over data×fsdp×expert,
# length over context, the tensor-split dims over tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", LENGTH_AXES),
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
    ("expert", "expert"),
    # LoRA adapters: in/out axes as their kernel's, the small rank axis whole.
    ("lora_rank", None),
)


def logical_rules(cfg: MeshConfig | None = None) -> tuple[tuple[str, Any], ...]:
    """The default table with `cfg.rules` applied: `logical=axis[+axis...]` (empty = not
    sharded) replaces the logical axis's entry, or adds one."""
    rules = dict(LOGICAL_RULES)
    for entry in (cfg.rules if cfg is not None else []):
        logical, sep, axes = entry.partition("=")
        names = tuple(a for a in axes.split("+") if a)
        unknown = [a for a in names if a not in MESH_AXES]
        if not sep or not logical or unknown:
            raise ConfigError(f"mesh.rules entry '{entry}': expected logical=mesh_axis[+...] "
                              f"with mesh axes from {', '.join(MESH_AXES)}")
        rules[logical.strip()] = None if not names else names[0] if len(names) == 1 else names
    return tuple(rules.items())


def mesh_axes_for(logical: str) -> tuple[str, ...]:
    """The mesh axes the active rules (`nn.logical_axis_rules`, else the default table) map a
    logical axis to."""
    active = nn.get_logical_axis_rules() or LOGICAL_RULES
    axes = dict(active).get(logical)
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Resolves -1 entries so that data × fsdp × expert × context × tensor == num_devices (in
    MESH_AXES order)."""
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
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
                f"{num_devices} devices; adjust mesh.data/mesh.fsdp/mesh.expert/mesh.context/"
                "mesh.tensor"
            )
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {'×'.join(MESH_AXES)} = {'×'.join(map(str, sizes))} = {math.prod(sizes)} "
            f"but there are {num_devices} devices; set one axis to -1 to fill"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The data × fsdp × expert × context × tensor mesh over all devices (JAX picks a
    topology-aware order), or over `devices` in the order given (a subset, or a TPU topology
    described for AOT). Axes split across slices (`mesh.dcn_data`, `mesh.dcn_fsdp`) put each
    slice in one block."""
    every = list(jax.devices() if devices is None else devices)
    grid = multislice.device_grid(cfg, MESH_AXES, mesh_shape(cfg, len(every)), every)
    if grid is not None:
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    if devices is None:
        shape = mesh_shape(cfg, jax.device_count())
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: Any = LOGICAL_RULES) -> Any:
    """A pytree of logical PartitionSpecs -> NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over the batch axes; the token axis (the second) over the context axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *((LENGTH_AXES,) if ndim > 1 else ()),
                                             *([None] * (ndim - 2))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def host_batch_to_global(batch: Any, mesh: Mesh) -> Any:
    """Each process passes its own rows (a batch pytree of numpy arrays); returns the same
    tree of global arrays sharded over the batch axes (data, fsdp, expert), their tokens over
    the context axis. Every process holds whole sequences, also where the context axis spans
    processes: each device takes its slice of them."""
    rows = _global_rows(mesh)
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(
            batch_sharding(mesh, v.ndim), v, (v.shape[0] * rows, *v.shape[1:])), batch)


@functools.lru_cache(maxsize=8)  # per step, and a pod has thousands of devices to scan
def _global_rows(mesh: Mesh) -> int:
    """Global rows per row of this process: the batch shards of the mesh over those its
    devices hold."""
    axes = [mesh.axis_names.index(a) for a in BATCH_AXES]
    mine = {tuple(np.take(i, axes)) for i in np.ndindex(mesh.devices.shape)
            if mesh.devices[i].process_index == jax.process_index()}
    return data_parallel_size(mesh) // len(mine)


def check_model_fits_mesh(model_cfg, mesh: Mesh) -> None:
    """Dimensions split over `tensor` (heads, kv heads, mlp, vocab), `fsdp` (embed) and
    `expert` (MoE experts) must divide evenly; says which one does not, and how to fix it."""
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    kv = model_cfg.num_kv_heads or model_cfg.num_heads
    checks = [("model.num_heads", model_cfg.num_heads, t, "mesh.tensor"),
              ("model.num_kv_heads", kv, t, "mesh.tensor"),
              ("model.d_ff", model_cfg.d_ff, t, "mesh.tensor"),
              ("model.vocab_size", model_cfg.vocab_size, t, "mesh.tensor"),
              ("model.d_model", model_cfg.d_model, f, "mesh.fsdp")]
    if model_cfg.num_experts:
        checks.append(("model.num_experts", model_cfg.num_experts, mesh.shape["expert"],
                       "mesh.expert"))
    for key, size, parts, axis in checks:
        if size % parts:
            raise ConfigError(f"{key}={size} is not divisible by {axis}={parts}; "
                              f"choose a {axis} that divides it (or pad {key})")
