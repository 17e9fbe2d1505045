"""Attention as pure functions: softmax(QKᵀ·scale + bias)V, masks, rotary embeddings.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K query heads per key/value head (grouped-query attention), H head width.
Masks are boolean, True where attention is allowed, shaped [B, T, S] (no head axis), or a
structured `MaskSpec` (causal / window / segments / padding) that block kernels expand tile by
tile instead of holding T×S booleans.

Implementations (`impl`, config `model.attention`):
  reference  einsum, float32 softmax; the definition every other one is tested against
  xla        jax.nn.dot_product_attention(implementation="xla")
  cudnn      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention,
             NVIDIA GPUs, bfloat16/float16
  splash     Pallas TPU splash attention (no bias; structured masks only)
  flash      Pallas TPU flash attention (takes a bias; no local window)
  chunked    pure-JAX blockwise online softmax: O(T·block) memory, every backend
  triangular pure-JAX causal attention in static query slices that skip the masked-out keys
             (about 5/8 of dense attention's pairs at 4 slices); dense-attention memory
  auto       cudnn on NVIDIA GPUs, splash (or flash with a bias) on TPU, where the inputs
             allow; on CPU triangular for causal self-attention of 128 tokens or more;
             xla otherwise
KV-cache decoding steps (a MaskSpec with q_offset) under splash, flash or triangular run on
xla, as do inputs triangular cannot take (a dense mask array, fewer queries than keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.config import NO_SOFTCAP_KERNELS, ConfigError, ModelConfig
from jaxlm.models.kernels import triangular
from jaxlm.models.kernels.chunked import chunked_attention
from jaxlm.models.kernels.mask import MaskSpec

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "splash", "flash", "chunked", "triangular",
                   "auto")
__all__ = ["IMPLEMENTATIONS", "MaskSpec", "attention", "causal_mask", "combine_masks",
           "local_layers", "local_window_mask", "padding_mask", "pattern_of", "resolve_impl",
           "rope", "rope_frequencies", "segment_mask", "select_mask", "sinusoidal_positions",
           "relative_position_buckets", "softcap"]


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


def select_mask(on: jax.Array | bool, mask_a, mask_b):
    """mask_a where `on` (a traced per-layer flag welcome), else mask_b. For MaskSpecs,
    mask_a must be mask_b plus a window (as DecoderLM builds its local layers' mask)."""
    if isinstance(mask_a, MaskSpec):
        if not mask_a.window:
            raise ValueError("select_mask: the first MaskSpec needs a window")
        return mask_a.with_window(on)
    return jnp.where(on, mask_a, mask_b)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else jnp.logical_and(out, m)
    return out


def local_layers(cfg: ModelConfig) -> tuple[bool, ...]:
    """Which layers attend within `cfg.local_window`: `local_pattern` (L local, G global)
    repeated over the stack, else every `local_every`-th layer (GPT-3); none without a
    window."""
    if not cfg.local_window:
        return (False,) * cfg.num_layers
    pattern = cfg.local_pattern or "G" * (cfg.local_every - 1) + "L"
    return tuple(pattern[i % len(pattern)] == "L" for i in range(cfg.num_layers))


def pattern_of(local: Sequence[bool]) -> str:
    """The shortest `local_pattern` (L local, G global) that repeats into `local`."""
    n = len(local)
    period = next(p for p in range(1, n + 1) if all(local[i] == local[i % p] for i in range(n)))
    return "".join("L" if x else "G" for x in local[:period])


def softcap(logits: jax.Array, cap: float) -> jax.Array:
    """cap·tanh(logits / cap): logits squashed into (-cap, cap) (Gemma 2); cap 0 = off."""
    return cap * jnp.tanh(logits / cap) if cap else logits


def _reference(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale, cap=0.0):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = softcap(jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                                      preferred_element_type=jnp.float32) * scale, cap)
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


def _is_nvidia() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and "rocm" not in getattr(dev.client, "platform_version", "")


def _cudnn_fits(q_BTNH) -> bool:
    return q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and q_BTNH.shape[-1] % 8 == 0 \
        and q_BTNH.shape[-1] <= 256


