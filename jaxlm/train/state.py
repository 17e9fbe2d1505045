"""TrainState, and its shardings derived from the parameters' logical annotations."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.families import registry
from jaxlm.train.trainable import EVERYTHING, Trainable


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: base key; step k's dropout key is fold_in(rng, k)


@flax.struct.dataclass
class TrainStateWithReference(TrainState):
    """DPO without LoRA: also the frozen reference model (a copy of the starting parameters),
    kept and checkpointed beside the parameters but never given to the optimizer. A subclass,
    so that every other run's state (and checkpoint) keeps TrainState's four fields."""

    ref_params: Any


def _init_variables(model: nn.Module, rng: jax.Array):
    inputs = registry.of(model.cfg).init_inputs()
    return model.init({"params": rng, "dropout": rng}, *inputs)


def param_shardings(model: nn.Module, mesh: Mesh,
                    rules: Any = sharding.LOGICAL_RULES) -> tuple[Any, Any]:
    """(abstract params, their NamedShardings) from the modules' logical axis names."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract: no array on the mesh needed
    boxed = jax.eval_shape(functools.partial(_init_variables, model), key)
    specs = nn.get_partition_spec(boxed)["params"]
    return nn.unbox(boxed)["params"], sharding.logical_to_sharding(specs, mesh, rules)


def _opt_state_shardings(opt_shapes: Any, params_sharding: Any, params_shape: Any,
                         mesh: Mesh) -> Any:
    """Each optimizer-state leaf that mirrors a parameter (same key path suffix and shape)
    gets that parameter's sharding; everything else (counts, scalars) is replicated."""
    by_path = {}
    for path, s in jax.tree_util.tree_leaves_with_path(params_sharding):
        by_path[tuple(path)] = s
    shapes = {tuple(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params_shape)}

    def pick(path, leaf):
        path = tuple(path)
        for k in range(len(path)):
            suffix = path[k:]
            if suffix in by_path and shapes[suffix] == leaf.shape:
                return by_path[suffix]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Any = sharding.LOGICAL_RULES, *, reference_copy: bool = False,
                    trainable: Trainable = EVERYTHING) -> tuple[TrainState, TrainState]:
    """(abstract TrainState of ShapeDtypeStructs with shardings, TrainState of shardings);
    `reference_copy`: with ref_params, sharded as the parameters. The optimizer state covers
    the `trainable` parameters only."""
    params_shape, params_sharding = param_shardings(model, mesh, rules)
    opt_shape = jax.eval_shape(tx.init, trainable.trained(params_shape))
    opt_sharding = _opt_state_shardings(opt_shape, params_sharding, params_shape, mesh)
    rep = sharding.replicated(mesh)
    shardings = TrainState(step=rep, params=params_sharding, opt_state=opt_sharding, rng=rep)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_shape,
                        opt_state=opt_shape, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    if reference_copy:
        shardings = _with_ref(shardings, params_sharding)
        shapes = _with_ref(shapes, params_shape)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, shardings)
    return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
               seed: int, rules: Any = sharding.LOGICAL_RULES, *,
               reference_copy: bool = False, trainable: Trainable = EVERYTHING) -> TrainState:
    """Initialises parameters and optimizer state directly into their shardings
    (`reference_copy`: and ref_params, a copy of the parameters)."""
    _, shardings = state_shardings(model, tx, mesh, rules, reference_copy=reference_copy,
                                   trainable=trainable)

    def init(rng):
        params = nn.unbox(_init_variables(model, rng))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(trainable.trained(params)),
                          rng=jax.random.fold_in(rng, 1))

    with nn.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=_without_ref(shardings))(jax.random.PRNGKey(seed))
    return with_reference_copy(state, shardings)


def _with_ref(state: TrainState, ref_params: Any) -> TrainStateWithReference:
    return TrainStateWithReference(step=state.step, params=state.params,
                                   opt_state=state.opt_state, rng=state.rng,
                                   ref_params=ref_params)


def _without_ref(state: TrainState) -> TrainState:
    return TrainState(step=state.step, params=state.params, opt_state=state.opt_state,
                      rng=state.rng)


def with_reference_copy(state: TrainState, shardings: TrainState) -> TrainState:
    """When `shardings` is a TrainStateWithReference: the state with ref_params, a copy (own
    buffers) of its parameters; else the state as it is."""
    if not isinstance(shardings, TrainStateWithReference):
        return state
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.ref_params)
    return _with_ref(state, copy(state.params))


def state_from_params(params: Any, tx: optax.GradientTransformation, shardings: TrainState,
                      seed: int, trainable: Trainable = EVERYTHING) -> TrainState:
    """A step-0 TrainState around `params` (already in their shardings): a fresh optimizer
    state and the dropout base key init_state makes (fold_in(PRNGKey(seed), 1))."""
    opt_state = jax.jit(lambda p: tx.init(trainable.trained(p)),
                        out_shardings=shardings.opt_state)(params)
    rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(seed), 1), shardings.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return with_reference_copy(TrainState(step=step, params=params, opt_state=opt_state,
                                          rng=rng), shardings)


def init_params_part(model: nn.Module, shardings: Any, seed: int, rules: Any,
                     part: Callable[[Any], Any]) -> Any:
    """`part(params)` of the initialisation init_state makes (same seed), into `shardings`
    (the part's); XLA drops the rest uncomputed (LoRA's fresh adapters over a loaded base)."""
    def init(rng):
        return part(nn.unbox(_init_variables(model, rng))["params"])

    with nn.logical_axis_rules(rules):
        return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
