"""Mixture of experts (Mixtral): a linear router sends each token to its top-k expert MLPs,
whose outputs are summed with the softmax of the k chosen router logits as weights.

Routing is dropless: the token copies are sorted by expert and every expert's rows go through
one grouped matmul (`jax.lax.ragged_dot`), so no token is ever dropped for want of capacity.
The routing math and the router losses are pure functions; `MoeMlp` holds the parameters.

Under a mesh (`expert_parallel`) each device keeps the experts of its `expert` shard. The
tokens of the devices that share an expert group are all-gathered over the `expert` axis,
each device runs its own experts on them (copies bound for other experts sort last and get
zeros), and a reduce-scatter over `expert` sums the experts' outputs back onto the devices
that own the tokens. Without this, XLA's partitioner replicates a ragged_dot whose experts
are sharded: every device would compute every expert."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.config import ModelConfig
from jaxlm.models.layers import ACTIVATIONS, Projection, normal_init
from jaxlm.sharding import mesh_axes_for

# What each MoE layer sows into the "intermediates" collection, summed over its tokens.
STATS = "router_stats"


# ---------------------------------------------------------------------------- routing math

def route(logits_NE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(weights [N, k] float32, experts [N, k] int32): each token's k highest-scoring experts
    and the softmax over their logits (= HF's top-k of the softmax, renormalised)."""
    top_NK, experts_NK = jax.lax.top_k(logits_NE.astype(jnp.float32), k)
    return jax.nn.softmax(top_NK, axis=-1), experts_NK


def router_stats(logits_NE: jax.Array, experts_NK: jax.Array) -> dict[str, jax.Array]:
    """The sums the router losses need from one layer: top-k assignments per expert [E],
    router probabilities per expert [E], squared log-sum-exp of the logits, and tokens."""
    logits = logits_NE.astype(jnp.float32)
    E = logits.shape[-1]
    assigned_E = jnp.sum(jax.nn.one_hot(experts_NK, E, dtype=jnp.float32), axis=(0, 1))
    z_N = jax.nn.logsumexp(logits, axis=-1)
    return {"assigned": assigned_E, "prob": jnp.sum(jax.nn.softmax(logits, -1), axis=0),
            "z": jnp.sum(jnp.square(z_N)), "tokens": jnp.asarray(logits.shape[0], jnp.float32)}


def total_stats(intermediates: Any) -> dict[str, jax.Array]:
    """Sums the router stats sown by every MoE layer (scanned layers stack them on a leading
    axis; unrolled ones keep one entry each)."""
    totals: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates):
        keys = [str(getattr(p, "key", "")) for p in path]
        if STATS not in keys:
            continue
        name = keys[-1]
        trailing = 1 if name in ("assigned", "prob") else 0
        summed = jnp.sum(leaf, axis=tuple(range(leaf.ndim - trailing)))
        totals[name] = totals[name] + summed if name in totals else summed
    return totals


def load_balancing_loss(stats: dict[str, jax.Array], num_experts: int) -> jax.Array:
    """Switch Transformer's loss as HF's `load_balancing_loss_func` computes it over all
    layers' tokens: E · Σ_e (share of top-k assignments to e) · (mean router probability
    of e). k when the routing is uniform."""
    n = jnp.maximum(stats["tokens"], 1.0)
    return num_experts * jnp.sum((stats["assigned"] / n) * (stats["prob"] / n))


def z_loss(stats: dict[str, jax.Array]) -> jax.Array:
    """ST-MoE's router z-loss: the mean over tokens and layers of logsumexp(logits)²."""
    return stats["z"] / jnp.maximum(stats["tokens"], 1.0)


def router_losses(intermediates: Any, *, num_experts: int, aux_weight: float,
                  z_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the weighted sum to add to the objective, {moe_aux_loss, moe_z_loss} unweighted)."""
    stats = total_stats(intermediates)
    lb, z = load_balancing_loss(stats, num_experts), z_loss(stats)
    return aux_weight * lb + z_weight * z, {"moe_aux_loss": lb, "moe_z_loss": z}


# ---------------------------------------------------------------------------- expert MLPs

def grouped_mlp(x_ND: jax.Array, experts_NK: jax.Array, weights_NK: jax.Array,
                kernels: tuple[jax.Array, ...], act: Callable, *, num_experts: int,
                first_expert: jax.Array | int = 0) -> jax.Array:
    """Σ_k weight_k · expert_k(x) per token, over the experts held in `kernels` (wi_gate and
    wi_up, or wi alone, [E', D, F]; wo [E', F, D]): experts first_expert .. first_expert +
    E' - 1 of `num_experts`. Copies routed to other experts contribute 0."""
    N, K = experts_NK.shape
    wo = kernels[-1]
    local = wo.shape[0]
    # Rotate the expert ids so that the held experts come first, then sort the copies by them.
    slot_M = ((experts_NK - first_expert) % num_experts).reshape(-1)
    order_M = jnp.argsort(slot_M, stable=True)
    sizes_G = jnp.bincount(slot_M, length=num_experts)[:local].astype(jnp.int32)
    rows_MD = jnp.take(x_ND, order_M // K, axis=0)
    h_MF = act(jax.lax.ragged_dot(rows_MD, kernels[0], sizes_G))
    if len(kernels) == 3:
        h_MF = h_MF * jax.lax.ragged_dot(rows_MD, kernels[1], sizes_G)
    out_MD = jax.lax.ragged_dot(h_MF, wo, sizes_G)
    held_M = jnp.arange(N * K) < jnp.sum(sizes_G)
    out_MD = jnp.where(held_M[:, None], out_MD, 0)
    unsort_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(N * K))
    out_NKD = jnp.take(out_MD, unsort_M, axis=0).reshape(N, K, -1)
    # A weighted sum (elementwise, not a matmul: FLOPs count only weight matmuls).
    out_ND = jnp.sum(out_NKD.astype(jnp.float32) * weights_NK[..., None], axis=1)
    return out_ND.astype(x_ND.dtype)


