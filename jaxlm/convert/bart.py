"""HF BartForConditionalGeneration <-> jaxlm `bart` preset. MarianMTModel has the same layer
layout (jaxlm.convert.marian reuses the tables here) without BART's learned positions and
embedding LayerNorm."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, take
from jaxlm.convert import seq2seq_layout as lay
from jaxlm.models.presets import PRESETS


def _attn(jax_name: str, hf_name: str, ln: str) -> lay.Table:
    return [(f"{jax_name}/query", f"{hf_name}.q_proj", "qkv"),
            (f"{jax_name}/key", f"{hf_name}.k_proj", "qkv"),
            (f"{jax_name}/value", f"{hf_name}.v_proj", "qkv"),
            (f"{jax_name}/out", f"{hf_name}.out_proj", "out"),
            (ln, f"{hf_name}_layer_norm", "norm")]


_MLP = [("mlp/wi", "fc1", "wi"), ("mlp/wo", "fc2", "wo"), ("ln_mlp", "final_layer_norm", "norm")]
EMBED_KEYS = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
ENCODER_TABLE = _attn("attn", "self_attn", "ln_attn") + _MLP
DECODER_TABLE = (_attn("attn", "self_attn", "ln_attn")
                 + _attn("cross_attn", "encoder_attn", "ln_cross") + _MLP)


def common_config(hf: dict[str, Any], model_type: str, start_default: int) -> dict[str, Any]:
    """model.* fields shared by BART and Marian configs; `start_default`: the decoder start
    when the config names none (HF's own default for the model type)."""
    lay.equal_sides(hf, model_type, "attention_heads", "ffn_dim")
    layers, dec_layers = hf["encoder_layers"], hf["decoder_layers"]
    return dict(
        PRESETS[model_type], preset=model_type, num_layers=layers,
        num_decoder_layers=0 if dec_layers == layers else dec_layers,
        d_model=hf["d_model"], num_heads=hf["encoder_attention_heads"],
        d_ff=hf["encoder_ffn_dim"], vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        activation=lay.act_from_hf(hf.get("activation_function", "gelu")),
        embed_scale=bool(hf.get("scale_embedding", False)),
        tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
        dropout=float(hf.get("dropout", 0.0)),
        pad_token_id=hf.get("pad_token_id", PRESETS[model_type]["pad_token_id"]),
        decoder_start_id=hf.get("decoder_start_token_id", start_default),
    )


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return common_config(hf, "bart", hf.get("eos_token_id", 2))  # HF BartConfig: 2 (</s>)


def check(cfg: ModelConfig, model_type: str, **expected: Any) -> None:
    lay.require(cfg, model_type, family="encoder_decoder", norm="layernorm",
                norm_position="post", use_bias=True, relative_buckets=0, attention_scale=0.0,
                final_norm=False, final_logits_bias=True, scale_decoder_output=False,
                norm_eps=1e-5, gated_mlp=False, **expected)
    lay.require_plain_heads(cfg, f"HF '{model_type}'")
    if not 0 <= cfg.pad_token_id < cfg.vocab_size:
        raise ConversionError(f"HF '{model_type}' needs model.pad_token_id inside the "
                              f"vocabulary (< {cfg.vocab_size}), got {cfg.pad_token_id}")


def _check(cfg: ModelConfig) -> None:
    check(cfg, "bart", position="learned", position_offset=2, embed_norm=True)


def common_params(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """Embedding, layers, output projection and final_logits_bias (missing = zeros, as HF)."""
    V = cfg.vocab_size
    shared = lay.shared_embedding(tensors, cfg, "model.shared.weight", EMBED_KEYS)
    bias = (take(tensors, "final_logits_bias", (1, V))[0] if "final_logits_bias" in tensors
            else np.zeros((V,), np.float32))
    params: dict[str, Any] = {
        "embed": {"embedding": shared},
        "encoder": {"stack": lay.layers_from(tensors, "model.encoder.layers.{}.",
                                             ENCODER_TABLE, cfg, cfg.num_layers)},
        "decoder": {"stack": lay.layers_from(tensors, "model.decoder.layers.{}.",
                                             DECODER_TABLE, cfg, lay.num_decoder_layers(cfg))},
        "final_logits_bias": bias,
    }
    params.update(lay.output_from(tensors, cfg, shared))
    return params


def common_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    a = lambda x: np.asarray(x, np.float32)
    embedding = a(params["embed"]["embedding"])
    # All three tables: with tie_word_embeddings=false HF reads the per-stack ones.
    out = {name: embedding for name in ("model.shared.weight", *EMBED_KEYS)}
    out["final_logits_bias"] = a(params["final_logits_bias"])[None]
    out.update(lay.layers_to(params["encoder"]["stack"], "model.encoder.layers.{}.",
                             ENCODER_TABLE, cfg.num_layers))
    out.update(lay.layers_to(params["decoder"]["stack"], "model.decoder.layers.{}.",
                             DECODER_TABLE, lay.num_decoder_layers(cfg)))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = a(params["lm_head"]["kernel"]).T
    return out


def start_for_hf(cfg: ModelConfig) -> int:
    """decoder_start_token_id for HF's config.json: model.decoder_start_id, or when that is
    -1 (the tokenizer's BOS, resolved by `jaxlm convert` before it gets here) the pad id."""
    return cfg.decoder_start_id if cfg.decoder_start_id >= 0 else max(cfg.pad_token_id, 0)


def common_hf_config(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    return {
        "model_type": model_type, "architectures": [architecture],
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
        "encoder_layers": cfg.num_layers, "decoder_layers": lay.num_decoder_layers(cfg),
        "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "activation_function": lay.ACT_TO_HF[cfg.activation],
        "scale_embedding": cfg.embed_scale, "tie_word_embeddings": cfg.tie_embeddings,
        "dropout": cfg.dropout, "is_encoder_decoder": True,
        "pad_token_id": cfg.pad_token_id, "decoder_start_token_id": start_for_hf(cfg),
    }


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    _check(cfg)
    params = common_params(tensors, cfg)
    rows = cfg.max_seq_len + cfg.position_offset
    for side in ("encoder", "decoder"):
        e = f"model.{side}."
        params[side]["pos_embed"] = take(tensors, f"{e}embed_positions.weight", (rows, cfg.d_model))
        params[side]["ln_embed"] = lay.module_from(tensors, f"{e}layernorm_embedding", "norm",
                                                   cfg, cfg.num_heads)
    return params


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check(cfg)
    out = common_to_hf(params, cfg)
    for side in ("encoder", "decoder"):
        e = f"model.{side}."
        out[f"{e}embed_positions.weight"] = np.asarray(params[side]["pos_embed"], np.float32)
        out.update(lay.module_to(params[side]["ln_embed"], f"{e}layernorm_embedding", "norm"))
    return out


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check(cfg)
    return common_hf_config(cfg, "bart", "BartForConditionalGeneration")
