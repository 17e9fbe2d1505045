"""HF GPT-Neo (`GPTNeoForCausalLM`, model_type 'gpt_neo') <-> jaxlm DecoderLM.

GPT-Neo is GPT-2 with GPT-3's alternating dense / locally banded attention: layer types
come from `attention_layers` ('global' | 'local'), local layers see the last `window_size`
positions. It does not scale attention logits by 1/sqrt(head_dim) (model.attention_scale=1)
and its q/k/v projections have no bias (imported as zeros; exported only if still zero).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, stack_layers, take
from jaxlm.convert.gpt2 import (
    ACT_FROM_HF,
    ACT_TO_HF,
    bias_or_zeros,
    head_dim,
    layers_out,
    ln_from_hf,
    ln_to_hf,
    np_tree,
    require,
    require_unset,
)
from jaxlm.models import attention as attn

_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


def _layer_pattern(kinds: list[str]) -> dict[str, Any]:
    """model.local_every (layer i local iff i % every == every - 1) where it matches `kinds`,
    else model.local_pattern."""
    if "local" not in kinds:
        return {"local_every": 2}
    for every in range(1, len(kinds) + 1):
        if all((k == "local") == (i % every == every - 1) for i, k in enumerate(kinds)):
            return {"local_every": every}
    return {"local_pattern": attn.pattern_of([k == "local" for k in kinds])}


def _layer_kinds(hf: dict[str, Any]) -> list[str]:
    kinds = hf.get("attention_layers")
    if not kinds:  # expand attention_types: [[["global", "local"], 12]]
        kinds = [k for pattern, n in hf["attention_types"] for _ in range(n) for k in pattern]
    if len(kinds) != hf["num_layers"] or set(kinds) - {"global", "local"}:
        raise ConversionError(f"GPT-Neo attention_layers {kinds} do not describe "
                              f"{hf['num_layers']} global/local layers")
    return list(kinds)


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ACT_FROM_HF:
        raise ConversionError(f"GPT-Neo activation_function '{act}' is not supported")
    kinds = _layer_kinds(hf)
    d = hf["hidden_size"]
    return dict(
        preset="gpt-neo", family="decoder", num_layers=hf["num_layers"], d_model=d,
        num_heads=hf["num_heads"], num_kv_heads=0, head_dim=0,
        d_ff=hf.get("intermediate_size") or 4 * d, vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"], norm="layernorm", norm_position="pre",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=ACT_FROM_HF[act],
        gated_mlp=False, position="learned", use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=0.0,
        init_std=hf.get("initializer_range", 0.02), attention_scale=1.0,
        local_window=hf["window_size"] if "local" in kinds else 0,
        **_layer_pattern(kinds))


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    D, N, H, F, V = cfg.d_model, cfg.num_heads, head_dim(cfg), cfg.d_ff, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        h = f"transformer.h.{i}"
        attn = {name: {"kernel": take(tensors, f"{h}.attn.attention.{hf_name}.weight",
                                      (N * H, D)).T.reshape(D, N, H),
                       "bias": np.zeros((N, H), np.float32)}
                for name, hf_name in _PROJ.items()}
        attn["out"] = {"kernel": take(tensors, f"{h}.attn.attention.out_proj.weight",
                                      (D, N * H)).T.reshape(N, H, D),
                       "bias": take(tensors, f"{h}.attn.attention.out_proj.bias", (D,))}
        mlp = {"wi": {"kernel": take(tensors, f"{h}.mlp.c_fc.weight", (F, D)).T,
                      "bias": take(tensors, f"{h}.mlp.c_fc.bias", (F,))},
               "wo": {"kernel": take(tensors, f"{h}.mlp.c_proj.weight", (D, F)).T,
                      "bias": take(tensors, f"{h}.mlp.c_proj.bias", (D,))}}
        layers.append({"attn": attn, "mlp": mlp, "ln_attn": ln_from_hf(tensors, f"{h}.ln_1", D),
                       "ln_mlp": ln_from_hf(tensors, f"{h}.ln_2", D)})
    params = {"embed": {"embedding": take(tensors, "transformer.wte.weight", (V, D))},
              "pos_embed": take(tensors, "transformer.wpe.weight", (cfg.max_seq_len, D)),
              "decoder": stack_layers(layers, cfg.scan_layers),
              "ln_final": ln_from_hf(tensors, "transformer.ln_f", D)}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": take(tensors, "lm_head.weight", (V, D)).T}
    return params


def _check_exportable(cfg: ModelConfig) -> None:
    t = "gpt_neo"
    require(cfg.norm == "layernorm" and cfg.norm_position == "pre"
            and not cfg.gated_mlp and cfg.position == "learned",
            "GPT-Neo is a pre-LayerNorm decoder with learned positions and a plain MLP", t)
    require(cfg.activation in ACT_TO_HF, f"model.activation={cfg.activation!r}", t)
    require(cfg.attention_scale == 1.0, "GPT-Neo does not scale attention logits "
            "(model.attention_scale must be 1.0)", t)
    require(cfg.num_kv_heads in (0, cfg.num_heads) and head_dim(cfg) * cfg.num_heads
            == cfg.d_model, "GPT-Neo has plain multi-head attention with d_model = heads × "
            "head_dim", t)
    require_unset(cfg, t, keep=("local_pattern",))


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check_exportable(cfg)
    D = cfg.d_model
    out = {"transformer.wte.weight": np.asarray(params["embed"]["embedding"], np.float32),
           "transformer.wpe.weight": np.asarray(params["pos_embed"], np.float32)}
    for i, layer in enumerate(layers_out(params, cfg)):
        h, a, m = f"transformer.h.{i}", layer["attn"], layer["mlp"]
        for name, hf_name in _PROJ.items():
            if np.any(a[name].get("bias", 0.0) != 0):
                raise ConversionError(f"cannot convert to HF 'gpt_neo': layer {i} has a "
                                      f"nonzero attn.{name}.bias, which GPT-Neo lacks")
            out[f"{h}.attn.attention.{hf_name}.weight"] = a[name]["kernel"].reshape(D, -1).T
        out[f"{h}.attn.attention.out_proj.weight"] = a["out"]["kernel"].reshape(-1, D).T
        out[f"{h}.attn.attention.out_proj.bias"] = bias_or_zeros(a["out"], (D,))
        out[f"{h}.mlp.c_fc.weight"] = m["wi"]["kernel"].T
        out[f"{h}.mlp.c_fc.bias"] = bias_or_zeros(m["wi"], (cfg.d_ff,))
        out[f"{h}.mlp.c_proj.weight"] = m["wo"]["kernel"].T
        out[f"{h}.mlp.c_proj.bias"] = bias_or_zeros(m["wo"], (D,))
        out.update(ln_to_hf(layer["ln_attn"], f"{h}.ln_1"))
        out.update(ln_to_hf(layer["ln_mlp"], f"{h}.ln_2"))
    out.update(ln_to_hf(np_tree(params["ln_final"]), "transformer.ln_f"))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"], np.float32).T
    return out


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check_exportable(cfg)
    kinds = ["local" if x else "global" for x in attn.local_layers(cfg)]
    return {
        "architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.d_model, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff, "attention_types": [[[k], 1] for k in kinds],
        "attention_layers": kinds, "window_size": cfg.local_window or 256,
        "activation_function": ACT_TO_HF[cfg.activation],
        "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "resid_dropout": cfg.dropout,
        "embed_dropout": cfg.dropout, "attention_dropout": 0.0, "dtype": "float32",
        # The class defaults (50256) name GPT-2's vocabulary; run_to_hf sets the tokenizer's.
        "bos_token_id": None, "eos_token_id": None,
    }
