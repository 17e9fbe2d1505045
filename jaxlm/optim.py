"""The optax chain: clip_by_global_norm -> AdamW with linear warmup and cosine decay."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int | jax.Array) -> optax.Schedule:
    """Linear warmup from 0 to lr over min(warmup_steps, total_steps - 1) steps, then cosine
    decay to lr * min_lr_ratio at total_steps (optax's warmup_cosine_decay_schedule), as jnp
    arithmetic: `total_steps` may be traced, so one compiled step serves any step count."""
    peak, end = cfg.lr, cfg.lr * cfg.min_lr_ratio

    def schedule(count):
        total = jnp.asarray(total_steps, jnp.float32)
        warmup = jnp.minimum(float(cfg.warmup_steps), jnp.maximum(total - 1.0, 0.0))
        count = jnp.asarray(count, jnp.float32)
        rising = peak * count / jnp.maximum(warmup, 1.0)
        progress = jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
        falling = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, rising, falling)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for projection kernels; biases, norm scales and embeddings are not decayed."""
    def is_kernel(path, _):
        return getattr(path[-1], "key", None) == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: OptimConfig,
                   total_steps: int | jax.Array) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
