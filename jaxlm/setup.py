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

from jaxlm import dpo, lora, sharding
from jaxlm.config import Config, ConfigError
from jaxlm.data.batch import Batch
from jaxlm.families import registry
from jaxlm.families.spec import FamilySpec
from jaxlm.optim import lr_schedule, make_optimizer
from jaxlm.train.state import (
    TrainState,
    TrainStateWithReference,
    init_state,
    state_shardings,
)
from jaxlm.train.step import (
    TrainStep,
    jit_eval_step,
    jit_scheduled_train_step,
    make_eval_step,
    make_train_step,
)
from jaxlm.train.trainable import EVERYTHING, Trainable


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
    eval_step: Callable  # jitted: (eval_inputs(state), batch, index) -> sums
    # DPO: state -> the reference model's parameters (jaxlm.dpo); None for other objectives.
    reference: Callable[[TrainState], Any] | None = None
    # The parameters the step trains and the optimizer holds (LoRA: the adapters alone).
    trainable: Trainable = EVERYTHING

    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, initialised in their shardings."""
        with jax.set_mesh(self.mesh):
            return init_state(self.model, self.tx, self.mesh, self.cfg.seed, self.rules,
                              reference_copy=isinstance(self.state_shardings,
                                                        TrainStateWithReference),
                              trainable=self.trainable)

    def eval_inputs(self, state: TrainState) -> Any:
        """What eval_step takes first: the parameters, or (DPO) the state without its
        optimizer state, from which the step reads the reference."""
        return state.params if self.reference is None else state.replace(opt_state=None)

    def synthetic_batch(self, rng: np.random.Generator) -> Batch:
        """A global host batch of random tokens in the family's layout (DPO: pairs)."""
        if self.reference is not None:
            return dpo.synthetic_batch(self.family.synthetic_batch(self.cfg, rng),
                                       self.family.synthetic_batch(self.cfg, rng))
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
        flops = self.family.flops_per_token(self.cfg, params or self.abstract_state.params,
                                            causal_halved=causal_halved)
        if self.reference is not None:  # per position of a pair: both sequences, reference
            flops *= dpo.FLOPS_FACTOR
        return flops

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
    model = family.build_model(lora.adapted(cfg.model, cfg.lora))
    trainable = lora.trainable(cfg.lora)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    loss_fn, reference = family.loss_fn(cfg, mask_id=mask_id), None
    if cfg.train.objective == "dpo":
        loss_fn, reference = dpo.loss_fn(cfg), dpo.reference_fn(cfg)
    with jax.set_mesh(mesh):
        abstract_state, shardings = state_shardings(
            model, tx, mesh, rules,
            reference_copy=dpo.keeps_reference_copy(cfg),
            trainable=trainable)

    def step_for(total_steps):  # traced: the optimizer's state does not depend on it
        step = make_train_step(model, make_optimizer(cfg.optim, total_steps),
                               lr_schedule(cfg.optim, total_steps), loss_fn=loss_fn,
                               grad_accum_steps=cfg.optim.grad_accum_steps,
                               trainable=trainable)
        return step if reference is None else dpo.train_step_with_reference(
            step, model.apply, reference)

    jitted = jit_scheduled_train_step(step_for, shardings, mesh, rules)
    eval_step, eval_shardings = make_eval_step(model, loss_fn), shardings.params
    if reference is not None:
        eval_step = dpo.eval_step_with_reference(eval_step, model.apply, reference)
        eval_shardings = shardings.replace(opt_state=None)
    return StepSetup(
        cfg=cfg, family=family, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule,
        loss_fn=loss_fn, abstract_state=abstract_state, state_shardings=shardings,
        train_step=TrainStep(jitted, cfg.train.steps),
        eval_step=jit_eval_step(eval_step, eval_shardings, mesh, rules), reference=reference,
        trainable=trainable)
