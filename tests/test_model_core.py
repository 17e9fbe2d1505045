"""Decoder LM structure: causality, logical axes on every parameter, scan == unrolled."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import perf
from jaxlm.families.registry import build_model

TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
        "model.vocab_size=64", "model.max_seq_len=16", "train.seq_len=16"]


def make(extra=()):
    cfg = config_lib.load("tiny", TINY + list(extra))
    model = build_model(cfg.model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), tokens)
    return cfg, model, variables, tokens


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_no_future_leakage(preset):
    _, model, variables, tokens = make([f"model.preset={preset}"])
    params = nn.unbox(variables)["params"]
    logits = model.apply({"params": params}, tokens)
    t = 6
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 64)
    logits2 = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(logits[:, : t + 1]), np.asarray(logits2[:, : t + 1]))
    assert not np.allclose(np.asarray(logits[:, t + 1:]), np.asarray(logits2[:, t + 1:]))


def test_every_parameter_has_logical_axes():
    _, _, variables, _ = make()
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim


def test_scan_and_unrolled_layers_compute_the_same_function():
    _, scanned, variables, tokens = make(["model.scan_layers=true"])
    _, unrolled, _, _ = make(["model.scan_layers=false"])
    params = nn.unbox(variables)["params"]
    layers = params["decoder"]["layers"]
    unrolled_params = dict(params)
    unrolled_params["decoder"] = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], layers)
                                  for i in range(2)}
    np.testing.assert_allclose(scanned.apply({"params": params}, tokens),
                               unrolled.apply({"params": unrolled_params}, tokens), atol=1e-5)


def test_padding_positions_do_not_change_valid_logits():
    _, model, variables, tokens = make(["model.preset=llama"])
    params = nn.unbox(variables)["params"]
    base = model.apply({"params": params}, tokens[:, :8])
    padded = tokens.at[:, 8:].set(0)
    valid = jnp.arange(12)[None] < 8
    out = model.apply({"params": params}, padded, padding_mask_BT=jnp.broadcast_to(valid, (2, 12)))
    np.testing.assert_allclose(out[:, :8], base, atol=1e-5)


def test_materialize_grad_is_the_identity_forward_and_backward():
    from jaxlm.models.layers import materialize_grad
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 8)), jnp.float32)
    f = lambda x: jnp.sum(jnp.tanh(x) * w)
    np.testing.assert_array_equal(materialize_grad(x), x)
    np.testing.assert_array_equal(jax.grad(lambda x: f(materialize_grad(x)))(x), jax.grad(f)(x))


def _train_grads_and_dots(barrier):
    cfg, model, variables, tokens = make([f"model.grad_barrier={barrier}",
                                          "model.scan_layers=false"])
    params = nn.unbox(variables)["params"]
    loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    flops = {b: perf.jaxpr_matmul_flops(jax.grad(loss), params, barrier=b) for b in (False, True)}
    return jax.grad(loss)(params), hlo.count("stablehlo.dot_general"), flops, cfg, tokens.size


def test_grad_barrier_adds_one_product_per_residual_and_leaves_the_gradient_exact():
    grads_on, dots_on, flops_on, cfg, tokens = _train_grads_and_dots("true")
    grads_off, dots_off, flops_off, _, _ = _train_grads_and_dots("false")
    assert dots_on - dots_off == 2 * 2  # two residuals (attention, MLP) in each of 2 layers
    # The FLOP counts leave the identity products out of the model's work, and count them
    # alone when asked: a d x d product per residual, token and layer.
    d = cfg.model.d_model
    assert flops_on[False] == flops_off[False] and flops_off[True] == 0
    assert flops_on[True] == 2 * cfg.model.num_layers * tokens * 2 * d * d
    for a, b in zip(jax.tree.leaves(grads_on), jax.tree.leaves(grads_off), strict=True):
        np.testing.assert_array_equal(a, b)