def _cudnn(q_BTNH, k_BSKH, v_BSKH, mask, bias_BNTS, scale):
    """cuDNN's fused kernel: causal and window by flag; segments and padding (when present)
    as a dense mask, which cuDNN folds into its bias."""
    if not _is_nvidia():
        raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU, but the backend is "
                          f"'{jax.default_backend()}'; use model.attention=xla or chunked")
    if not _cudnn_fits(q_BTNH):
        raise ConfigError(f"model.attention=cudnn needs bfloat16/float16 inputs with a head "
                          f"width that is a multiple of 8 up to 256, got {q_BTNH.dtype} and "
                          f"{q_BTNH.shape[-1]}; set model.dtype=bfloat16 or use xla")
    kw = dict(bias=bias_BNTS, scale=scale, implementation="cudnn")
    if not isinstance(mask, MaskSpec) or mask.q_offset is not None:
        dense = mask.dense(q_BTNH.shape[1], k_BSKH.shape[1]) if isinstance(mask, MaskSpec) \
            else mask
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=None if dense is None else dense[:, None], **kw)
    rest = mask.replace(window_on=None).replace(window=0, causal=False)
    rest = rest.dense(q_BTNH.shape[1], k_BSKH.shape[1]) if rest.has_arrays else None
    kw.update(mask=None if rest is None else rest[:, None], is_causal=mask.causal)

    def run(window):
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, **kw,
                                            local_window_size=window)
    if not mask.window:
        return run(None)
    banded = (mask.window - 1, 0)
    if mask.window_on is None:
        return run(banded)
    return jax.lax.cond(mask.window_on, lambda: run(banded), lambda: run(None))


def _unsupported(impl: str, what: str) -> ConfigError:
    return ConfigError(f"model.attention={impl} cannot apply {what}; use model.attention="
                       "chunked, xla or reference")


