"""The optax chain: clip_by_global_norm -> AdamW with linear warmup, then a cosine decay or
warmup-stable-decay."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int | jax.Array) -> optax.Schedule:
    """Linear warmup from 0 to lr over min(warmup_steps, total_steps - 1) steps, then down to
    lr * min_lr_ratio at total_steps: a cosine over the rest (optax's
    warmup_cosine_decay_schedule), or with schedule=wsd the lr held until `decay_start` and
    a line from there. As jnp arithmetic: `total_steps` may be traced, so one compiled step
    serves any step count."""
    peak, end = cfg.lr, cfg.lr * cfg.min_lr_ratio

    def schedule(count):
        total = jnp.asarray(total_steps, jnp.float32)
        warmup = _warmup(jnp, cfg, total)
        count = jnp.asarray(count, jnp.float32)
        rising = peak * count / jnp.maximum(warmup, 1.0)
        if cfg.schedule == "wsd":
            start = _decay_start(jnp, cfg, total, warmup)
            progress = jnp.clip((count - start) / jnp.maximum(total - start, 1.0), 0.0, 1.0)
            falling = peak + (end - peak) * progress
        else:
            progress = jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
            falling = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, rising, falling)

    return schedule


def _warmup(xp: Any, cfg: OptimConfig, total: Any) -> Any:
    return xp.minimum(xp.float32(cfg.warmup_steps), xp.maximum(total - 1.0, 0.0))


def _decay_start(xp: Any, cfg: OptimConfig, total: Any, warmup: Any) -> Any:
    """schedule=wsd: the last count at the peak, in float32 for jnp and numpy alike (so the
    host's answer is the compiled schedule's)."""
    decaying = xp.maximum(xp.floor(xp.float32(cfg.decay_fraction) * total), 1.0)
    return xp.maximum(total - decaying, warmup)


def decay_start(cfg: OptimConfig, total_steps: int) -> int:
    """schedule=wsd: the last step count (from 0) at which a run of `total_steps` steps
    still holds the peak lr; the lr of every count up to it does not depend on the total."""
    total = np.float32(total_steps)
    return int(_decay_start(np, cfg, total, _warmup(np, cfg, total)))


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
