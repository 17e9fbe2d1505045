"""Parameters from any saved model (an HF directory, a jaxlm run directory or an export)
straight into given shardings: what `jaxlm.load` and `model.init_from` read.

An HF directory is read lazily, one parameter at a time in its target dtype
(jaxlm.convert.hf.place); a run's newest checkpoint and an export are restored by orbax
onto the target shardings, parameters only (a run's optimizer state is never read)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh

from jaxlm import lora, sharding
from jaxlm.checkpoint import CheckpointError, restore_params, restore_state_params
from jaxlm.config import ConfigError, LoraConfig, ModelConfig, TrainConfig
from jaxlm.data.paths import as_path, local_copy
from jaxlm.families import registry
from jaxlm.train import rundir
from jaxlm.train.state import TrainState, init_params_part, param_shardings, state_from_params

if TYPE_CHECKING:
    from jaxlm.setup import StepSetup

EXPORT_PARAMS_DIR = "params"
HF_CONFIG = "config.json"


def kind_of(path: str | Path) -> str:
    """'run', 'export' (config.yaml + params/) or 'hf' (config.json); ConfigError if none."""
    path = as_path(path)
    if (path / rundir.CONFIG_FILE).is_file():
        return "export" if (path / EXPORT_PARAMS_DIR).is_dir() else "run"
    if (path / HF_CONFIG).is_file():
        return "hf"
    why = "it does not exist" if not path.exists() else (
        f"no {rundir.CONFIG_FILE} or {HF_CONFIG} in it" if path.is_dir() else "it is a file")
    raise ConfigError(f"'{path}' is not a jaxlm run directory, an export or an HF model "
                      f"directory: {why}")


def model_config_of(path: str | Path) -> ModelConfig:
    """The saved model's architecture: the run's model.* or the HF config's conversion."""
    if kind_of(path) == "hf":
        from jaxlm.convert.hf import model_config_from_hf, read_hf_config

        # Unrolled, as HF holds it: each layer's tensors are parameters of their own.
        return model_config_from_hf(read_hf_config(path), scan_layers=False)
    return rundir.load_config(path).model


# model.* fields a checkpoint leaves to the new run: how it computes, not what it is.
RUN_FIELDS = ("init_from", "dropout", "attention", "dtype", "param_dtype", "remat",
              "grad_barrier")


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The config layer `model.init_from=path` fixes: the model's architecture (and a run's
    layer layout, which its checkpoint holds), its tokenizer as data.tokenizer, and a
    train.seq_len the model's positions cover."""
    model = dataclasses.asdict(model_config_of(path))
    drop = RUN_FIELDS + (("scan_layers",) if kind_of(path) == "hf" else ())
    layer: dict[str, Any] = {"model": {k: v for k, v in model.items() if k not in drop}}
    tok = tokenizer_dir(path)
    if tok is not None:
        layer["data"] = {"tokenizer": str(tok)}
    layer["train"] = {"seq_len": min(TrainConfig.seq_len, model["max_seq_len"])}
    return layer


def fine_tune_state(setup: StepSetup) -> TrainState:
    """Step 0 of a run from model.init_from: its parameters in the run's dtype and
    shardings (with LoRA: the base, beside fresh adapters), a fresh optimizer state."""
    cfg = setup.cfg
    adapters, base = lora.split(setup.abstract_state.params)
    params = read_params(cfg.model.init_from, cfg.model, base)
    if adapters:
        fresh = init_params_part(setup.model, lora.split(setup.state_shardings.params)[0],
                                 cfg.seed, setup.rules, lambda p: lora.split(p)[0])
        params = lora.join(fresh, params)
    return state_from_params(params, setup.tx, setup.state_shardings, cfg.seed,
                             setup.trainable)


def tokenizer_dir(path: str | Path) -> Path | None:
    """Where the saved model's tokenizer files are (None when it has none)."""
    from jaxlm.data.tokenizers import has_tokenizer

    path = as_path(path)
    found = path if kind_of(path) == "hf" else path / rundir.TOKENIZER_DIR
    return found if has_tokenizer(found) else None


def target_params(model_cfg: ModelConfig, mesh: Mesh, rules: Any = sharding.LOGICAL_RULES
                  ) -> Any:
    """The model's parameters as ShapeDtypeStructs carrying their NamedShardings."""
    model = registry.of(model_cfg).build_model(model_cfg)
    with jax.set_mesh(mesh):
        abstract, shardings = param_shardings(model, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


def read_params(path: str | Path, model_cfg: ModelConfig, target: Any,
                step: int | None = None) -> Any:
    """The saved parameters in the dtypes and shardings of `target` (target_params of
    `model_cfg`, which must be the saved model's architecture)."""
    path = as_path(path)
    kind = kind_of(path)
    if kind == "hf":
        from jaxlm.convert.hf import lazy_params, place

        with local_copy(path) as local:  # safetensors are read from local files
            return place(lazy_params(local, model_cfg), target)
    if kind == "export":
        return restore_params(path / EXPORT_PARAMS_DIR, target)
    source = rundir.load_config(path).lora
    if not source.rank or lora.has_adapters(target):
        params = restore_state_params(path / rundir.CHECKPOINT_DIR, target, step)
    else:  # a LoRA run read as a plain model: its adapters merged into their kernels
        params = _merged_run_params(path, model_cfg, source, target, step)
    if params is None:
        raise CheckpointError(f"no checkpoint in {path}")
    return params


def _merged_run_params(path: Path, model_cfg: ModelConfig, source: LoraConfig, target: Any,
                       step: int | None) -> Any:
    """A LoRA run's parameters with its adapters folded into their kernels, in the
    shardings of `target`; None without a checkpoint."""
    adapters = adapter_target(model_cfg, source, jax.tree.leaves(target)[0].sharding.mesh)
    params = restore_state_params(path / rundir.CHECKPOINT_DIR, lora.join(adapters, target),
                                  step)
    if params is None:
        return None
    merge = functools.partial(lora.merge, scale=source.alpha / source.rank)
    out = jax.tree.map(lambda x: x.sharding, target)
    return jax.jit(merge, out_shardings=out)(params)


def adapter_target(model_cfg: ModelConfig, lora_cfg: LoraConfig, mesh: Mesh,
                   dtype: Any = None) -> Any:
    """The abstract adapters `lora_cfg` adds to `model_cfg`, replicated on `mesh` (they are
    small), in their parameter dtype or `dtype`: the target that reads a LoRA run's adapters
    without its base."""
    model = registry.build_model(lora.adapted(model_cfg, lora_cfg))
    with jax.set_mesh(mesh):
        shapes, _ = param_shardings(model, mesh)
    rep = sharding.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=rep),
                        lora.split(shapes)[0])
