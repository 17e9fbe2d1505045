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
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError, MeshConfig, TrainConfig
from jaxlm.convert import ConversionError, family_module
from jaxlm.convert.hf import read_hf_config, read_tensors, save_hf
from jaxlm.data.tokenizers import HFTokenizer, Tokenizer, decoder_start_id, load_tokenizer
from jaxlm.families import registry
from jaxlm.optim import make_optimizer
from jaxlm.train import rundir
from jaxlm.train.state import TrainState, state_shardings

# model.* keys a conversion may set; the rest come from the HF config (they shape the params).
MODEL_OVERRIDES = ("scan_layers", "remat", "dropout", "attention", "dtype", "param_dtype")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"'{out}' already exists; choose a new output directory")


def _staging(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    _check_out(out)  # again: something may have appeared meanwhile
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


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


def _check_tree(abstract: Any, params: Any) -> None:
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


def train_state(cfg: Config, params: Any) -> TrainState:
    """A step-0 TrainState holding `params` (fresh optimizer state) on one device."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = registry.of(cfg.model).build_model(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
        abstract, shardings = state_shardings(model, tx, mesh)
        _check_tree(abstract.params, params)
        params = jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding),
                              params, abstract.params)
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
        # As init_state does: the dropout base key is fold_in(PRNGKey(seed), 1).
        rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1),
                             shardings.rng)
        step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
        return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def _hf_tokenizer(hf_dir: Path) -> Tokenizer | None:
    try:
        return load_tokenizer(hf_dir)
    except ValueError:  # TokenizerError and friends: the directory has no tokenizer files
        return None


def hf_to_run(hf_dir: str | Path, out_dir: str | Path,
              overrides: list[str] | None = None) -> Path:
    """Converts an HF model directory into a new jaxlm run directory `out_dir`."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    _check_out(out)
    hf_config = read_hf_config(hf_dir)
    cfg = run_config(hf_config, hf_dir.resolve().name, overrides)
    try:
        tensors = read_tensors(hf_dir)
    except SafetensorError as e:
        raise ConversionError(f"cannot read the safetensors in '{hf_dir}': {e}") from None
    try:
        params = family_module(hf_config["model_type"]).params_from_hf(tensors, cfg.model)
    except KeyError as e:
        raise ConversionError(f"the safetensors in '{hf_dir}' lack the tensor {e}") from None
    state = train_state(cfg, params)
    tokenizer = _hf_tokenizer(hf_dir)
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


def _token(tok: HFTokenizer, i: int | None) -> str | None:
    return None if i is None else tok.tokenizer.id_to_token(i)


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """The tokenizer's own files (tokenizer.json or tokenizer.model, plus jaxlm's role ids),
    a tokenizer_config.json for `AutoTokenizer` where HF can read it, and the special ids in
    config.json."""
    tokenizer.save(out)
    if isinstance(tokenizer, HFTokenizer):
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for role in ("bos", "eos", "pad", "unk", "mask"):
            text = _token(tokenizer, getattr(tokenizer, f"{role}_id"))
            if text is not None:
                tok_cfg[f"{role}_token"] = text
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    config_path = out / "config.json"
    hf_config = json.loads(config_path.read_text())
    for role in ("bos", "eos", "pad"):
        if role == "pad" and hf_config.get("model_type") == "roberta":
            continue  # RoBERTa's pad id fixes its position offset: it belongs to the model
        hf_config[f"{role}_token_id"] = getattr(tokenizer, f"{role}_id")
    config_path.write_text(json.dumps(hf_config, indent=2) + "\n")


def run_to_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes the newest checkpoint of a jaxlm run as an HF model directory `out_dir`."""
    from jaxlm.api import load

    out = Path(out_dir)
    _check_out(out)
    lm = load(run_dir)
    params = jax.device_get(lm.params)
    # The decoder start the run used (-1: its tokenizer's BOS), as HF's decoder_start_token_id.
    model_cfg = dataclasses.replace(lm.config.model,
                                    decoder_start_id=decoder_start_id(lm.config.model,
                                                                      lm.tokenizer))
    tmp = _staging(out)
    try:
        save_hf(model_cfg, params, tmp)
        if lm.tokenizer is not None:
            save_hf_tokenizer(lm.tokenizer, tmp)
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
