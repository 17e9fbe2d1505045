"""Config -> everything a step needs: mesh, model, optimizer, objective, state shardings and
the jitted train/eval steps. The training loop, `bench`, `profile`, `compile`, `eval`, the
benchmarks and the tests all start here, so there is one way a step is wired."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.config import Config, ConfigError
from jaxlm.data.batch import Batch
from jaxlm.families import registry
from jaxlm.families.spec import FamilySpec
from jaxlm.optim import lr_schedule, make_optimizer
from jaxlm.train.state import TrainState, init_state, state_shardings
from jaxlm.train.step import (
    TrainStep,
    jit_eval_step,
    jit_scheduled_train_step,
    make_eval_step,
    make_train_step,
)


@dataclass
class StepSetup:
    """A config wired onto a mesh. Run its steps under `jax.set_mesh(setup.mesh)`."""

    cfg: Config
    family: FamilySpec
    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    loss_fn: Callable
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    train_step: TrainStep  # (state, batch) -> (state, metrics), jitted; donates the state
    eval_step: Callable  # jitted: (params, batch, index) -> sums

    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, initialised in their shardings."""
        with jax.set_mesh(self.mesh):
            return init_state(self.model, self.tx, self.mesh, self.cfg.seed, self.rules)

    def synthetic_batch(self, rng: np.random.Generator) -> Batch:
        """A global host batch of random tokens in the family's layout."""
        return self.family.synthetic_batch(self.cfg, rng)

    def abstract_batch(self) -> Batch:
        """The training batch as sharded ShapeDtypeStructs (for lowering and tracing)."""
        host = self.synthetic_batch(np.random.default_rng(0))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=sharding.batch_sharding(self.mesh, x.ndim)), host)

    def lower(self) -> Any:
        """The train step lowered on abstract inputs (nothing allocated): `.compile()` it for
        memory and cost analysis, or for a topology without its chips (AOT)."""
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(self.abstract_state, self.abstract_batch())

    def flops_per_token(self, params: Any = None, *, causal_halved: bool = True) -> float:
        return self.family.flops_per_token(self.cfg, params or self.abstract_state.params,
                                           causal_halved=causal_halved)

    def with_steps(self, steps: int) -> StepSetup:
        """The same wiring for a run of `steps` optimizer steps: the schedule and optimizer
        for that count, and the train step bound to it (the same compiled program: the count
        is an argument of the jitted step)."""
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train,
                                                                      steps=steps))
        return dataclasses.replace(
            self, cfg=cfg, schedule=lr_schedule(cfg.optim, steps),
            tx=make_optimizer(cfg.optim, steps),
            train_step=dataclasses.replace(self.train_step, total_steps=steps))


def check_fits(cfg: Config, mesh: Mesh) -> None:
    """The model's split dimensions divide their mesh axes, and the global batch divides into
    data-parallel shards of whole micro-batches."""
    sharding.check_model_fits_mesh(cfg.model, mesh)
    dp, accum = sharding.data_parallel_size(mesh), cfg.optim.grad_accum_steps
    if cfg.train.batch_size % (dp * accum):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                          f"data-parallel size {dp} × optim.grad_accum_steps={accum}; choose "
                          f"a multiple of {dp * accum}")


def build(cfg: Config, *, devices: Sequence[Any] | None = None,
          mask_id: int | None = None) -> StepSetup:
    """Wires `cfg` onto a mesh of `devices` (default: all). `mask_id` is the tokenizer's mask
    token for masked-LM families (synthetic data picks one when it is None)."""
    family = registry.of(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh, None if devices is None else list(devices))
    check_fits(cfg, mesh)
    rules = sharding.logical_rules(cfg.mesh)
    model = family.build_model(cfg.model)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    loss_fn = family.loss_fn(cfg, mask_id=mask_id)
    with jax.set_mesh(mesh):
        abstract_state, shardings = state_shardings(model, tx, mesh, rules)

    def step_for(total_steps):  # traced: the optimizer's state does not depend on it
        return make_train_step(model, make_optimizer(cfg.optim, total_steps),
                               lr_schedule(cfg.optim, total_steps), loss_fn=loss_fn,
                               grad_accum_steps=cfg.optim.grad_accum_steps)

    jitted = jit_scheduled_train_step(step_for, shardings, mesh, rules)
    return StepSetup(
        cfg=cfg, family=family, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule,
        loss_fn=loss_fn, abstract_state=abstract_state, state_shardings=shardings,
        train_step=TrainStep(jitted, cfg.train.steps),
        eval_step=jit_eval_step(make_eval_step(model, loss_fn), shardings.params, mesh, rules))
