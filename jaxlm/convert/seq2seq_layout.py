"""Shared plumbing of the encoder-decoder converters (T5, BART, Marian, torch.nn.Transformer).

A family describes one layer as a table of (jaxlm path inside the layer, source module name,
kind); the same table drives both directions. Kinds:
  qkv    Linear [heads*head_dim, D] -> kernel [D, heads, head_dim]   (query, key, value)
  out    Linear [D, heads*head_dim] -> kernel [heads, head_dim, D]   (attention output)
  wi     Linear [d_ff, D]           -> kernel [D, d_ff]              (MLP in, gate, up)
  wo     Linear [D, d_ff]           -> kernel [d_ff, D]              (MLP out)
  norm   weight (+ bias)            -> scale (+ bias)
PyTorch Linear weights are [out, in], hence the transposes. Biases follow cfg.use_bias.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, stack_layers, take, unstack_layers
from jaxlm.convert.gpt2 import VARIANT_FIELDS
from jaxlm.models.transformer import head_dim

Table = list[tuple[str, str, str]]

# HF activation names <-> jaxlm's.
ACT_FROM_HF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}
ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


def act_from_hf(name: str) -> str:
    if name not in ACT_FROM_HF:
        raise ConversionError(f"activation '{name}' is not supported; supported: "
                              f"{', '.join(sorted(ACT_FROM_HF))}")
    return ACT_FROM_HF[name]


def _has_norm_bias(cfg: ModelConfig) -> bool:
    return cfg.norm == "layernorm" and cfg.use_bias


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict[str, Any], path: str) -> Any:
    for p in path.split("/"):
        tree = tree[p]
    return tree


def module_from(tensors: dict[str, np.ndarray], name: str, kind: str, cfg: ModelConfig,
                heads: int) -> dict[str, np.ndarray]:
    """jaxlm params of one source module (`name` without .weight/.bias)."""
    D, H, bias = cfg.d_model, head_dim(cfg), cfg.use_bias
    if kind == "norm":
        out = {"scale": take(tensors, f"{name}.weight", (D,))}
        if _has_norm_bias(cfg):
            out["bias"] = take(tensors, f"{name}.bias", (D,))
        return out
    if kind == "qkv":
        out = {"kernel": take(tensors, f"{name}.weight", (heads * H, D)).T.reshape(D, heads, H)}
        if bias:
            out["bias"] = take(tensors, f"{name}.bias", (heads * H,)).reshape(heads, H)
        return out
    if kind == "out":
        out = {"kernel": take(tensors, f"{name}.weight", (D, heads * H)).T.reshape(heads, H, D)}
        if bias:
            out["bias"] = take(tensors, f"{name}.bias", (D,))
        return out
    shape = (cfg.d_ff, D) if kind == "wi" else (D, cfg.d_ff)
    out = {"kernel": take(tensors, f"{name}.weight", shape).T}
    if bias:
        out["bias"] = take(tensors, f"{name}.bias", shape[:1])
    return out


def module_to(p: dict[str, Any], name: str, kind: str) -> dict[str, np.ndarray]:
    """Inverse of module_from: source tensors of one module."""
    a = lambda x: np.asarray(x, np.float32)
    if kind == "norm":
        out = {f"{name}.weight": a(p["scale"])}
    elif kind == "qkv":
        k = a(p["kernel"])
        out = {f"{name}.weight": k.reshape(k.shape[0], -1).T}
    elif kind == "out":
        k = a(p["kernel"])
        out = {f"{name}.weight": k.reshape(-1, k.shape[-1]).T}
    else:
        out = {f"{name}.weight": a(p["kernel"]).T}
    if "bias" in p:
        out[f"{name}.bias"] = a(p["bias"]).reshape(-1)
    return out


def _heads(cfg: ModelConfig, path: str) -> int:
    kv = path.endswith("/key") or path.endswith("/value")
    return (cfg.num_kv_heads or cfg.num_heads) if kv else cfg.num_heads


def layers_from(tensors: dict[str, np.ndarray], prefix: str, table: Table, cfg: ModelConfig,
                num_layers: int) -> dict[str, Any]:
    """{'layers': stacked} or {'layers_i': ...} from `prefix.format(i) + module` tensors."""
    layers = []
    for i in range(num_layers):
        layer: dict[str, Any] = {}
        for path, name, kind in table:
            _set(layer, path, module_from(tensors, prefix.format(i) + name, kind, cfg,
                                          _heads(cfg, path)))
        layers.append(layer)
    return stack_layers(layers, cfg.scan_layers)


def layers_to(stack: dict[str, Any], prefix: str, table: Table, num_layers: int
              ) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(unstack_layers(stack, num_layers)):
        for path, name, kind in table:
            out.update(module_to(_get(layer, path), prefix.format(i) + name, kind))
    return out


def num_decoder_layers(cfg: ModelConfig) -> int:
    return cfg.num_decoder_layers or cfg.num_layers


def shared_embedding(tensors: dict[str, np.ndarray], cfg: ModelConfig, shared: str,
                     per_side: tuple[str, str]) -> np.ndarray:
    """The one token embedding of both stacks. HF ties `per_side` (encoder, decoder tables) to
    `shared` only while they hold equal values and tie_word_embeddings is on; otherwise each
    stack reads its own table, so those win when present and must agree."""
    shape = (cfg.vocab_size, cfg.d_model)
    tables = [take(tensors, n, shape) if n in tensors else None for n in per_side]
    found = [t for t in tables if t is not None]
    if len(found) == 2 and not np.allclose(*found):
        raise ConversionError(f"'{per_side[0]}' and '{per_side[1]}' differ; jaxlm shares one "
                              "token embedding between encoder and decoder")
    return found[0] if found else take(tensors, shared, shape)


def output_from(tensors: dict[str, np.ndarray], cfg: ModelConfig, shared: np.ndarray,
                lm_head: str = "lm_head.weight") -> dict[str, Any]:
    """The untied output projection, if any; refuses a tied config whose checkpoint holds a
    different lm_head (HF would then untie them, and we would silently differ)."""
    V, D = cfg.vocab_size, cfg.d_model
    if not cfg.tie_embeddings:
        return {"lm_head": {"kernel": take(tensors, lm_head, (V, D)).T}}
    if lm_head in tensors and not np.allclose(take(tensors, lm_head, (V, D)), shared):
        raise ConversionError(f"'{lm_head}' differs from the shared embedding but the config "
                              "ties them; set tie_word_embeddings=false in config.json")
    return {}


def require(cfg: ModelConfig, model_type: str, **expected: Any) -> None:
    """Raises ConversionError naming every model.* field the HF class cannot express; the
    decoder variants' fields (VARIANT_FIELDS) must be off unless `expected` names them."""
    off = {k: getattr(ModelConfig(), k) for k in VARIANT_FIELDS if k != "embed_scale"}
    bad = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in {**off, **expected}.items()
           if getattr(cfg, k) != v]
    if bad:
        raise ConversionError(f"HF '{model_type}' cannot represent this model: {', '.join(bad)}")


def equal_sides(hf: dict[str, Any], model_type: str, *keys: str) -> None:
    """jaxlm uses one width/head count for both stacks; HF BART/Marian allow two."""
    for key in keys:
        enc, dec = hf.get(f"encoder_{key}"), hf.get(f"decoder_{key}")
        if enc != dec:
            raise ConversionError(f"{model_type}: encoder_{key}={enc} differs from "
                                  f"decoder_{key}={dec}; jaxlm needs them equal")


def require_plain_heads(cfg: ModelConfig, model_type: str, any_width: bool = False) -> None:
    """No grouped-query attention; heads of width d_model // num_heads unless any_width."""
    if (cfg.num_kv_heads or cfg.num_heads) != cfg.num_heads:
        raise ConversionError(f"{model_type} has no grouped-query attention; "
                              "set model.num_kv_heads=0")
    if not any_width and head_dim(cfg) * cfg.num_heads != cfg.d_model:
        raise ConversionError(f"{model_type} needs heads of width d_model // num_heads; "
                              "set model.head_dim=0")
