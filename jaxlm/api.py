"""`jaxlm.load(path)`: a trained run directory as a callable model with `.generate`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm import lora, sampling, sharding, weights
from jaxlm.checkpoint import CheckpointError, save_params
from jaxlm.config import Config, ConfigError, MeshConfig
from jaxlm.data.paths import as_path, copy_tree, native
from jaxlm.data.tokenizers import Tokenizer, TokenizerError, load_tokenizer
from jaxlm.families import registry
from jaxlm.generate import unrolled_for_decoding
from jaxlm.train import rundir


class LM:
    """A model, its parameters and its tokenizer. `lm(tokens)` returns logits [B, T, V]."""

    def __init__(self, config: Config, params: Any, tokenizer: Tokenizer | None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.family = registry.of(config.model)
        self.model = self.family.build_model(config.model)
        self._decoding: tuple[Any, Any, Any] | None = None  # (of params, model, params)
        self._apply = jax.jit(lambda p, *t, **kw: self.model.apply({"params": p}, *t, **kw))

    def __call__(self, *token_arrays: Sequence[Sequence[int]] | np.ndarray | jax.Array,
                 **kwargs: Any) -> jax.Array:
        """`lm(tokens)` (decoder, encoder) or `lm(src, tgt)` (encoder-decoder) -> logits.
        Keyword arguments (e.g. padding_mask_BT) go to the model's __call__."""
        arrays = []
        for t in token_arrays:
            t = jnp.asarray(t, dtype=jnp.int32)
            arrays.append(t[None] if t.ndim == 1 else t)
        if any(isinstance(v, (bool, int, float, str)) for v in kwargs.values()):
            # Python flags (deterministic=...) steer tracing: not jit arguments.
            return self.model.apply({"params": self.params}, *arrays, **kwargs)
        return self._apply(self.params, *arrays, **kwargs)

    def generate(self, text: str | Sequence[str], max_new_tokens: int = 200,
                 temperature: float = sampling.TEMPERATURE, top_k: int = sampling.TOP_K,
                 top_p: float = sampling.TOP_P, seed: int = 0, beams: int = 1,
                 length_penalty: float = 1.0) -> str | list[str]:
        """Continues `text` (or each of a list of texts); returns only the new text, sampled
        as `jaxlm generate` samples (temperature 0 is greedy; top_k 0 and top_p 1 are off).
        Encoder-decoder models instead map each text to its output (a translation, a
        summary), by beam search when `beams` > 1 (score / length**length_penalty)."""
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer (its directory had no tokenizer "
                                 "files); call it on token ids, or add a tokenizer")
        texts = [text] if isinstance(text, str) else list(text)
        model, params = self._for_decoding()
        ids = self.family.generate_ids(
            model, params, self.tokenizer, self.config.model, texts,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, beams=beams, length_penalty=length_penalty)
        out = [self.tokenizer.decode(i) for i in ids]
        return out[0] if isinstance(text, str) else out

    def _for_decoding(self) -> tuple[Any, Any]:
        """Scanned layers split out once per LM, not once per `generate` call (an eval
        generates batch after batch); the copy is kept beside the training layout."""
        if self._decoding is None or self._decoding[0] is not self.params:
            self._decoding = (self.params, *unrolled_for_decoding(self.model, self.params))
        return self._decoding[1], self._decoding[2]


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, *,
           dtype: str | None = None) -> Path:
    """Writes a params-only copy of a run (config.yaml, tokenizer/, params/) for inference,
    its parameters in `dtype` (default: the run's model.param_dtype)."""
    out = as_path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"'{out}' is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"'{out}' exists and is not empty; choose a new directory")
    lm = load(run_dir, step, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_config(out, lm.config)
    src_tok = as_path(run_dir) / rundir.TOKENIZER_DIR
    if src_tok.exists():
        copy_tree(src_tok, out / rundir.TOKENIZER_DIR)
    save_params(out / weights.EXPORT_PARAMS_DIR, lm.params)
    return native(out)


def _mesh_and_rules(cfg: Config, mesh: Mesh | MeshConfig | None) -> tuple[Mesh, Any]:
    if isinstance(mesh, Mesh):
        return mesh, sharding.logical_rules(cfg.mesh)
    if mesh is None:
        return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]), \
            sharding.logical_rules(cfg.mesh)
    return sharding.make_mesh(mesh), sharding.logical_rules(mesh)


def load(path: str | Path, step: int | None = None, *, dtype: str | None = None,
         mesh: Mesh | MeshConfig | None = None) -> LM:
    """Loads a jaxlm run directory (newest checkpoint, or `step`), a params-only export
    (`jaxlm export`) or an HF model directory (config.json + safetensors, one file or shards
    with an index), with its tokenizer. A LoRA run loads with its adapters merged into the
    base weights (a plain model; `lm.config.lora.rank` is 0).

    `dtype` ('float32' | 'bfloat16'): the parameters' and the computation's dtype (default:
    the run's; float32 for an HF directory). `mesh` (a jax Mesh, or a MeshConfig over all
    devices): the parameters are placed straight into their shardings on it by the
    logical-axis rules (default: one device). HF safetensors are read one tensor at a time,
    converted to `dtype` on the way, never the whole model in float32 on the host."""
    path = as_path(path)
    kind = weights.kind_of(path)
    if kind == "hf":
        cfg = Config(model=weights.model_config_of(path), name=path.name)
    else:
        cfg = rundir.load_config(path)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={dtype!r}: choose float32 or bfloat16")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype,
                                                                 param_dtype=dtype))
    the_mesh, rules = _mesh_and_rules(cfg, mesh)
    sharding.check_model_fits_mesh(cfg.model, the_mesh)
    target = weights.target_params(cfg.model, the_mesh, rules)
    params = weights.read_params(path, cfg.model, target, step)
    cfg = lora.merged_config(cfg)  # a LoRA run's adapters are in its kernels now
    tok_dir = weights.tokenizer_dir(path)
    # A run converted from an HF directory without tokenizer files has none: ids only.
    return LM(cfg, params, load_tokenizer(tok_dir) if tok_dir is not None else None)
