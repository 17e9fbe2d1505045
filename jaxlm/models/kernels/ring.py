"""Ring attention: attention over a sequence split across the devices of a mesh axis.

Each of n shards holds its queries, keys and values (and the keys' segment ids / validity).
For n steps every shard attends its queries to the key/value block it holds while passing
that block on to the next shard (`jax.lax.ppermute`); the partial results are merged by their
log-sum-exp (an online softmax across blocks), so no shard ever holds more than one remote
block: memory O(length / n). Each block pair runs the blockwise kernel of chunked.py, which
skips the tiles a causal or sliding-window mask rules out.

The backward pass (a custom VJP) runs the ring again: the key/value blocks travel with their
gradient accumulators, each shard adds its queries' share and keeps its own dq, and after n
passes every dk/dv is back home. It saves only the inputs, the output and the log-sum-exp.

A `Layout` says which tokens a shard holds: one contiguous chunk each, or two in zig-zag order
(shard i holds chunks i and 2n-1-i of 2n), which gives every shard the same causal work.
These functions run per shard, inside `jax.shard_map` (jaxlm.models.context).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.kernels import chunked
from jaxlm.models.kernels.mask import MaskSpec
from jaxlm.models.kernels.scores import MASKED

# Mask arrays that travel with the key/value blocks; "q_segment" and "window_on" stay.
KV_MASKS = ("kv_segment", "kv_valid")


@dataclass(frozen=True)
class Layout:
    """How a sequence lies over `shards` shards: `chunks` = 1, one contiguous chunk per shard;
    2, zig-zag (shard i holds chunks i and 2·shards-1-i)."""

    shards: int
    chunks: int = 1

    def starts(self, owner: jax.Array | int, local_len: int) -> list:
        """Token index of the first token of each of `owner`'s chunks (owner may be traced)."""
        c = local_len // self.chunks
        if self.chunks == 1:
            return [owner * c]
        return [owner * c, (2 * self.shards - 1 - owner) * c]

    def order(self, length: int) -> np.ndarray:
        """[length]: the token index at each position of the whole (concatenated) layout."""
        c = length // (self.shards * self.chunks)
        firsts = [s for o in range(self.shards) for s in self.starts(o, c * self.chunks)]
        return np.concatenate([np.arange(f, f + c) for f in firsts])

    def to_tokens(self, x: jax.Array, axis: int = 1) -> jax.Array:
        """x, whose `axis` holds the whole sequence in layout order (every shard's chunks,
        shard by shard; an all-gather's result), in token order: static slices, not a
        gather (whose gradient would be a scatter)."""
        if self.chunks == 1:
            return x
        pieces = jnp.split(x, self.shards * self.chunks, axis=axis)
        chunk_of = self.order(self.shards * self.chunks)  # chunk index at each place
        return jnp.concatenate([pieces[i] for i in np.argsort(chunk_of)], axis=axis)


@dataclass(frozen=True)
class Ring:
    """The static settings of one ring attention (hashable: a custom-VJP constant)."""

    axis: tuple[str, ...]  # the mesh axes of the ring
    layout: Layout
    causal: bool
    window: int
    scale: float
    cap: float
    block: int = chunked.DEFAULT_BLOCK


def ring_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                   masks: dict[str, jax.Array], ring: Ring) -> jax.Array:
    """One shard's attention output [B, T, N, H] (v's dtype) over the keys of every shard.
    `masks` holds the present ones of q_segment, kv_segment, kv_valid ([B, T] each, this
    shard's tokens) and window_on (a scalar bool)."""
    return _ring(q_BTNH, k_BTKH, v_BTKH, masks, ring)


def _chunk(x, i, size: int):
    """Chunk i (traced) of `size` tokens along axis 1; None stays None."""
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _pass_on(tree, ring: Ring):
    """Sends every array to the next shard of the ring (receives the previous one's)."""
    n = ring.layout.shards
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axis, perm), tree)


