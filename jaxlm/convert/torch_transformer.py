"""`torch.nn.Transformer` weights (a safetensors state_dict, batch_first or not) -> the
`transformer` preset's parameters.

nn.Transformer holds only the two stacks: token embedding and output projection live outside
it, so the (shared) embedding table [vocab, d_model] is passed in, or named by its key in the
same file. Its layers are post-LN by default (norm_first=True: set model.norm_position=pre),
and both stacks end in a LayerNorm (encoder.norm, decoder.norm) even when post-LN, which the
`transformer` preset mirrors with final_norm=true. Self- and cross-attention pack q, k, v in
one in_proj_weight [3 * d_model, d_model]; the activation (relu by default) and head count
cannot be read from the weights and come from `cfg`.

    params = load_torch_transformer("nn_transformer.safetensors", cfg, embedding)
    logits = registry.of(cfg).build_model(cfg).apply({"params": params}, src, tgt)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, take
from jaxlm.convert import seq2seq_layout as lay


def _attn(jax_name: str, torch_name: str, ln: str, norm: str) -> lay.Table:
    # q, k, v are split out of in_proj_weight/in_proj_bias by _unpack.
    return [(f"{jax_name}/query", f"{torch_name}.q", "qkv"),
            (f"{jax_name}/key", f"{torch_name}.k", "qkv"),
            (f"{jax_name}/value", f"{torch_name}.v", "qkv"),
            (f"{jax_name}/out", f"{torch_name}.out_proj", "out"), (ln, norm, "norm")]


_MLP = [("mlp/wi", "linear1", "wi"), ("mlp/wo", "linear2", "wo")]
ENCODER_TABLE = (_attn("attn", "self_attn", "ln_attn", "norm1") + _MLP
                 + [("ln_mlp", "norm2", "norm")])
DECODER_TABLE = (_attn("attn", "self_attn", "ln_attn", "norm1")
                 + _attn("cross_attn", "multihead_attn", "ln_cross", "norm2")
                 + _MLP + [("ln_mlp", "norm3", "norm")])


def _unpack(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Strips `prefix` and splits each packed in_proj into q, k and v."""
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        if name.endswith(("in_proj_weight", "in_proj_bias")):
            base, kind = name.rsplit(".in_proj_", 1)
            for proj, part in zip("qkv", np.split(np.asarray(t), 3, axis=0)):
                out[f"{base}.{proj}.{kind}"] = part
        else:
            out[name] = np.asarray(t)
    return out


def _check_packed(tensors: dict[str, np.ndarray], prefix: str, cfg: ModelConfig) -> None:
    """Names a missing or mis-shaped in_proj tensor by its own name, before the split."""
    D = cfg.d_model
    for side, attns, n in (("encoder", ("self_attn",), cfg.num_layers),
                           ("decoder", ("self_attn", "multihead_attn"),
                            lay.num_decoder_layers(cfg))):
        for i in range(n):
            for a in attns:
                name = f"{prefix}{side}.layers.{i}.{a}.in_proj_"
                take(tensors, name + "weight", (3 * D, D))
                take(tensors, name + "bias", (3 * D,))


def params_from_torch(tensors: dict[str, np.ndarray], cfg: ModelConfig,
                      embedding: np.ndarray | str, prefix: str = "") -> dict[str, Any]:
    """jaxlm params from an nn.Transformer state_dict (keys may carry `prefix`, e.g.
    'transformer.'); `embedding` is the [vocab, d_model] table or its key in `tensors`."""
    lay.require(cfg, "torch.nn.Transformer", family="encoder_decoder", norm="layernorm",
                use_bias=True, tie_embeddings=True, final_norm=True, relative_buckets=0,
                gated_mlp=False, embed_norm=False, final_logits_bias=False)
    lay.require_plain_heads(cfg, "torch.nn.Transformer")
    if isinstance(embedding, str):
        embedding = take(tensors, embedding)
    embedding = np.asarray(embedding, np.float32)
    if embedding.shape != (cfg.vocab_size, cfg.d_model):
        raise ConversionError(f"embedding has shape {embedding.shape}, expected "
                              f"{(cfg.vocab_size, cfg.d_model)} (model.vocab_size, d_model)")
    _check_packed(tensors, prefix, cfg)
    flat = _unpack(tensors, prefix)
    params: dict[str, Any] = {"embed": {"embedding": embedding}}
    for side, table, n in (("encoder", ENCODER_TABLE, cfg.num_layers),
                           ("decoder", DECODER_TABLE, lay.num_decoder_layers(cfg))):
        params[side] = {
            "stack": lay.layers_from(flat, f"{side}.layers.{{}}.", table, cfg, n),
            "ln_final": lay.module_from(flat, f"{side}.norm", "norm", cfg, cfg.num_heads),
        }
        if f"{side}.layers.{n}.linear1.weight" in flat:
            raise ConversionError(f"the checkpoint has more {side} layers than "
                                  f"model.num_{'decoder_' if side == 'decoder' else ''}layers")
    return params


def load_torch_transformer(path: str | Path, cfg: ModelConfig, embedding: np.ndarray | str,
                           prefix: str = "") -> dict[str, Any]:
    """params_from_torch on a safetensors file (safetensors.torch.save_file(net.state_dict()))."""
    if not Path(path).is_file():
        raise ConversionError(f"no safetensors file at '{path}'")
    return params_from_torch(load_file(str(path)), cfg, embedding, prefix)
