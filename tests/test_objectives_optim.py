"""Loss against a hand computation; masked-LM masking (rate, 80/10/10 split, re-masking per
step); the learning-rate schedule; weight-decay masking."""

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.config import OptimConfig
from jaxlm.data.batch import MLMBatch
from jaxlm.objectives import cross_entropy, mask_tokens, masked_lm_loss
from jaxlm.optim import decay_mask, decay_start, lr_schedule
from jaxlm.train.state import TrainState
from jaxlm.train.step import make_train_step


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


def test_schedule_equals_optax_warmup_cosine_for_static_and_traced_step_counts():
    """The jnp schedule (step count may be traced, for train.time_budget) is optax's
    warmup_cosine_decay_schedule, the reference it replaced."""
    cfg = OptimConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1)
    for total in (1, 5, 11, 40, 300):
        warmup = min(cfg.warmup_steps, max(total - 1, 0))
        reference = optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warmup, max(total, warmup + 1), cfg.lr * cfg.min_lr_ratio)
        counts = np.arange(total + 3)
        ours = jax.jit(lambda c, t: jax.vmap(lr_schedule(cfg, t))(c))(counts, total)
        np.testing.assert_allclose(ours, [reference(c) for c in counts], rtol=1e-5, atol=1e-9)


def _wsd_float64(cfg: OptimConfig, total: int, count: int) -> float:
    """Warmup-stable-decay written out in float64: warmup as the cosine schedule's, the peak
    held, then a line to lr * min_lr_ratio over the last floor(decay_fraction * total)
    steps (at least one)."""
    warmup = min(cfg.warmup_steps, max(total - 1, 0))
    start = max(total - max(math.floor(cfg.decay_fraction * total), 1), warmup)
    if count < warmup:
        return cfg.lr * count / max(warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    return cfg.lr + (end - cfg.lr) * min(max((count - start) / max(total - start, 1), 0), 1)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0])
def test_wsd_schedule_equals_a_float64_reference_and_holds_the_peak_until_decay_start(fraction):
    cfg = OptimConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd",
                      decay_fraction=fraction)
    for total in (1, 5, 11, 40, 301, 8295):
        counts = np.arange(total + 3)
        ours = np.asarray(jax.jit(lambda c, t: jax.vmap(lr_schedule(cfg, t))(c))(counts, total))
        np.testing.assert_allclose(ours, [_wsd_float64(cfg, total, c) for c in counts],
                                   rtol=1e-5, atol=1e-9)
        start = decay_start(cfg, total)
        if cfg.warmup_steps < start < total:  # held through `start`, falling right after
            assert ours[start] == np.float32(cfg.lr) > ours[start + 1]
    # The host's decay_start is the compiled schedule's for every count (float32 alike; 0.7
    # is no float32 number, and 0.7 * total lands near integers).
    cfg = dataclasses.replace(cfg, decay_fraction=0.7)
    totals = np.arange(12, 3000)
    starts = np.array([decay_start(cfg, int(t)) for t in totals])
    around = jax.jit(jax.vmap(lambda t, c: jax.vmap(lr_schedule(cfg, t))(c + jnp.arange(2))))
    lrs = np.asarray(around(totals, starts))
    assert (lrs[:, 0] == np.float32(cfg.lr)).all() and (lrs[:, 1] < lrs[:, 0]).all()


def test_weight_decay_only_on_kernels():
    params = {"embed": {"embedding": 1}, "ln": {"scale": 1, "bias": 1},
              "mlp": {"wi": {"kernel": 1, "bias": 1}}, "pos_embed": 1}
    m = decay_mask(params)
    assert m["mlp"]["wi"]["kernel"] is True
    assert not any([m["embed"]["embedding"], m["ln"]["scale"], m["ln"]["bias"],
                    m["mlp"]["wi"]["bias"], m["pos_embed"]])


# ------------------------------------------------------------------ masked-LM masking