def _pairs(ring: Ring, T: int, me, masks, kv, owner, body, carry):
    """Folds `body(carry, a, b, q_chunk, k_chunk, v_chunk, spec)` over every pair of this
    shard's query chunk a and the held block's chunk b (one loop: one kernel to compile)."""
    c = ring.layout.chunks
    Tc = T // c
    q_starts = jnp.stack(ring.layout.starts(me, T))
    kv_starts = jnp.stack(ring.layout.starts(owner, T))

    def pair(carry, p):
        a, b = p // c, p % c
        spec = MaskSpec(q_segment_BT=_chunk(masks.get("q_segment"), a, Tc),
                        kv_segment_BS=_chunk(kv.get("kv_segment"), b, Tc),
                        kv_valid_BS=_chunk(kv.get("kv_valid"), b, Tc),
                        window_on=masks.get("window_on"), q_offset=q_starts[a],
                        kv_offset=kv_starts[b], causal=ring.causal, window=ring.window)
        run = lambda carry: body(carry, a, b, _chunk(kv["k"], b, Tc), _chunk(kv["v"], b, Tc),
                                 spec)
        # Pairs the causal / window parts rule out entirely are skipped whole.
        return jax.lax.cond(_overlaps(spec, Tc), run, lambda carry: carry, carry), None

    return jax.lax.scan(pair, carry, jnp.arange(c * c))[0]


def _overlaps(spec: MaskSpec, Tc: int) -> jax.Array:
    """Whether some query of the chunk at q_offset may see some key of the chunk at
    kv_offset (both Tc tokens): the blockwise kernel's own tile-skipping rule, with the
    chunk pair as one tile."""
    lo, hi = chunked._kv_range(spec, 0, (None, Tc, Tc), 1)
    return jnp.asarray(lo < hi)


def _merge(out, lse, out_b, lse_b):
    """Two softmax-normalised partial outputs [B, T, N, H] combined by their log-sum-exps
    [B, K, G, T]."""
    new = jnp.logaddexp(lse, lse_b)
    B, K, G, T = lse.shape
    weight = lambda x: jnp.exp(x - new).transpose(0, 3, 1, 2).reshape(B, T, K * G, 1)
    return out * weight(lse) + out_b * weight(lse_b), new


def _kv(k, v, masks):
    """What travels round the ring: the keys, values and their masks."""
    return {"k": k, "v": v, **{m: masks[m] for m in KV_MASKS if m in masks}}


