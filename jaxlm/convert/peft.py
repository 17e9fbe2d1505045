"""A LoRA run's adapters alone in HF PEFT's layout: `adapter_config.json` +
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base, dir)` reads over
the base model in HF form (the run's model.init_from, or its `jaxlm convert jaxlm2hf`).

PEFT holds, for each adapted HF Linear `<module>`, `base_model.model.<module>.lora_A.weight`
[r, in] and `.lora_B.weight` [out, r], and adds (lora_alpha / r) · B A to the Linear's
[out, in] weight. jaxlm's A [in..., r] and B [r, out...] flatten in the order the HF weight
does, so A_hf = A.reshape(in, r)ᵀ and B_hf = B.reshape(r, out)ᵀ. Each family converter that
can write adapters names the HF module of a projection (`peft_module`) and the task
(`PEFT_TASK_TYPE`); the others export merged weights only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxlm import lora, sharding, weights
from jaxlm.checkpoint import CheckpointError, restore_state_params
from jaxlm.config import Config, ConfigError, MeshConfig
from jaxlm.convert import ConversionError, family_module
from jaxlm.convert.hf import hf_model_type
from jaxlm.data.paths import as_path
from jaxlm.train import rundir

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def read_adapters(run_dir: str | Path, cfg: Config, step: int | None = None) -> Any:
    """The run's adapters alone (float32, one device), from its newest checkpoint or `step`;
    the base weights are not read."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    target = weights.adapter_target(cfg.model, cfg.lora, mesh, np.float32)
    adapters = restore_state_params(as_path(run_dir) / rundir.CHECKPOINT_DIR, target, step)
    if adapters is None:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    return jax.device_get(adapters)


def per_layer(adapters: Any) -> list[tuple[tuple[str, ...], np.ndarray, np.ndarray]]:
    """(projection path, A, B) for every adapter, scanned stacks split into their layers
    ('layers' with a leading layer axis -> 'layers_0', 'layers_1', ...)."""
    flat = traverse_util.flatten_dict(adapters)
    out = []
    for key, a in flat.items():
        if key[-1] != lora.A:
            continue
        module, b = key[:-1], flat[(*key[:-1], lora.B)]
        if "layers" not in module:
            out.append((module, np.asarray(a), np.asarray(b)))
            continue
        at = module.index("layers")
        for i in range(a.shape[0]):
            out.append(((*module[:at], f"layers_{i}", *module[at + 1:]), np.asarray(a[i]),
                        np.asarray(b[i])))
    return out


def peft_tensors(adapters: Any, cfg: Config, converter: Any) -> tuple[dict[str, np.ndarray],
                                                                      list[str]]:
    """(PEFT's tensors by name, the adapted module names' last parts for target_modules)."""
    tensors, targets = {}, set()
    r = cfg.lora.rank
    for path, a, b in per_layer(adapters):
        module = converter.peft_module(path, cfg.model)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        targets.add(module.rsplit(".", 1)[-1])
    return tensors, sorted(targets)


def adapter_config(cfg: Config, task_type: str, targets: list[str]) -> dict[str, Any]:
    """adapter_config.json: PEFT's LoraConfig of the run's adapters."""
    lo = cfg.lora
    return {"peft_type": "LORA", "task_type": task_type, "r": lo.rank,
            "lora_alpha": lo.alpha, "lora_dropout": lo.dropout, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": cfg.model.init_from or None}


def save_adapters(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Writes the adapters of a LoRA run (newest checkpoint, or `step`) as a new PEFT
    directory `out_dir`; nothing is written when the run or its architecture cannot."""
    from safetensors.numpy import save_file

    from jaxlm.convert.run import _check_out, _publish, _staging

    out = as_path(out_dir)
    _check_out(out)
    cfg = rundir.load_config(run_dir)
    if not cfg.lora.rank:
        raise ConfigError(f"{run_dir} trains no LoRA adapters (lora.rank=0); export it "
                          "without --adapters-only")
    if cfg.lora.train_also:
        raise ConfigError(f"{run_dir} also trained {', '.join(cfg.lora.train_also)} whole "
                          "(lora.train_also), which PEFT adapters alone do not hold; export "
                          "the merged model without --adapters-only")
    model_type = hf_model_type(cfg.model)
    converter = family_module(model_type, family=cfg.model.family)
    if not hasattr(converter, "peft_module"):
        raise ConversionError(f"--adapters-only writes PEFT adapters of Llama-layout models "
                              f"(llama, mistral, qwen, gemma, mixtral), not '{model_type}'; "
                              "export the merged model without --adapters-only")
    tensors, targets = peft_tensors(read_adapters(run_dir, cfg, step), cfg, converter)
    tmp = _staging(out)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(
            adapter_config(cfg, converter.PEFT_TASK_TYPE, targets), indent=2) + "\n")
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
