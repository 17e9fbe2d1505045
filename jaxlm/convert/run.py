"""HF model directory <-> jaxlm run directory: what `jaxlm convert` does.

`hf_to_run` writes a run directory that `jaxlm.load`, `jaxlm generate` and `jaxlm train`
(which resumes it, i.e. fine-tunes) read: config.yaml, tokenizer/ (when the HF directory has
tokenizer files) and an orbax checkpoint at step 0 of a full TrainState. `run_to_hf` writes
config.json + model.safetensors + the tokenizer. Both build the output next to its final
place and move it there at the end, so a failure leaves nothing half-written, and neither
overwrites an existing directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError, MeshConfig, TrainConfig
from jaxlm.convert import ConversionError, family_module
from jaxlm.convert.hf import hf_config_for, lazy_params, place, read_hf_config, save_hf
from jaxlm.convert.hf_tokenizer import save_for_hf
from jaxlm.convert.safetensors_files import DEFAULT_MAX_SHARD_BYTES
from jaxlm.data.paths import as_path, copy_tree, is_remote, local_copy, native
from jaxlm.data.tokenizers import Tokenizer, decoder_start_id, load_tokenizer
from jaxlm.families import registry
from jaxlm.optim import make_optimizer
from jaxlm.train import rundir
from jaxlm.train.state import TrainState, state_from_params, state_shardings
from jaxlm.weights import model_config_of

# model.* keys a conversion may set; the rest come from the HF config (they shape the params).
MODEL_OVERRIDES = ("scan_layers", "remat", "grad_barrier", "dropout", "attention", "dtype",
                   "param_dtype")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"'{out}' already exists; choose a new output directory")


def _staging(out: Path) -> Path:
    """Where `out` is built: beside it (renamed at the end), or for a cloud `out` in a local
    temporary folder (copied at the end)."""
    if is_remote(out):
        return Path(tempfile.mkdtemp(prefix="jaxlm-convert-"))
    tmp = Path(out).parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    _check_out(out)  # again: something may have appeared meanwhile
    if is_remote(out):
        copy_tree(tmp, out)
        return out
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return native(out)


def run_config(hf_config: dict[str, Any], name: str, overrides: list[str] | None = None
               ) -> Config:
    """The run's Config: model fields from the HF config, schema defaults elsewhere, then
    `overrides` (train.*, optim.*, data.*, ... and the model keys in MODEL_OVERRIDES)."""
    model_type = hf_config.get("model_type", "<missing model_type>")
    try:
        fields = family_module(model_type).config_from_hf(hf_config)
    except KeyError as e:
        raise ConversionError(f"the HF config ({model_type}) lacks {e}") from None
    over = config_lib.parse_overrides(overrides or [])
    for key in over.get("model", {}):
        if key not in MODEL_OVERRIDES:
            raise ConfigError(f"model.{key} comes from the HF config and cannot be overridden "
                              f"when converting; allowed: "
                              + ", ".join(f"model.{k}" for k in MODEL_OVERRIDES))
    seq_len = min(TrainConfig.seq_len, fields["max_seq_len"])
    raw = config_lib._merge({"model": fields, "train": {"seq_len": seq_len}, "name": name},
                            over)
    cfg = config_lib.from_dict(raw)
    config_lib.validate(cfg)
    return cfg


def train_state(cfg: Config, params: Any) -> TrainState:
    """A step-0 TrainState holding `params` (recipes or arrays; fresh optimizer state) on one
    device, each parameter read and placed on its own."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = registry.of(cfg.model).build_model(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
        abstract, shardings = state_shardings(model, tx, mesh)
        return state_from_params(place(params, abstract.params), tx, shardings, cfg.seed)


def _hf_tokenizer(hf_dir: Path) -> Tokenizer | None:
    try:
        return load_tokenizer(hf_dir)
    except ValueError:  # TokenizerError and friends: the directory has no tokenizer files
        return None


def hf_to_run(hf_dir: str | Path, out_dir: str | Path,
              overrides: list[str] | None = None) -> Path:
    """Converts an HF model directory into a new jaxlm run directory `out_dir` (either may
    be local or `gs://...`)."""
    out = as_path(out_dir)
    _check_out(out)
    name = as_path(hf_dir).name if is_remote(hf_dir) else Path(hf_dir).resolve().name
    with local_copy(hf_dir) as local:  # safetensors are read from local files
        cfg = run_config(read_hf_config(local), name, overrides)
        state = train_state(cfg, lazy_params(local, cfg.model))
        tokenizer = _hf_tokenizer(local)
    tmp = _staging(out)
    try:
        cfg.run.dir = str(out)
        rundir.write_config(tmp, cfg)
        if tokenizer is not None:
            tokenizer.save(tmp / rundir.TOKENIZER_DIR)
        ckpt = Checkpointer(tmp / rundir.CHECKPOINT_DIR, async_save=False)
        try:
            ckpt.save(0, state, {"position": 0}, force=True)
        finally:
            ckpt.close()
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """The tokenizer as AutoTokenizer loads it (jaxlm.convert.hf_tokenizer), and its special
    ids in config.json."""
    save_for_hf(tokenizer, out)
    config_path = out / "config.json"
    hf_config = json.loads(config_path.read_text())
    for role in ("bos", "eos", "pad"):
        if role == "pad" and hf_config.get("model_type") == "roberta":
            continue  # RoBERTa's pad id fixes its position offset: it belongs to the model
        hf_config[f"{role}_token_id"] = getattr(tokenizer, f"{role}_id")
    config_path.write_text(json.dumps(hf_config, indent=2) + "\n")


def run_to_hf(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes the newest checkpoint of a jaxlm run (or an export) as an HF model directory
    `out_dir`: safetensors in `dtype`, in shards of at most `max_shard_bytes` with an index
    when they do not fit in one."""
    from jaxlm.api import load

    out = as_path(out_dir)
    _check_out(out)
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    hf_config_for(model_config_of(run_dir))  # refused before the weights are read
    lm = load(run_dir)
    params = jax.device_get(lm.params)
    # The decoder start the run used (-1: its tokenizer's BOS), as HF's decoder_start_token_id.
    model_cfg = dataclasses.replace(lm.config.model,
                                    decoder_start_id=decoder_start_id(lm.config.model,
                                                                      lm.tokenizer))
    tmp = _staging(out)
    try:
        save_hf(model_cfg, params, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
        if lm.tokenizer is not None:
            save_hf_tokenizer(lm.tokenizer, tmp)
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
