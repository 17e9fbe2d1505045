"""HF T5ForConditionalGeneration (v1.0 and v1.1 layouts) <-> jaxlm `t5` preset.

HF keeps the relative position bias table in block 0 of each stack and reuses it in every
layer; jaxlm holds it once per stack (`encoder/rel_bias`, `decoder/rel_bias`, [buckets, heads]).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, take
from jaxlm.convert import seq2seq_layout as lay
from jaxlm.models.presets import PRESETS
from jaxlm.models.transformer import head_dim


def _attn(jax_name: str, hf_name: str, ln: str, i: int) -> lay.Table:
    p = f"layer.{i}.{hf_name}."
    return [(f"{jax_name}/query", p + "q", "qkv"), (f"{jax_name}/key", p + "k", "qkv"),
            (f"{jax_name}/value", p + "v", "qkv"), (f"{jax_name}/out", p + "o", "out"),
            (ln, f"layer.{i}.layer_norm", "norm")]


def _table(cfg: ModelConfig, decoder: bool) -> lay.Table:
    table = _attn("attn", "SelfAttention", "ln_attn", 0)
    if decoder:
        table += _attn("cross_attn", "EncDecAttention", "ln_cross", 1)
    ff = f"layer.{2 if decoder else 1}."
    if cfg.gated_mlp:
        table += [("mlp/wi_gate", ff + "DenseReluDense.wi_0", "wi"),
                  ("mlp/wi_up", ff + "DenseReluDense.wi_1", "wi")]
    else:
        table += [("mlp/wi", ff + "DenseReluDense.wi", "wi")]
    return table + [("mlp/wo", ff + "DenseReluDense.wo", "wo"), ("ln_mlp", ff + "layer_norm",
                                                                 "norm")]


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    ff = hf.get("feed_forward_proj", "relu")
    gated = ff.startswith("gated-")
    # HF maps "gated-gelu" to the tanh approximation (gelu_new), for T5 v1.1 checkpoints.
    act = "gelu_new" if ff == "gated-gelu" else ff.split("-")[-1]
    tied = hf.get("tie_word_embeddings", True) is not False
    layers = hf["num_layers"]
    dec_layers = hf.get("num_decoder_layers") or layers
    pad = hf.get("pad_token_id", 0)
    return dict(
        PRESETS["t5"], preset="t5", num_layers=layers,
        num_decoder_layers=0 if dec_layers == layers else dec_layers,
        d_model=hf["d_model"], num_heads=hf["num_heads"], head_dim=hf["d_kv"],
        d_ff=hf["d_ff"], vocab_size=hf["vocab_size"],
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=lay.act_from_hf(act),
        gated_mlp=gated, tie_embeddings=tied,
        # Old configs say tie_word_embeddings=false (v1.1) to mean "do not rescale".
        scale_decoder_output=bool(hf.get("scale_decoder_outputs", tied)),
        dropout=float(hf.get("dropout_rate", 0.0)), pad_token_id=pad,
        decoder_start_id=hf.get("decoder_start_token_id", pad),
    )


def _check(cfg: ModelConfig) -> None:
    lay.require(cfg, "t5", family="encoder_decoder", norm="rmsnorm", norm_position="pre",
                position="none", use_bias=False, attention_scale=1.0, embed_scale=False,
                embed_norm=False, final_norm=True, final_logits_bias=False)
    if cfg.relative_buckets <= 0:
        raise ConversionError("HF 't5' needs model.relative_buckets > 0")
    lay.require_plain_heads(cfg, "HF 't5'", any_width=True)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    _check(cfg)
    D, N = cfg.d_model, cfg.num_heads
    shared = lay.shared_embedding(tensors, cfg, "shared.weight",
                                  ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"))
    params: dict[str, Any] = {"embed": {"embedding": shared}}
    for side, n in (("encoder", cfg.num_layers), ("decoder", lay.num_decoder_layers(cfg))):
        params[side] = {
            "rel_bias": take(tensors, f"{side}.block.0.layer.0.SelfAttention."
                             "relative_attention_bias.weight", (cfg.relative_buckets, N)),
            "ln_final": {"scale": take(tensors, f"{side}.final_layer_norm.weight", (D,))},
            "stack": lay.layers_from(tensors, f"{side}.block.{{}}.",
                                     _table(cfg, side == "decoder"), cfg, n),
        }
    params.update(lay.output_from(tensors, cfg, shared))
    return params


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check(cfg)
    a = lambda x: np.asarray(x, np.float32)
    out = {"shared.weight": a(params["embed"]["embedding"])}
    for side, n in (("encoder", cfg.num_layers), ("decoder", lay.num_decoder_layers(cfg))):
        p = params[side]
        out[f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = a(
            p["rel_bias"])
        out[f"{side}.final_layer_norm.weight"] = a(p["ln_final"]["scale"])
        out.update(lay.layers_to(p["stack"], f"{side}.block.{{}}.",
                                 _table(cfg, side == "decoder"), n))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = a(params["lm_head"]["kernel"]).T
    return out


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check(cfg)
    if cfg.gated_mlp and cfg.activation == "gelu":
        raise ConversionError("HF 't5' reads 'gated-gelu' as the tanh approximation; "
                              "set model.activation=gelu_tanh")
    act = lay.ACT_TO_HF[cfg.activation]
    ff = "gated-gelu" if cfg.gated_mlp and act == "gelu_new" else (
        f"gated-{act}" if cfg.gated_mlp else act)
    return {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": head_dim(cfg),
        "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
        "num_decoder_layers": lay.num_decoder_layers(cfg), "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": ff,
        "dropout_rate": cfg.dropout, "is_encoder_decoder": True,
        "pad_token_id": cfg.pad_token_id,
        # -1 (the tokenizer's BOS) is resolved by `jaxlm convert`; T5's own start is pad.
        "decoder_start_token_id": (cfg.decoder_start_id if cfg.decoder_start_id >= 0
                                   else cfg.pad_token_id),
        "eos_token_id": 1, "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_output,
    }
