"""Cross entropy of the output projection computed in chunks of positions, so that the
[B, T, V] float32 logits never exist whole, neither in the forward pass nor in the backward.

Differentiated, the forward pass also computes the gradient (the fused linear cross entropy of
Liger-Kernel): each chunk's logits are made once, turned into their gradient and multiplied
back into gradients of the hidden states and of the projection; the backward pass only scales
them by the incoming cotangent. This costs the FLOPs of the plain path (no recomputation) and
holds one chunk of logits at a time. Not differentiated (evaluation), only the loss is made.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Options(NamedTuple):
    chunk: int  # positions per chunk; divides T
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0  # cap·tanh(logits / cap) before the softmax (0 = off)


def chunked_cross_entropy(
    x_BTD: jax.Array,
    w_VD: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array | None = None,
    *,
    chunk: int,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """objectives.cross_entropy of logits = softcap(x_BTD @ w_VDᵀ), computed `chunk`
    positions at a time; returns (loss, {nll_sum, num_tokens}). The logits are float32
    (accumulated in float32 from x and w in their dtype). Only the loss carries a gradient:
    nll_sum is a metric."""
    T = x_BTD.shape[1]
    if chunk <= 0 or T % chunk:
        raise ValueError(f"chunk={chunk} does not divide the sequence length {T}")
    mask = (jnp.ones(targets_BT.shape, jnp.float32) if mask_BT is None
            else mask_BT.astype(jnp.float32))
    num_tokens = jnp.sum(mask)
    weight_BT = mask / jnp.maximum(num_tokens, 1.0)
    opts = Options(chunk, label_smoothing, z_loss, softcap)
    loss, nll_sum = _fused(x_BTD, w_VD, targets_BT, weight_BT, mask, opts)
    return loss, {"nll_sum": nll_sum, "num_tokens": num_tokens}


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...]: batch sharding stays on its axis."""
    B, T = a.shape[:2]
    return jnp.moveaxis(a.reshape(B, T // chunk, chunk, *a.shape[2:]), 1, 0)


def _unchunk(a: jax.Array) -> jax.Array:
    n, B, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape(B, n * c, *a.shape[3:])


def _chunk_terms(x_BCD, w_VD, t_BC, opts: Options):
    """Per position of one chunk: the logits, softmax, target hits and token losses."""
    logits_BCV = jnp.einsum("bcd,vd->bcv", x_BCD, w_VD, preferred_element_type=jnp.float32)
    if opts.softcap:
        logits_BCV = opts.softcap * jnp.tanh(logits_BCV / opts.softcap)
    top_BC1 = jnp.max(logits_BCV, axis=-1, keepdims=True)
    exp_BCV = jnp.exp(logits_BCV - top_BC1)
    sum_BC1 = jnp.sum(exp_BCV, axis=-1, keepdims=True)
    log_z_BC = (top_BC1 + jnp.log(sum_BC1))[..., 0]
    hit_BCV = jax.lax.broadcasted_iota(jnp.int32, logits_BCV.shape, 2) == t_BC[..., None]
    nll_BC = log_z_BC - jnp.sum(jnp.where(hit_BCV, logits_BCV, 0.0), axis=-1)
    loss_BC = nll_BC
    if opts.label_smoothing:
        smooth_BC = log_z_BC - jnp.mean(logits_BCV, axis=-1)
        loss_BC = (1 - opts.label_smoothing) * nll_BC + opts.label_smoothing * smooth_BC
    if opts.z_loss:
        loss_BC = loss_BC + opts.z_loss * jnp.square(log_z_BC)
    return logits_BCV, exp_BCV / sum_BC1, hit_BCV, log_z_BC, nll_BC, loss_BC


def _logits_grad(logits_BCV, probs_BCV, hit_BCV, log_z_BC, weight_BC, opts: Options):
    """d(Σ weight · token loss) / d(x @ wᵀ), the raw (uncapped) logits."""
    ls, V = opts.label_smoothing, logits_BCV.shape[-1]
    scale_BC1 = (1.0 + 2.0 * opts.z_loss * log_z_BC)[..., None]
    g_BCV = probs_BCV * scale_BC1 - jnp.where(hit_BCV, 1.0 - ls, 0.0) - ls / V
    if opts.softcap:
        g_BCV = g_BCV * (1.0 - jnp.square(logits_BCV / opts.softcap))
    return g_BCV * weight_BC[..., None]


def _scan_chunks(x_BTD, w_VD, t_BT, weight_BT, mask_BT, opts: Options, with_grad: bool):
    """(loss, nll_sum) and, with_grad, (dx_BTD, dw_VD) of the loss."""
    def body(carry, xs):
        loss, nll, dw_VD = carry
        x_BCD, t_BC, weight_BC, mask_BC = xs
        logits, probs, hit, log_z, nll_BC, loss_BC = _chunk_terms(x_BCD, w_VD, t_BC, opts)
        carry_sums = (loss + jnp.sum(loss_BC * weight_BC), nll + jnp.sum(nll_BC * mask_BC))
        if not with_grad:
            return (*carry_sums, dw_VD), None
        g_BCV = _logits_grad(logits, probs, hit, log_z, weight_BC, opts).astype(w_VD.dtype)
        dx_BCD = jnp.einsum("bcv,vd->bcd", g_BCV, w_VD, preferred_element_type=jnp.float32)
        dw_VD = dw_VD + jnp.einsum("bcv,bcd->vd", g_BCV, x_BCD,
                                   preferred_element_type=jnp.float32)
        return (*carry_sums, dw_VD), dx_BCD.astype(x_BTD.dtype)

    zero = jnp.zeros((), jnp.float32)
    dw0 = jnp.zeros(w_VD.shape, jnp.float32) if with_grad else zero
    xs = tuple(_chunks(a, opts.chunk) for a in (x_BTD, t_BT, weight_BT, mask_BT))
    (loss, nll, dw_VD), dx = jax.lax.scan(body, (zero, zero, dw0), xs)
    if not with_grad:
        return (loss, nll), None
    return (loss, nll), (_unchunk(dx), dw_VD.astype(w_VD.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(x_BTD, w_VD, t_BT, weight_BT, mask_BT, opts: Options):
    return _scan_chunks(x_BTD, w_VD, t_BT, weight_BT, mask_BT, opts, with_grad=False)[0]


def _fused_fwd(x_BTD, w_VD, t_BT, weight_BT, mask_BT, opts: Options):
    return _scan_chunks(x_BTD, w_VD, t_BT, weight_BT, mask_BT, opts, with_grad=True)


def _fused_bwd(opts: Options, grads, cotangents):
    dx_BTD, dw_VD = grads
    g_loss = cotangents[0]  # nll_sum is a metric: its cotangent is not propagated
    return (dx_BTD * g_loss.astype(dx_BTD.dtype), dw_VD * g_loss.astype(dw_VD.dtype),
            None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)
