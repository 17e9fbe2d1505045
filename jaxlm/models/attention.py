"""Attention as pure functions: softmax(QKᵀ·scale + bias)V, masks, rotary embeddings.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K query heads per key/value head (grouped-query attention), H head width.
Masks are boolean, True where attention is allowed, shaped [B, T, S] (no head axis).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("reference", "xla")


def causal_mask(q_len: int, kv_len: int, q_offset: int | jax.Array = 0) -> jax.Array:
    """[T, S]: query i (at absolute position q_offset + i) sees keys 0..q_offset + i."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    return jnp.arange(kv_len)[None, :] <= q_pos


def local_window_mask(q_len: int, kv_len: int, window: int, q_offset: int = 0) -> jax.Array:
    """[T, S]: causal and at most `window` - 1 positions back (GPT-3's banded layers)."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    k_pos = jnp.arange(kv_len)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def padding_mask(kv_valid_BS: jax.Array, q_len: int) -> jax.Array:
    """[B, T, S] from a [B, S] validity vector of the keys."""
    return jnp.broadcast_to(kv_valid_BS[:, None, :].astype(bool),
                            (kv_valid_BS.shape[0], q_len, kv_valid_BS.shape[1]))


def segment_mask(q_segment_BT: jax.Array, kv_segment_BS: jax.Array) -> jax.Array:
    """[B, T, S]: packed documents attend only within their own segment id."""
    return q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else jnp.logical_and(out, m)
    return out


def _reference(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    if bias_BNTS is not None:
        bias = bias_BNTS.astype(jnp.float32)
        logits_BKGTS += bias.reshape(bias.shape[0], K, N // K, *bias.shape[2:])
    if mask_BTS is not None:
        # A finite minimum keeps fully masked rows (padding queries) NaN-free.
        logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS,
                                 jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def _xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale):
    mask = None if mask_BTS is None else mask_BTS[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask,
                                        scale=scale, implementation="xla")


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array | None = None,
    bias_BNTS: jax.Array | None = None,
    *,
    scale: float | None = None,
    impl: str = "reference",
) -> jax.Array:
    """Multi-head (grouped-query) attention; returns [B, T, N, H] in the dtype of v."""
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise ValueError(f"{q_BTNH.shape[2]} query heads not divisible by "
                         f"{k_BSKH.shape[2]} key/value heads")
    if scale is None:
        scale = q_BTNH.shape[-1] ** -0.5
    if impl == "auto":
        impl = "xla"
    if impl == "reference":
        return _reference(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale)
    if impl == "xla":
        return _xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale)
    raise ValueError(f"unknown attention implementation '{impl}'; "
                     f"choose one of {', '.join(IMPLEMENTATIONS)}")


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding, half-split layout (as in HF Llama's rotate_half)."""
    H = x_BTNH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def sinusoidal_positions(num_positions: int, dim: int, layout: str = "interleaved") -> jax.Array:
    """[P, D] fixed encodings of "Attention Is All You Need" (sin on even, cos on odd dims);
    layout="split" puts all sines first, then the cosines (HF Marian's table)."""
    pos = jnp.arange(num_positions, dtype=jnp.float32)[:, None]
    inv = jnp.exp(-jnp.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    if layout == "split":
        return jnp.concatenate([jnp.sin(pos * inv), jnp.cos(pos * inv[: dim // 2])], axis=1)
    table = jnp.zeros((num_positions, dim), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * inv))
    return table.at[:, 1::2].set(jnp.cos(pos * inv[: dim // 2]))


def relative_position_buckets(rel_pos: jax.Array, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> jax.Array:
    """T5's buckets of relative positions (key - query): exact for small distances,
    logarithmic up to max_distance, then shared. Causal (bidirectional=False) puts every
    future key in bucket 0."""
    buckets = jnp.zeros_like(rel_pos)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel_pos > 0).astype(rel_pos.dtype) * num_buckets
        dist = jnp.abs(rel_pos)
    else:
        dist = -jnp.minimum(rel_pos, 0)
    max_exact = num_buckets // 2
    # float32 and truncation as in Mesh TensorFlow / HF, so boundary cases land alike.
    log_ratio = jnp.log(jnp.maximum(dist, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(rel_pos.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(dist < max_exact, dist, large)
