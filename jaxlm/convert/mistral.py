"""HF Mistral (`MistralForCausalLM`, model_type 'mistral') <-> jaxlm DecoderLM.

Mistral is Llama's layout (llama.py; no biases) with sliding-window attention on every layer:
HF's `sliding_window` = W lets the query at position i see keys i - W < j <= i, which is
jaxlm's `model.local_window` = W with `model.local_every` = 1 (and a decoding cache of W
positions, models/ring_cache.py). A null `sliding_window` (Mistral 7B v0.2 and later) is full
causal attention. MistralForCausalLM windows all layers whatever `layer_types` says, so that
key is not read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import llama
from jaxlm.convert.gpt2 import ACT_TO_HF, head_dim, require, require_unset
from jaxlm.models.attention import local_layers

_TYPE = "mistral"


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(
        # The preset names the HF class it exports to; every architecture field is set here.
        llama.shape_fields(hf), preset="mistral-7b", norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=llama.activation(hf),
        **llama.rope_fields(hf), use_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_scale=0.0,
        local_window=int(hf.get("sliding_window") or 0), local_every=1)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    return llama.params_from_hf(tensors, cfg)


def check_exportable(cfg: ModelConfig, model_type: str = _TYPE) -> None:
    """What Mistral's attention, norms and embeddings need (Mixtral's too)."""
    t = model_type
    llama.check_layout(cfg, t)
    require(cfg.norm == "rmsnorm", "its RMSNorm scales by w (model.norm=rmsnorm)", t)
    require(not cfg.use_bias, "it has no projection biases (model.use_bias)", t)
    require(cfg.local_window == 0 or all(local_layers(cfg)),
            "it windows every layer or none (model.local_every=1, no G in "
            "model.local_pattern)", t)
    require(cfg.attention_scale in (0.0, head_dim(cfg) ** -0.5),
            f"model.attention_scale={cfg.attention_scale} (it scales by 1/sqrt(head_dim))", t)
    require_unset(cfg, t, keep=("rope_scaling", "local_pattern"))


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    check_exportable(cfg)
    return llama.layout_to_hf(params, cfg, _TYPE, attn_bias=(), mlp_bias=False)


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    check_exportable(cfg)
    return {
        "architectures": ["MistralForCausalLM"], "model_type": _TYPE,
        **llama.base_hf_config(cfg), "hidden_act": ACT_TO_HF[cfg.activation],
        **llama.rope_hf_config(cfg), "sliding_window": cfg.local_window or None,
    }


# LoRA adapters export in PEFT's layout as Llama's (jaxlm.convert.peft).
PEFT_TASK_TYPE, peft_module = llama.PEFT_TASK_TYPE, llama.peft_module
