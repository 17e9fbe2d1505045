"""LoRA (Hu et al., 2021): low-rank adapters beside frozen projections.

A targeted projection y = x W (+ b) becomes y = x W (+ b) + (alpha / r) · dropout(x) A B with
A [in..., r] (PEFT's Kaiming-uniform init) and B [r, out...] (zeros, so training starts at the
base model). The adapters are parameters `lora_a`, `lora_b` beside the projection's `kernel`;
their in/out axes carry the kernel's logical names and the rank axis `lora_rank`, so they
shard like their base weight. Only they (and what lora.train_also names, e.g. the embeddings)
are differentiated and given optimizer state (jaxlm.train.trainable); the rest of the base
stays bit-identical.

Everything here is a pure function of parameter trees; `Projection` (models/layers.py) holds
the adapter parameters and calls `adapter_delta`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlm.config import Config, LoraConfig, ModelConfig
from jaxlm.models.names import OUTPUT_HEAD, POSITION_TABLE, TOKEN_TABLE, TYPE_TABLE
from jaxlm.train.trainable import EVERYTHING, Trainable

A, B = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"  # the adapters' own logical axis (not sharded: jaxlm.sharding)
# lora.targets -> the projections (Flax module names) that get adapters.
TARGET_MODULES = {"query": ("query",), "key": ("key",), "value": ("value",), "out": ("out",),
                  "mlp_in": ("wi", "wi_gate", "wi_up"), "mlp_out": ("wo",)}

Params = Any


@dataclass(frozen=True)
class Adapter:
    """One projection's adapter settings (hashable: a Flax module attribute)."""

    rank: int
    alpha: float
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class AdaptedModelConfig(ModelConfig):
    """A ModelConfig whose modules add adapters to the `targets` projections. Built by
    `adapted` for the training model only; run directories keep `lora.*` in their own
    section, never this."""

    adapter: Adapter | None = None
    targets: tuple[str, ...] = ()


def adapted(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> ModelConfig:
    """The model config whose modules carry `lora_cfg`'s adapters (itself when rank is 0)."""
    if not lora_cfg.rank:
        return model_cfg
    fields = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    return AdaptedModelConfig(**fields, adapter=Adapter(lora_cfg.rank, lora_cfg.alpha,
                                                        lora_cfg.dropout),
                              targets=tuple(lora_cfg.targets))


def adapter_for(model_cfg: ModelConfig, target: str) -> Adapter | None:
    """The adapter of the projections `target` names (a lora.targets entry), or None."""
    if isinstance(model_cfg, AdaptedModelConfig) and target in model_cfg.targets:
        return model_cfg.adapter
    return None


def adapter_axes(kernel_axes: tuple, in_axes: int) -> tuple[tuple, tuple]:
    """(A's, B's) logical axes: the kernel's input axes + rank, rank + its output axes."""
    return (*kernel_axes[:in_axes], RANK_AXIS), (RANK_AXIS, *kernel_axes[in_axes:])


def a_init(axes: tuple, in_axes: int) -> nn.initializers.Initializer:
    """PEFT's init of A: Kaiming-uniform with a=sqrt(5), i.e. U(±1/sqrt(fan_in))."""
    init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                            in_axis=tuple(range(in_axes)), out_axis=-1)
    return nn.with_logical_partitioning(init, axes)


def adapter_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                  in_axes: int = 1) -> jax.Array:
    """scale · (x A) B: x [..., in...], a [in..., r], b [r, out...] -> [..., out...]."""
    contract = tuple(range(x.ndim - in_axes, x.ndim))
    h = jax.lax.dot_general(x, a, ((contract, tuple(range(in_axes))), ((), ())))
    return jnp.tensordot(h * jnp.asarray(scale, h.dtype), b, axes=1)


# ----------------------------------------------------------------------- parameter trees

def _leaf_name(path: tuple) -> str:
    """The last key of a parameter path: a flattened dict's (a str) or a jax key path's."""
    return str(getattr(path[-1], "key", path[-1]))


def is_adapter(path: tuple) -> bool:
    """Whether a flattened parameter path (of keys) names an adapter matrix."""
    return _leaf_name(path) in (A, B)


def has_adapters(params: Params) -> bool:
    """Whether the tree holds adapters (static: looks at the keys only)."""
    return any(is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))


ADAPTERS = Trainable(is_adapter)


def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def is_embedding(path: tuple) -> bool:
    """Whether a parameter path names an embedding table: token, position or token-type
    embeddings, or an untied output head (lm_head)."""
    names = _path_names(path)
    return names[-1] in (TOKEN_TABLE, POSITION_TABLE, TYPE_TABLE) or OUTPUT_HEAD in names


# lora.train_also names -> the other parameters that train whole beside the adapters.
TRAIN_ALSO = {"embed": is_embedding}


@dataclass(frozen=True)
class _AdaptersAnd:
    """Trainable.select of the adapters plus the `train_also` parameters (hashable)."""

    train_also: tuple[str, ...]

    def __call__(self, path: tuple) -> bool:
        return is_adapter(path) or any(TRAIN_ALSO[n](path) for n in self.train_also)


def trainable(lora_cfg: LoraConfig) -> Trainable:
    """What a run trains: with LoRA the adapters (and the lora.train_also parameters), else
    every parameter."""
    if not lora_cfg.rank:
        return EVERYTHING
    return Trainable(_AdaptersAnd(tuple(lora_cfg.train_also))) if lora_cfg.train_also \
        else ADAPTERS


def split(params: Params) -> tuple[Params, Params]:
    """(adapters, base): two nested dicts holding the adapter leaves and all the others."""
    return ADAPTERS.split(params)


def join(adapters: Params, base: Params) -> Params:
    """The inverse of `split`."""
    return ADAPTERS.join(adapters, base)


def without_adapters(params: Params) -> Params:
    """The same tree with every B zeroed: the adapted model then computes its base model
    exactly (x A 0 = 0), with no second copy of the base (DPO's reference model)."""
    def zero(path, leaf):
        return jnp.zeros_like(leaf) if _leaf_name(path) == B else leaf
    return jax.tree_util.tree_map_with_path(zero, params)


def kernel_delta(a: jax.Array, b: jax.Array, kernel_ndim: int, scale: float) -> jax.Array:
    """scale · A B in the kernel's layout [lead..., in..., out...], in float32; leading axes
    (stacked layers) shared by A, B and the kernel are batch axes."""
    lead = a.ndim + b.ndim - 2 - kernel_ndim
    batch = tuple(range(lead))
    ab = jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32),
                             (((a.ndim - 1,), (lead,)), (batch, batch)))
    return scale * ab


def merge(params: Params, scale: float) -> Params:
    """The base parameters with each adapter folded into its kernel (W + scale · A B, in
    float32, stored in W's dtype); the adapter leaves are gone."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for key, a in flat.items():
        if key[-1] != A:
            continue
        kernel_key = (*key[:-1], "kernel")
        w = out[kernel_key]
        delta = kernel_delta(a, flat[(*key[:-1], B)], w.ndim, scale)
        out[kernel_key] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return traverse_util.unflatten_dict(out)


def merged_config(cfg: Config) -> Config:
    """The config of merged parameters: lora off (a plain model of the same architecture)."""
    return dataclasses.replace(cfg, lora=LoraConfig())
