"""Blockwise attention in pure JAX: an online softmax over key blocks (FlashAttention's
algorithm, written with lax loops), so memory is O(T·block) in the forward pass and O(n) in
the backward pass, on every backend.

The forward pass keeps, per query block, a running max m, normaliser l and un-normalised
output; it saves only the output and the log-sum-exp L = m + log l. The backward pass
(a custom VJP) recomputes each tile's probabilities from L instead of storing them.
Tiles that a causal or local-window mask rules out entirely are skipped.

Shapes as in attention.py: q [B, T, N, H], k/v [B, S, K, H], G = N // K.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.models.kernels.mask import MaskSpec
from jaxlm.models.kernels.scores import MASKED, capped_scores, int_zero, reduce_to

DEFAULT_BLOCK = 512


def chunked_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                      mask: MaskSpec | jax.Array | None = None,
                      bias_BNTS: jax.Array | None = None, *, scale: float, cap: float = 0.0,
                      q_block: int = DEFAULT_BLOCK, kv_block: int = DEFAULT_BLOCK) -> jax.Array:
    """softmax(softcap(q kᵀ·scale, cap) + bias, masked) v with float32 softmax statistics
    (cap 0: no soft-cap); returns [B, T, N, H] in v's dtype. `mask` is a MaskSpec or a
    dense [B or 1, T, S] bool array (the dense form is sliced per tile: it still costs T·S
    bytes to hold)."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    st, Tp, Sp = _tiling(T, S, q_block, kv_block, scale, cap)
    spec = mask if isinstance(mask, MaskSpec) else None
    dense = None
    if mask is not None and spec is None:
        dense = jnp.pad(jnp.asarray(mask, bool), ((0, 0), (0, Tp - T), (0, Sp - S)))
    if bias_BNTS is not None:
        bias_BNTS = jnp.pad(bias_BNTS, ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S)))
    out = _attend(_pad(q_BTNH, Tp), _pad(k_BSKH, Sp), _pad(v_BSKH, Sp), _pad_spec(spec, Tp, Sp),
                  dense, bias_BNTS, st)
    return out[:, :T]


def _tiling(T: int, S: int, q_block: int, kv_block: int, scale: float, cap: float):
    """(st, Tp, Sp): the static (hashable) arguments of the kernel (scale, tile sizes, true
    key length, soft-cap) for tiles of at most the block sizes, and the lengths padded to
    whole tiles."""
    bq, bk = min(q_block, T), min(kv_block, S)
    return (float(scale), bq, bk, S, float(cap)), -(-T // bq) * bq, -(-S // bk) * bk


def _pad(x, n: int):
    """x [B, L, ...] padded with zeros to n tokens."""
    if x is None or x.shape[1] == n:
        return x
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), *[(0, 0)] * (x.ndim - 2)))


def _pad_spec(spec, Tp: int, Sp: int):
    """The spec's per-token parts padded like the queries and keys, so that tiles past the
    end can be sliced."""
    if spec is None:
        return None
    return spec.replace(q_segment_BT=_pad(spec.q_segment_BT, Tp),
                        kv_segment_BS=_pad(spec.kv_segment_BS, Sp),
                        kv_valid_BS=_pad(spec.kv_valid_BS, Sp))


def _tile_logits(q_tile, k_tile, bias, spec, dense, i, j, st, K):
    """float32 logits [B, K, G, bq, bk] of query tile i against key tile j, with masked
    pairs at the float32 minimum (as the reference) and keys past the end at -inf (never
    counted); also returns where the pairs are live (allowed and real), and with a soft-cap
    its slope d capped / d uncapped (else None)."""
    scale, bq, bk, kv_len, cap = st
    B = q_tile.shape[0]
    s, slope = capped_scores(q_tile.reshape(B, bq, K, -1, q_tile.shape[-1]), k_tile, scale, cap)
    if bias is not None:
        b = jax.lax.dynamic_slice(bias, (0, 0, i * bq, j * bk), (*bias.shape[:2], bq, bk))
        kg = (K, -1) if b.shape[1] > 1 else (1, 1)
        s = s + b.astype(jnp.float32).reshape(b.shape[0], *kg, bq, bk)
    allowed = None
    if spec is not None:
        allowed = spec.tile(i * bq, bq, j * bk, bk)
    if dense is not None:
        d = jax.lax.dynamic_slice(dense, (0, i * bq, j * bk), (dense.shape[0], bq, bk))
        allowed = d if allowed is None else allowed & d
    in_range = jnp.arange(bk) + j * bk < kv_len
    if allowed is not None:
        s = jnp.where(allowed[:, None, None], s, MASKED)
        live = allowed[:, None, None] & in_range
    else:
        live = jnp.broadcast_to(in_range, (1, 1, 1, bq, bk))
    return jnp.where(in_range, s, -jnp.inf), live, slope


