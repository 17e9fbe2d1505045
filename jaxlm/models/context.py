"""Context parallelism: self-attention over sequences split across the `context` mesh axis.

The `length` logical axis of activations (and the token axis of batches) is sharded over the
mesh axes the rules table gives it (`context`). Everything but attention works token by token,
so only attention needs the other shards' keys. Two ways, `model.context_attention`:

  ring       kernels/ring.py: key/value blocks go round the shards (ppermute), merged by an
             online softmax; memory O(length / shards); always the blockwise kernel
  allgather  each shard gathers every key and value (all_gather; its gradient is a
             reduce-scatter) and runs `model.attention` on its own queries; memory O(length)
             for K/V

Load balance: under a causal mask the last tokens see the most keys, so a contiguous split
gives the last shard n times the first one's work. With `zigzag` (mesh.context_zigzag) the
loss puts each sequence in zig-zag order before the model (`zigzag_batch`): shard i holds
chunks i and 2n-1-i of 2n, and every shard attends the same number of query-key pairs.
Positions travel with the tokens, so RoPE and learned positions see the true ones.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.config import ConfigError
from jaxlm.data.batch import LMBatch
from jaxlm.models import attention as attn
from jaxlm.models.kernels import ring
from jaxlm.models.kernels.mask import MaskSpec
from jaxlm.sharding import mesh_axes_for

STRATEGIES = ("ring", "allgather")


def _axes(logical: str, mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh_axes_for(logical) if a in mesh.axis_names)


def shards() -> int:
    """How many pieces the active mesh and rules split the `length` axis into (1: none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in _axes("length", mesh))


def zigzag_batch(batch: LMBatch, n: int) -> LMBatch:
    """The batch with every [B, T] field in the zig-zag order of `n` shards, and positions
    made explicit (0..T-1 before reordering, unless the batch has its own)."""
    B, T = batch.inputs.shape
    order = ring.Layout(n, 2).order(T)
    if batch.positions is None:
        batch = batch.replace(positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    return jax.tree.map(lambda x: jnp.take(x, order, axis=1), batch)


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
              mask: MaskSpec | None = None, bias_BNTS: jax.Array | None = None, *,
              scale: float | None = None, impl: str = "auto", cap: float = 0.0,
              strategy: str = "ring") -> jax.Array:
    """attn.attention of a self-attention whose queries, keys and values are split over the
    context axes of the active mesh (in `mask.zigzag` order when it is set); returns
    [B, T, N, H] split the same way."""
    n = shards()
    if bias_BNTS is not None:
        raise ConfigError("context parallelism (mesh.context > 1) cannot apply an additive "
                          "attention bias (T5's relative positions); use mesh.context=1")
    spec = mask if mask is not None else MaskSpec()
    if not isinstance(spec, MaskSpec) or spec.q_offset is not None or spec.kv_offset is not None:
        raise ValueError("context-parallel attention takes a structured mask without offsets "
                         "(no dense masks, no KV-cache decoding)")
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if k_BSKH.shape[1] != T:
        raise ConfigError("context parallelism splits self-attention; cross-attention "
                          f"({T} queries, {k_BSKH.shape[1]} keys) needs mesh.context=1")
    if spec.zigzag not in (0, 1, n):
        raise ValueError(f"a zig-zag order over {spec.zigzag} shards on a mesh of {n}")
    layout = ring.Layout(n, 2 if spec.zigzag > 1 else 1)
    if T % (n * layout.chunks):
        raise ConfigError(f"a sequence of {T} tokens does not split into {n * layout.chunks} "
                          f"equal chunks over mesh.context={n}")
    mesh = jax.sharding.get_abstract_mesh()
    length, batch, heads = (_axes(a, mesh) for a in ("length", "batch", "act_heads"))
    dp, tp = (math.prod(mesh.shape[a] for a in axes) for axes in (batch, heads))
    b = (batch or None) if B % dp == 0 else None
    h = (heads or None) if N % tp == 0 and K % tp == 0 else None
    masks = {name: jnp.broadcast_to(x, (B, T)) for name, x in (
        ("q_segment", spec.q_segment_BT), ("kv_segment", spec.kv_segment_BS),
        ("kv_valid", spec.kv_valid_BS)) if x is not None}
    if spec.window_on is not None:
        masks["window_on"] = spec.window_on
    settings = ring.Ring(axis=length, layout=layout, causal=spec.causal, window=spec.window,
                         scale=H ** -0.5 if scale is None else float(scale), cap=float(cap))
    if strategy == "ring":
        per_shard = functools.partial(ring.ring_attention, ring=settings)
    elif strategy == "allgather":
        per_shard = functools.partial(_allgather, settings=settings, impl=impl)
    else:
        raise ValueError(f"unknown context attention '{strategy}'; choose one of "
                         f"{', '.join(STRATEGIES)}")
    x_spec = P(b, length, h)
    mask_specs = {name: P() if name == "window_on" else P(b, length) for name in masks}
    return jax.shard_map(per_shard, in_specs=(x_spec, x_spec, x_spec, mask_specs),
                         out_specs=x_spec, check_vma=False)(q_BTNH, k_BSKH, v_BSKH, masks)


def _allgather(q, k, v, masks, settings: ring.Ring, impl: str):
    """One shard: gathers every shard's keys, values and key masks into token order, then
    attends its own query chunks (at their true offsets) with `impl`."""
    layout, axis = settings.layout, settings.axis
    T = q.shape[1]
    gather = lambda x: layout.to_tokens(jax.lax.all_gather(x, axis, axis=1, tiled=True))
    k_all, v_all = gather(k), gather(v)
    kv_seg = gather(masks["kv_segment"]) if "kv_segment" in masks else None
    kv_valid = gather(masks["kv_valid"]) if "kv_valid" in masks else None
    starts = layout.starts(jax.lax.axis_index(axis), T)
    c = layout.chunks
    q_seg = jnp.split(masks["q_segment"], c, axis=1) if "q_segment" in masks else [None] * c
    outs = []
    for a, q_a in enumerate(jnp.split(q, c, axis=1)):
        spec = MaskSpec(q_segment_BT=q_seg[a], kv_segment_BS=kv_seg, kv_valid_BS=kv_valid,
                        window_on=masks.get("window_on"), q_offset=starts[a],
                        causal=settings.causal, window=settings.window)
        outs.append(attn.attention(q_a, k_all, v_all, spec, scale=settings.scale, impl=impl,
                                   cap=settings.cap))
    return jnp.concatenate(outs, axis=1)
