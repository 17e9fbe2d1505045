"""Projections as 2-D matmuls whose backward pass is written out, on the CPU backend.

XLA's own transpose of a dot_general over [batch, seq, in] activations contracts the weight
gradient over the batch axes, and the CPU backend's layout assignment copies the cotangent
into a transposed layout before that product (for a tied output projection the copy is as
large as the logits). Flattened to [tokens, in] · [in, out], with dx = g · wᵀ and
dw = xᵀ · g stated as products, the CPU backend runs the three matmuls without the copies.
Other platforms keep XLA's transpose rule, which they lay out well, and so does a mesh that
splits the token axis (flattening [batch, seq] would gather the sequence shards).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlm import sharding

# Backends whose projections take the written-out backward pass (benchmarks switch it off).
WRITTEN_OUT_BACKENDS = ("cpu",)


def project(x: jax.Array, w: jax.Array, in_axes: int = 1,
            out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x[..., *in] · w[*in, *out]: x's trailing `in_axes` axes contracted with w's leading
    ones; the product in `out_dtype` (default x's; on CPU accumulated in float32, then
    cast)."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
    if sharding.target_platform() not in WRITTEN_OUT_BACKENDS or sharding.length_sharded():
        return jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=out_dtype)
    lead, outs = x.shape[:x.ndim - in_axes], w.shape[in_axes:]
    k = math.prod(w.shape[:in_axes])
    y_MN = _matmul(x.reshape(-1, k), w.reshape(k, -1), out_dtype)
    return y_MN.reshape(*lead, *outs)


def _product(a, b, a_axis: int, b_axis: int, dtype):
    """a · b contracting one axis of each, accumulated in float32 (CPU's bfloat16 matmuls
    run at their full rate only with a float32 result), returned in `dtype`."""
    y = jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MK: jax.Array, w_KN: jax.Array, out_dtype: jnp.dtype) -> jax.Array:
    return _product(x_MK, w_KN, 1, 0, out_dtype)


def _matmul_fwd(x_MK, w_KN, out_dtype):
    return _product(x_MK, w_KN, 1, 0, out_dtype), (x_MK, w_KN)


def _matmul_bwd(out_dtype, res, g_MN):
    x_MK, w_KN = res
    # As XLA's rule: a float32 cotangent (float32 logits of a bfloat16 model) is not rounded.
    ct = jnp.promote_types(g_MN.dtype, x_MK.dtype)
    g_MN = g_MN.astype(ct)
    dx_MK = _product(g_MN, w_KN.astype(ct), 1, 1, x_MK.dtype)
    dw_KN = _product(x_MK.astype(ct), g_MN, 0, 0, w_KN.dtype)
    return dx_MK, dw_KN


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
