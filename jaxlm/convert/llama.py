"""HF Llama (`LlamaForCausalLM`, model_type 'llama') <-> jaxlm DecoderLM.

HF Linear weights are stored [out, in]; our kernels are [in, out...], so each is transposed.
HF applies RoPE with `rotate_half` to q/k as projected (first half / second half of each
head), which is jaxlm's layout too: no permutation of the q/k rows is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, stack_layers, take
from jaxlm.convert.gpt2 import ACT_FROM_HF, ACT_TO_HF, head_dim, layers_out, require

_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers 5 keeps RoPE settings in `rope_parameters`; older files use rope_theta
    # and rope_scaling at the top level.
    rp = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConversionError(f"Llama rope_type '{kind}' (RoPE scaling) is not supported; "
                              "only the default RoPE is")
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    if act not in ACT_FROM_HF:
        raise ConversionError(f"Llama hidden_act '{act}' is not supported; "
                              f"supported: {', '.join(ACT_FROM_HF)}")
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    return dict(
        preset="llama", family="decoder", num_layers=hf["num_hidden_layers"], d_model=D,
        num_heads=N, num_kv_heads=hf.get("num_key_value_heads") or N,
        head_dim=hf.get("head_dim") or D // N, d_ff=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_position="pre", norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=ACT_FROM_HF[act], gated_mlp=True, position="rope",
        rope_theta=_rope_theta(hf),
        # One switch for all projection biases: missing ones are imported as zeros (exact).
        use_bias=bool(hf.get("attention_bias") or hf.get("mlp_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout=0.0,
        init_std=hf.get("initializer_range", 0.02), attention_scale=0.0, local_window=0)


def _bias(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...],
          present: bool) -> np.ndarray:
    if present:
        return take(tensors, name, (int(np.prod(shape)),)).reshape(shape)
    return np.zeros(shape, np.float32)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    D, N, H, F, V = cfg.d_model, cfg.num_heads, head_dim(cfg), cfg.d_ff, cfg.vocab_size
    K = cfg.num_kv_heads or N
    heads = {"query": N, "key": K, "value": K}
    attn_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    mlp_bias = "model.layers.0.mlp.up_proj.bias" in tensors
    layers = []
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        attn = {}
        for name, hf_name in _PROJ.items():
            w = take(tensors, f"{pre}.self_attn.{hf_name}.weight", (heads[name] * H, D))
            attn[name] = {"kernel": w.T.reshape(D, heads[name], H)}
            if cfg.use_bias:
                attn[name]["bias"] = _bias(tensors, f"{pre}.self_attn.{hf_name}.bias",
                                           (heads[name], H), attn_bias)
        o = take(tensors, f"{pre}.self_attn.o_proj.weight", (D, N * H))
        attn["out"] = {"kernel": o.T.reshape(N, H, D)}
        mlp = {}
        for name, hf_name, shape in (("wi_gate", "gate_proj", (F, D)),
                                     ("wi_up", "up_proj", (F, D)), ("wo", "down_proj", (D, F))):
            mlp[name] = {"kernel": take(tensors, f"{pre}.mlp.{hf_name}.weight", shape).T}
            if cfg.use_bias:
                mlp[name]["bias"] = _bias(tensors, f"{pre}.mlp.{hf_name}.bias", (shape[0],),
                                          mlp_bias)
        if cfg.use_bias:
            attn["out"]["bias"] = _bias(tensors, f"{pre}.self_attn.o_proj.bias", (D,),
                                        attn_bias)
        layers.append({
            "attn": attn, "mlp": mlp,
            "ln_attn": {"scale": take(tensors, f"{pre}.input_layernorm.weight", (D,))},
            "ln_mlp": {"scale": take(tensors, f"{pre}.post_attention_layernorm.weight", (D,))},
        })
    embedding = take(tensors, "model.embed_tokens.weight", (V, D))
    params = {"embed": {"embedding": embedding},
              "decoder": stack_layers(layers, cfg.scan_layers),
              "ln_final": {"scale": take(tensors, "model.norm.weight", (D,))}}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": take(tensors, "lm_head.weight", (V, D)).T}
    return params


def _check_exportable(cfg: ModelConfig) -> None:
    t = "llama"
    require(cfg.norm == "rmsnorm" and cfg.norm_position == "pre",
            "Llama uses pre-RMSNorm (model.norm=rmsnorm, model.norm_position=pre)", t)
    require(cfg.gated_mlp, "Llama has a gated MLP (model.gated_mlp must be true)", t)
    require(cfg.position == "rope", "Llama uses RoPE (model.position=rope)", t)
    require(cfg.activation in ACT_TO_HF, f"model.activation={cfg.activation!r}", t)
    require(cfg.local_window == 0, "Llama has no local attention layers (model.local_window)",
            t)
    require(cfg.attention_scale in (0.0, head_dim(cfg) ** -0.5),
            f"model.attention_scale={cfg.attention_scale} (Llama scales by 1/sqrt(head_dim))",
            t)


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check_exportable(cfg)
    D = cfg.d_model
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"], np.float32),
           "model.norm.weight": np.asarray(params["ln_final"]["scale"], np.float32)}
    for i, layer in enumerate(layers_out(params, cfg)):
        pre, a, m = f"model.layers.{i}", layer["attn"], layer["mlp"]
        for name, hf_name in (*_PROJ.items(), ("out", "o_proj")):
            kernel = a[name]["kernel"]
            w = kernel.reshape(-1, D) if name == "out" else kernel.reshape(D, -1)
            out[f"{pre}.self_attn.{hf_name}.weight"] = w.T
            if cfg.use_bias:
                out[f"{pre}.self_attn.{hf_name}.bias"] = a[name]["bias"].reshape(-1)
        for name, hf_name in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"),
                              ("wo", "down_proj")):
            out[f"{pre}.mlp.{hf_name}.weight"] = m[name]["kernel"].T
            if cfg.use_bias:
                out[f"{pre}.mlp.{hf_name}.bias"] = m[name]["bias"]
        out[f"{pre}.input_layernorm.weight"] = layer["ln_attn"]["scale"]
        out[f"{pre}.post_attention_layernorm.weight"] = layer["ln_mlp"]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"], np.float32).T
    return out


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check_exportable(cfg)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "head_dim": head_dim(cfg), "hidden_act": ACT_TO_HF[cfg.activation],
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias,
        "attention_dropout": 0.0, "dtype": "float32",
    }
