"""A structured attention mask: the allowed (query, key) pairs described by their parts.

A dense [B, T, S] boolean mask costs T·S memory before any attention is computed. Block
kernels (chunked, splash, flash, cuDNN) only need the rule that generates it, so models pass
a `MaskSpec` and each kernel builds the tiles it visits. `MaskSpec.dense` gives the same
allowed set as the dense helpers in `jaxlm.models.attention` (causal_mask, padding_mask,
segment_mask, local_window_mask) combined with logical and.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class MaskSpec:
    """Query i may attend key j iff every part present allows it:

    causal:  j + kv_offset <= i + q_offset    (query i sits at absolute position i + q_offset,
                                               key j at j + kv_offset)
    window:  j + kv_offset > i + q_offset - window   (a band of `window` keys; with causal:
                                               GPT-3's local layers). Off where `window_on`
                                               is False.
    segment: q_segment[b, i] == kv_segment[b, j]   (packed documents)
    padding: kv_valid[b, j]                         (real key tokens)
    """

    q_segment_BT: jax.Array | None = None
    kv_segment_BS: jax.Array | None = None
    kv_valid_BS: jax.Array | None = None
    # Scalar bool; None = always on. Scanned layers switch the window per layer with it.
    window_on: jax.Array | None = None
    # Scalar int; None = 0. Decoding with a KV cache puts the queries after the cache.
    q_offset: jax.Array | None = None
    # Scalar int; None = 0. A rolling cache's keys start mid-sequence (ring_cache.py).
    kv_offset: jax.Array | None = None
    causal: bool = struct.field(pytree_node=False, default=False)
    window: int = struct.field(pytree_node=False, default=0)
    # > 1: the token axis is in context parallelism's zig-zag order over this many shards
    # (jaxlm.models.context), which only the context-parallel attention reads; 0 = in order.
    zigzag: int = struct.field(pytree_node=False, default=0)

    @property
    def has_arrays(self) -> bool:
        """Whether batch-dependent parts (segments, padding) are present."""
        return any(x is not None for x in (self.q_segment_BT, self.kv_segment_BS,
                                           self.kv_valid_BS))

    @property
    def q_shift(self) -> jax.Array | int:
        """Query i sits at key index i + q_shift (q_offset less kv_offset)."""
        return (0 if self.q_offset is None else self.q_offset) - (
            0 if self.kv_offset is None else self.kv_offset)

    def tile(self, q_start, q_len: int, k_start, k_len: int) -> jax.Array | None:
        """[B or 1, q_len, k_len] allowed pairs of queries q_start.. and keys k_start..;
        None when nothing is masked. Starts may be traced (block loops)."""
        out = None

        def both(m):
            nonlocal out
            out = m if out is None else out & m

        q_pos = (jnp.arange(q_len) + q_start)[:, None] + self.q_shift
        k_pos = (jnp.arange(k_len) + k_start)[None, :]
        if self.causal:
            both((k_pos <= q_pos)[None])
        if self.window:
            band = k_pos > q_pos - self.window
            if self.window_on is not None:
                band = band | ~self.window_on
            both(band[None])
        if self.q_segment_BT is not None or self.kv_segment_BS is not None:
            if self.q_segment_BT is None or self.kv_segment_BS is None:
                raise ValueError("MaskSpec needs both q_segment_BT and kv_segment_BS")
            q_seg = jax.lax.dynamic_slice_in_dim(self.q_segment_BT, q_start, q_len, axis=1)
            kv_seg = jax.lax.dynamic_slice_in_dim(self.kv_segment_BS, k_start, k_len, axis=1)
            both(q_seg[:, :, None] == kv_seg[:, None, :])
        if self.kv_valid_BS is not None:
            valid = jax.lax.dynamic_slice_in_dim(self.kv_valid_BS, k_start, k_len, axis=1)
            both(valid[:, None, :].astype(bool))
        return out

    def dense(self, q_len: int, kv_len: int) -> jax.Array | None:
        """The [B or 1, T, S] boolean mask (None when nothing is masked)."""
        return self.tile(0, q_len, 0, kv_len)

    def with_window(self, on: jax.Array | bool) -> MaskSpec:
        """This mask with its window switched on or off (traced bools welcome)."""
        on = jnp.asarray(on, bool)
        if self.window_on is not None:
            on = on & self.window_on
        return self.replace(window_on=on)


def pad_segments(mask: MaskSpec | None, batch: int, q_len: int, kv_len: int,
                 q_pad: int, kv_pad: int) -> tuple[jax.Array, jax.Array] | None:
    """The segment and padding parts as one pair of [B, T + q_pad] / [B, S + kv_pad] int32
    segment ids for kernels that take segment ids: invalid and padded keys get an id no
    query has. None when neither part is present and nothing is padded."""
    has_seg = mask is not None and mask.q_segment_BT is not None
    has_valid = mask is not None and mask.kv_valid_BS is not None
    if not (has_seg or has_valid or kv_pad):
        return None
    never = jnp.iinfo(jnp.int32).min
    if has_seg:
        q_seg = mask.q_segment_BT.astype(jnp.int32)
        kv_seg = mask.kv_segment_BS.astype(jnp.int32)
        # Keep real ids clear of the sentinel.
        q_seg, kv_seg = jnp.maximum(q_seg, never + 1), jnp.maximum(kv_seg, never + 1)
    else:
        q_seg = jnp.zeros((batch, q_len), jnp.int32)
        kv_seg = jnp.zeros((batch, kv_len), jnp.int32)
    if has_valid:
        kv_seg = jnp.where(mask.kv_valid_BS.astype(bool), kv_seg, never)
    q_seg = jnp.pad(jnp.broadcast_to(q_seg, (batch, q_len)), ((0, 0), (0, q_pad)))
    kv_seg = jnp.pad(jnp.broadcast_to(kv_seg, (batch, kv_len)), ((0, 0), (0, kv_pad)),
                     constant_values=never)
    return q_seg, kv_seg
