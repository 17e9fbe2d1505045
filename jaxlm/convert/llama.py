"""HF Llama (`LlamaForCausalLM`, model_type 'llama') <-> jaxlm DecoderLM, and the tensor
layout Llama shares with Mistral, Qwen2/3, Gemma 2/3 and (its MLP aside) Mixtral
(mistral.py, qwen.py, gemma.py, mixtral.py).

HF Linear weights are stored [out, in]; our kernels are [in, out...], so each is transposed.
HF applies RoPE with `rotate_half` to q/k as projected (first half / second half of each
head), which is jaxlm's layout too: no permutation of the q/k rows is needed.

The shared layout: `model.embed_tokens`, per layer `self_attn.{q,k,v,o}_proj` (+ `q_norm`,
`k_norm` with qk_norm), `mlp.{gate,up,down}_proj` and norms, `model.norm`, `lm_head` when
untied. Llama's `post_attention_layernorm` is the MLP's pre-norm; with sandwich norms
(Gemma) it normalises the attention output, and the MLP has `pre_feedforward_layernorm` and
`post_feedforward_layernorm`. RoPE settings sit in `rope_parameters` (transformers 5) or in
`rope_theta` + `rope_scaling` (older files); both are read, both are written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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
    require,
    require_unset,
)
from jaxlm.models import attention as attn

_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}
_MLP = {"wi_gate": "gate_proj", "wi_up": "up_proj", "wo": "down_proj"}
ROPE_FROM_HF = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3"}
ROPE_TO_HF = {v: k for k, v in ROPE_FROM_HF.items()}


def _rope_value(rp: dict[str, Any], key: str) -> Any:
    if rp.get(key) is None:
        raise ConversionError(f"RoPE type '{rp.get('rope_type')}' needs '{key}' in the HF "
                              "config's rope parameters")
    return rp[key]


def rope_fields(hf: dict[str, Any], rp: dict[str, Any] | None = None) -> dict[str, Any]:
    """jaxlm's rope_* fields of the RoPE parameter dict `rp` (one layer type's, for Gemma 3),
    by default the config's own: rope_scaling wins over rope_parameters, as in HF."""
    if rp is None:
        rp = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rp.get("rope_type") or rp.get("type") or "default"
    if kind not in ROPE_FROM_HF:
        raise ConversionError(f"RoPE type '{kind}' is not supported; supported: "
                              f"{', '.join(ROPE_FROM_HF)}")
    if rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError("partial rotary embeddings (partial_rotary_factor) are not "
                              "supported")
    theta = rp.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") \
        or hf.get("rope_theta") or 10000.0
    out = dict(rope_theta=float(theta), rope_scaling=ROPE_FROM_HF[kind])
    if kind != "default":
        out["rope_factor"] = float(_rope_value(rp, "factor"))
    if kind == "llama3":
        original = rp.get("original_max_position_embeddings") or hf.get(
            "original_max_position_embeddings") or hf.get("max_position_embeddings", 2048)
        out.update(rope_low_freq_factor=float(_rope_value(rp, "low_freq_factor")),
                   rope_high_freq_factor=float(_rope_value(rp, "high_freq_factor")),
                   rope_original_max_len=int(original))
    return out


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """HF's RoPE parameter dict of cfg's (global layers') RoPE."""
    out: dict[str, Any] = {"rope_type": ROPE_TO_HF[cfg.rope_scaling],
                           "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        out["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_len
                   or cfg.max_seq_len)
    return out


def shape_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The model.* shape fields of a Llama-layout HF config."""
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    return dict(family="decoder", num_layers=hf["num_hidden_layers"], d_model=D, num_heads=N,
                num_kv_heads=hf.get("num_key_value_heads") or N,
                head_dim=hf.get("head_dim") or D // N, d_ff=hf["intermediate_size"],
                vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                norm_position="pre", gated_mlp=True, position="rope", dropout=0.0,
                init_std=hf.get("initializer_range", 0.02))


def local_fields(hf: dict[str, Any], default: list[bool] | None = None) -> dict[str, Any]:
    """model.local_window and local_pattern of HF's per-layer `layer_types`
    (sliding_attention = local), or of the `default` flags where the config has none."""
    kinds = hf.get("layer_types")
    n = hf["num_hidden_layers"]
    local = [k == "sliding_attention" for k in kinds] if kinds else list(default or [False] * n)
    if len(local) != n or set(kinds or []) - {"sliding_attention", "full_attention"}:
        raise ConversionError(f"layer_types {kinds} do not describe {n} sliding_attention / "
                              "full_attention layers")
    if not any(local) or not hf.get("sliding_window"):
        return {"local_window": 0}
    return {"local_window": int(hf["sliding_window"]), "local_pattern": attn.pattern_of(local)}


def layer_types(cfg: ModelConfig) -> list[str]:
    """HF's layer_types of cfg's local/global layers."""
    return ["sliding_attention" if x else "full_attention" for x in attn.local_layers(cfg)]


def activation(hf: dict[str, Any], key: str = "hidden_act", default: str = "silu") -> str:
    act = hf.get(key) or default
    if act not in ACT_FROM_HF:
        raise ConversionError(f"{hf.get('model_type')} {key} '{act}' is not supported; "
                              f"supported: {', '.join(ACT_FROM_HF)}")
    return ACT_FROM_HF[act]


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(
        shape_fields(hf), preset="llama", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=activation(hf), **rope_fields(hf),
        # One switch for all projection biases: missing ones are imported as zeros (exact).
        use_bias=bool(hf.get("attention_bias") or hf.get("mlp_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_scale=0.0,
        local_window=0)


def _norm_names(cfg: ModelConfig) -> dict[str, str]:
    """jaxlm block norms -> HF layer norm names."""
    if cfg.sandwich_norm:
        return {"ln_attn": "input_layernorm", "ln_attn_out": "post_attention_layernorm",
                "ln_mlp": "pre_feedforward_layernorm",
                "ln_mlp_out": "post_feedforward_layernorm"}
    return {"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm"}


def _bias(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The bias `name` if the checkpoint's layer 0 has it (then every layer must), else
    zeros: exact for a projection HF builds without one."""
    layer0 = "model.layers.0." + name.split(".", 3)[3]
    if layer0 in tensors:
        return take(tensors, name, (int(np.prod(shape)),)).reshape(shape)
    return np.zeros(shape, np.float32)


