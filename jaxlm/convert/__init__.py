"""HF transformers checkpoints (safetensors + config.json) <-> jaxlm parameters.

Each supported HF `model_type` has a module in this package that provides:

    config_from_hf(hf_config: dict) -> dict            # jaxlm `model.*` fields
    params_from_hf(tensors: Mapping[str, array], cfg: ModelConfig) -> params pytree
    params_to_hf(params, cfg: ModelConfig) -> dict[str, np.ndarray]
    hf_config_from(cfg: ModelConfig) -> dict            # config.json for the HF class

Loading is lazy (jaxlm.convert.lazy): `tensors` maps each HF name to a `Lazy` recipe, not
an array, and `params_from_hf` returns the *mapping* from jaxlm parameter to HF tensors: a
tree whose leaves are recipes (read these tensors, transpose/reshape/slice/stack them). The
loader then builds one parameter at a time in the target dtype, straight into its sharding
(`jaxlm.convert.hf.place`), never the whole model on the host. For that to hold, write
`params_from_hf` with:
  - `take(tensors, name, shape)` for every tensor (checks presence and shape; a recipe),
  - `.T`, `.transpose(...)`, `.reshape(...)`, indexing/slicing, arithmetic (float32, as
    before) on what `take` returns, `np.stack`/`np.concatenate` or `stack_layers`,
  - `name in tensors` and iterating over `tensors` (names only, nothing is read);
anything else numpy does (np.allclose, np.asarray) still works by reading the tensors then,
in float32. `params_from_hf` also accepts a plain dict of numpy arrays (tests do), and then
returns float32 arrays as before.

Parameters are built for `cfg.scan_layers` (stacked on a leading layer axis) or unrolled;
`stack_layers`/`unstack_layers` convert between a list of per-layer trees and either layout.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import numpy as np

from jaxlm.convert.lazy import Lazy


class ConversionError(ValueError):
    """Unsupported architecture or a missing/mis-shaped tensor; the CLI exits with code 2."""


def family_module(model_type: str, family: str | None = None):
    """The jaxlm.convert module for an HF model_type (each family spec lists its own). With
    `family` (exporting a jaxlm model), the model_type must belong to that family."""
    from jaxlm.families import registry

    found = registry.hf_converter(model_type, family)
    if found is None:
        supported = ", ".join(sorted(registry.hf_model_types()))
        raise ConversionError(
            f"HF architecture '{model_type}' is not supported"
            + (f" for a {family} model" if family else "") + f"; supported: {supported}")
    return importlib.import_module(f"jaxlm.convert.{found[1]}")


def stack_layers(layers: list[Any], scan: bool, prefix: str = "layers") -> dict[str, Any]:
    """Per-layer trees -> {'layers': stacked} (scan) or {'layers_0': ..., 'layers_1': ...}."""
    if scan:
        # np.stack of recipes is a lazy stack (Lazy.__array_function__).
        return {prefix: jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return {f"{prefix}_{i}": layer for i, layer in enumerate(layers)}


def unstack_layers(stack: dict[str, Any], num_layers: int, prefix: str = "layers") -> list[Any]:
    if prefix in stack:
        return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], stack[prefix])
                for i in range(num_layers)]
    return [stack[f"{prefix}_{i}"] for i in range(num_layers)]


def take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...] | None = None
         ) -> np.ndarray:
    """A tensor by HF name, checked for presence and shape (named in the error): a `Lazy`
    recipe from a lazily opened checkpoint, else a float32 array."""
    if name not in tensors:
        raise ConversionError(f"tensor '{name}' is missing from the checkpoint")
    t = tensors[name]
    if not isinstance(t, Lazy):
        t = np.asarray(t, dtype=np.float32)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ConversionError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
    return t
