"""HF Qwen2/Qwen2.5 (`Qwen2ForCausalLM`, model_type 'qwen2') and Qwen3 (`Qwen3ForCausalLM`,
'qwen3') <-> jaxlm DecoderLM: Llama's layout (llama.py) with biases on the query, key and
value projections only (Qwen2: model.qkv_bias) or a per-head RMSNorm on queries and keys
before RoPE (Qwen3: model.qk_norm). A model exports to Qwen3 when it has qk_norm, else to
Qwen2. Qwen's optional sliding window (use_sliding_window, on layers from max_window_layers)
becomes model.local_window + local_pattern; the published checkpoints leave it off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, llama
from jaxlm.convert.gpt2 import ACT_TO_HF, head_dim, require, require_unset


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    qwen3 = hf["model_type"] == "qwen3"
    if qwen3 and hf.get("attention_bias"):
        raise ConversionError("Qwen3 with attention_bias=true is not supported (jaxlm's "
                              "biases cover the MLP too)")
    return dict(
        llama.shape_fields(hf), preset="qwen3" if qwen3 else "qwen2", norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=llama.activation(hf),
        **llama.rope_fields(hf), use_bias=False, qkv_bias=not qwen3, qk_norm=qwen3,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_scale=0.0,
        **llama.local_fields(hf))


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    return llama.params_from_hf(tensors, cfg)


def _model_type(cfg: ModelConfig) -> str:
    return "qwen3" if cfg.qk_norm else "qwen2"


def _check_exportable(cfg: ModelConfig) -> str:
    t = _model_type(cfg)
    llama.check_layout(cfg, t)
    require(cfg.norm == "rmsnorm", "Qwen's RMSNorm scales by w (model.norm=rmsnorm)", t)
    require(not cfg.use_bias, "Qwen has no output-projection or MLP biases (model.use_bias)", t)
    require(not (cfg.qk_norm and cfg.qkv_bias), "Qwen3 has no q/k/v biases (model.qkv_bias)",
            t)
    require(cfg.attention_scale in (0.0, head_dim(cfg) ** -0.5),
            f"model.attention_scale={cfg.attention_scale} (Qwen scales by 1/sqrt(head_dim))", t)
    require_unset(cfg, t, keep=("rope_scaling", "qkv_bias", "qk_norm", "local_pattern"))
    return t


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    t = _check_exportable(cfg)
    # Qwen2 always has q/k/v biases: a model without them writes zeros (exact).
    biased = () if cfg.qk_norm else ("query", "key", "value")
    return llama.layout_to_hf(params, cfg, t, biased, mlp_bias=False)


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    t = _check_exportable(cfg)
    kinds = llama.layer_types(cfg)
    windowed = "sliding_attention" in kinds
    return {
        "architectures": [f"{t.capitalize()}ForCausalLM"], "model_type": t,
        **llama.base_hf_config(cfg), "hidden_act": ACT_TO_HF[cfg.activation],
        **llama.rope_hf_config(cfg), "attention_bias": False, "layer_types": kinds,
        "use_sliding_window": windowed, "sliding_window": cfg.local_window or None,
        # Older readers slide the layers from max_window_layers on.
        "max_window_layers": kinds.index("sliding_attention") if windowed else cfg.num_layers,
    }


# LoRA adapters export in PEFT's layout as Llama's (jaxlm.convert.peft).
PEFT_TASK_TYPE, peft_module = llama.PEFT_TASK_TYPE, llama.peft_module