def _attention_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, pre: str
                       ) -> dict[str, Any]:
    D, N, H = cfg.d_model, cfg.num_heads, head_dim(cfg)
    K = cfg.num_kv_heads or N
    heads = {"query": N, "key": K, "value": K}
    attn: dict[str, Any] = {}
    for name, hf_name in _PROJ.items():
        if name == "out":
            o = take(tensors, f"{pre}.self_attn.o_proj.weight", (D, N * H))
            attn[name] = {"kernel": o.T.reshape(N, H, D)}
        else:
            w = take(tensors, f"{pre}.self_attn.{hf_name}.weight", (heads[name] * H, D))
            attn[name] = {"kernel": w.T.reshape(D, heads[name], H)}
        if cfg.use_bias or (cfg.qkv_bias and name != "out"):
            shape = (D,) if name == "out" else (heads[name], H)
            attn[name]["bias"] = _bias(tensors, f"{pre}.self_attn.{hf_name}.bias", shape)
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            attn[name] = {"scale": take(tensors, f"{pre}.self_attn.{name}.weight", (H,))}
    return attn


def _mlp_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, pre: str
                 ) -> dict[str, Any]:
    D, F = cfg.d_model, cfg.d_ff
    mlp: dict[str, Any] = {}
    for name, hf_name in _MLP.items():
        shape = (D, F) if name == "wo" else (F, D)
        mlp[name] = {"kernel": take(tensors, f"{pre}.mlp.{hf_name}.weight", shape).T}
        if cfg.use_bias:
            mlp[name]["bias"] = _bias(tensors, f"{pre}.mlp.{hf_name}.bias", (shape[0],))
    return mlp


# A layer's MLP from the HF tensors: (tensors, cfg, the layer's name prefix) -> params.
MlpFromHf = Callable[[dict[str, np.ndarray], ModelConfig, str], dict[str, Any]]


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig,
                   mlp_from_hf: MlpFromHf = _mlp_from_hf) -> dict[str, Any]:
    """The shared layout's parameters; `mlp_from_hf` reads each layer's MLP (Mixtral: its
    experts), by default the dense gated one."""
    D, V = cfg.d_model, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        layer = {"attn": _attention_from_hf(tensors, cfg, pre),
                 "mlp": mlp_from_hf(tensors, cfg, pre)}
        for ours, theirs in _norm_names(cfg).items():
            layer[ours] = {"scale": take(tensors, f"{pre}.{theirs}.weight", (D,))}
        layers.append(layer)
    params = {"embed": {"embedding": take(tensors, "model.embed_tokens.weight", (V, D))},
              "decoder": stack_layers(layers, cfg.scan_layers),
              "ln_final": {"scale": take(tensors, "model.norm.weight", (D,))}}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": take(tensors, "lm_head.weight", (V, D)).T}
    return params


def _bias_out(module: dict[str, Any], shape: tuple[int, ...], written: bool, what: str,
              model_type: str) -> np.ndarray | None:
    """The bias to write (zeros where the model has none), or None where HF's class has
    none; a bias of ours that HF cannot hold is refused."""
    if written:
        return bias_or_zeros(module, shape).reshape(-1)
    require("bias" not in module, f"the {what} projection has a bias, which HF "
            f"'{model_type}' lacks (model.use_bias / model.qkv_bias)", model_type)
    return None


def _attention_to_hf(a: dict[str, Any], cfg: ModelConfig, pre: str,
                     attn_bias: tuple[str, ...], model_type: str) -> dict[str, np.ndarray]:
    D, out = cfg.d_model, {}
    for name, hf_name in _PROJ.items():
        kernel = a[name]["kernel"]
        w = kernel.reshape(-1, D) if name == "out" else kernel.reshape(D, -1)
        out[f"{pre}.self_attn.{hf_name}.weight"] = w.T
        bias = _bias_out(a[name], (w.shape[1],), name in attn_bias, name, model_type)
        if bias is not None:
            out[f"{pre}.self_attn.{hf_name}.bias"] = bias
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            out[f"{pre}.self_attn.{name}.weight"] = a[name]["scale"]
    return out