def _kv_range(spec, i, st, nk):
    """Key tiles [lo, hi) that query tile i can see under the causal / window parts."""
    bq, bk = st[1:3]
    lo, hi = 0, nk
    if spec is None:
        return lo, hi
    off = spec.q_shift
    if spec.causal:
        hi = jnp.clip((i * bq + bq - 1 + off) // bk + 1, 0, nk)
    if spec.window:
        first = jnp.clip((i * bq + off - spec.window + 1) // bk, 0, nk)
        lo = first if spec.window_on is None else jnp.where(spec.window_on, first, 0)
    return lo, hi


def _q_range(spec, j, st, nq):
    """Query tiles [lo, hi) that can see key tile j (the transpose of _kv_range)."""
    bq, bk = st[1:3]
    lo, hi = 0, nq
    if spec is None:
        return lo, hi
    off = spec.q_shift
    if spec.causal:  # some query position >= j * bk
        lo = jnp.clip((j * bk - off) // bq, 0, nq)
    if spec.window:  # some query position < (j + 1) * bk - 1 + window
        last = jnp.clip(((j + 1) * bk - 1 + spec.window - 1 - off) // bq + 1, 0, nq)
        hi = last if spec.window_on is None else jnp.where(spec.window_on, last, nq)
    return lo, hi


def _slice_rows(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _forward(q, k, v, spec, dense, bias, st, out_dtype=None):
    """Returns out [B, Tp, N, H] (`out_dtype`, default v's dtype) and logsumexp
    [B, K, G, Tp] (float32)."""
    B, Tp, N, H = q.shape
    K = k.shape[2]
    bq, bk = st[1:3]
    nq, nk = Tp // bq, k.shape[1] // bk

    def q_tile(i):
        q_i = _slice_rows(q, i * bq, bq)

        def body(j, carry):
            m, denom, acc = carry
            k_j, v_j = _slice_rows(k, j * bk, bk), _slice_rows(v, j * bk, bk)
            s = _tile_logits(q_i, k_j, bias, spec, dense, i, j, st, K)[0]
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v_j,
                            preferred_element_type=jnp.float32)
            return m_new, denom * corr + jnp.sum(p, -1), acc * corr[..., None] + pv

        G = N // K
        init = (jnp.full((B, K, G, bq), MASKED, jnp.float32),
                jnp.zeros((B, K, G, bq), jnp.float32), jnp.zeros((B, K, G, bq, H), jnp.float32))
        lo, hi = _kv_range(spec, i, st, nk)
        m, denom, acc = jax.lax.fori_loop(lo, hi, body, init)
        denom = jnp.maximum(denom, 1e-30)  # a tile range with nothing in it (all skipped)
        out = (acc / denom[..., None]).transpose(0, 3, 1, 2, 4).reshape(B, bq, N, H)
        return out.astype(out_dtype or v.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(q_tile, jnp.arange(nq))  # [nq, B, bq, N, H], [nq, B, K, G, bq]
    out = out.transpose(1, 0, 2, 3, 4).reshape(B, Tp, N, H)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, K, N // K, Tp)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, spec, dense, bias, st):
    return _forward(q, k, v, spec, dense, bias, st)[0]


def _attend_fwd(q, k, v, spec, dense, bias, st):
    out, lse = _forward(q, k, v, spec, dense, bias, st)
    return out, (q, k, v, spec, dense, bias, out, lse)


def _attend_bwd(st, res, do):
    q, k, v, spec, dense, bias, out, lse = res
    dq, dk, dv, dbias = _grads(st, q, k, v, spec, dense, bias, out, lse, do)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    # Masks are integer/boolean inputs: their cotangents are symbolic zeros.
    zero_spec = None if spec is None else jax.tree.map(int_zero, spec)
    zero_dense = None if dense is None else int_zero(dense)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_spec, zero_dense,
            dbias)


def _grads(st, q, k, v, spec, dense, bias, out, lse, do):
    """float32 gradients (dq, dk, dv, dbias or None) of the attention whose output `out` and
    logsumexp `lse` the forward pass gave, for the output cotangent `do`."""
    B, Tp, N, H = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = N // K
    scale, bq, bk = st[:3]
    nq, nk = Tp // bq, Sp // bk
    # D_i = rowsum(dO ∘ O): the softmax Jacobian's correction term.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, Tp, N]
    delta = delta.reshape(B, Tp, K, G).transpose(0, 2, 3, 1)

    def kv_tile(carry, j):
        dq, dbias = carry
        k_j, v_j = _slice_rows(k, j * bk, bk), _slice_rows(v, j * bk, bk)

        def body(i, c):
            dq, dbias, dk_j, dv_j = c
            q_i = _slice_rows(q, i * bq, bq)
            do_i = _slice_rows(do, i * bq, bq).reshape(B, bq, K, G, H)
            s, live, slope = _tile_logits(q_i, k_j, bias, spec, dense, i, j, st, K)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
            p = jnp.exp(s - lse_i[..., None])                         # [B, K, G, bq, bk]
            dv_j += jnp.einsum("bkgts,btkgh->bskh", p.astype(do.dtype), do_i,
                               preferred_element_type=jnp.float32)
            dp = jnp.einsum("btkgh,bskh->bkgts", do_i, v_j, preferred_element_type=jnp.float32)
            d_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
            ds = jnp.where(live, p * (dp - d_i[..., None]), 0.0)
            ds_qk = ds if slope is None else ds * slope  # through the soft-cap's tanh
            q_i5 = q_i.reshape(B, bq, K, G, H)
            dk_j += jnp.einsum("bkgts,btkgh->bskh", ds_qk, q_i5,
                               preferred_element_type=jnp.float32) * scale
            dq_i = jnp.einsum("bkgts,bskh->btkgh", ds_qk, k_j,
                              preferred_element_type=jnp.float32) * scale
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, _slice_rows(dq, i * bq, bq) + dq_i.reshape(B, bq, N, H), i * bq, axis=1)
            if dbias is not None:
                db = ds.reshape(B, N, bq, bk)
                db = reduce_to(db, dbias.shape[:2])
                start = (0, 0, i * bq, j * bk)
                dbias = jax.lax.dynamic_update_slice(
                    dbias, jax.lax.dynamic_slice(dbias, start, db.shape) + db, start)
            return dq, dbias, dk_j, dv_j

        lo, hi = _q_range(spec, j, st, nq)
        zeros = jnp.zeros((B, bk, K, H), jnp.float32)
        dq, dbias, dk_j, dv_j = jax.lax.fori_loop(lo, hi, body, (dq, dbias, zeros, zeros))
        return (dq, dbias), (dk_j, dv_j)

    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    (dq, dbias), (dk, dv) = jax.lax.scan(
        kv_tile, (jnp.zeros(q.shape, jnp.float32), dbias0), jnp.arange(nk))
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(B, Sp, K, H)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(B, Sp, K, H)
    return dq, dk, dv, dbias


_attend.defvjp(_attend_fwd, _attend_bwd)


def block_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                    spec: MaskSpec | None, *, scale: float, cap: float = 0.0,
                    block: int = DEFAULT_BLOCK) -> tuple[jax.Array, jax.Array]:
    """The attention of these queries over these keys alone, for a caller that merges blocks
    of keys (ring attention): float32 output [B, T, N, H] normalised over this block, and its
    logsumexp [B, K, G, T] (masked everywhere: about the float32 minimum)."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    st, Tp, Sp = _tiling(T, S, block, block, scale, cap)
    out, lse = _forward(_pad(q_BTNH, Tp), _pad(k_BSKH, Sp), _pad(v_BSKH, Sp),
                        _pad_spec(spec, Tp, Sp), None, None, st, out_dtype=jnp.float32)
    return out[:, :T], lse[..., :T]


def block_attention_grads(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                          spec: MaskSpec | None, out_BTNH: jax.Array, lse_BKGT: jax.Array,
                          do_BTNH: jax.Array, *, scale: float, cap: float = 0.0,
                          block: int = DEFAULT_BLOCK) -> tuple[jax.Array, ...]:
    """float32 (dq, dk, dv): this block of keys' part of the gradient of an attention whose
    final output and logsumexp over all blocks are `out_BTNH` and `lse_BKGT`."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    st, Tp, Sp = _tiling(T, S, block, block, scale, cap)
    # Padded queries have zero cotangents, so their (finite) probabilities add nothing.
    lse = jnp.pad(lse_BKGT, ((0, 0), (0, 0), (0, 0), (0, Tp - T)))
    dq, dk, dv, _ = _grads(st, _pad(q_BTNH, Tp), _pad(k_BSKH, Sp), _pad(v_BSKH, Sp),
                           _pad_spec(spec, Tp, Sp), None, None, _pad(out_BTNH, Tp), lse,
                           _pad(do_BTNH, Tp))
    return dq[:, :T], dk[:, :S], dv[:, :S]
