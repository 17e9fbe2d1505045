"""What the pure-JAX attention kernels (chunked, triangular, ring) share: the masked-logit
value, grouped-query scores with the soft-cap, the reduction of a broadcast bias's gradient,
and the cotangent of integer inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MASKED = jnp.finfo(jnp.float32).min  # as the reference: fully masked rows stay finite


def capped_scores(q_BTKGH: jax.Array, k_BSKH: jax.Array, scale: float,
                  cap: float) -> tuple[jax.Array, jax.Array | None]:
    """float32 logits [B, K, G, T, S] = softcap(q kᵀ·scale, cap) (cap 0: none), and the
    soft-cap's slope d capped / d uncapped for the backward pass (None without a cap)."""
    s = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                   preferred_element_type=jnp.float32) * scale
    if not cap:
        return s, None
    s = cap * jnp.tanh(s / cap)
    return s, 1 - jnp.square(s / cap)


def reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x summed over the leading axes where a broadcast array of `shape` has size 1 (the
    gradient of a bias broadcast over batch, heads or queries)."""
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def int_zero(x) -> np.ndarray:
    """The cotangent of an integer or boolean input (float0 zeros)."""
    return np.zeros(jnp.shape(x), jax.dtypes.float0)
