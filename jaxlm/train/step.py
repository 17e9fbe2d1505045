"""Pure train and eval steps, jit-compiled with explicit shardings and a donated state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.data.batch import Batch
from jaxlm.objectives import LossFn
from jaxlm.train.state import TrainState

# Evaluation draws its randomness (the masked-LM masks) from this key folded with the batch
# index: the same masks at every evaluation, different ones for each batch.
EVAL_SEED = 0


def _split_micro(batch: Batch, n: int) -> Batch:
    return jax.tree.map(lambda v: v.reshape(n, v.shape[0] // n, *v.shape[1:]), batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, loss_fn: LossFn,
                    grad_accum_steps: int = 1) -> Callable:
    """Returns step(state, batch) -> (state, metrics).

    Gradients are averaged over all unmasked tokens of the global batch, also when it is
    split into `grad_accum_steps` micro-batches. A step whose loss or gradient norm is not
    finite leaves the state unchanged (bad_step=1 in its metrics).
    """

    def grads_of(params, micro, rng):
        def f(p):
            return loss_fn(model.apply, p, micro, rng=rng, deterministic=False)
        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, aux, grads

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum_steps == 1:
            loss, aux, grads = grads_of(state.params, batch, rng)
            nll_sum, num_tokens = aux["nll_sum"], aux["num_tokens"]
        else:
            micro = _split_micro(batch, grad_accum_steps)

            # Sum of per-micro-batch gradients weighted by their token counts, divided by the
            # total count: the gradient of the mean over every counted token of the batch.
            def accumulate(carry, xs):
                grads_acc, loss_acc, nll_acc, n_acc = carry
                i, mb = xs
                loss, aux, grads = grads_of(state.params, mb, jax.random.fold_in(rng, i))
                n = aux["num_tokens"]
                grads_acc = jax.tree.map(lambda a, g: a + n * g, grads_acc, grads)
                return (grads_acc, loss_acc + n * loss, nll_acc + aux["nll_sum"], n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss_sum, nll_sum, num_tokens), _ = jax.lax.scan(
                accumulate, (zeros, 0.0, 0.0, 0.0), (jnp.arange(grad_accum_steps), micro))
            denom = jnp.maximum(num_tokens, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # Also guard the update itself: a non-finite learning rate gives finite gradients.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(
            optax.tree.norm(updates))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = TrainState(step=state.step + 1,
                               params=keep(new_params, state.params),
                               opt_state=keep(new_opt_state, state.opt_state),
                               rng=state.rng)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "num_tokens": num_tokens, "nll_sum": nll_sum,
                   "bad_step": (~ok).astype(jnp.int32)}
        return new_state, metrics

    return step


def make_eval_step(model: nn.Module, loss_fn: LossFn) -> Callable:
    """eval(params, batch, index) -> the loss's sums (nll_sum, num_tokens, ...)."""
    def step(params: Any, batch: Batch, index: jax.Array) -> dict[str, jax.Array]:
        rng = jax.random.fold_in(jax.random.PRNGKey(EVAL_SEED), index)
        _, aux = loss_fn(model.apply, params, batch, rng=rng, deterministic=True)
        return aux

    return step


def jit_train_step(step: Callable, state_shardings: TrainState, mesh: Mesh,
                   rules: Any = sharding.LOGICAL_RULES) -> Callable:
    """jit with explicit in/out shardings; the state's buffers are donated."""
    def traced(state, batch):
        with nn.logical_axis_rules(rules):
            return step(state, batch)

    batch_shard = sharding.batch_sharding(mesh)
    return jax.jit(traced, in_shardings=(state_shardings, batch_shard),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def jit_eval_step(step: Callable, params_shardings: Any, mesh: Mesh,
                  rules: Any = sharding.LOGICAL_RULES) -> Callable:
    def traced(params, batch, index):
        with nn.logical_axis_rules(rules):
            return step(params, batch, index)

    rep = sharding.replicated(mesh)
    return jax.jit(traced, in_shardings=(params_shardings, sharding.batch_sharding(mesh), rep),
                   out_shardings=rep)
