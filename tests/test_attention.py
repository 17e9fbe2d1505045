"""Attention against a float64 numpy reference; masks; RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import attention as attn


def numpy_attention(q, k, v, mask):
    """float64 softmax(QK^T/sqrt(d))V with grouped kv heads; mask [B,T,S] True = allowed."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)
            logits = q[b, :, n] @ k[b, :, kv].T / np.sqrt(H)
            if mask is not None:
                logits = np.where(mask[b], logits, -np.inf)
            logits -= logits.max(axis=-1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=-1, keepdims=True)
            out[b, :, n] = p @ v[b, :, kv]
    return out


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_matches_float64_numpy(impl, num_kv_heads):
    rng = np.random.default_rng(0)
    B, T, N, H = 2, 7, 4, 8
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, num_kv_heads, H)).astype(np.float32)
    v = rng.normal(size=(B, T, num_kv_heads, H)).astype(np.float32)
    valid = np.ones((B, T), bool)
    valid[1, 5:] = False
    mask = np.asarray(attn.causal_mask(T, T))[None] & np.asarray(attn.padding_mask(valid, T))
    got = attn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                         impl=impl)
    want = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def test_masks():
    np.testing.assert_array_equal(attn.causal_mask(3, 3), np.tril(np.ones((3, 3), bool)))
    # A query at absolute position 2 of a 4-key cache sees keys 0..2.
    np.testing.assert_array_equal(attn.causal_mask(1, 4, 2), [[True, True, True, False]])
    seg = jnp.array([[1, 1, 2, 2]])
    np.testing.assert_array_equal(
        attn.segment_mask(seg, seg)[0],
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(attn.local_window_mask(4, 4, 2),
                                  [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])


def test_fully_masked_rows_are_finite():
    q = k = v = jnp.ones((1, 3, 2, 4))
    mask = jnp.zeros((1, 3, 3), bool)
    assert np.isfinite(np.asarray(attn.attention(q, k, v, mask))).all()


def test_rope_is_a_rotation_that_depends_on_relative_position():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    def score(pq, pk):
        rq = attn.rope(q, jnp.array([[pq]]))
        rk = attn.rope(k, jnp.array([[pk]]))
        return float(jnp.sum(rq * rk))
    np.testing.assert_allclose(np.linalg.norm(attn.rope(q, jnp.array([[5]]))),
                               np.linalg.norm(q), rtol=1e-6)
    np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
    assert abs(score(3, 1) - score(3, 2)) > 1e-4


def test_attention_gradient_matches_between_implementations():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32) for _ in range(3))
    mask = jnp.broadcast_to(attn.causal_mask(5, 5), (2, 5, 5))
    def loss(impl):
        return jax.grad(lambda q, k, v: jnp.sum(attn.attention(q, k, v, mask, impl=impl) ** 2),
                        argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(loss("reference"), loss("xla")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
