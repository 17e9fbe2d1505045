"""jaxlm.setup: one wiring of config -> mesh, model, objective, shardings and jitted steps."""

import jax
import numpy as np
import pytest
from conftest import TINY_MODEL

from jaxlm import config as config_lib
from jaxlm import setup, sharding
from jaxlm.config import ConfigError

SMALL = TINY_MODEL


def test_masked_lm_evaluation_masks_each_batch_differently_and_every_time_alike():
    s = setup.build(config_lib.load("bert-mlm-tiny", SMALL))
    state = s.init_state()
    host = s.synthetic_batch(np.random.default_rng(0))
    with jax.set_mesh(s.mesh):
        batch = sharding.host_batch_to_global(host, s.mesh)
        first, again, second = (jax.device_get(s.eval_step(state.params, batch, i))
                                for i in (0, 0, 1))
    # The same batch at another index is masked elsewhere (a different loss); at the same
    # index exactly as before.
    assert first["nll_sum"] == again["nll_sum"] and first["num_tokens"] == again["num_tokens"]
    assert first["nll_sum"] != second["nll_sum"]


@pytest.mark.parametrize("overrides,needs", [
    (["train.batch_size=6"], "8"),
    (["train.batch_size=8", "optim.grad_accum_steps=2"], "16"),
])
def test_one_batch_size_check_names_the_data_parallel_size_and_accumulation(overrides, needs):
    cfg = config_lib.load("tiny", [*SMALL, *overrides])
    with pytest.raises(ConfigError, match=rf"optim.grad_accum_steps.*multiple of {needs}"):
        setup.build(cfg)


def test_the_step_runs_and_the_flops_are_the_family_specs():
    cfg = config_lib.load("tiny", SMALL)
    s = setup.build(cfg)
    state = s.init_state()
    with jax.set_mesh(s.mesh):
        batch = sharding.host_batch_to_global(s.synthetic_batch(np.random.default_rng(0)), s.mesh)
        state, metrics = s.train_step(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert s.flops_per_token() == s.family.flops_per_token(cfg, s.abstract_state.params)
