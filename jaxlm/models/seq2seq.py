"""Encoder-decoder Transformers: the original Transformer, T5, BART and Marian.

One module covers the four layouts; ModelConfig fields switch the differences:
  embeddings  times sqrt(d_model) (embed_scale); learned positions (offset rows, BART),
              sinusoidal (interleaved, or Marian's split layout), or none with T5's
              relative position bias (relative_buckets), computed once per stack
  norms       pre (T5) or post (BART, Marian, the paper) residuals; a LayerNorm on the
              embeddings (embed_norm, BART); a norm closing each stack (final_norm: T5,
              torch.nn.Transformer)
  output      tied embedding or lm_head; T5's d_model**-0.5 rescale (scale_decoder_output);
              BART/Marian's final_logits_bias
Encoder and decoder share one token embedding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models import attention as attn
from jaxlm.models.layers import Embed, Norm, Projection, normal_init, zeros_init
from jaxlm.models.transformer import ACT_AXES, Stack, add_positions, dtypes


def relative_position_bias(table_PN: jax.Array, q_len: int, kv_len: int, bidirectional: bool,
                           max_distance: int, q_offset: int | jax.Array = 0) -> jax.Array:
    """[1, N, T, S] bias from a [buckets, N] table (T5: bidirectional in the encoder,
    causal in the decoder); query i sits at position q_offset + i."""
    rel_TS = jnp.arange(kv_len)[None, :] - (jnp.arange(q_len) + q_offset)[:, None]
    buckets_TS = attn.relative_position_buckets(rel_TS, bidirectional, table_PN.shape[0],
                                                max_distance)
    return jnp.take(table_PN, buckets_TS, axis=0).transpose(2, 0, 1)[None]


class _Side(nn.Module):
    """One stack with its position encoding, embedding norm and closing norm."""

    cfg: ModelConfig
    is_decoder: bool

    @nn.compact
    def __call__(self, x_BTD, mask_BTS, enc_BSD=None, enc_mask_BTS=None, *,
                 deterministic: bool = True, cache=None):
        """Returns (x, cache): with a decoding cache (init_cache), x_BTD are the tokens after
        the cached ones and the cache comes back advanced; without one, the cache is None."""
        cfg = self.cfg
        B, T, D = x_BTD.shape
        offset = 0 if cache is None else cache["index"]
        pos_BT = jnp.broadcast_to(jnp.arange(T) + offset, (B, T))
        x_BTD = add_positions(self, x_BTD, pos_BT, cfg, cfg.init_std)
        norm = lambda name: Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name=name, **dtypes(cfg))
        if cfg.embed_norm:
            x_BTD = norm("ln_embed")(x_BTD)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ACT_AXES)

        bias_1NTS = None
        if cfg.relative_buckets:
            table_PN = self.param("rel_bias", normal_init(cfg.init_std, (None, "heads")),
                                  (cfg.relative_buckets, cfg.num_heads),
                                  jnp.dtype(cfg.param_dtype))
            kv_len = T if cache is None else _cache_length(cache)
            bias_1NTS = relative_position_bias(table_PN, T, kv_len, not self.is_decoder,
                                               cfg.relative_max_distance, offset)
        enc_pos_BS = None
        if enc_BSD is not None:
            enc_pos_BS = jnp.broadcast_to(jnp.arange(enc_BSD.shape[1]), enc_BSD.shape[:2])
        layers = (cfg.num_decoder_layers or cfg.num_layers) if self.is_decoder else cfg.num_layers
        x_BTD, layers = Stack(cfg, layers, deterministic, cross=self.is_decoder, name="stack")(
            x_BTD, mask_BTS, pos_BT, enc_BSD, enc_mask_BTS, enc_pos_BS, bias_BNTS=bias_1NTS,
            cache=None if cache is None else cache["layers"])
        if cache is not None:
            cache = {"layers": layers, "index": cache["index"] + T}
        if cfg.final_norm:
            x_BTD = norm("ln_final")(x_BTD)
        return x_BTD, cache


def _cache_length(cache: dict) -> int:
    """L, the number of self-attention slots of a decoding cache."""
    layers = cache["layers"]
    first = layers[0] if isinstance(layers, tuple) else layers
    return first["self"]["k"].shape[-3]


class EncoderDecoder(nn.Module):
    """Sequence-to-sequence Transformer. `__call__(src, tgt)` returns logits [B, T, V] for
    teacher-forced target inputs; padding masks are [B, S] / [B, T], True (1) = real token."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, **dtypes(cfg))
        self.encoder = _Side(cfg, is_decoder=False)
        self.decoder = _Side(cfg, is_decoder=True)
        if not cfg.tie_embeddings:
            self.lm_head = Projection((cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                                      std=cfg.init_std, **dtypes(cfg))
        if cfg.final_logits_bias:
            self.logits_bias = self.param("final_logits_bias", zeros_init(("vocab",)),
                                          (cfg.vocab_size,), jnp.dtype(cfg.param_dtype))

    def _embed(self, ids_BT: jax.Array) -> jax.Array:
        x_BTD = self.embed(ids_BT)
        if self.cfg.embed_scale:
            x_BTD = x_BTD * jnp.asarray(self.cfg.d_model ** 0.5, x_BTD.dtype)
        return x_BTD

    def encode(self, src_BS: jax.Array, *, src_padding_mask_BS: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
        """Encoder output [B, S, D]."""
        mask = None if src_padding_mask_BS is None else attn.MaskSpec(
            kv_valid_BS=src_padding_mask_BS)
        return self.encoder(self._embed(src_BS), mask, deterministic=deterministic)[0]

    def decode(self, tgt_BT: jax.Array, enc_BSD: jax.Array | None, *,
               src_padding_mask_BS: jax.Array | None = None,
               tgt_padding_mask_BT: jax.Array | None = None,
               deterministic: bool = True, cache: dict | None = None):
        """Logits [B, T, V] of the next target token at every target position.

        Decoding: pass `cache` (init_cache) and the target tokens after the cached ones; the
        call returns (logits, cache advanced by T). The first call projects enc_BSD into the
        cache's cross-attention keys and values; later calls may pass enc_BSD=None."""
        cfg = self.cfg
        self_mask = attn.MaskSpec(kv_valid_BS=tgt_padding_mask_BT, causal=True,
                                  q_offset=None if cache is None else cache["index"])
        cross_mask = None if src_padding_mask_BS is None else attn.MaskSpec(
            kv_valid_BS=src_padding_mask_BS)
        x_BTD, cache = self.decoder(self._embed(tgt_BT), self_mask, enc_BSD, cross_mask,
                                    deterministic=deterministic, cache=cache)
        if cfg.scale_decoder_output:
            x_BTD = x_BTD * jnp.asarray(cfg.d_model ** -0.5, x_BTD.dtype)
        logits_BTV = self.embed.attend(x_BTD) if cfg.tie_embeddings else self.lm_head(x_BTD)
        if cfg.final_logits_bias:
            logits_BTV = logits_BTV + self.logits_bias.astype(logits_BTV.dtype)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)

    def __call__(self, src_BS: jax.Array, tgt_BT: jax.Array, *,
                 src_padding_mask_BS: jax.Array | None = None,
                 tgt_padding_mask_BT: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        enc_BSD = self.encode(src_BS, src_padding_mask_BS=src_padding_mask_BS,
                              deterministic=deterministic)
        return self.decode(tgt_BT, enc_BSD, src_padding_mask_BS=src_padding_mask_BS,
                           tgt_padding_mask_BT=tgt_padding_mask_BT, deterministic=deterministic)
