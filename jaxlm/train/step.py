"""Pure train and eval steps, jit-compiled with explicit shardings and a donated state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.data.batch import Batch
from jaxlm.objectives import LossFn
from jaxlm.train.state import TrainState
from jaxlm.train.trainable import EVERYTHING, Trainable

# Evaluation draws its randomness (the masked-LM masks) from this key folded with the batch
# index: the same masks at every evaluation, different ones for each batch.
EVAL_SEED = 0


def _split_micro(batch: Batch, n: int) -> Batch:
    return jax.tree.map(lambda v: v.reshape(n, v.shape[0] // n, *v.shape[1:]), batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, loss_fn: LossFn,
                    grad_accum_steps: int = 1, guard: bool = True,
                    trainable: Trainable = EVERYTHING) -> Callable:
    """Returns step(state, batch) -> (state, metrics).

    Gradients are averaged over all unmasked tokens of the global batch, also when it is
    split into `grad_accum_steps` micro-batches. A step whose loss, gradient norm or learning
    rate is not finite leaves the state unchanged (bad_step=1 in its metrics); with finite
    ones AdamW's update is finite (config.validate requires optim.eps > 0). `guard=False`
    leaves that check out, only to measure its cost (benchmarks/step_variants.py). Only the
    `trainable` parameters are differentiated and updated (LoRA: the adapters); the rest
    pass through.
    """

    def grads_of(trained, frozen, micro, rng):
        def f(t):
            return loss_fn(model.apply, trainable.join(t, frozen), micro, rng=rng,
                           deterministic=False)
        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(trained)
        return loss, aux, grads

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        trained, frozen = trainable.split(state.params)
        if grad_accum_steps == 1:
            loss, sums, grads = grads_of(trained, frozen, batch, rng)
        else:
            micro = _split_micro(batch, grad_accum_steps)

            # Sum of per-micro-batch gradients weighted by their token counts, divided by the
            # total count: the gradient of the mean over every counted token of the batch.
            def accumulate(carry, xs):
                grads_acc, loss_acc, sums_acc = carry
                i, mb = xs
                loss, sums, grads = grads_of(trained, frozen, mb, jax.random.fold_in(rng, i))
                n = sums["num_tokens"]
                grads_acc = jax.tree.map(lambda a, g: a + n * g, grads_acc, grads)
                return (grads_acc, loss_acc + n * loss, jax.tree.map(jnp.add, sums_acc, sums)), None

            zeros = jax.tree.map(jnp.zeros_like, trained)
            no_sums = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), jax.eval_shape(
                grads_of, trained, frozen, jax.tree.map(lambda v: v[0], micro), rng)[1])
            (grads, loss_sum, sums), _ = jax.lax.scan(
                accumulate, (zeros, 0.0, no_sums), (jnp.arange(grad_accum_steps), micro))
            denom = jnp.maximum(sums["num_tokens"], 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        lr = schedule(state.step)
        ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr) if guard
              else jnp.bool_(True))

        def update(operands):
            params, opt_state = operands
            updates, new_opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        # A conditional rather than a select of the new or the old state: the update runs
        # only on good steps, in one pass over the state (a select after it needs all of it
        # computed first, then a second pass).
        operands = (trained, state.opt_state)
        new_trained, new_opt_state = (jax.lax.cond(ok, update, lambda o: o, operands)
                                      if guard else update(operands))
        # replace: fields the optimizer never sees (DPO's reference) pass through.
        new_state = state.replace(step=state.step + 1,
                                  params=trainable.join(new_trained, frozen),
                                  opt_state=new_opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                   "num_tokens": sums["num_tokens"], "nll_sum": sums["nll_sum"],
                   "bad_step": (~ok).astype(jnp.int32), **token_means(sums)}
        return new_state, metrics

    return step


def token_means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """X for each `X_sum` of a loss's sums but nll_sum: per-token means (objectives.LossFn),
    e.g. the MoE router losses."""
    n = jnp.maximum(sums["num_tokens"], 1.0)
    return {k[:-4]: v / n for k, v in sums.items() if k.endswith("_sum") and k != "nll_sum"}


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


def jit_scheduled_train_step(step_for: Callable[[jax.Array], Callable],
                             state_shardings: TrainState, mesh: Mesh,
                             rules: Any = sharding.LOGICAL_RULES) -> Callable:
    """jit of (state, batch, total_steps) -> step_for(total_steps)(state, batch): the
    schedule's length is a traced argument, so one compiled program serves every step count
    (a planned train.time_budget, a resumed run with more steps). The state is donated."""
    def traced(state, batch, total_steps):
        with nn.logical_axis_rules(rules):
            return step_for(total_steps)(state, batch)

    rep = sharding.replicated(mesh)
    return jax.jit(traced, in_shardings=(state_shardings, sharding.batch_sharding(mesh), rep),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,))


@dataclass(frozen=True)
class TrainStep:
    """A run's train step, (state, batch) -> (state, metrics): the jitted scheduled step with
    the run's step count bound. `.lower(state, batch)` as a jitted function's."""

    jitted: Callable
    total_steps: int

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        return self.jitted(state, batch, np.int32(self.total_steps))

    def lower(self, state: Any, batch: Any) -> Any:
        total = np.int32(self.total_steps)
        return _BoundStage(self.jitted.lower(state, batch, total), total)


class _BoundStage:
    """A jax stage (Lowered, Compiled) of the scheduled step with the step count bound:
    `.compile()` and calls take (state, batch); everything else is the stage's own."""

    def __init__(self, stage: Any, total_steps: np.int32) -> None:
        self._stage, self._total = stage, total_steps

    def compile(self, *args: Any, **kwargs: Any) -> _BoundStage:
        return _BoundStage(self._stage.compile(*args, **kwargs), self._total)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        return self._stage(state, batch, self._total)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage, name)


def jit_eval_step(step: Callable, params_shardings: Any, mesh: Mesh,
                  rules: Any = sharding.LOGICAL_RULES) -> Callable:
    def traced(params, batch, index):
        with nn.logical_axis_rules(rules):
            return step(params, batch, index)

    rep = sharding.replicated(mesh)
    return jax.jit(traced, in_shardings=(params_shardings, sharding.batch_sharding(mesh), rep),
                   out_shardings=rep)
