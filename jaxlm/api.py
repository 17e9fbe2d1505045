"""`jaxlm.load(path)`: a trained run directory as a callable model with `.generate`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sharding
from jaxlm.checkpoint import Checkpointer, CheckpointError, restore_params, save_params
from jaxlm.config import Config, MeshConfig
from jaxlm.data.tokenizers import Tokenizer, TokenizerError, load_tokenizer
from jaxlm.families import registry
from jaxlm.generate import unrolled_for_decoding
from jaxlm.optim import make_optimizer
from jaxlm.train import rundir
from jaxlm.train.state import param_shardings, state_shardings


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
                 temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, beams: int = 1, length_penalty: float = 1.0) -> str | list[str]:
        """Continues `text` (or each of a list of texts); returns only the new text.
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


EXPORT_PARAMS_DIR = "params"


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Writes a params-only copy of a run (config.yaml, tokenizer/, params/) for inference."""
    import shutil

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"'{out}' is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"'{out}' exists and is not empty; choose a new directory")
    lm = load(run_dir, step)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_config(out, lm.config)
    src_tok = Path(run_dir) / rundir.TOKENIZER_DIR
    if src_tok.exists():
        shutil.copytree(src_tok, out / rundir.TOKENIZER_DIR)
    save_params(out / EXPORT_PARAMS_DIR, lm.params)
    return out


def load(path: str | Path, step: int | None = None) -> LM:
    """Loads a jaxlm run directory (newest checkpoint, or `step`), a params-only export
    (`jaxlm export`) or an HF model directory (config.json + safetensors), with its
    tokenizer."""
    path = Path(path)
    if not (path / rundir.CONFIG_FILE).exists() and (path / "config.json").exists():
        return _load_hf(path)
    cfg = rundir.load_config(path)
    tok_dir = path / rundir.TOKENIZER_DIR
    # A run converted from an HF directory without tokenizer files has none: ids only.
    tokenizer = load_tokenizer(tok_dir) if tok_dir.exists() else None
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = registry.of(cfg.model).build_model(cfg.model)
    if (path / EXPORT_PARAMS_DIR).exists():
        with jax.set_mesh(mesh):
            abstract_params, shardings = param_shardings(model, mesh)
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract_params, shardings)
            return LM(cfg, restore_params(path / EXPORT_PARAMS_DIR, target), tokenizer)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
        abstract, _ = state_shardings(model, tx, mesh)
        ckpt = Checkpointer(path / rundir.CHECKPOINT_DIR, async_save=False)
        try:
            _, state, _ = ckpt.restore(abstract, step)
        finally:
            ckpt.close()
    if state is None:
        raise CheckpointError(f"no checkpoint in {path}")
    return LM(cfg, state.params, tokenizer)


def _load_hf(path: Path) -> LM:
    from jaxlm.convert.hf import load_hf

    model_cfg, params = load_hf(path)
    cfg = Config(model=model_cfg, name=path.name)
    try:
        tokenizer = load_tokenizer(path)
    except ValueError:  # an HF directory without tokenizer files: ids only
        tokenizer = None
    return LM(cfg, jax.tree.map(jnp.asarray, params), tokenizer)
