"""HF Mixtral (`MixtralForCausalLM`, model_type 'mixtral') <-> jaxlm DecoderLM with MoE MLPs.

Attention, norms and embeddings are Llama's (the same names, no biases). Each layer's MLP is
`block_sparse_moe`: a router `gate` [experts, D] and experts `experts.{e}.w1` (gate) and
`w3` (up) [F, D], `w2` (down) [D, F], as the hub's checkpoints and transformers'
save_pretrained store them; jaxlm stacks them into `mlp/experts/{wi_gate, wi_up, wo}/kernel`
[E, D, F] / [E, F, D]. A `sliding_window` is jaxlm's `local_window` on every layer, as for
Mistral. HF's `router_jitter_noise` (a training-time perturbation of the router input) has no
jaxlm counterpart; the forward pass does not use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, llama, mistral, take
from jaxlm.convert.gpt2 import require

_TYPE = "mixtral"
_EXPERTS = (("wi_gate", "w1"), ("wi_up", "w3"), ("wo", "w2"))


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    fields = llama.config_from_hf(hf)
    if fields.get("use_bias"):
        raise ConversionError("Mixtral with projection biases is not supported")
    # The preset names the HF architecture it exports to; every field is set here.
    fields.update(preset="mixtral-8x7b", num_experts=hf["num_local_experts"],
                  experts_per_token=hf.get("num_experts_per_tok", 2),
                  router_aux_loss=float(hf.get("router_aux_loss_coef", 0.001)),
                  router_z_loss=0.0, local_window=hf.get("sliding_window") or 0,
                  local_every=1)
    return fields


def _experts_from_hf(tensors: dict[str, Any], cfg: ModelConfig, pre: str) -> dict[str, Any]:
    D, F, E = cfg.d_model, cfg.d_ff, cfg.num_experts
    moe = f"{pre}.block_sparse_moe"
    shapes = {"w1": (F, D), "w3": (F, D), "w2": (D, F)}
    experts = {name: {"kernel": np.stack([
        take(tensors, f"{moe}.experts.{e}.{hf}.weight", shapes[hf]).T for e in range(E)])}
        for name, hf in _EXPERTS}
    return {"router": {"kernel": take(tensors, f"{moe}.gate.weight", (E, D)).T},
            "experts": experts}


def params_from_hf(tensors: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    return llama.params_from_hf(tensors, cfg, mlp_from_hf=_experts_from_hf)


def _check_exportable(cfg: ModelConfig) -> None:
    """Mistral's checks (Mixtral's attention is Mistral's) plus SwiGLU experts."""
    require(cfg.num_experts > 0, "Mixtral's MLPs are experts (model.num_experts > 0)", _TYPE)
    require(cfg.gated_mlp and cfg.activation == "silu",
            "Mixtral's experts are SwiGLU (model.gated_mlp=true, model.activation=silu)", _TYPE)
    mistral.check_exportable(cfg, _TYPE)


def _experts_to_hf(m: dict[str, Any], pre: str) -> dict[str, np.ndarray]:
    moe = f"{pre}.block_sparse_moe"
    out = {f"{moe}.gate.weight": m["router"]["kernel"].T}
    for name, hf in _EXPERTS:
        for e, kernel in enumerate(m["experts"][name]["kernel"]):
            out[f"{moe}.experts.{e}.{hf}.weight"] = kernel.T
    return out


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    _check_exportable(cfg)
    return llama.layout_to_hf(params, cfg, _TYPE, attn_bias=(), mlp_to_hf=_experts_to_hf)


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    _check_exportable(cfg)
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": _TYPE,
        **llama.base_hf_config(cfg), "hidden_act": "silu", **llama.rope_hf_config(cfg),
        "sliding_window": cfg.local_window or None, "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "router_aux_loss_coef": cfg.router_aux_loss, "router_jitter_noise": 0.0,
        "output_router_logits": False,
    }


# LoRA adapters export in PEFT's layout as Llama's (jaxlm.convert.peft).
PEFT_TASK_TYPE, peft_module = llama.PEFT_TASK_TYPE, llama.peft_module
