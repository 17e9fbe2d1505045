"""jaxlm.models.matmul.project (the CPU's written-out backward pass) against float64 numpy:
values and gradients, one and two contracted axes, bfloat16 operands, a sharded batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.config import MeshConfig
from jaxlm.models.matmul import project


def _numpy_grads(x, w, g, in_axes):
    """y = x·w and the gradients of sum(y * g), in float64 (x: [..., *in], w: [*in, *out])."""
    x2 = x.reshape(-1, int(np.prod(w.shape[:in_axes]))).astype(np.float64)
    w2 = w.reshape(x2.shape[1], -1).astype(np.float64)
    g2 = g.reshape(x2.shape[0], -1).astype(np.float64)
    y = (x2 @ w2).reshape(g.shape)
    return y, (g2 @ w2.T).reshape(x.shape), (x2.T @ g2).reshape(w.shape)


@pytest.mark.parametrize("x_shape,w_shape,in_axes", [
    ((3, 5, 8), (8, 6), 1),            # [B, T, D] · [D, F]
    ((3, 5, 4, 2), (4, 2, 7), 2),      # [B, T, N, H] · [N, H, D]: the attention output
    ((3, 5, 8), (8, 2, 3), 1),         # [B, T, D] · [D, N, H]: a head projection
])
def test_values_and_gradients_match_float64(x_shape, w_shape, in_axes):
    rng = np.random.default_rng(0)
    x, w = (rng.normal(size=s).astype(np.float32) for s in (x_shape, w_shape))
    out_shape = x_shape[:len(x_shape) - in_axes] + w_shape[in_axes:]
    g = rng.normal(size=out_shape).astype(np.float32)
    y, (dx, dw) = jax.jit(lambda x, w: (project(x, w, in_axes), jax.grad(
        lambda x, w: jnp.sum(project(x, w, in_axes) * g), (0, 1))(x, w)))(x, w)
    want_y, want_dx, want_dw = _numpy_grads(x, w, g, in_axes)
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_operands_with_float32_product():
    """The tied output projection of a bfloat16 model: float32 logits; gradients in the
    operands' dtype, and a float32 cotangent is not rounded before its products."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 5)), jnp.bfloat16)
    g = rng.normal(size=(2, 3, 5)).astype(np.float32)
    y = project(x, w, out_dtype=jnp.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(project(x, w, out_dtype=jnp.float32) * g),
                      (0, 1))(x, w)
    want_y, want_dx, want_dw = _numpy_grads(np.asarray(x, np.float32),
                                            np.asarray(w, np.float32), g, 1)
    assert y.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float32), want_dw, rtol=1e-2, atol=1e-2)
    assert project(x, w).dtype == jnp.bfloat16


def test_sharded_batch_and_features():
    """Batch over `data`, output features over `tensor`: same values as unsharded."""
    mesh = sharding.make_mesh(MeshConfig(data=4, tensor=2))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4, 16)).astype(np.float32)
    w = rng.normal(size=(16, 6)).astype(np.float32)
    spec = jax.sharding.PartitionSpec
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec("data")))
        ws = jax.device_put(w, jax.sharding.NamedSharding(mesh, spec(None, "tensor")))
        loss = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(project(x, w))), (0, 1)))
        got = loss(xs, ws)
    want = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum("btd,df->btf", x, w))),
                              (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_plain_dot_where_the_token_axis_is_sharded():
    """Under context parallelism flattening [batch, seq] would gather the sequence shards:
    the products keep their [batch, seq, in] operands there, and are 2-D without it."""
    x, w = jnp.ones((8, 4, 16)), jnp.ones((16, 6))

    def operand_ranks(mesh_cfg):
        with jax.set_mesh(sharding.make_mesh(mesh_cfg)):
            jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(project(x, w)), (0, 1)))(x, w)
        return {v.aval.ndim for e in jaxpr.eqns if e.primitive.name == "dot_general"
                for v in e.invars}

    assert 3 in operand_ranks(MeshConfig(data=4, context=2))
    assert operand_ranks(MeshConfig(data=-1)) == {2}
