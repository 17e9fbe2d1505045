"""Causal attention in static query slices, each against only the keys it can see.

Dense attention computes every (query, key) pair and masks half of them away under a causal
mask. Here the queries are cut into a few static slices; a slice attends only the keys up to
its last query, so with n equal slices (n + 1) / 2n of the pairs are computed. The slices are
unrolled at trace time (no while loops, which a CPU runs tile by tile), each slice's softmax
is exact (all its keys at once, no online rescaling), and the backward pass is a custom VJP
that reuses the forward's probabilities and the row sums D = rowsum(dO ∘ O), a reduction
over the head dimension instead of the key dimension. Memory is that of dense attention
(the probabilities are kept for the backward pass); for long contexts use `chunked`.

Shapes as in attention.py: q [B, T, N, H], k/v [B, S, K, H], G = N // K.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.models.kernels.mask import MaskSpec
from jaxlm.models.kernels.scores import MASKED, capped_scores, int_zero, reduce_to

SLICE_ROWS = 64  # queries per slice (at least); more slices skip more but run smaller matmuls
MAX_SLICES = 8


def default_slices(T: int) -> int:
    """How many query slices a sequence of T tokens is cut into."""
    return max(1, min(MAX_SLICES, T // SLICE_ROWS))


def supports(mask, q_len: int, kv_len: int) -> bool:
    """Whether this kernel can run a mask over these lengths: self-attention (as many keys
    as queries) with no mask or a MaskSpec without offsets or zig-zag order (training,
    evaluation, prefill)."""
    spec_ok = mask is None or (isinstance(mask, MaskSpec) and mask.q_offset is None
                               and mask.kv_offset is None and mask.zigzag <= 1)
    return q_len == kv_len and spec_ok


def triangular_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                         mask: MaskSpec | None = None, bias_BNTS: jax.Array | None = None, *,
                         scale: float, cap: float = 0.0, slices: int = 0) -> jax.Array:
    """softmax(softcap(q kᵀ·scale, cap) + bias, masked) v; returns [B, T, N, H] in v's
    dtype. `slices` 0 = default_slices(T). Without a causal mask every slice sees all keys
    (nothing is skipped)."""
    if not supports(mask, q_BTNH.shape[1], k_BSKH.shape[1]):
        raise ValueError("triangular attention needs as many keys as queries and no mask "
                         "or a MaskSpec without offsets")
    n = slices or default_slices(q_BTNH.shape[1])
    return _attend(q_BTNH, k_BSKH, v_BSKH, mask, bias_BNTS, (float(scale), float(cap), n))


def _slices(T: int, n: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) of each of n static slices of T queries."""
    bounds = [T * i // n for i in range(n + 1)]
    return [(lo, hi, hi if causal else T) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _bias_slices(bias, lo, hi, kend):
    """Index of the bias entries for queries lo..hi and keys 0..kend (a broadcast axis
    whole)."""
    t = slice(lo, hi) if bias.shape[2] > 1 else slice(None)
    return (slice(None), slice(None), t, slice(None, kend) if bias.shape[3] > 1 else slice(None))


def _logits(q_i, k_BSKH, bias, spec, lo, hi, kend, st):
    """float32 logits [B, K, G, hi - lo, kend] of queries lo..hi against keys 0..kend, masked
    pairs at the float32 minimum; the soft-cap's slope (or None); and which queries see no
    key at all ([B or 1, hi - lo], or None where the mask cannot leave a query without
    keys: causal and window masks always allow a query's own position)."""
    scale, cap, _ = st
    B, bq, N, H = q_i.shape
    K = k_BSKH.shape[2]
    s, slope = capped_scores(q_i.reshape(B, bq, K, N // K, H), k_BSKH[:, :kend], scale, cap)
    if bias is not None:
        b = bias[_bias_slices(bias, lo, hi, kend)].astype(jnp.float32)
        s = s + b.reshape(b.shape[0], K if b.shape[1] > 1 else 1, -1, *b.shape[2:])
    allowed = None if spec is None else spec.tile(lo, hi - lo, 0, kend)
    dead = None
    if allowed is not None:
        s = jnp.where(allowed[:, None, None], s, MASKED)
        if spec.has_arrays:
            dead = ~jnp.any(allowed, axis=-1)
    return s, slope, dead


def _forward(q, k, v, spec, bias, st):
    """out [B, T, N, H] and, per slice, the float32 probabilities, soft-cap slopes and
    queries without keys. A query without keys gets the mean of all values, as the
    reference's softmax over all-masked logits gives."""
    B, T, N, H = q.shape
    causal = spec is not None and spec.causal
    # What a query without keys gets; only segment or padding masks can leave one so.
    v_mean_BKH = (jnp.mean(v.astype(jnp.float32), axis=1)
                  if spec is not None and spec.has_arrays else None)
    outs, saved = [], []
    for lo, hi, kend in _slices(T, st[2], causal):
        s, slope, dead = _logits(q[:, lo:hi], k, bias, spec, lo, hi, kend, st)
        p = jax.nn.softmax(s, axis=-1)
        if dead is not None:
            p = jnp.where(dead[:, None, None, :, None], 0.0, p)
        o = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v[:, :kend],
                       preferred_element_type=jnp.float32)
        if dead is not None:
            o = jnp.where(dead[:, :, None, None, None], v_mean_BKH[:, None, :, None], o)
        outs.append(o.reshape(B, hi - lo, N, H))
        saved.append((p, slope, dead))
    return jnp.concatenate(outs, axis=1).astype(v.dtype), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, spec, bias, st):
    return _forward(q, k, v, spec, bias, st)[0]


def _attend_fwd(q, k, v, spec, bias, st):
    out, saved = _forward(q, k, v, spec, bias, st)
    return out, (q, k, v, spec, bias, out, saved)


def _attend_bwd(st, res, do):
    q, k, v, spec, bias, out, saved = res
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    scale = st[0]
    causal = spec is not None and spec.causal
    # D_i = rowsum(dO ∘ O): the softmax Jacobian's correction term, per query and head.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, T, N]
    delta = delta.reshape(B, T, K, G).transpose(0, 2, 3, 1)                # [B, K, G, T]
    dq_parts = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dbias = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    for (lo, hi, kend), (p, slope, dead) in zip(_slices(T, st[2], causal), saved):
        do_i = do[:, lo:hi].reshape(B, hi - lo, K, G, H)
        if dead is not None:  # their output, the mean of all values: 1/T of dO to each
            do_dead = jnp.where(dead[:, :, None, None, None], do_i.astype(jnp.float32), 0.0)
            dv = dv + jnp.sum(do_dead, axis=(1, 3))[:, None] / T
        dv = dv.at[:, :kend].add(jnp.einsum("bkgts,btkgh->bskh", p.astype(do.dtype), do_i,
                                            preferred_element_type=jnp.float32))
        dp = jnp.einsum("btkgh,bskh->bkgts", do_i, v[:, :kend],
                        preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., lo:hi, None])
        if dbias is not None:
            db = reduce_to(ds.reshape(B, N, hi - lo, kend), bias.shape)
            dbias = dbias.at[_bias_slices(bias, lo, hi, kend)].add(db)
        if slope is not None:
            ds = ds * slope
        dk = dk.at[:, :kend].add(jnp.einsum("bkgts,btkgh->bskh", ds,
                                            q[:, lo:hi].reshape(B, hi - lo, K, G, H),
                                            preferred_element_type=jnp.float32) * scale)
        dq_i = jnp.einsum("bkgts,bskh->btkgh", ds, k[:, :kend],
                          preferred_element_type=jnp.float32) * scale
        dq_parts.append(dq_i.reshape(B, hi - lo, N, H))
    dq = jnp.concatenate(dq_parts, axis=1)
    zero_spec = None if spec is None else jax.tree.map(int_zero, spec)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_spec, dbias


_attend.defvjp(_attend_fwd, _attend_bwd)
