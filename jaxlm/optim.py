"""The optax chain: clip_by_global_norm -> AdamW with linear warmup and cosine decay."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for projection kernels; biases, norm scales and embeddings are not decayed."""
    def is_kernel(path, _):
        return getattr(path[-1], "key", None) == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
