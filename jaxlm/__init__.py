"""jaxlm: train, evaluate and serve Transformer language models with JAX/Flax."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, step=None, *, dtype=None, mesh=None):
    """Loads a run directory, an export or an HF model directory as a callable model:
    `lm(tokens)`, `lm.generate(text)`; see jaxlm.api.load for `dtype` and `mesh`."""
    from jaxlm.api import load as _load

    return _load(path, step, dtype=dtype, mesh=mesh)


__all__ = ["load", "__version__"]
