"""Read and write HF model directories (config.json + *.safetensors, one file or shards
with model.safetensors.index.json) through the family modules the family specs list
(jaxlm.families). safetensors only: no torch.load, no pickle.

Loading is lazy: `lazy_params` gives the parameter tree as recipes (jaxlm.convert.lazy) and
`place` builds one parameter at a time, in its target dtype, straight into its sharding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, family_module
from jaxlm.convert.lazy import fill, materialize
from jaxlm.convert.safetensors_files import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsCheckpoint,
    write_shards,
)
from jaxlm.data.paths import as_path


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF directory; ConversionError naming the file when it is missing,
    unreadable, or not a JSON object with a model_type."""
    path = as_path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"'{hf_dir}' is not an HF model directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ConversionError(f"'{path}' is not valid JSON ({e})") from None
    except OSError as e:
        raise ConversionError(f"cannot read '{path}': {e.strerror}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"'{path}' must hold a JSON object, not a "
                              f"{type(config).__name__}")
    if not isinstance(config.get("model_type"), str):
        raise ConversionError(f"'{path}' has no model_type string; is it an HF model config?")
    return config


def read_tensors(hf_dir: str | Path) -> SafetensorsCheckpoint:
    """The directory's tensors by HF name, opened lazily (headers only, nothing read)."""
    return SafetensorsCheckpoint(hf_dir)


def model_config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
    model_type = hf_config.get("model_type", "<missing model_type>")
    fields = family_module(model_type).config_from_hf(hf_config)
    fields.update(overrides)
    raw = config_lib._merge({"model": config_lib.to_dict(ModelConfig())}, {"model": fields})
    return config_lib.from_dict(raw["model"], ModelConfig, "model.")


def lazy_params(hf_dir: str | Path, cfg: ModelConfig) -> Any:
    """The parameter tree of an HF directory for `cfg`, each leaf a recipe (nothing read)."""
    hf_dir = Path(hf_dir)
    model_type = read_hf_config(hf_dir)["model_type"]
    try:
        return family_module(model_type).params_from_hf(read_tensors(hf_dir), cfg)
    except KeyError as e:
        raise ConversionError(f"the safetensors in '{hf_dir}' lack the tensor {e}") from None


def check_tree(abstract: Any, params: Any) -> None:
    """Same parameter paths and shapes as the model's, else ConversionError naming one."""
    want = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(p): np.shape(x)
           for p, x in jax.tree_util.tree_leaves_with_path(params)}
    for key in sorted(want.keys() | got.keys()):
        if key not in got:
            raise ConversionError(f"converted parameters lack {key}")
        if key not in want:
            raise ConversionError(f"converted parameter {key} is not in the jaxlm model")
        if tuple(want[key]) != tuple(got[key]):
            raise ConversionError(f"converted parameter {key} has shape {tuple(got[key])}, "
                                  f"the model expects {tuple(want[key])}")


def place(params: Any, abstract: Any) -> Any:
    """`params` (recipes or arrays) as jax Arrays in the dtype and sharding of each leaf of
    `abstract` (ShapeDtypeStructs carrying shardings). One parameter is on the host at a
    time, in its target dtype; each device receives its shard of it (with several
    processes, each reads the whole parameter and keeps its own devices' shards)."""
    check_tree(abstract, params)
    flat, treedef = jax.tree_util.tree_flatten(params)
    targets = treedef.flatten_up_to(abstract)
    placed = []
    for x, target in zip(flat, targets, strict=True):
        host = _aligned_empty(target.shape, target.dtype)
        fill(x, host)
        placed.append(jax.make_array_from_callback(target.shape, target.sharding,
                                                   lambda index, h=host: h[index]))
        del host  # before the next parameter is read
    return jax.tree_util.tree_unflatten(treedef, placed)


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array at a 64-byte boundary: a CPU device adopts such a buffer
    whole instead of copying it (the only memory on a CPU host is the host's)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def load_hf(hf_dir: str | Path, *, scan_layers: bool = False) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params as float32 numpy arrays) from an HF directory; jaxlm.load reads
    one straight onto devices instead."""
    cfg = model_config_from_hf(read_hf_config(hf_dir), scan_layers=scan_layers)
    params = jax.tree.map(lambda x: materialize(x, np.float32), lazy_params(hf_dir, cfg))
    return cfg, params


def save_hf(cfg: ModelConfig, params: Any, out_dir: str | Path, *, dtype: str = "float32",
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes config.json + the safetensors (shards of at most `max_shard_bytes` with an
    index when one file would be larger) in `dtype`, which the HF class for `cfg` loads. A
    model the HF class cannot hold is refused (ConversionError) before anything is written."""
    out = Path(out_dir)
    hf_config = hf_config_for(cfg)
    tensors = family_module(hf_config["model_type"], family=cfg.family).params_to_hf(params, cfg)
    write_shards(tensors, out, dtype=jnp.dtype(dtype), max_shard_bytes=max_shard_bytes)
    hf_config["dtype"] = str(dtype)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out


def hf_config_for(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of `cfg` as an HF model; ConversionError naming what HF's class cannot
    hold (checked before any weight is read or written)."""
    return family_module(hf_model_type(cfg), family=cfg.family).hf_config_from(cfg)


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type a jaxlm preset converts to."""
    mapping = {"gpt2": "gpt2", "gpt3": "gpt2", "gpt-neo": "gpt_neo", "llama": "llama",
               "mistral": "mistral", "mixtral": "mixtral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma2": "gemma2", "gemma3": "gemma3_text",
               "bert": "bert", "roberta": "roberta", "t5": "t5", "bart": "bart",
               "marian": "marian"}
    if cfg.num_experts:  # any MoE decoder exports as Mixtral (which refuses what it can't hold)
        return "mixtral"
    # Sized variants ("gpt3-1.3b", "llama3-8b") convert like the longest preset they extend.
    known = sorted((k for k in mapping if cfg.preset.startswith(k)), key=len)
    if not known:
        raise ConversionError(f"model.preset='{cfg.preset}' has no HF counterpart")
    return mapping[known[-1]]