def _forward(q, k, v, masks, ring: Ring, me=None, pass_on=None):
    """(output [B, T, N, H] float32, log-sum-exp [chunks, B, K, G, T / chunks]). `me` and
    `pass_on` (default: this shard's index on the ring axis, ppermute) let one shard run
    alone (`one_shard`)."""
    n, c = ring.layout.shards, ring.layout.chunks
    me = jax.lax.axis_index(ring.axis) if me is None else me
    pass_on = pass_on or functools.partial(_pass_on, ring=ring)
    B, T, N, H = q.shape
    K, Tc = k.shape[2], T // c
    kw = dict(scale=ring.scale, cap=ring.cap, block=ring.block)

    def attend(acc, a, b, k_b, v_b, spec):
        out, lse = acc
        out_b, lse_b = chunked.block_attention(_chunk(q, a, Tc), k_b, v_b, spec, **kw)
        merged = _merge(out[a], lse[a], out_b, lse_b)
        return out.at[a].set(merged[0]), lse.at[a].set(merged[1])

    def step(carry, s):
        # The block goes on while this shard attends to it: the transfer overlaps the work
        # (the last one is not needed; one loop body compiles faster than a peeled step).
        acc, kv = carry
        return (_pairs(ring, T, me, masks, kv, (me - s) % n, attend, acc), pass_on(kv)), None

    acc = (jnp.zeros((c, B, Tc, N, H), jnp.float32),
           jnp.full((c, B, K, N // K, Tc), MASKED, jnp.float32))
    ((out, lse), _), _ = jax.lax.scan(step, (acc, _kv(k, v, masks)), jnp.arange(n))
    return jnp.moveaxis(out, 0, 1).reshape(B, T, N, H), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, masks, ring):
    return _forward(q, k, v, masks, ring)[0].astype(v.dtype)


def _ring_fwd(q, k, v, masks, ring):
    out, lse = _forward(q, k, v, masks, ring)
    out = out.astype(v.dtype)
    return out, (q, k, v, masks, out, lse)


def _ring_bwd(ring: Ring, res, do):
    return _backward(ring, res, do)


def _backward(ring: Ring, res, do, me=None, pass_on=None):
    q, k, v, masks, out, lse = res
    n, c = ring.layout.shards, ring.layout.chunks
    me = jax.lax.axis_index(ring.axis) if me is None else me
    pass_on = pass_on or functools.partial(_pass_on, ring=ring)
    T = q.shape[1]
    Tc = T // c
    kw = dict(scale=ring.scale, cap=ring.cap, block=ring.block)

    def grads(acc, a, b, k_b, v_b, spec):
        dq, dk, dv = acc
        dq_ab, dk_ab, dv_ab = chunked.block_attention_grads(
            _chunk(q, a, Tc), k_b, v_b, spec, _chunk(out, a, Tc), lse[a], _chunk(do, a, Tc),
            **kw)
        add = lambda x, d, i: jax.lax.dynamic_update_slice_in_dim(
            x, _chunk(x, i, Tc) + d, i * Tc, axis=1)
        return add(dq, dq_ab, a), add(dk, dk_ab, b), add(dv, dv_ab, b)

    def step(carry, s):
        # A block's gradient travels with it; after n passes it is back at its own shard.
        dq, kv, dkv = carry
        dq, *dkv = _pairs(ring, T, me, masks, kv, (me - s) % n, grads, (dq, *dkv))
        kv, dkv = pass_on((kv, tuple(dkv)))
        return (dq, kv, dkv), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    (dq, _, (dk, dv)), _ = jax.lax.scan(
        step, (zeros(q), _kv(k, v, masks), (zeros(k), zeros(v))), jnp.arange(n))
    no_grad = jax.tree.map(lambda x: np.zeros(jnp.shape(x), jax.dtypes.float0), masks)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad


_ring.defvjp(_ring_fwd, _ring_bwd)


def one_shard(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
              masks: dict[str, jax.Array], do_BTNH: jax.Array, ring: Ring,
              me: jax.Array) -> tuple[jax.Array, ...]:
    """Shard `me`'s whole share of a ring attention's forward and backward pass, run alone
    on one device: its own key/value block stands in for every other shard's (the work
    depends only on the token positions), nothing is passed. Returns (out, dq, dk, dv);
    for measuring how evenly a layout spreads the work."""
    out, lses = _forward(q_BTNH, k_BTKH, v_BTKH, masks, ring, me, lambda x: x)
    out = out.astype(v_BTKH.dtype)
    res = (q_BTNH, k_BTKH, v_BTKH, masks, out, lses)
    return (out, *_backward(ring, res, do_BTNH, me, lambda x: x)[:3])


def pairs_computed(ring: Ring, length: int) -> np.ndarray:
    """[shards]: the query-key pairs in the tiles each shard's forward pass computes for a
    sequence of `length` tokens, by the kernel's own tiling and rule for skipping masked
    tiles."""
    n, c = ring.layout.shards, ring.layout.chunks
    local = length // n
    st, Tp, _ = chunked._tiling(local // c, local // c, ring.block, ring.block, ring.scale,
                                ring.cap)
    tile, tiles = st[1], Tp // st[1]
    counts = np.zeros(n, np.int64)
    for me in range(n):
        for s in range(n):
            owner = (me - s) % n
            for q0 in ring.layout.starts(me, local):
                for k0 in ring.layout.starts(owner, local):
                    spec = MaskSpec(q_offset=q0, kv_offset=k0, causal=ring.causal,
                                    window=ring.window)
                    for i in range(tiles):
                        lo, hi = chunked._kv_range(spec, i, st, tiles)
                        counts[me] += max(int(hi) - int(lo), 0)
    return counts * tile**2
