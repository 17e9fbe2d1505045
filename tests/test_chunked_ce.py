"""The chunked cross entropy (train.loss_chunk): loss and gradients against a float64 numpy
reference and against the whole-logits cross entropy, through the decoder model, sharded,
and the config it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL

from jaxlm import config as config_lib
from jaxlm import setup as setup_lib
from jaxlm.chunked_ce import chunked_cross_entropy
from jaxlm.config import ConfigError
from jaxlm.objectives import cross_entropy

B, T, D, V = 3, 16, 8, 37


@pytest.fixture(scope="module")
def inputs():
    r = np.random.default_rng(0)
    return (r.normal(size=(B, T, D)), r.normal(size=(V, D)), r.integers(0, V, (B, T)),
            (r.random((B, T)) > 0.3).astype(np.float64))


def _numpy_reference(x, w, t, m):
    """Mean masked NLL of softmax(x @ wᵀ) and its gradients, in float64."""
    logits = x @ w.T
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(p, t[..., None], -1)[..., 0])
    n = m.sum()
    g = (p - np.eye(V)[t]) * (m / n)[..., None]
    return (nll * m).sum() / n, (nll * m).sum(), g @ w, np.einsum("btv,btd->vd", g, x)


def test_matches_a_float64_reference_in_loss_and_gradients(inputs):
    x, w, t, m = inputs
    loss64, nll64, dx64, dw64 = _numpy_reference(x, w, t, m)
    f = lambda x, w: chunked_cross_entropy(x, w, jnp.asarray(t), jnp.asarray(m, jnp.float32),
                                           chunk=4)
    (loss, sums), (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(float(loss), loss64, rtol=1e-6)
    np.testing.assert_allclose(float(sums["nll_sum"]), nll64, rtol=1e-6)
    assert float(sums["num_tokens"]) == m.sum()
    np.testing.assert_allclose(np.asarray(dx), dx64, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), dw64, atol=1e-6)
    # Not differentiated (evaluation), the forward-only path gives the same loss.
    np.testing.assert_allclose(float(jax.jit(f)(x.astype(np.float32),
                                                w.astype(np.float32))[0]), loss64, rtol=1e-6)


@pytest.mark.parametrize("kw,chunk", [
    (dict(label_smoothing=0.1, z_loss=1e-2, softcap=2.0), 4),
    (dict(label_smoothing=0.1), 16),  # one chunk: the whole sequence
])
def test_equals_the_whole_logits_cross_entropy_with_every_option(inputs, kw, chunk):
    x, w, t, m = (jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else jnp.asarray(a)
                  for a in inputs)
    cap = kw.get("softcap", 0.0)
    ce = {k: v for k, v in kw.items() if k != "softcap"}

    def whole(x, w):
        logits = jnp.einsum("btd,vd->btv", x, w)
        return cross_entropy(cap * jnp.tanh(logits / cap) if cap else logits, t, m, **ce)

    def chunked(x, w):
        return chunked_cross_entropy(x, w, t, m, chunk=chunk, **kw)

    (l0, s0), g0 = jax.jit(jax.value_and_grad(whole, (0, 1), has_aux=True))(x, w)
    (l1, s1), g1 = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(x, w)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(float(s1["nll_sum"]), float(s0["nll_sum"]), rtol=1e-6)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_refuses_a_chunk_that_does_not_divide_the_sequence(inputs):
    x, w, t, _ = inputs
    with pytest.raises(ValueError, match="does not divide"):
        chunked_cross_entropy(jnp.asarray(x), jnp.asarray(w), jnp.asarray(t), chunk=5)


def _loss_and_grads(extra, devices):
    cfg = config_lib.load("tiny", [*TINY_MODEL, *extra])
    s = setup_lib.build(cfg, devices=devices)
    with jax.set_mesh(s.mesh):
        state = s.init_state()
        batch = s.synthetic_batch(np.random.default_rng(0))
        f = jax.jit(jax.value_and_grad(
            lambda p: s.loss_fn(s.model.apply, p, batch, rng=None, deterministic=True),
            has_aux=True))
        (loss, _), grads = f(state.params)
    return float(loss), grads


@pytest.mark.parametrize("extra,devices", [
    (["mesh.data=1"], 1),
    (["mesh.data=1", "model.tie_embeddings=false", "model.final_logit_softcap=5.0"], 1),
    (["mesh.data=4", "mesh.tensor=2"], 8),  # vocabulary split over tensor, batch over data
])
def test_the_decoder_trains_on_the_same_loss_and_gradients(extra, devices):
    l0, g0 = _loss_and_grads(extra, jax.devices()[:devices])
    l1, g1 = _loss_and_grads([*extra, "train.loss_chunk=8"], jax.devices()[:devices])
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


@pytest.mark.parametrize("extra,needle", [
    (["train.loss_chunk=5"], "divisor of train.seq_len=32"),
    (["train.loss_chunk=-1"], "divisor of train.seq_len"),
    (["model.preset=bert", "train.loss_chunk=8"], "decoder-only"),
])
def test_config_refuses_chunks_it_cannot_use(extra, needle):
    with pytest.raises(ConfigError, match=needle):
        config_lib.load("tiny", [*TINY_MODEL, *extra])
