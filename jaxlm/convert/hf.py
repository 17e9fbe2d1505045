"""Read and write HF model directories (config.json + *.safetensors) through the family
modules the family specs list (jaxlm.families). safetensors only: no torch.load, no pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxlm import config as config_lib
from jaxlm.config import ModelConfig
from jaxlm.convert import ConversionError, family_module


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF directory; ConversionError naming the file when it is missing,
    unreadable, or not a JSON object with a model_type."""
    path = Path(hf_dir) / "config.json"
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


def read_tensors(hf_dir: str | Path) -> dict[str, np.ndarray]:
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ConversionError(f"no *.safetensors file in '{hf_dir}' (pickled .bin checkpoints "
                              "are not loaded; re-save with safe_serialization=True)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def model_config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
    model_type = hf_config.get("model_type", "<missing model_type>")
    fields = family_module(model_type).config_from_hf(hf_config)
    fields.update(overrides)
    raw = config_lib._merge({"model": config_lib.to_dict(ModelConfig())}, {"model": fields})
    return config_lib.from_dict(raw["model"], ModelConfig, "model.")


def load_hf(hf_dir: str | Path, *, scan_layers: bool = False) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) from an HF directory."""
    hf_config = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf_config, scan_layers=scan_layers)
    params = family_module(hf_config["model_type"]).params_from_hf(read_tensors(hf_dir), cfg)
    return cfg, params


def save_hf(cfg: ModelConfig, params: Any, out_dir: str | Path) -> Path:
    """Writes config.json + model.safetensors that the HF class for `cfg` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = family_module(hf_model_type(cfg), family=cfg.family)
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32))
               for k, v in module.params_to_hf(params, cfg).items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(module.hf_config_from(cfg), indent=2) + "\n")
    return out


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type a jaxlm preset converts to."""
    mapping = {"gpt2": "gpt2", "gpt3": "gpt2", "gpt-neo": "gpt_neo", "llama": "llama",
               "bert": "bert", "roberta": "roberta", "t5": "t5", "bart": "bart",
               "marian": "marian"}
    # Sized variants ("gpt3-1.3b", "llama3-8b") convert like the longest preset they extend.
    known = sorted((k for k in mapping if cfg.preset.startswith(k)), key=len)
    if not known:
        raise ConversionError(f"model.preset='{cfg.preset}' has no HF counterpart")
    return mapping[known[-1]]
