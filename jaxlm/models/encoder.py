"""Encoder-only masked language model (BERT / RoBERTa layouts): token + position + token-type
embeddings, a post-norm bidirectional Stack, and the MLM head tied to the token embedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models import attention as attn
from jaxlm.models.layers import ACTIVATIONS, Embed, Norm, Projection, normal_init, zeros_init
from jaxlm.models.names import TYPE_TABLE
from jaxlm.models.transformer import ACT_AXES, Stack, add_positions, dtypes


def roberta_positions(valid_BT: jax.Array) -> jax.Array:
    """Position of each valid token among the valid tokens of its row (0, 1, ...); -1 at pads.

    With `position_offset = pad_token_id + 1` this reproduces HF's
    create_position_ids_from_input_ids: pads land on row pad_token_id of the table."""
    valid = valid_BT.astype(jnp.int32)
    return jnp.cumsum(valid, axis=1) * valid - 1


class MlmHead(nn.Module):
    """dense -> activation -> LayerNorm -> (tied) vocabulary projection + bias."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, embed: Embed) -> jax.Array:
        cfg = self.cfg
        x_BTD = Projection((cfg.d_model,), ("embed", None), std=cfg.init_std, name="dense",
                           **dtypes(cfg))(x_BTD)
        x_BTD = ACTIVATIONS[cfg.activation](x_BTD)
        x_BTD = Norm(cfg.norm, cfg.norm_eps, True, name="ln", **dtypes(cfg))(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = Projection((cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                                    std=cfg.init_std, name="decoder", **dtypes(cfg))(x_BTD)
        bias_V = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,),
                            jnp.dtype(cfg.param_dtype))
        return logits_BTV + bias_V.astype(logits_BTV.dtype)


class EncoderMLM(nn.Module):
    """Bidirectional encoder; returns MLM logits [B, T, V] or, with return_hidden, the final
    hidden states [B, T, D] (HF's last_hidden_state, e.g. for sentence embeddings)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, *, padding_mask_BT=None, token_types_BT=None,
                 positions_BT=None, segment_ids_BT=None, deterministic: bool = True,
                 return_hidden: bool = False):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            if cfg.position_offset:  # RoBERTa: count only the real (non-pad) tokens
                valid_BT = (tokens_BT != cfg.pad_token_id if padding_mask_BT is None
                            else padding_mask_BT)
                positions_BT = roberta_positions(valid_BT)
            else:
                positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, name="embed", **dtypes(cfg))
        x_BTD = embed(tokens_BT)
        x_BTD = add_positions(self, x_BTD, positions_BT, cfg, cfg.init_std)
        if cfg.type_vocab_size:
            type_table = self.param(TYPE_TABLE, normal_init(cfg.init_std, (None, "embed")),
                                    (cfg.type_vocab_size, cfg.d_model),
                                    jnp.dtype(cfg.param_dtype))
            types_BT = jnp.zeros_like(tokens_BT) if token_types_BT is None else token_types_BT
            x_BTD = x_BTD + jnp.take(type_table, types_BT, axis=0).astype(x_BTD.dtype)
        if cfg.norm_position == "post":  # BERT normalises the embeddings before the stack
            x_BTD = Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name="ln_embed",
                         **dtypes(cfg))(x_BTD)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ACT_AXES)

        mask_BTS = None  # structured, so block kernels never build [B, T, T]
        if padding_mask_BT is not None or segment_ids_BT is not None:
            mask_BTS = attn.MaskSpec(q_segment_BT=segment_ids_BT, kv_segment_BS=segment_ids_BT,
                                     kv_valid_BS=padding_mask_BT)
        x_BTD, _ = Stack(cfg, cfg.num_layers, deterministic, name="encoder")(
            x_BTD, mask_BTS, positions_BT)
        if cfg.norm_position == "pre":
            x_BTD = Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name="ln_final",
                         **dtypes(cfg))(x_BTD)
        if return_hidden:
            return x_BTD
        logits_BTV = MlmHead(cfg, name="mlm_head")(x_BTD, embed)
        return nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))
