"""TPU Pallas flash attention (jax.experimental.pallas.ops.tpu.flash_attention).

Older than splash but it takes an additive bias (T5's relative positions), so it is the TPU
kernel for biased attention. Causal by flag, packed segments and key padding by segment ids;
no local window and no query offset. Key/value heads are repeated for grouped-query
attention. Lengths are padded to multiples of 128. Off TPU the kernel runs under
`pltpu.force_tpu_interpret_mode()` (slow; for tests), forward and backward alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as fa

from jaxlm.config import ConfigError
from jaxlm.models.kernels.mask import MaskSpec, pad_segments
from jaxlm.models.kernels.splash import block_size, shard_over_mesh

# The kernel's own mask value: large and finite, so fully masked rows stay finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def flash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                    mask: MaskSpec | jax.Array | None = None, bias_BNTS: jax.Array | None = None,
                    *, scale: float, block: int = 512, interpret: bool | None = None) -> jax.Array:
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    spec = mask if isinstance(mask, MaskSpec) else None
    if spec is not None and (spec.window or spec.q_offset is not None):
        raise ValueError("the TPU flash kernel has no local window or query offset")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    if interpret and not mesh.empty and mesh.size > 1:
        # TPU interpret mode simulates one chip; across simulated devices it deadlocks.
        raise ConfigError("model.attention=flash runs off TPU only in Pallas interpret mode, "
                          f"on one device, but the mesh has {mesh.size}; use "
                          "model.attention=chunked")
    bq, bk = block_size(T, block), block_size(S, block)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    if mask is not None and spec is None:  # a dense mask goes in as part of the bias
        dense_bias = jnp.where(jnp.asarray(mask, bool)[:, None], 0.0, _MASK_VALUE)
        bias_BNTS = dense_bias if bias_BNTS is None else bias_BNTS + dense_bias
    ab = None
    if bias_BNTS is not None:
        ab = jnp.broadcast_to(bias_BNTS.astype(jnp.float32), (B, N, T, S))
        ab = jnp.pad(ab, ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S)))
    segs = pad_segments(spec, B, T, S, Tp - T, Sp - S)
    blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                           block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                           block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    causal = spec is not None and spec.causal

    def pad_heads_first(x, n, repeat=1):
        x = jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
        return jnp.repeat(x, repeat, axis=2).transpose(0, 2, 1, 3)

    # The kernel computes (q·k + bias) * sm_scale: scale q instead, so the bias is unscaled.
    q = pad_heads_first(q_BTNH * jnp.asarray(scale, q_BTNH.dtype), Tp)
    k, v = (pad_heads_first(x, Sp, N // K) for x in (k_BSKH, v_BSKH))

    def run(q, k, v, q_seg, kv_seg, ab):
        seg = None if q_seg is None else fa.SegmentIds(q_seg, kv_seg)
        return fa.flash_attention(q, k, v, ab, seg, causal=causal, sm_scale=1.0,
                                  block_sizes=blocks)

    if interpret:
        run = _interpreted(run)
    q_seg, kv_seg = segs if segs is not None else (None, None)
    out = shard_over_mesh(run, "hhhbbh", B, N, N)(q, k, v, q_seg, kv_seg, ab)
    return out.transpose(0, 2, 1, 3)[:, :T]


def _interpreted(fn):
    """fn with every Pallas call, the backward pass's included, traced in TPU interpret
    mode: the context manager only reaches calls traced inside it, and a custom VJP's
    backward is traced after the forward returns."""

    @jax.custom_vjp
    def wrapped(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)

    def fwd(*args):
        with pltpu.force_tpu_interpret_mode():
            out, vjp = jax.vjp(fn, *args)
        return out, vjp

    def bwd(vjp, g):
        with pltpu.force_tpu_interpret_mode():
            return vjp(g)

    wrapped.defvjp(fwd, bwd)
    return wrapped
