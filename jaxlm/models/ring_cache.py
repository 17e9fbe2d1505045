"""A decoding KV cache bounded by the attention window (a rolling cache), for models whose every
layer attends within `model.local_window` = W keys (Mistral: `model.local_every` = 1).

Of a sequence of L positions such a layer only ever reads the last W, so its cache is a ring of
S = min(L, W) slots holding position p in slot p % S: decoding any number of tokens keeps S
slots per layer. The slots' positions follow from the cache index (the next position), so the
cache stores nothing beside keys and values. Pure functions: `Attention` reads and writes the
ring (`attend_and_update`), `DecoderLM` builds the matching mask (`ring_mask`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models.attention import local_layers
from jaxlm.models.kernels.mask import MaskSpec


def windowed_everywhere(cfg: ModelConfig) -> bool:
    """Whether every self-attention layer attends within `cfg.local_window` keys (models
    with global layers too, Gemma's, keep a full cache)."""
    return cfg.local_window > 0 and all(local_layers(cfg))


def cache_slots(cfg: ModelConfig, length: int) -> int:
    """Slots per layer of a cache for `length` positions: the window's when it is shorter."""
    return min(length, cfg.local_window) if windowed_everywhere(cfg) else length


def slot_positions(index: jax.Array, slots: int) -> jax.Array:
    """[S] int32: the position each slot holds once positions 0..index-1 are written (the
    latest p < index with p % S == slot); negative where nothing was written yet."""
    s = jnp.arange(slots)
    return index - 1 - (index - 1 - s) % slots


def write(ring_BSKH: jax.Array, new_BTKH: jax.Array, index: jax.Array) -> jax.Array:
    """The ring with positions index..index+T-1 written to their slots (the last S of them
    when T > S: the earlier ones would be overwritten anyway)."""
    S, T = ring_BSKH.shape[1], new_BTKH.shape[1]
    new_BTKH = new_BTKH.astype(ring_BSKH.dtype)
    if T == 1:  # a decoding step: an in-place update
        return jax.lax.dynamic_update_slice_in_dim(ring_BSKH, new_BTKH, index % S, 1)
    if T >= S:  # slot (index + T - S + j) % S gets new row T - S + j
        return jnp.roll(new_BTKH[:, T - S:], index + T - S, axis=1)
    return ring_BSKH.at[:, (index + jnp.arange(T)) % S].set(new_BTKH)


def in_order(ring_BSKH: jax.Array, index: jax.Array) -> jax.Array:
    """The ring's rows by position, oldest first: positions index - S .. index - 1."""
    return jnp.roll(ring_BSKH, -index, axis=1)


def attend_and_update(cache: dict, k_BTKH: jax.Array, v_BTKH: jax.Array, index: jax.Array
                      ) -> tuple[jax.Array, jax.Array, dict]:
    """(keys, values to attend over, the ring cache with these T written). One token: the
    ring after the write (the slot it reuses held a position the window no longer reaches).
    Several: the ring in position order followed by the new ones, since a later token's
    write may reuse a slot an earlier query still sees. `ring_mask` describes both."""
    ring = {"k": write(cache["k"], k_BTKH, index), "v": write(cache["v"], v_BTKH, index)}
    if k_BTKH.shape[1] == 1:
        return ring["k"], ring["v"], ring
    keys, values = (jnp.concatenate([in_order(cache[n], index), x.astype(cache[n].dtype)],
                                    axis=1) for n, x in (("k", k_BTKH), ("v", v_BTKH)))
    return keys, values, ring


def _valid_slots(pos_S: jax.Array, padding_mask_BL: jax.Array | None) -> jax.Array:
    """[B or 1, S]: positions written (>= 0) and real tokens under the caller's padding mask,
    which covers absolute positions 0..L-1."""
    ok = (pos_S >= 0)[None]
    if padding_mask_BL is None:
        return ok
    L = padding_mask_BL.shape[1]
    return ok & jnp.take(padding_mask_BL.astype(bool), jnp.clip(pos_S, 0, L - 1), axis=1)


def ring_mask(index: jax.Array, slots: int, new: int, window: int,
              padding_mask_BL: jax.Array | None) -> MaskSpec:
    """The mask of `new` queries at positions index.. over `attend_and_update`'s keys."""
    index = jnp.asarray(index, jnp.int32)
    if new == 1:
        # Every written slot is within the window and not after the query: padding decides.
        pos = slot_positions(index + 1, slots)
        return MaskSpec(kv_valid_BS=_valid_slots(pos, padding_mask_BL), q_offset=index)
    pos = index - slots + jnp.arange(slots + new)
    return MaskSpec(kv_valid_BS=_valid_slots(pos, padding_mask_BL), q_offset=index,
                    kv_offset=index - slots, causal=True, window=window)


def ring_length(cache_layers) -> int:
    """S, the slots of a decoder cache's layers (stacked or a tuple of layers)."""
    return jax.tree.leaves(cache_layers)[0].shape[-3]
