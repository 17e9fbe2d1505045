"""Transformer blocks and stacks. Flax modules hold structure; the math lives in
attention.py and layers.py. Activations carry logical-axis constraints at block boundaries.

One cache convention: every layer module (Attention, Block, Stack, a seq2seq side) returns
(x, cache), the cache None unless a decoding cache was passed in. The models' entry points
return logits, and (logits, cache) when decoding."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import lora
from jaxlm.config import ConfigError, ModelConfig
from jaxlm.models import attention as attn
from jaxlm.models import context, ring_cache
from jaxlm.models.layers import Embed, Mlp, Norm, Projection, materialize_grad, normal_init
from jaxlm.models.moe import MoeMlp
from jaxlm.models.names import OUTPUT_HEAD, POSITION_TABLE

ACT_AXES = ("batch", "length", "act_embed")


def dtypes(cfg: ModelConfig) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.num_heads


def add_positions(module: nn.Module, x_BTD: jax.Array, positions_BT: jax.Array,
                  cfg: ModelConfig, std: float) -> jax.Array:
    """x plus the absolute position encoding of `cfg.position` (learned: a `pos_embed` table
    created on `module`, with `position_offset` rows before position 0; sinusoidal: fixed).
    RoPE and relative biases act inside attention instead; they add nothing here."""
    if cfg.position == "learned":
        table = module.param(POSITION_TABLE, normal_init(std, (None, "embed")),
                             (cfg.max_seq_len + cfg.position_offset, x_BTD.shape[-1]),
                             jnp.dtype(cfg.param_dtype))
        rows_BT = positions_BT + cfg.position_offset
        return x_BTD + jnp.take(table, rows_BT, axis=0).astype(x_BTD.dtype)
    if cfg.position == "sinusoidal":
        table = attn.sinusoidal_positions(cfg.max_seq_len, x_BTD.shape[-1],
                                          cfg.sinusoidal_layout)
        return x_BTD + jnp.take(table, positions_BT, axis=0).astype(x_BTD.dtype)
    return x_BTD


def out_std(cfg: ModelConfig) -> float:
    # GPT-2's scaled init of residual projections: std / sqrt(2 * layers).
    return cfg.init_std / (2 * cfg.num_layers) ** 0.5


def layer_is_local(cfg: ModelConfig, layer_idx: int | jax.Array) -> bool | jax.Array:
    """Whether layer `layer_idx` (traced under nn.scan) attends within the local window."""
    flags = attn.local_layers(cfg)
    return flags[layer_idx] if isinstance(layer_idx, int) else jnp.asarray(flags)[layer_idx]


def rope_inv_freq(cfg: ModelConfig, positions_BT: jax.Array,
                  local: bool | jax.Array = False) -> jax.Array:
    """[H / 2] RoPE inverse frequencies of a layer: `cfg.rope_scaling` applied (dynamic NTK
    reads the largest position), except in local layers when `rope_local_theta` gives them a
    base of their own (Gemma 3: unscaled, base 10000)."""
    H = head_dim(cfg)
    dynamic = cfg.rope_scaling == "dynamic"
    inv = attn.rope_frequencies(
        H, cfg.rope_theta, cfg.rope_scaling, factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
        original_max_len=cfg.rope_original_max_len or cfg.max_seq_len,
        max_len=cfg.max_seq_len, seq_len=jnp.max(positions_BT) + 1 if dynamic else None)
    if cfg.rope_local_theta and cfg.local_window:
        inv = jnp.where(local, attn.rope_frequencies(H, cfg.rope_local_theta), inv)
    return inv


class Attention(nn.Module):
    """Self- or cross-attention with separate q/k/v projections [embed, heads, head_dim]."""

    cfg: ModelConfig
    cross: bool = False
    deterministic: bool = True  # LoRA adapters' dropout off

    def _heads(self, x_BSD: jax.Array, heads: int, axis: str, name: str) -> jax.Array:
        """x projected to [B, S, heads, H]; queries and keys normed per head with qk_norm."""
        cfg = self.cfg
        y = Projection((heads, head_dim(cfg)), ("embed", axis, "head_dim"), name=name,
                       use_bias=cfg.use_bias or cfg.qkv_bias, std=cfg.init_std,
                       adapter=lora.adapter_for(cfg, name), deterministic=self.deterministic,
                       **dtypes(cfg))(x_BSD)
        if cfg.qk_norm and name in ("query", "key"):
            y = Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, axis="head_dim",
                     name=f"{name[0]}_norm", **dtypes(cfg))(y)
        return y

    @nn.compact
    def __call__(self, x_BTD, kv_BSD, mask_BTS, q_pos_BT, kv_pos_BS, bias_BNTS=None,
                 cache=None, local=False):
        """Returns (out, cache): None without a cache. Self-attention caches ({"k", "v"}:
        [B, L, K, H]) get this step's keys and values at slot `mask_BTS.q_offset`, and
        attention runs over all L slots (the mask hides the unwritten ones); when every layer
        is windowed the cache is a ring of the window's length (ring_cache.py). Cross-attention
        caches hold the projected encoder keys and values: an empty dict is filled on the
        first decoding step, later steps reuse it without projecting again. `local`: this
        layer is a local one (its RoPE base may differ)."""
        cfg = self.cfg
        N, K = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
        kw = dict(use_bias=cfg.use_bias, std=cfg.init_std, **dtypes(cfg))
        inv_freq = rope_inv_freq(cfg, q_pos_BT, local) if cfg.position == "rope" else None
        q = self._heads(x_BTD, N, "heads", "query")
        if inv_freq is not None:
            q = attn.rope(q, q_pos_BT, inv_freq=inv_freq)
        if self.cross and cache:
            k, v = cache["k"], cache["v"]
        else:
            k = self._heads(kv_BSD, K, "kv_heads", "key")
            v = self._heads(kv_BSD, K, "kv_heads", "value")
            if inv_freq is not None:
                k = attn.rope(k, kv_pos_BS, inv_freq=inv_freq)
        if cache is not None and not self.cross and ring_cache.windowed_everywhere(cfg):
            k, v, cache = ring_cache.attend_and_update(cache, k, v, mask_BTS.q_offset)
        elif cache is not None:
            if not self.cross:
                at = mask_BTS.q_offset
                k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                        at, 1)
                v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                        at, 1)
            cache = {"k": k, "v": v}
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        scale = cfg.attention_scale or None
        attend = attn.attention
        if cache is None and context.shards() > 1:  # the sequence is split over devices
            attend = functools.partial(context.attention, strategy=cfg.context_attention)
        out_BTNH = attend(q, k, v, mask_BTS, bias_BNTS, scale=scale, impl=cfg.attention,
                          cap=cfg.attention_softcap)
        kw["std"] = out_std(cfg)
        out_BTD = Projection((x_BTD.shape[-1],), ("heads", "head_dim", "embed"), in_axes=2,
                             name="out", adapter=lora.adapter_for(cfg, "out"),
                             deterministic=self.deterministic, **kw)(out_BTNH)
        return out_BTD, cache


class Block(nn.Module):
    """One layer: self-attention, optional cross-attention, MLP; pre- or post-norm residuals."""

    cfg: ModelConfig
    deterministic: bool = True
    cross: bool = False

    @nn.compact
    def __call__(self, x_BTD, layer_idx, mask_BTS, pos_BT, enc_BSD=None, enc_mask_BTS=None,
                 enc_pos_BS=None, bias_BNTS=None, local_mask_BTS=None, cache=None):
        """Returns (x, this layer's updated cache or None). A layer's cache is {"self": KV}
        plus {"cross": encoder KV} in cross-attending stacks (see Attention)."""
        cfg = self.cfg
        is_local = layer_is_local(cfg, layer_idx) if cfg.local_window else False
        if local_mask_BTS is not None:  # the layer pattern's local layers (attn.local_layers)
            mask_BTS = attn.select_mask(is_local, local_mask_BTS, mask_BTS)
        norm = lambda name: Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name=name, **dtypes(cfg))
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
        pre = cfg.norm_position == "pre"

        def residual(x, fn, norm_name):
            if cfg.grad_barrier:
                x = materialize_grad(x)
            if not pre:
                return norm(norm_name)(x + drop(fn(x)))
            y = fn(norm(norm_name)(x))
            if cfg.sandwich_norm:  # Gemma 2/3: the sublayer's output normed too
                y = norm(f"{norm_name}_out")(y)
            return x + drop(y)

        new_cache = None if cache is None else {}

        def attention_step(kind, h, kv, mask, kv_pos, bias):
            attention = Attention(cfg, cross=kind == "cross", deterministic=self.deterministic,
                                  name="attn" if kind == "self" else "cross_attn")
            out, layer_cache = attention(h, kv, mask, pos_BT, kv_pos, bias,
                                         None if cache is None else cache[kind],
                                         local=is_local if kind == "self" else False)
            if new_cache is not None:
                new_cache[kind] = layer_cache
            return out

        x_BTD = residual(x_BTD, lambda h: attention_step("self", h, h, mask_BTS, pos_BT,
                                                         bias_BNTS), "ln_attn")
        if self.cross:
            x_BTD = residual(x_BTD, lambda h: attention_step("cross", h, enc_BSD, enc_mask_BTS,
                                                             enc_pos_BS, None), "ln_cross")
        mlp = MoeMlp(cfg, out_std(cfg), name="mlp") if cfg.num_experts else Mlp(
            cfg.d_ff, cfg.activation, cfg.gated_mlp, cfg.use_bias, cfg.init_std, out_std(cfg),
            adapter_in=lora.adapter_for(cfg, "mlp_in"),
            adapter_out=lora.adapter_for(cfg, "mlp_out"), deterministic=self.deterministic,
            name="mlp", **dtypes(cfg))
        x_BTD = residual(x_BTD, mlp, "ln_mlp")
        return nn.with_logical_constraint(x_BTD, ACT_AXES), new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    # Weight-like matmul outputs go to pinned host memory instead of being recomputed.
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def remat_policy(name: str):
    """The jax.checkpoint policy of `model.remat`; host offload needs pinned host memory."""
    if name == "offload":
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            raise ConfigError(f"model.remat=offload needs pinned host memory, which the "
                              f"'{jax.default_backend()}' backend lacks; use full or "
                              "dots_saveable")
    return _REMAT_POLICIES[name]


class Stack(nn.Module):
    """`num_layers` Blocks, scanned (params stacked on a leading 'layers' axis) or unrolled."""

    cfg: ModelConfig
    num_layers: int
    deterministic: bool = True
    cross: bool = False

    @nn.compact
    def __call__(self, x_BTD, mask_BTS, pos_BT, enc_BSD=None, enc_mask_BTS=None, enc_pos_BS=None,
                 bias_BNTS=None, local_mask_BTS=None, cache=None):
        """bias_BNTS (e.g. T5's relative position bias) is shared by all layers' self-attention;
        local_mask_BTS replaces mask_BTS in the local layers (attn.local_layers). Returns
        (x, cache): the layers' updated caches (stacked on a leading layer axis when scanned,
        else a tuple) when `cache` is given, else None."""
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(block, policy=remat_policy(cfg.remat),
                             prevent_cse=not cfg.scan_layers)
        args = (mask_BTS, pos_BT, enc_BSD, enc_mask_BTS, enc_pos_BS, bias_BNTS, local_mask_BTS)
        if cfg.scan_layers:
            # Intermediates (the MoE router stats) stack over the layers like the params.
            scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(0,) + (nn.broadcast,) * len(args) + (0,),
                              length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x_BTD, new_cache = scanned(cfg, self.deterministic, self.cross, name="layers")(
                x_BTD, jnp.arange(self.num_layers), *args, cache)
            return x_BTD, new_cache
        # Unrolled layers keep one cache per layer (a tuple): no restacking copy per step.
        new_caches = []
        for i in range(self.num_layers):
            x_BTD, layer_cache = block(cfg, self.deterministic, self.cross, name=f"layers_{i}")(
                x_BTD, i, *args, None if cache is None else cache[i])
            new_caches.append(layer_cache)
        return x_BTD, None if cache is None else tuple(new_caches)


def init_cache(cfg: ModelConfig, batch: int, length: int, *, cross: bool = False) -> dict:
    """An empty decoding cache: per decoder layer, self-attention k and v [B, L, K, H] (and,
    with `cross`, an empty cross-attention slot for an encoder-decoder's decoder, filled by
    the first step), stacked on a leading layer axis when the layers are scanned, else a
    tuple; plus the next position. When every layer is windowed, L is at most the window
    (a ring: ring_cache.py), whatever `length`."""
    slots = ring_cache.cache_slots(cfg, length)
    shape = (batch, slots, cfg.num_kv_heads or cfg.num_heads, head_dim(cfg))
    dtype = jnp.dtype(cfg.dtype)
    layers = (cfg.num_decoder_layers or cfg.num_layers) if cross else cfg.num_layers

    def layer(lead=()):
        zeros = jnp.zeros((*lead, *shape), dtype)
        return {"self": {"k": zeros, "v": zeros}, **({"cross": {}} if cross else {})}

    stacked = layer((layers,)) if cfg.scan_layers else tuple(layer() for _ in range(layers))
    return {"layers": stacked, "index": jnp.zeros((), jnp.int32)}


class DecoderLM(nn.Module):
    """Decoder-only language model (GPT-2 / GPT-3 / Llama / Qwen / Gemma layouts). Returns
    logits [B, T, V].

    Decoding: pass `cache` (from `init_cache`) and the tokens after those already cached; the
    call returns (logits, cache advanced by T). padding_mask_BT then covers the L cache slots
    (False = a padding slot; for a rolling cache, positions 0..L-1 of the sequence), and
    positions_BT must be given.

    With `hidden=True` (training) it returns (x_BTD, w_VD) instead of the logits: the final
    hidden states and the output projection [vocab, embed] in the compute dtype, for a loss
    that applies them in chunks (jaxlm.chunked_ce; cfg.final_logit_softcap is the loss's).

    `zigzag` > 1: the tokens (and positions_BT, segment_ids_BT, which must be given) are in
    context parallelism's zig-zag order over that many shards (jaxlm.models.context)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None,
                 padding_mask_BT=None, deterministic: bool = True, cache=None,
                 hidden: bool = False, zigzag: int = 0):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, name="embed", **dtypes(cfg))
        x_BTD = embed(tokens_BT)
        if cfg.embed_scale:  # Gemma; the factor rounded to the compute dtype, as HF does
            x_BTD = x_BTD * jnp.asarray(cfg.d_model ** 0.5, x_BTD.dtype)
        x_BTD = add_positions(self, x_BTD, positions_BT, cfg, cfg.init_std / 2)  # GPT-2 init
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ACT_AXES)

        # Structured, not [B, T, T]: block kernels build only the tiles they visit.
        mask_BTS = attn.MaskSpec(q_segment_BT=segment_ids_BT, kv_segment_BS=segment_ids_BT,
                                 kv_valid_BS=padding_mask_BT, causal=True,
                                 q_offset=None if cache is None else cache["index"],
                                 zigzag=zigzag)
        local_BTS = mask_BTS.replace(window=cfg.local_window) if cfg.local_window else None
        if cache is not None and ring_cache.windowed_everywhere(cfg):  # a rolling cache
            mask_BTS = ring_cache.ring_mask(cache["index"], ring_cache.ring_length(
                cache["layers"]), T, cfg.local_window, padding_mask_BT)
            local_BTS = None  # the ring's mask has the window already
        x_BTD, layers = Stack(cfg, cfg.num_layers, deterministic, name="decoder")(
            x_BTD, mask_BTS, positions_BT, local_mask_BTS=local_BTS,
            cache=None if cache is None else cache["layers"])
        if cache is not None:
            cache = {"layers": layers, "index": cache["index"] + T}
        if cfg.norm_position == "pre":
            x_BTD = Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name="ln_final",
                         **dtypes(cfg))(x_BTD)
        if hidden:
            w_VD = (embed.embedding if cfg.tie_embeddings
                    else self.variables["params"][OUTPUT_HEAD]["kernel"].T)
            return x_BTD, w_VD.astype(cfg.dtype)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = Projection((cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                                    std=cfg.init_std, name=OUTPUT_HEAD, **dtypes(cfg))(x_BTD)
        logits_BTV = attn.softcap(logits_BTV, cfg.final_logit_softcap)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)

