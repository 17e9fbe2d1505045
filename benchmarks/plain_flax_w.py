"""The plain step jaxlm's training step is measured against: a Flax linen + optax GPT-2 on
workload W, what a careful user writes by hand (fused QKV, jit with the state donated).

Copied from the performance issue's reference, ../shared/reference/plain_flax_w.py (same
model, optimizer and step), with its module-level timing loop turned into functions that
benchmarks/vs_torch.py calls on the batches the other columns train on.
`python benchmarks/plain_flax_w.py [steps]` prints its training tokens/s as the original did.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

L, D, H, F, V, T, B = 4, 256, 4, 1024, 8192, 256, 16


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        qkv = nn.Dense(3 * D)(h).reshape(B, T, 3, H, D // H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D // H)
        att = jnp.where(jnp.tril(jnp.ones((T, T), bool)), att, -1e9)
        y = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(att, -1), v).reshape(B, T, D)
        x = x + nn.Dense(D)(y)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(D)(nn.gelu(nn.Dense(F)(h)))


class GPT(nn.Module):
    @nn.compact
    def __call__(self, idx):
        emb = nn.Embed(V, D)
        x = emb(idx) + self.param("pos", nn.initializers.normal(0.02), (T, D))
        for _ in range(L):
            x = Block()(x)
        return emb.attend(nn.LayerNorm()(x))


def make() -> tuple[Any, Any]:
    """(jitted step(state, x, y) -> (state, loss) with the state donated, initial state)."""
    model = GPT()
    params = model.init(jax.random.key(0), jnp.zeros((B, T), jnp.int32))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1))

    def step(state, x, y):
        params, opt = state

        def loss_fn(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, upd), opt), loss

    return jax.jit(step, donate_argnums=(0,)), (params, tx.init(params))


class PlainRunner:
    """The plain step with its state, on device copies of (inputs, targets) batches."""

    def __init__(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.step, self.state = make()
        self.batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches]

    def round(self, steps: int) -> float:
        """Seconds for `steps` steps dispatched asynchronously, to the last one's loss."""
        t0 = time.perf_counter()
        for i in range(steps):
            self.state, loss = self.step(self.state, *self.batches[i % len(self.batches)])
        loss.block_until_ready()
        return time.perf_counter() - t0


def main() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, V, size=(8, B, T + 1)).astype(np.int32)
    runner = PlainRunner([(d[:, :-1], d[:, 1:]) for d in data])
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    runner.round(3)
    rates = [B * T * (steps // 3) / runner.round(steps // 3) for _ in range(3)]
    print(statistics.median(rates))


if __name__ == "__main__":
    main()