def _mlp_to_hf(m: dict[str, Any], pre: str, *, mlp_bias: bool, model_type: str
               ) -> dict[str, np.ndarray]:
    out = {}
    for name, hf_name in _MLP.items():
        out[f"{pre}.mlp.{hf_name}.weight"] = m[name]["kernel"].T
        bias = _bias_out(m[name], (m[name]["kernel"].shape[1],), mlp_bias, "MLP", model_type)
        if bias is not None:
            out[f"{pre}.mlp.{hf_name}.bias"] = bias
    return out


def layout_to_hf(params: dict[str, Any], cfg: ModelConfig, model_type: str,
                 attn_bias: tuple[str, ...], mlp_bias: bool = False,
                 mlp_to_hf: Callable[[dict[str, Any], str], dict[str, np.ndarray]] | None = None
                 ) -> dict[str, np.ndarray]:
    """HF tensors of the shared layout; `attn_bias` names the attention projections whose
    biases HF's class has (query, key, value, out), `mlp_bias` whether its MLP has them.
    `mlp_to_hf(mlp params, layer prefix)` writes each layer's MLP (Mixtral: its experts),
    by default the dense gated one."""
    if mlp_to_hf is None:
        mlp_to_hf = functools.partial(_mlp_to_hf, mlp_bias=mlp_bias, model_type=model_type)
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"], np.float32),
           "model.norm.weight": np.asarray(params["ln_final"]["scale"], np.float32)}
    for i, layer in enumerate(layers_out(params, cfg)):
        pre = f"model.layers.{i}"
        out.update(_attention_to_hf(layer["attn"], cfg, pre, attn_bias, model_type))
        out.update(mlp_to_hf(layer["mlp"], pre))
        for ours, theirs in _norm_names(cfg).items():
            out[f"{pre}.{theirs}.weight"] = layer[ours]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"], np.float32).T
    return out


def check_layout(cfg: ModelConfig, model_type: str) -> None:
    """What every class of the shared layout needs."""
    t = model_type
    require(cfg.norm in ("rmsnorm", "rmsnorm_plus1") and cfg.norm_position == "pre",
            f"{t} uses pre-RMSNorm (model.norm, model.norm_position=pre)", t)
    require(cfg.gated_mlp, f"{t} has a gated MLP (model.gated_mlp must be true)", t)
    require(cfg.position == "rope", f"{t} uses RoPE (model.position=rope)", t)
    require(cfg.activation in ACT_TO_HF, f"model.activation={cfg.activation!r}", t)


def _check_exportable(cfg: ModelConfig) -> None:
    t = "llama"
    check_layout(cfg, t)
    require(cfg.norm == "rmsnorm", "Llama's RMSNorm scales by w (model.norm=rmsnorm)", t)
    require(cfg.local_window == 0, "Llama has no local attention layers (model.local_window)",
            t)
    require(cfg.attention_scale in (0.0, head_dim(cfg) ** -0.5),
            f"model.attention_scale={cfg.attention_scale} (Llama scales by 1/sqrt(head_dim))",
            t)
    require_unset(cfg, t, keep=("rope_scaling", "qkv_bias"))


def _attn_bias(cfg: ModelConfig) -> tuple[str, ...]:
    # Llama's attention_bias covers q, k, v and o: a q/k/v-only model writes a zero o bias.
    return tuple(_PROJ) if cfg.use_bias or cfg.qkv_bias else ()


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check_exportable(cfg)
    return layout_to_hf(params, cfg, "llama", _attn_bias(cfg), cfg.use_bias)


# HF PEFT (LoRA adapters alone, jaxlm.convert.peft): the task and each projection's module.
PEFT_TASK_TYPE = "CAUSAL_LM"


def peft_module(path: tuple[str, ...], cfg: ModelConfig) -> str:
    """The HF module of one layer's projection, e.g. ('decoder', 'layers_0', 'attn',
    'query') -> 'model.layers.0.self_attn.q_proj'."""
    _, layer, block, proj = path
    i = int(layer.rsplit("_", 1)[1])
    if block == "attn":
        return f"model.layers.{i}.self_attn.{_PROJ[proj]}"
    return f"model.layers.{i}.mlp.{_MLP[proj]}"


def base_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json keys every class of the shared layout reads."""
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "head_dim": head_dim(cfg), "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "dtype": "float32",
    }


def rope_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """RoPE keys of config.json, for transformers 5 (rope_parameters) and older readers
    (rope_theta, rope_scaling)."""
    params = rope_parameters(cfg)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta,
            "rope_scaling": scaling if cfg.rope_scaling != "none" else None}


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check_exportable(cfg)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **base_hf_config(cfg),
        "hidden_act": ACT_TO_HF[cfg.activation], **rope_hf_config(cfg),
        "attention_bias": bool(_attn_bias(cfg)), "mlp_bias": cfg.use_bias,
    }
