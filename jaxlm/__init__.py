"""jaxlm: train, evaluate and serve Transformer language models with JAX/Flax."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, step=None):
    """Loads a run directory as a callable model: `lm(tokens)`, `lm.generate(text)`."""
    from jaxlm.api import load as _load

    return _load(path, step)


__all__ = ["load", "__version__"]