def resolve_impl(impl: str, q_BTNH: jax.Array, mask, bias_BNTS, cap: float = 0.0) -> str:
    """The implementation `auto` stands for, given the backend and these inputs (`cap`: the
    attention-logit soft-cap, which the NO_SOFTCAP_KERNELS do not apply)."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    structured = mask is None or (isinstance(mask, MaskSpec) and mask.q_offset is None)
    if backend == "gpu" and _is_nvidia() and _cudnn_fits(q_BTNH) and not cap:
        return "cudnn"
    if backend == "tpu" and structured:
        if bias_BNTS is None:
            return "splash"
        if (mask is None or not mask.window) and not cap:
            return "flash"
    # Self-attention is assumed here (no keys given); attention() runs xla where T != S.
    T = q_BTNH.shape[1]
    if (sharding.target_platform() == "cpu" and isinstance(mask, MaskSpec) and mask.causal
            and triangular.supports(mask, T, T)
            and triangular.default_slices(T) > 1):
        return "triangular"
    return "xla"


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array | MaskSpec | None = None,
    bias_BNTS: jax.Array | None = None,
    *,
    scale: float | None = None,
    impl: str = "reference",
    cap: float = 0.0,
) -> jax.Array:
    """Multi-head (grouped-query) attention; returns [B, T, N, H] in the dtype of v.

    mask_BTS: dense [B, T, S] booleans or a MaskSpec; bias_BNTS: additive, broadcastable
    to [B, N, T, S]; cap: soft-cap of the scaled logits before the bias (0 = off). Raises
    ConfigError when `impl` can't honour the mask, bias or soft-cap here."""
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise ValueError(f"{q_BTNH.shape[2]} query heads not divisible by "
                         f"{k_BSKH.shape[2]} key/value heads")
    if scale is None:
        scale = q_BTNH.shape[-1] ** -0.5
    impl = resolve_impl(impl, q_BTNH, mask_BTS, bias_BNTS, cap)
    if cap and impl in NO_SOFTCAP_KERNELS:  # xla soft-caps through the reference einsums
        raise ConfigError(f"model.attention={impl} cannot soft-cap attention logits "
                          "(model.attention_softcap); use model.attention=chunked, xla, "
                          "splash or reference")
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    spec = mask_BTS if isinstance(mask_BTS, MaskSpec) else None
    if spec is not None and spec.zigzag > 1:
        raise ValueError("a sequence in zig-zag order needs the context-parallel attention "
                         "(jaxlm.models.context, under a mesh with context > 1)")
    if impl in ("splash", "flash") and spec is not None and spec.q_offset is not None:
        # KV-cache decoding: a few queries after the cache, which the TPU kernels can't
        # place; this step is small, so XLA's attention serves it.
        impl = "xla"
    if impl == "triangular" and not triangular.supports(mask_BTS, T, S):
        impl = "xla"  # decoding after a cache, a dense mask, T != S: no slices to skip
    if impl == "triangular":
        return triangular.triangular_attention(q_BTNH, k_BSKH, v_BSKH, spec, bias_BNTS,
                                               scale=scale, cap=cap)
    if impl in ("reference", "xla"):
        dense = spec.dense(T, S) if spec is not None else mask_BTS
        if impl == "xla" and not cap:
            return _xla(q_BTNH, k_BSKH, v_BSKH, dense, bias_BNTS, scale)
        # jax.nn.dot_product_attention has no soft-cap: XLA runs the same einsums here.
        return _reference(q_BTNH, k_BSKH, v_BSKH, dense, bias_BNTS, scale, cap)
    if impl == "chunked":
        return chunked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale=scale,
                                 cap=cap)
    if impl == "cudnn":
        return _cudnn(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale)
    if impl in ("splash", "flash"):
        if jax.default_backend() == "gpu":
            raise ConfigError(f"model.attention={impl} is a TPU kernel (the backend is 'gpu'); "
                              "use model.attention=cudnn, xla or chunked")
        if impl == "splash":
            from jaxlm.models.kernels.splash import splash_attention

            if bias_BNTS is not None:
                raise _unsupported(impl, "an attention bias (model.attention=flash can)")
            if mask_BTS is not None and spec is None:
                raise _unsupported(impl, "a dense [B, T, S] mask (it needs a MaskSpec)")
            return splash_attention(q_BTNH, k_BSKH, v_BSKH, spec, scale=scale, cap=cap)
        from jaxlm.models.kernels.flash import flash_attention

        if spec is not None and spec.window:
            raise _unsupported(impl, "a local window (model.attention=splash can)")
        return flash_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale=scale)
    raise ValueError(f"unknown attention implementation '{impl}'; "
                     f"choose one of {', '.join(IMPLEMENTATIONS)}")


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none", *,
                     factor: float = 1.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_max_len: int = 0,
                     max_len: int = 0, seq_len: jax.Array | int | None = None) -> jax.Array:
    """[head_dim / 2] float32 inverse frequencies of RoPE with HF's scalings
    (transformers' ROPE_INIT_FUNCTIONS): `linear` divides them by `factor`; `dynamic` (NTK)
    raises the base once `seq_len` (largest position + 1; may be traced) passes `max_len`;
    `llama3` divides wavelengths above original_max_len / low_freq_factor by `factor`,
    keeps those below original_max_len / high_freq_factor and blends the band between."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    if scaling == "dynamic":
        seq = jnp.maximum(jnp.asarray(max_len if seq_len is None else seq_len, jnp.float32),
                          max_len)
        theta = theta * (factor * seq / max_len - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** exponents)
    if scaling == "linear":
        return inv_freq / factor
    if scaling != "llama3":
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    long = wavelen > original_max_len / low_freq_factor
    short = wavelen < original_max_len / high_freq_factor
    scaled = jnp.where(long, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor
                                                                - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    return jnp.where(~long & ~short, blended, scaled)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float = 10000.0,
         inv_freq: jax.Array | None = None) -> jax.Array:
    """Rotary position embedding, half-split layout (as in HF Llama's rotate_half), at
    `inv_freq` ([H / 2], from rope_frequencies) or unscaled at base `theta`."""
    H = x_BTNH.shape[-1]
    if inv_freq is None:
        inv_freq = rope_frequencies(H, theta)
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
