"""Loss against a hand computation; the learning-rate schedule; weight-decay masking."""

import math

import jax.numpy as jnp
import numpy as np

from jaxlm.config import OptimConfig
from jaxlm.objectives import cross_entropy
from jaxlm.optim import decay_mask, lr_schedule


def test_cross_entropy_matches_hand_computation_with_mask():
    logits = np.array([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]], np.float64)
    targets = np.array([[1, 0]])
    mask = np.array([[1.0, 0.0]])
    # Only the first token counts: -log softmax([1, 2, .5])[1].
    want = -(2.0 - math.log(math.exp(1) + math.exp(2) + math.exp(0.5)))
    loss, aux = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                              jnp.asarray(mask))
    assert abs(float(loss) - want) < 1e-6
    assert float(aux["num_tokens"]) == 1.0
    full, _ = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    want2 = -(0.0 - math.log(2 + math.exp(3)))
    assert abs(float(full) - (want + want2) / 2) < 1e-6


def test_cross_entropy_is_float32_for_bfloat16_logits():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 50)), jnp.bfloat16)
    loss, _ = cross_entropy(logits, jnp.zeros((2, 3), jnp.int32))
    assert loss.dtype == jnp.float32


def test_label_smoothing_and_z_loss():
    logits = jnp.asarray([[[2.0, 0.0, -1.0]]])
    t = jnp.asarray([[0]])
    base, _ = cross_entropy(logits, t)
    smooth, _ = cross_entropy(logits, t, label_smoothing=0.1)
    lz = np.log(np.exp(2) + 1 + np.exp(-1))
    want = 0.9 * (lz - 2) + 0.1 * (lz - np.mean([2, 0, -1]))
    assert abs(float(smooth) - want) < 1e-6
    z, _ = cross_entropy(logits, t, z_loss=1e-2)
    assert abs(float(z) - float(base) - 1e-2 * lz**2) < 1e-6


def test_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    s = lr_schedule(cfg, 110)
    assert float(s(0)) == 0.0
    assert abs(float(s(5)) - 0.5e-3) < 1e-9
    assert abs(float(s(10)) - 1e-3) < 1e-9
    mid = 10 + 50  # halfway through the cosine: floor + (peak - floor) / 2
    assert abs(float(s(mid)) - (1e-4 + 0.45e-3)) < 1e-8
    assert abs(float(s(110)) - 1e-4) < 1e-9
    vals = [float(s(i)) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_weight_decay_only_on_kernels():
    params = {"embed": {"embedding": 1}, "ln": {"scale": 1, "bias": 1},
              "mlp": {"wi": {"kernel": 1, "bias": 1}}, "pos_embed": 1}
    m = decay_mask(params)
    assert m["mlp"]["wi"]["kernel"] is True
    assert not any([m["embed"]["embedding"], m["ln"]["scale"], m["ln"]["bias"],
                    m["mlp"]["wi"]["bias"], m["pos_embed"]])
