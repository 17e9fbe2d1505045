"""TPU Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention).

Splash takes its causal / local-window structure as a static mask (tiles that are fully
masked are never visited) and packed segments as dynamic segment ids; key padding rides on
the segment ids. It takes no additive bias and no dense mask. Lengths are padded to the
block size. Off TPU the kernel runs in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from jaxlm.models.kernels.mask import MaskSpec, pad_segments
from jaxlm.sharding import mesh_axes_for

LANES = 128


def block_size(length: int, largest: int = 512) -> int:
    """A block for `length`: a multiple of 128, at most `largest`."""
    return min(largest, -(-length // LANES) * LANES)


def splash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     mask: MaskSpec | None, *, scale: float, cap: float = 0.0,
                     block: int = 512, interpret: bool | None = None) -> jax.Array:
    """Attention with the logits scaled (and soft-capped at `cap`, 0 = off) as in
    attention.py."""
    B, T, N, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    if mask is not None and mask.q_offset is not None:
        raise ValueError("splash attention needs queries at offset 0 (no KV-cache decoding)")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    bq, bk = block_size(T, block), block_size(S, block)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    segs = pad_segments(mask, B, T, S, Tp - T, Sp - S)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                           block_kv_dq=bk)

    def kernel(window: bool):
        causal = mask is not None and mask.causal
        if window:  # a band of `window` keys ending at the query: causal by construction
            head = sm.LocalMask((Tp, Sp), window_size=(mask.window - 1, 0), offset=0)
        elif causal:
            head = sm.CausalMask((Tp, Sp))
        else:
            head = sm.FullMask((Tp, Sp))
        return sk.make_splash_mha(sm.MultiHeadMask([head] * N), block_sizes=blocks,
                                  attn_logits_soft_cap=cap or None, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)

    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    # The kernel works on one example, heads first: q [N, T, H], k/v [K, S, H].
    q = pad(q_BTNH * jnp.asarray(scale, q_BTNH.dtype), Tp).transpose(0, 2, 1, 3)
    k, v = (pad(x, Sp).transpose(0, 2, 1, 3) for x in (k_BSKH, v_BSKH))

    def run(q, k, v, q_seg, kv_seg, window_on):
        def one(window):
            fn = kernel(window)
            if q_seg is None:
                return jax.vmap(fn)(q, k, v)
            return jax.vmap(lambda q, k, v, a, b: fn(q, k, v, sk.SegmentIds(a, b)))(
                q, k, v, q_seg, kv_seg)
        if mask is None or not mask.window:
            return one(False)
        if window_on is None:
            return one(True)
        return jax.lax.cond(window_on, lambda: one(True), lambda: one(False))

    q_seg, kv_seg = segs if segs is not None else (None, None)
    window_on = None if mask is None else mask.window_on
    out = shard_over_mesh(run, "hhhbbr", B, N, k.shape[1])(q, k, v, q_seg, kv_seg, window_on)
    return out.transpose(0, 2, 1, 3)[:, :T]


def shard_over_mesh(fn, kinds: str, batch: int, heads: int, kv_heads: int):
    """Pallas calls are opaque to XLA's partitioner: under a mesh (jax.set_mesh) run `fn`
    per shard, the batch and the heads split as the active logical-axis rules split the
    `batch` and `act_heads` activations. `kinds` names each argument: h = [B, heads, ...],
    b = [B, ...], r = replicated; the output is an h."""
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, head_axes = mesh_axes_for("batch"), mesh_axes_for("act_heads")
    if mesh.empty or not set(batch_axes + head_axes) <= set(mesh.axis_names):
        return fn
    dp = math.prod(mesh.shape[a] for a in batch_axes)
    tp = math.prod(mesh.shape[a] for a in head_axes)
    if dp * tp == 1:
        return fn
    b = (batch_axes or None) if batch % dp == 0 else None
    h = (head_axes or None) if heads % tp == 0 and kv_heads % tp == 0 else None
    specs = {"h": P(b, h), "b": P(b), "r": P()}
    return jax.shard_map(fn, in_specs=tuple(specs[c] for c in kinds), out_specs=specs["h"],
                         check_vma=False)
