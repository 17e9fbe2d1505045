"""BERT and RoBERTa (HF `model_type` 'bert' / 'roberta') <-> jaxlm EncoderMLM.

Reads BertForMaskedLM / RobertaForMaskedLM checkpoints and plain BertModel / RobertaModel ones
(e.g. sentence-transformers' MiniLM, whose tensor names may lack the `bert.` prefix and which
have no MLM head). Writes the *ForMaskedLM layout. HF Linear weights are [out, in]; jaxlm
kernels are [in, out] with q/k/v split per head: [embed, heads, head_dim].
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, stack_layers, take, unstack_layers
from jaxlm.convert.gpt2 import require_unset

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# HF name of the base model and of the MLM head's parts, per model_type.
_BASE = {"bert": "bert.", "roberta": "roberta."}
_HEAD = {"bert": dict(dense="cls.predictions.transform.dense",
                      ln="cls.predictions.transform.LayerNorm", bias="cls.predictions.bias",
                      decoder="cls.predictions.decoder"),
         "roberta": dict(dense="lm_head.dense", ln="lm_head.layer_norm", bias="lm_head.bias",
                         decoder="lm_head.decoder")}


def _kind(cfg: ModelConfig) -> str:
    return "roberta" if cfg.preset == "roberta" else "bert"


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    kind = hf["model_type"]
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConversionError(f"{kind} checkpoints configured as decoders are not supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{kind} position_embedding_type="
                              f"'{hf['position_embedding_type']}' is not supported (absolute)")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF or (kind == "roberta" and act != "gelu"):
        # RoBERTa's LM head applies exact GELU whatever hidden_act says.
        raise ConversionError(f"{kind} hidden_act='{act}' is not supported")
    pad = hf.get("pad_token_id")
    pad = (1 if kind == "roberta" else 0) if pad is None else int(pad)
    offset = pad + 1 if kind == "roberta" else 0
    return dict(
        preset=kind, family="encoder", norm="layernorm", norm_position="post",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)), activation=_ACT_FROM_HF[act],
        gated_mlp=False, position="learned", use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        num_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"], num_kv_heads=0, head_dim=0,
        d_ff=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"] - offset,
        type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=pad, position_offset=offset,
        dropout=float(hf.get("hidden_dropout_prob", 0.0)), attention_scale=0.0,
    )


def _ln(tensors, name, D):
    return {"scale": take(tensors, f"{name}.weight", (D,)),
            "bias": take(tensors, f"{name}.bias", (D,))}


def _dense(tensors, name, n_in, n_out):
    """HF Linear [out, in] -> kernel [in, out], bias [out]."""
    return take(tensors, f"{name}.weight", (n_out, n_in)).T, take(tensors, f"{name}.bias", (n_out,))


def _layer_from_hf(tensors, p: str, cfg: ModelConfig) -> dict[str, Any]:
    D, N, F = cfg.d_model, cfg.num_heads, cfg.d_ff
    H = D // N
    att = {}
    for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
        k, b = _dense(tensors, f"{p}attention.self.{theirs}", D, N * H)
        att[ours] = {"kernel": k.reshape(D, N, H), "bias": b.reshape(N, H)}
    k, b = _dense(tensors, f"{p}attention.output.dense", N * H, D)
    att["out"] = {"kernel": k.reshape(N, H, D), "bias": b}
    wi, bi = _dense(tensors, f"{p}intermediate.dense", D, F)
    wo, bo = _dense(tensors, f"{p}output.dense", F, D)
    return {"attn": att, "ln_attn": _ln(tensors, f"{p}attention.output.LayerNorm", D),
            "mlp": {"wi": {"kernel": wi, "bias": bi}, "wo": {"kernel": wo, "bias": bo}},
            "ln_mlp": _ln(tensors, f"{p}output.LayerNorm", D)}


def _check(cfg: ModelConfig) -> None:
    ok = (cfg.norm == "layernorm" and cfg.norm_position == "post"
          and not cfg.gated_mlp and cfg.position == "learned" and cfg.use_bias
          and cfg.num_kv_heads in (0, cfg.num_heads)
          and cfg.head_dim in (0, cfg.d_model // cfg.num_heads)
          and cfg.d_model % cfg.num_heads == 0 and cfg.attention_scale == 0)
    if not ok:
        raise ConversionError(f"model.preset='{cfg.preset}' with these settings has no BERT/"
                              "RoBERTa equivalent (needs post-LN, learned positions, biases, "
                              "no GQA/gating, head_dim = d_model / num_heads)")
    require_unset(cfg, _kind(cfg))
    want = cfg.pad_token_id + 1 if _kind(cfg) == "roberta" else 0
    if cfg.position_offset != want:
        raise ConversionError(f"{_kind(cfg)} needs model.position_offset={want} "
                              f"(pad_token_id={cfg.pad_token_id}), got {cfg.position_offset}")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    _check(cfg)
    kind = _kind(cfg)
    D, V = cfg.d_model, cfg.vocab_size
    # MaskedLM checkpoints prefix the encoder with `bert.`/`roberta.`; base models may not.
    p = _BASE[kind] if any(k.startswith(_BASE[kind]) for k in tensors) else ""
    e = f"{p}embeddings."
    params: dict[str, Any] = {
        "embed": {"embedding": take(tensors, f"{e}word_embeddings.weight", (V, D))},
        "pos_embed": take(tensors, f"{e}position_embeddings.weight",
                          (cfg.max_seq_len + cfg.position_offset, D)),
        "ln_embed": _ln(tensors, f"{e}LayerNorm", D),
    }
    if cfg.type_vocab_size:
        params["type_embed"] = take(tensors, f"{e}token_type_embeddings.weight",
                                    (cfg.type_vocab_size, D))
    layers = [_layer_from_hf(tensors, f"{p}encoder.layer.{i}.", cfg)
              for i in range(cfg.num_layers)]
    params["encoder"] = stack_layers(layers, cfg.scan_layers)

    h = _HEAD[kind]
    if f"{h['dense']}.weight" in tensors:
        k, b = _dense(tensors, h["dense"], D, D)
        head = {"dense": {"kernel": k, "bias": b}, "ln": _ln(tensors, h["ln"], D),
                "bias": take(tensors, h["bias"], (V,))}
        if not cfg.tie_embeddings:  # untied, HF adds the decoder's own bias, not `bias`
            head["decoder"] = {"kernel": take(tensors, f"{h['decoder']}.weight", (V, D)).T}
            if f"{h['decoder']}.bias" in tensors:
                head["bias"] = take(tensors, f"{h['decoder']}.bias", (V,))
    else:
        # A base model (no MLM head): identity transform and zero bias stand in, so the
        # parameter tree is complete; hidden states are exact, MLM logits are untrained.
        warnings.warn("checkpoint has no MLM head; logits use an untrained stand-in head "
                      "(hidden states via return_hidden=True are exact)", stacklevel=2)
        head = {"dense": {"kernel": np.eye(D, dtype=np.float32),
                          "bias": np.zeros(D, np.float32)},
                "ln": {"scale": np.ones(D, np.float32), "bias": np.zeros(D, np.float32)},
                "bias": np.zeros(V, np.float32)}
        if not cfg.tie_embeddings:
            head["decoder"] = {"kernel": params["embed"]["embedding"].T.copy()}
    params["mlm_head"] = head
    return params


def params_to_hf(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check(cfg)
    kind = _kind(cfg)
    D = cfg.d_model
    a = lambda x: np.asarray(x, np.float32)
    out: dict[str, np.ndarray] = {}

    def put_ln(name, ln):
        out[f"{name}.weight"], out[f"{name}.bias"] = a(ln["scale"]), a(ln["bias"])

    def put_dense(name, kernel_in_out, bias):
        out[f"{name}.weight"], out[f"{name}.bias"] = a(kernel_in_out).T, a(bias)

    e = f"{_BASE[kind]}embeddings."
    out[f"{e}word_embeddings.weight"] = a(params["embed"]["embedding"])
    out[f"{e}position_embeddings.weight"] = a(params["pos_embed"])
    # HF always has a token-type table; an all-zero one row is the same as none.
    types = params.get("type_embed")
    out[f"{e}token_type_embeddings.weight"] = (a(types) if cfg.type_vocab_size
                                               else np.zeros((1, D), np.float32))
    put_ln(f"{e}LayerNorm", params["ln_embed"])
    for i, layer in enumerate(unstack_layers(params["encoder"], cfg.num_layers)):
        p = f"{_BASE[kind]}encoder.layer.{i}."
        att = layer["attn"]
        for name in ("query", "key", "value"):
            put_dense(f"{p}attention.self.{name}", a(att[name]["kernel"]).reshape(D, -1),
                      a(att[name]["bias"]).reshape(-1))
        put_dense(f"{p}attention.output.dense", a(att["out"]["kernel"]).reshape(-1, D),
                  att["out"]["bias"])
        put_ln(f"{p}attention.output.LayerNorm", layer["ln_attn"])
        put_dense(f"{p}intermediate.dense", layer["mlp"]["wi"]["kernel"],
                  layer["mlp"]["wi"]["bias"])
        put_dense(f"{p}output.dense", layer["mlp"]["wo"]["kernel"], layer["mlp"]["wo"]["bias"])
        put_ln(f"{p}output.LayerNorm", layer["ln_mlp"])
    h, head = _HEAD[kind], params["mlm_head"]
    put_dense(h["dense"], head["dense"]["kernel"], head["dense"]["bias"])
    put_ln(h["ln"], head["ln"])
    out[h["bias"]] = a(head["bias"])
    if not cfg.tie_embeddings:
        put_dense(h["decoder"], head["decoder"]["kernel"], head["bias"])
    return out


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check(cfg)
    kind = _kind(cfg)
    if cfg.activation not in _ACT_TO_HF or (kind == "roberta" and cfg.activation != "gelu"):
        raise ConversionError(f"model.activation='{cfg.activation}' has no {kind} equivalent")
    hf = {
        "architectures": ["RobertaForMaskedLM" if kind == "roberta" else "BertForMaskedLM"],
        "model_type": kind, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": _ACT_TO_HF[cfg.activation],
        "max_position_embeddings": cfg.max_seq_len + cfg.position_offset,
        "type_vocab_size": cfg.type_vocab_size or 1, "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_token_id, "tie_word_embeddings": cfg.tie_embeddings,
        # jaxlm drops residual branches only; attention probabilities are never dropped.
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": 0.0,
        "position_embedding_type": "absolute", "initializer_range": cfg.init_std,
    }
    if kind == "roberta":
        hf.update(bos_token_id=0, eos_token_id=2)
    return hf