def _binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mask_tokens_rate_and_80_10_10_split():
    """On 2^18 tokens: 15% of the maskable tokens are picked, never a padding one; of the
    picked, 80% become the mask id, 10% a uniformly drawn token, 10% stay; the others are
    untouched. Counts are held to 5 binomial standard deviations."""
    V, mask_id = 1000, 999
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V - 1, (512, 512)).astype(np.int32)  # never the mask id
    lengths = rng.integers(1, 513, 512)
    maskable = np.arange(512)[None, :] < lengths[:, None]  # right padding
    out, picked = mask_tokens(jnp.asarray(tokens), jnp.asarray(maskable),
                              jax.random.PRNGKey(1), mask_id=mask_id, vocab_size=V)
    out, picked = np.asarray(out), np.asarray(picked)
    n = int(maskable.sum())
    assert not picked[~maskable].any()
    assert _binomial_ok(int(picked.sum()), n, 0.15)
    np.testing.assert_array_equal(out[~picked], tokens[~picked])
    was, now = tokens[picked], out[picked]
    k = len(was)
    # A random replacement is the mask id or the original token 1 time in V each.
    assert _binomial_ok(int((now == mask_id).sum()), k, 0.8 + 0.1 / V)
    assert _binomial_ok(int((now == was).sum()), k, 0.1 + 0.1 / V)
    replaced = now[(now != mask_id) & (now != was)]
    assert _binomial_ok(len(replaced), k, 0.1 * (1 - 2 / V))
    # The replacements are uniform over the vocabulary: each tenth of it gets a tenth.
    hist = np.bincount(replaced // (V // 10), minlength=10)
    assert len(hist) == 10 and all(_binomial_ok(int(c), len(replaced), 0.1) for c in hist)
    # Another rate is honoured too.
    _, picked30 = mask_tokens(jnp.asarray(tokens), jnp.asarray(maskable),
                              jax.random.PRNGKey(1), mask_id=mask_id, vocab_size=V, rate=0.3)
    assert _binomial_ok(int(np.asarray(picked30).sum()), n, 0.3)


def test_masks_differ_between_keys_and_between_train_steps():
    """Dynamic masking: other keys pick other positions (as independent draws: the overlap
    of two 15% picks is ~15% of either), and the train step draws a new key every step, so
    the same batch is masked differently at each step."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 63, (8, 64)), jnp.int32)
    maskable = jnp.ones(tokens.shape, bool)
    picks = [np.asarray(mask_tokens(tokens, maskable, jax.random.PRNGKey(s), mask_id=63,
                                    vocab_size=64)[1]) for s in (0, 1)]
    overlap = (picks[0] & picks[1]).sum() / picks[0].sum()
    assert 0.05 < overlap < 0.3, overlap

    # A train step around a bare lookup-table "model" (no build_model needed), with a
    # learning rate of 0: the loss of the same batch changes only if its mask does.
    V = 64
    model = types.SimpleNamespace(
        apply=lambda variables, x, **kw: jnp.take(variables["params"]["logits"], x, axis=0))
    params = {"logits": jax.random.normal(jax.random.PRNGKey(2), (V, V))}
    tx = optax.sgd(0.0)
    loss_fn = functools.partial(masked_lm_loss, mask_id=V - 1, vocab_size=V)
    step = jax.jit(make_train_step(model, tx, optax.constant_schedule(0.0), loss_fn=loss_fn))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    batch = MLMBatch(inputs=tokens, loss_mask=jnp.ones(tokens.shape, jnp.float32))
    seen = []
    for _ in range(4):
        state, metrics = step(state, batch)
        seen.append((float(metrics["num_tokens"]), float(metrics["nll_sum"])))
    assert len(set(seen)) == 4, seen  # 4 different masks of the same 512 tokens
    assert all(_binomial_ok(int(n), 512, 0.15) for n, _ in seen), seen


def _lookup_step(lr: float, guard: bool = True):
    """A train step around a bare lookup-table "model" with AdamW at a constant `lr`."""
    V = 32
    model = types.SimpleNamespace(
        apply=lambda variables, x, **kw: jnp.take(variables["params"]["logits"], x, axis=0))
    params = {"logits": jax.random.normal(jax.random.PRNGKey(2), (V, V))}
    schedule = optax.constant_schedule(lr)
    tx = optax.adamw(schedule, weight_decay=0.1)
    loss_fn = functools.partial(masked_lm_loss, mask_id=V - 1, vocab_size=V)
    step = jax.jit(make_train_step(model, tx, schedule, loss_fn=loss_fn, guard=guard))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V - 1, (4, 16)), jnp.int32)
    return step, state, MLMBatch(inputs=tokens, loss_mask=jnp.ones(tokens.shape, jnp.float32))


def test_the_guard_skips_a_step_with_a_non_finite_lr_or_loss_and_changes_no_good_step():
    step, state, batch = _lookup_step(1e-2)
    unguarded, _, _ = _lookup_step(1e-2, guard=False)
    copy = lambda s: jax.tree.map(jnp.copy, s)
    new, metrics = step(copy(state), batch)
    same, _ = unguarded(copy(state), batch)
    assert int(metrics["bad_step"]) == 0 and int(new.step) == 1
    assert not np.allclose(new.params["logits"], state.params["logits"])
    jax.tree.map(np.testing.assert_array_equal, new, same)  # the conditional is exact

    def assert_skipped(state, new, metrics):
        assert int(metrics["bad_step"]) == 1 and int(new.step) == 1
        jax.tree.map(np.testing.assert_array_equal, (new.params, new.opt_state),
                     (state.params, state.opt_state))

    bad_lr, _, _ = _lookup_step(float("nan"))
    assert_skipped(state, *bad_lr(copy(state), batch))
    poisoned = state.replace(params={"logits": state.params["logits"].at[:, 0].set(jnp.nan)})
    assert_skipped(poisoned, *step(copy(poisoned), batch))  # a non-finite loss