def _mesh_split(mesh: Any, x_shape: tuple[int, ...], num_experts: int,
                d_ff: int) -> dict[str, tuple[str, ...]]:
    """The mesh axes (of size > 1, dividing their dimension) that split the tokens' batch and
    length, the experts and the experts' hidden width under the active rules."""
    def axes(logical: str, size: int, taken: tuple[str, ...] = ()) -> tuple[str, ...]:
        names = tuple(a for a in mesh_axes_for(logical)
                      if a in mesh.axis_names and mesh.shape[a] > 1 and a not in taken)
        return names if size % math.prod(mesh.shape[a] for a in names) == 0 else ()

    batch = axes("batch", x_shape[0])
    tokens = batch + axes("length", x_shape[1], batch)
    expert = axes("expert", num_experts)
    return {"batch": batch, "length": tokens[len(batch):], "expert": expert,
            "mlp": axes("mlp", d_ff, tokens + expert)}


def expert_parallel(x_BTD: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array,
                    kernels: tuple[jax.Array, ...], act: Callable,
                    num_experts: int) -> jax.Array:
    """The MoE output [B, T, D]: grouped_mlp per shard under a mesh (see the module doc)."""
    B, T, D = x_BTD.shape
    K = experts_BTK.shape[-1]

    def run(x, experts, weights, kernels, first):
        y = grouped_mlp(x.reshape(-1, D), experts.reshape(-1, K), weights.reshape(-1, K),
                        kernels, act, num_experts=num_experts, first_expert=first)
        return y.reshape(x.shape)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(x_BTD, experts_BTK, weights_BTK, kernels, 0)
    split = _mesh_split(mesh, x_BTD.shape, num_experts, kernels[0].shape[-1])
    token_axes = split["batch"] + split["length"]
    gathered = tuple(a for a in split["expert"] if a in token_axes)
    summed = tuple(a for a in split["expert"] if a not in token_axes) + split["mlp"]
    local = num_experts // math.prod(mesh.shape[a] for a in split["expert"])

    def shard(x, experts, weights, *kernels):
        first = jax.lax.axis_index(split["expert"]) * local if split["expert"] else 0
        if gathered:
            x, experts, weights = (jax.lax.all_gather(v, gathered, axis=0, tiled=True)
                                   for v in (x, experts, weights))
        y = run(x, experts, weights, kernels, first)
        if summed:
            y = jax.lax.psum(y, summed)
        if gathered:
            y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
        return y

    tok = P(split["batch"] or None, split["length"] or None)
    e, f = split["expert"] or None, split["mlp"] or None
    w_in, w_out = P(e, None, f), P(e, f, None)
    specs = (tok, tok, tok, *([w_in] * (len(kernels) - 1)), w_out)
    return jax.shard_map(shard, in_specs=specs, out_specs=tok)(
        x_BTD, experts_BTK, weights_BTK, *kernels)


# ---------------------------------------------------------------------------- modules

class ExpertKernel(nn.Module):
    """One stacked expert weight [experts, in, out] (a `kernel`: decayed and counted as a
    matmul weight, over the tokens routed to it)."""

    shape: tuple[int, int, int]
    axes: tuple[str, str, str]
    std: float
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", normal_init(self.std, self.axes), self.shape,
                          self.param_dtype)


class Experts(nn.Module):
    """The experts' stacked kernels: wi_gate and wi_up (gated; else wi) [E, D, F], wo
    [E, F, D]."""

    num_experts: int
    d_model: int
    d_ff: int
    gated: bool
    std: float
    out_std: float
    param_dtype: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, ...]:
        E, D, F = self.num_experts, self.d_model, self.d_ff
        names = ("wi_gate", "wi_up") if self.gated else ("wi",)
        ins = tuple(ExpertKernel((E, D, F), ("expert", "embed", "mlp"), self.std,
                                 self.param_dtype, name=n)() for n in names)
        wo = ExpertKernel((E, F, D), ("expert", "mlp", "embed"), self.out_std,
                          self.param_dtype, name="wo")()
        return (*ins, wo)


class MoeMlp(nn.Module):
    """Router [embed, experts] + the experts' (gated) MLPs, their kernels (`experts/*/kernel`)
    stacked on a leading 'expert' axis. Sows the router stats (`STATS`)."""

    cfg: ModelConfig
    out_std: float

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        E, D, F = cfg.num_experts, x_BTD.shape[-1], cfg.d_ff
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        logits_BTE = Projection((E,), ("embed", None), use_bias=False, std=cfg.init_std,
                                dtype=dtype, param_dtype=param_dtype, name="router")(x_BTD)
        weights_BTK, experts_BTK = route(logits_BTE, cfg.experts_per_token)
        self.sow("intermediates", STATS, router_stats(
            logits_BTE.reshape(-1, E), experts_BTK.reshape(-1, cfg.experts_per_token)))
        experts = Experts(E, D, F, cfg.gated_mlp, cfg.init_std, self.out_std, param_dtype,
                          name="experts")
        kernels = tuple(k.astype(dtype) for k in experts())
        return expert_parallel(x_BTD, experts_BTK, weights_BTK, kernels,
                               ACTIVATIONS[cfg.activation], E)
