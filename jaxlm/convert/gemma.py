"""HF Gemma 2 (`Gemma2ForCausalLM`, model_type 'gemma2') and Gemma 3 text
(`Gemma3ForCausalLM`, 'gemma3_text') <-> jaxlm DecoderLM.

Llama's tensor layout (llama.py) with Gemma's parts: RMSNorm scaled by (1 + w)
(model.norm=rmsnorm_plus1; HF stores w, so do we), norms before and after each sublayer
(model.sandwich_norm), embeddings times sqrt(d_model) (model.embed_scale), a GeGLU MLP,
attention scaled by query_pre_attn_scalar**-0.5 (model.attention_scale), tanh soft-caps of
the attention logits (Gemma 2 only: HF's Gemma 3 never applies one) and the output logits,
and sliding-window layers by HF's `layer_types` (model.local_window + local_pattern; Gemma 2:
even layers, Gemma 3: five of every six). Gemma 3 adds per-head q/k norms (model.qk_norm,
which picks Gemma 3 on export) and a RoPE base of its own for the sliding layers
(model.rope_local_theta), the RoPE scaling applying to the global layers only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, llama
from jaxlm.convert.gpt2 import ACT_TO_HF, head_dim, require, require_unset

_ACT_TO_HF = {**ACT_TO_HF, "gelu_tanh": "gelu_pytorch_tanh"}


def _rope(hf: dict[str, Any], gemma3: bool) -> dict[str, Any]:
    if not gemma3:
        return llama.rope_fields(hf)
    rp = hf.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:  # transformers 5: per layer type
        glob = llama.rope_fields(hf, rp.get("full_attention") or {"rope_theta": 1e6})
        local = llama.rope_fields(hf, rp.get("sliding_attention") or {"rope_theta": 1e4})
    else:  # older files: rope_theta (+ rope_scaling) global, rope_local_base_freq local
        glob = llama.rope_fields(dict(hf, rope_theta=hf.get("rope_theta", 1e6)))
        local = {"rope_theta": float(hf.get("rope_local_base_freq", 1e4)), "rope_scaling": "none"}
    if local["rope_scaling"] != "none":
        raise ConversionError("Gemma 3 with RoPE scaling on its sliding layers is not supported")
    return dict(glob, rope_local_theta=local["rope_theta"])


def _cap(hf: dict[str, Any], key: str, default: float | None) -> float:
    # A key present but null is off; a missing one takes HF's class default.
    return float(hf.get(key, default) or 0.0)


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    gemma3 = hf["model_type"] == "gemma3_text"
    for key in ("use_bidirectional_attention", "attention_bias"):
        if hf.get(key):
            raise ConversionError(f"Gemma with {key}=true is not supported")
    n = hf["num_hidden_layers"]
    every = (hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6) \
        if gemma3 else 2
    return dict(
        llama.shape_fields(hf), preset="gemma3" if gemma3 else "gemma2",
        norm="rmsnorm_plus1", norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=llama.activation(hf, "hidden_activation", "gelu_pytorch_tanh"),
        use_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        embed_scale=True, sandwich_norm=True, qk_norm=gemma3,
        attention_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attention_softcap=0.0 if gemma3 else _cap(hf, "attn_logit_softcapping", 50.0),
        final_logit_softcap=_cap(hf, "final_logit_softcapping", None if gemma3 else 30.0),
        **llama.local_fields(hf, [(i + 1) % every != 0 for i in range(n)]), **_rope(hf, gemma3))


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    return llama.params_from_hf(tensors, cfg)


def _query_pre_attn_scalar(cfg: ModelConfig) -> int:
    """HF's query_pre_attn_scalar of cfg's attention scale (exact, else refused)."""
    scale = cfg.attention_scale or head_dim(cfg) ** -0.5
    scalar = round(scale ** -2)
    require(float(scalar) ** -0.5 == scale, f"model.attention_scale={cfg.attention_scale} is "
            "not the inverse square root of a whole query_pre_attn_scalar", "gemma")
    return scalar


def _check_exportable(cfg: ModelConfig) -> str:
    t = "gemma3_text" if cfg.qk_norm else "gemma2"
    llama.check_layout(cfg, t)
    require(cfg.norm == "rmsnorm_plus1", "Gemma's RMSNorm scales by 1 + w "
            "(model.norm=rmsnorm_plus1)", t)
    require(cfg.sandwich_norm and cfg.embed_scale, "Gemma norms each sublayer's output and "
            "scales its embeddings (model.sandwich_norm, model.embed_scale)", t)
    require(not (cfg.use_bias or cfg.qkv_bias), "Gemma has no projection biases "
            "(model.use_bias, model.qkv_bias)", t)
    if cfg.qk_norm:
        require(not cfg.attention_softcap, "HF Gemma 3 applies no attention soft-cap "
                "(model.attention_softcap)", t)
    else:
        require(not cfg.rope_local_theta or (cfg.rope_local_theta == cfg.rope_theta
                                             and cfg.rope_scaling == "none"),
                "Gemma 2 has one RoPE for all layers (model.rope_local_theta)", t)
    require_unset(cfg, t, keep=("rope_scaling", "qk_norm", "sandwich_norm", "embed_scale",
                                "attention_softcap", "final_logit_softcap", "local_pattern",
                                "rope_local_theta"))
    return t


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    return llama.layout_to_hf(params, cfg, _check_exportable(cfg), (), mlp_bias=False)


def _rope_hf_config(cfg: ModelConfig, gemma3: bool) -> dict[str, Any]:
    out = llama.rope_hf_config(cfg)
    if gemma3:
        glob = out["rope_parameters"]
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta} \
            if cfg.rope_local_theta else glob
        out.update(rope_parameters={"full_attention": glob, "sliding_attention": local},
                   rope_local_base_freq=local["rope_theta"])
    return out


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    t = _check_exportable(cfg)
    gemma3 = t == "gemma3_text"
    return {
        "architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
        "model_type": t, **llama.base_hf_config(cfg),
        "hidden_activation": _ACT_TO_HF[cfg.activation], **_rope_hf_config(cfg, gemma3),
        "query_pre_attn_scalar": _query_pre_attn_scalar(cfg),
        "attn_logit_softcapping": cfg.attention_softcap or None,
        "final_logit_softcapping": cfg.final_logit_softcap or None,
        "layer_types": llama.layer_types(cfg), "attention_bias": False,
        # Without sliding layers HF still builds their mask: a window covering everything.
        "sliding_window": cfg.local_window or cfg.max_seq_len,
    }


# LoRA adapters export in PEFT's layout as Llama's (jaxlm.convert.peft).
PEFT_TASK_TYPE, peft_module = llama.PEFT_TASK_TYPE, llama.peft_module
