"""HF GPT-2 (`GPT2LMHeadModel`, model_type 'gpt2') <-> jaxlm DecoderLM.

HF GPT-2 uses Conv1D layers whose weights are stored [in, out] (already our kernel layout);
`c_attn` packs q, k, v along its output axis; the output projection is tied to `wte`
unless tie_word_embeddings=False. The helpers at the top are shared by gpt_neo.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, stack_layers, take, unstack_layers

# HF activation_function -> jaxlm activation (gelu_new is the tanh approximation).
ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu"}
ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.num_heads


def np_tree(tree: Any) -> Any:
    """Any pytree of arrays -> the same tree of float32 numpy arrays."""
    if isinstance(tree, dict):
        return {k: np_tree(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def require(ok: bool, what: str, model_type: str) -> None:
    """Refuses an export the HF class cannot represent, naming the field."""
    if not ok:
        raise ConversionError(f"cannot convert to HF '{model_type}': {what}")


# Fields of the newer decoder variants (Llama 3, Qwen, Gemma), each off by default: an
# exporter refuses a model that sets one its HF class cannot hold, rather than drop it.
VARIANT_FIELDS = ("rope_scaling", "qkv_bias", "qk_norm", "sandwich_norm", "attention_softcap",
                  "final_logit_softcap", "local_pattern", "rope_local_theta", "embed_scale")


def require_unset(cfg: ModelConfig, model_type: str, keep: tuple[str, ...] = ()) -> None:
    """Refuses an export of a model that sets a VARIANT_FIELDS field not in `keep`."""
    defaults = ModelConfig()
    for name in VARIANT_FIELDS:
        value = getattr(cfg, name)
        require(name in keep or value == getattr(defaults, name),
                f"it has no model.{name} (the model sets {value!r})", model_type)


def bias_or_zeros(module: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """A projection's bias, or zeros when the model has none (exact for HF classes that
    always carry biases)."""
    return np.asarray(module["bias"], np.float32) if "bias" in module else np.zeros(shape,
                                                                                   np.float32)


def ln_from_hf(tensors: dict[str, np.ndarray], name: str, d: int) -> dict[str, np.ndarray]:
    return {"scale": take(tensors, f"{name}.weight", (d,)),
            "bias": take(tensors, f"{name}.bias", (d,))}


def ln_to_hf(ln: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    return {f"{name}.weight": ln["scale"], f"{name}.bias": bias_or_zeros(ln, ln["scale"].shape)}


def layers_out(params: dict[str, Any], cfg: ModelConfig) -> list[dict[str, Any]]:
    return [np_tree(layer) for layer in unstack_layers(params["decoder"], cfg.num_layers)]


def _prefix(tensors: dict[str, np.ndarray]) -> str:
    # GPT2LMHeadModel saves "transformer.*"; a bare GPT2Model (e.g. the original hub
    # checkpoint) saves the same names without the prefix.
    return "" if "wte.weight" in tensors and "transformer.wte.weight" not in tensors \
        else "transformer."


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("add_cross_attention"):
        raise ConversionError("GPT-2 with add_cross_attention=true is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConversionError("GPT-2 with scale_attn_by_inverse_layer_idx=true is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACT_FROM_HF:
        raise ConversionError(f"GPT-2 activation_function '{act}' is not supported; "
                              f"supported: {', '.join(ACT_FROM_HF)}")
    d = hf["n_embd"]
    return dict(
        preset="gpt2", family="decoder", num_layers=hf["n_layer"], d_model=d,
        num_heads=hf["n_head"], num_kv_heads=0, head_dim=0, d_ff=hf.get("n_inner") or 4 * d,
        vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], norm="layernorm",
        norm_position="pre", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=ACT_FROM_HF[act], gated_mlp=False, position="learned", use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=0.0,
        init_std=hf.get("initializer_range", 0.02),
        attention_scale=0.0 if hf.get("scale_attn_weights", True) else 1.0,
        local_window=0)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    D, N, H, F, V = cfg.d_model, cfg.num_heads, head_dim(cfg), cfg.d_ff, cfg.vocab_size
    p = _prefix(tensors)
    layers = []
    for i in range(cfg.num_layers):
        h = f"{p}h.{i}"
        qkv_w = take(tensors, f"{h}.attn.c_attn.weight", (D, 3 * N * H))
        qkv_b = take(tensors, f"{h}.attn.c_attn.bias", (3 * N * H,))
        attn = {}
        for j, name in enumerate(("query", "key", "value")):
            cols = slice(j * N * H, (j + 1) * N * H)
            attn[name] = {"kernel": qkv_w[:, cols].reshape(D, N, H),
                          "bias": qkv_b[cols].reshape(N, H)}
        attn["out"] = {"kernel": take(tensors, f"{h}.attn.c_proj.weight", (N * H, D))
                       .reshape(N, H, D),
                       "bias": take(tensors, f"{h}.attn.c_proj.bias", (D,))}
        mlp = {"wi": {"kernel": take(tensors, f"{h}.mlp.c_fc.weight", (D, F)),
                      "bias": take(tensors, f"{h}.mlp.c_fc.bias", (F,))},
               "wo": {"kernel": take(tensors, f"{h}.mlp.c_proj.weight", (F, D)),
                      "bias": take(tensors, f"{h}.mlp.c_proj.bias", (D,))}}
        layers.append({"attn": attn, "mlp": mlp, "ln_attn": ln_from_hf(tensors, f"{h}.ln_1", D),
                       "ln_mlp": ln_from_hf(tensors, f"{h}.ln_2", D)})
    params = {"embed": {"embedding": take(tensors, f"{p}wte.weight", (V, D))},
              "pos_embed": take(tensors, f"{p}wpe.weight", (cfg.max_seq_len, D)),
              "decoder": stack_layers(layers, cfg.scan_layers),
              "ln_final": ln_from_hf(tensors, f"{p}ln_f", D)}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": take(tensors, "lm_head.weight", (V, D)).T}
    return params


def _check_exportable(cfg: ModelConfig) -> None:
    t = "gpt2"
    require(cfg.norm == "layernorm" and cfg.norm_position == "pre",
            "GPT-2 uses pre-LayerNorm (model.norm=layernorm, model.norm_position=pre)", t)
    require(not cfg.gated_mlp, "GPT-2 has no gated MLP (model.gated_mlp must be false)", t)
    require(cfg.position == "learned", "GPT-2 uses learned positions (model.position)", t)
    require(cfg.activation in ACT_TO_HF, f"model.activation={cfg.activation!r}", t)
    require(cfg.local_window == 0, "GPT-2 has no local attention layers (model.local_window "
            "must be 0)", t)
    require(cfg.num_kv_heads in (0, cfg.num_heads), "GPT-2 has no grouped-query attention "
            "(model.num_kv_heads)", t)
    require(head_dim(cfg) * cfg.num_heads == cfg.d_model,
            "GPT-2 needs num_heads * head_dim == d_model (model.head_dim)", t)
    require(cfg.attention_scale in (0.0, 1.0, head_dim(cfg) ** -0.5),
            f"model.attention_scale={cfg.attention_scale} (GPT-2 scales by 1/sqrt(head_dim) "
            "or not at all)", t)
    require_unset(cfg, t)


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check_exportable(cfg)
    D, N, H = cfg.d_model, cfg.num_heads, head_dim(cfg)
    out = {"transformer.wte.weight": np.asarray(params["embed"]["embedding"], np.float32),
           "transformer.wpe.weight": np.asarray(params["pos_embed"], np.float32)}
    for i, layer in enumerate(layers_out(params, cfg)):
        h, a, m = f"transformer.h.{i}", layer["attn"], layer["mlp"]
        qkv = [a[n] for n in ("query", "key", "value")]
        out[f"{h}.attn.c_attn.weight"] = np.concatenate(
            [x["kernel"].reshape(D, N * H) for x in qkv], axis=1)
        out[f"{h}.attn.c_attn.bias"] = np.concatenate(
            [bias_or_zeros(x, (N, H)).reshape(N * H) for x in qkv])
        out[f"{h}.attn.c_proj.weight"] = a["out"]["kernel"].reshape(N * H, D)
        out[f"{h}.attn.c_proj.bias"] = bias_or_zeros(a["out"], (D,))
        out[f"{h}.mlp.c_fc.weight"] = m["wi"]["kernel"]
        out[f"{h}.mlp.c_fc.bias"] = bias_or_zeros(m["wi"], (cfg.d_ff,))
        out[f"{h}.mlp.c_proj.weight"] = m["wo"]["kernel"]
        out[f"{h}.mlp.c_proj.bias"] = bias_or_zeros(m["wo"], (D,))
        out.update(ln_to_hf(layer["ln_attn"], f"{h}.ln_1"))
        out.update(ln_to_hf(layer["ln_mlp"], f"{h}.ln_2"))
    out.update(ln_to_hf(np_tree(params["ln_final"]), "transformer.ln_f"))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"], np.float32).T
    return out


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check_exportable(cfg)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
        "activation_function": ACT_TO_HF[cfg.activation],
        "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
        "scale_attn_weights": cfg.attention_scale != 1.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        # jaxlm has no dropout on attention probabilities.
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
        "dtype": "float32",
        # The class defaults (50256) name GPT-2's vocabulary; run_to_hf sets the tokenizer's.
        "bos_token_id": None, "eos_token_id": None,
    }
