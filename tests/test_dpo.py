"""DPO: the loss and its gradient against float64 numpy (alone and from a tiny model's
logits), response-only masks built by hand, a frozen reference, and bad preference files."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL

from jaxlm import config as config_lib
from jaxlm import dpo, sharding
from jaxlm.cli import main
from jaxlm.data.batch import LMBatch, PreferenceBatch
from jaxlm.data.preference import preference_rows
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.setup import build

BETA = 0.3
SFT_WEIGHT = 0.5


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_dpo(pc, pr, rc, rr, beta, eps):
    """float64: mean loss, d(mean loss)/d(policy chosen), /d(policy rejected), rewards."""
    z = beta * ((pc - rc) - (pr - rr))
    losses = -(1 - eps) * _np_log_sigmoid(z) - eps * _np_log_sigmoid(-z)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    dz = (-(1 - eps) * sig(-z) + eps * sig(z)) / len(z)
    return losses.mean(), beta * dz, -beta * dz, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_and_gradient_equal_float64_numpy(eps):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, 16) for _ in range(4))
    loss, g_c, g_r, rew_c, rew_r = _np_dpo(pc, pr, rc, rr, BETA, eps)

    def mean_loss(a, b):
        return dpo.dpo_loss(a, b, jnp.float32(rc), jnp.float32(rr), beta=BETA,
                            label_smoothing=eps)[0].mean()

    got, (got_c, got_r) = jax.value_and_grad(mean_loss, argnums=(0, 1))(
        jnp.float32(pc), jnp.float32(pr))
    np.testing.assert_allclose(got, loss, rtol=1e-5)
    np.testing.assert_allclose(got_c, g_c, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_r, g_r, rtol=1e-4, atol=1e-7)
    _, c, r = dpo.dpo_loss(jnp.float32(pc), jnp.float32(pr), jnp.float32(rc), jnp.float32(rr),
                           beta=BETA, label_smoothing=eps)
    np.testing.assert_allclose(c, rew_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r, rew_r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("w", [0.0, 0.7])
def test_rpo_loss_and_gradient_equal_float64_numpy(w):
    """DPO + w · the chosen responses' NLL per token (over the whole batch's tokens)."""
    rng = np.random.default_rng(3)
    pc, pr, rc, rr = (rng.normal(-20, 5, 16) for _ in range(4))
    tokens = rng.integers(1, 12, 16).astype(np.float64)
    dpo_mean, g_c, g_r, _, _ = _np_dpo(pc, pr, rc, rr, BETA, 0.0)
    nll = -pc.sum() / tokens.sum()

    def total(a, b):
        losses, _, _ = dpo.dpo_loss(a, b, jnp.float32(rc), jnp.float32(rr), beta=BETA)
        return dpo.rpo_loss(losses, a, jnp.float32(tokens), sft_weight=w)

    (got, got_nll), (got_c, got_r) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.float32(pc), jnp.float32(pr))
    np.testing.assert_allclose(got, dpo_mean + w * nll, rtol=1e-5)
    np.testing.assert_allclose(got_nll, nll, rtol=1e-5)
    np.testing.assert_allclose(got_c, g_c - w / tokens.sum(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_r, g_r, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def tiny():
    """A tiny DPO setup, its initial state and a batch of random pairs (prompt: the first
    half of each row, response: the second, some rows shorter)."""
    cfg = config_lib.load(None, [*TINY_MODEL, "train.objective=dpo", "data.files=p.jsonl",
                                 f"dpo.beta={BETA}", "optim.lr=1e-2", "optim.warmup_steps=1"])
    setup = build(cfg)
    batch = setup.synthetic_batch(np.random.default_rng(1))
    batch.rejected.loss_mask[:, -5:] = 0.0  # shorter rejected responses
    batch.chosen.loss_mask[::2, -9:] = 0.0
    return setup, setup.init_state(), batch


def _np_seq_logps(logits, targets, mask):
    x = np.asarray(logits, np.float64)
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - x.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (picked * mask).sum(-1), np.exp(logp)


def test_whole_loss_and_gradient_from_model_logits_equal_float64_numpy(tiny):
    setup, state, batch = tiny
    apply = jax.jit(setup.model.apply)  # eager Flax is slow; the math is the same
    ref = jax.device_get(state.params)
    noise = np.random.default_rng(2)
    policy = jax.tree.map(lambda x: x + 0.05 * noise.normal(size=x.shape).astype(x.dtype), ref)
    logits = {(who, side): np.asarray(apply({"params": p}, getattr(batch, side).inputs))
              for who, p in (("pol", policy), ("ref", ref)) for side in ("chosen", "rejected")}
    lp = {k: _np_seq_logps(v, getattr(batch, k[1]).targets, getattr(batch, k[1]).loss_mask)
          for k, v in logits.items()}
    loss, g_c, g_r, rew_c, rew_r = _np_dpo(lp["pol", "chosen"][0], lp["pol", "rejected"][0],
                                           lp["ref", "chosen"][0], lp["ref", "rejected"][0],
                                           BETA, 0.0)
    # The loss and its sums through the model, as the train step computes them.
    filled = jax.jit(dpo.with_reference_logps, static_argnums=0)(apply, ref, batch)
    got, sums = jax.jit(lambda p: dpo.preference_loss(apply, p, filled, beta=BETA))(policy)
    np.testing.assert_allclose(got, loss, rtol=1e-5)
    B = len(rew_c)
    assert float(sums["num_tokens"]) == B
    np.testing.assert_allclose(sums["dpo_reward_margin_sum"] / B, (rew_c - rew_r).mean(),
                               rtol=1e-4, atol=1e-5)
    assert float(sums["dpo_accuracy_sum"]) == np.sum(rew_c > rew_r)
    chosen_tokens = batch.chosen.loss_mask.sum()
    nll = -lp["pol", "chosen"][0].sum() / chosen_tokens  # per response token, float64
    np.testing.assert_allclose(sums["dpo_chosen_nll_sum"] / B, nll, rtol=1e-5)
    # RPO (dpo.sft_weight): the same DPO metrics, the loss (and eval_loss) adds w · NLL.
    got_w, sums_w = jax.jit(lambda p: dpo.preference_loss(apply, p, filled, beta=BETA,
                                                          sft_weight=SFT_WEIGHT))(policy)
    np.testing.assert_allclose(got_w, loss + SFT_WEIGHT * nll, rtol=1e-5)
    np.testing.assert_allclose(sums_w["nll_sum"] / B, loss + SFT_WEIGHT * nll, rtol=1e-5)
    assert float(sums_w["dpo_accuracy_sum"]) == float(sums["dpo_accuracy_sum"])

    # Its gradient w.r.t. the logits: dL/dlogp · mask · (onehot - softmax), in float64; the
    # NLL term adds -w / (chosen tokens) to dL/dlogp of every chosen row.
    def from_logits(lc, lr, w):
        pc = dpo.sequence_logps(lc, batch.chosen.targets, batch.chosen.loss_mask)
        pr = dpo.sequence_logps(lr, batch.rejected.targets, batch.rejected.loss_mask)
        losses = dpo.dpo_loss(pc, pr, filled.ref_chosen_logp, filled.ref_rejected_logp,
                              beta=BETA)[0]
        return dpo.rpo_loss(losses, pc, batch.chosen.loss_mask.sum(-1), sft_weight=w)[0]

    for w in (0.0, SFT_WEIGHT):
        grads = jax.jit(jax.grad(from_logits, argnums=(0, 1)), static_argnums=2)(
            logits["pol", "chosen"], logits["pol", "rejected"], w)
        for side, g_seq, got_g in (("chosen", g_c - w / chosen_tokens, grads[0]),
                                   ("rejected", g_r, grads[1])):
            rows, probs = getattr(batch, side), lp["pol", side][1]
            onehot = np.eye(probs.shape[-1])[rows.targets]
            want = g_seq[:, None, None] * rows.loss_mask[..., None] * (onehot - probs)
            np.testing.assert_allclose(got_g, want, atol=2e-6)

    # And through the parameters: a central difference along a random direction.
    @jax.jit
    def of_params(p):
        return dpo.preference_loss(apply, p, filled, beta=BETA)[0]

    g = jax.jit(jax.grad(of_params))(policy)
    d = jax.tree.map(lambda x: noise.normal(size=x.shape).astype(np.float32), policy)
    h = 1e-3
    step = lambda s: jax.tree.map(lambda x, v: x + s * h * v, policy, d)  # noqa: E731
    fd = (float(of_params(step(1))) - float(of_params(step(-1)))) / (2 * h)
    analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
    assert fd == pytest.approx(analytic, rel=2e-2)


def test_masks_cover_the_response_only_raw_and_chat():
    tok = ByteTokenizer()
    b = lambda s: list(s.encode())  # noqa: E731
    rows, cut = preference_rows([("ab", "c", "de")], tok, 8)
    assert cut == 0
    ids_c, ids_r = b("abc") + [tok.eos_id], b("abde") + [tok.eos_id]
    want_mask_c, want_mask_r = [0, 1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]
    for rows_side, ids, mask in ((rows.chosen, ids_c, want_mask_c),
                                 (rows.rejected, ids_r, want_mask_r)):
        n = len(ids) - 1
        assert rows_side.inputs[0, :n].tolist() == ids[:-1]
        assert rows_side.targets[0, :n].tolist() == ids[1:]
        assert rows_side.loss_mask[0].tolist() == mask

    # A prompt too long for the row keeps its end, the same for both responses, which stay
    # whole (9 ids fit a row of 8 next-token pairs).
    rows, cut = preference_rows([("0123456789", "c", "de")], tok, 8)
    assert cut == 1
    assert rows.rejected.inputs[0].tolist() == b("456789de")
    assert rows.rejected.targets[0].tolist() == b("56789de") + [tok.eos_id]
    assert rows.rejected.loss_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert rows.chosen.inputs[0, :7].tolist() == b("456789c")
    assert rows.chosen.loss_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]

    # Chat form (the default ChatML-like template, EOS closing each turn): the mask covers the
    # response's content and its end token, never the user's turn or the scaffolding.
    prompt = [{"role": "user", "content": "ab"}]
    rows, _ = preference_rows([(prompt, "c", "de")], tok, 64)
    head = b("<|im_start|>user\nab") + [tok.eos_id] + b("\n<|im_start|>assistant\n")
    for rows_side, answer in ((rows.chosen, "c"), (rows.rejected, "de")):
        ids = head + b(answer) + [tok.eos_id] + b("\n")
        n = len(ids) - 1
        assert rows_side.inputs[0, :n].tolist() == ids[:-1]
        mask = np.zeros(64)
        mask[len(head) - 1:len(head) + len(answer)] = 1  # targets: the answer, then EOS
        np.testing.assert_array_equal(rows_side.loss_mask[0], mask)


def test_reference_is_frozen_and_outside_the_optimizer(tiny):
    setup, _, host = tiny
    state = setup.init_state()
    start = jax.device_get(state.params)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(
        jax.eval_shape(setup.tx.init, state.params))  # the optimizer holds the policy only
    leaf_p, leaf_r = jax.tree.leaves(state.params)[0], jax.tree.leaves(state.ref_params)[0]
    assert (leaf_p.addressable_shards[0].data.unsafe_buffer_pointer()
            != leaf_r.addressable_shards[0].data.unsafe_buffer_pointer())
    with jax.set_mesh(setup.mesh):
        batch = sharding.host_batch_to_global(host, setup.mesh)
        rows = []
        for _ in range(3):
            state, metrics = setup.train_step(state, batch)
            rows.append(jax.device_get(metrics))
    # Step 1: the policy is the reference, so rewards are 0 and the loss is log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["dpo_reward_margin"] == 0 and rows[0]["dpo_accuracy"] == 0
    assert rows[0]["dpo_chosen_nll"] > 0  # per chosen response token
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["dpo_accuracy"] > 0
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(after.ref_params), jax.tree.leaves(start)):
        np.testing.assert_array_equal(a, b)  # bit-identical
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(start)))
    # Held-out evaluation reads the reference too: same metrics family as training.
    with jax.set_mesh(setup.mesh):
        sums = jax.device_get(setup.eval_step(setup.eval_inputs(state), batch, 0))
    assert {"dpo_accuracy_sum", "dpo_reward_margin_sum", "dpo_chosen_reward_sum",
            "dpo_chosen_nll_sum"} <= set(sums)


def test_sft_weight_from_the_config_adds_the_chosen_nll(tiny):
    """dpo.sft_weight reaches the run's loss: before any step (policy = reference, every
    reward 0) a pair's loss is log 2 + sft_weight · the chosen responses' NLL."""
    _, _, host = tiny
    cfg = config_lib.load(None, [*TINY_MODEL, "train.objective=dpo", "data.files=p.jsonl",
                                 f"dpo.beta={BETA}", f"dpo.sft_weight={SFT_WEIGHT}"])
    setup = build(cfg)
    with jax.set_mesh(setup.mesh):
        state = setup.init_state()
        batch = sharding.host_batch_to_global(host, setup.mesh)
        sums = jax.device_get(setup.eval_step(setup.eval_inputs(state), batch, 0))
    pairs = float(sums["num_tokens"])
    nll = sums["dpo_chosen_nll_sum"] / pairs
    assert nll > 1.0  # an untrained model: about log(vocabulary) nats a token
    assert sums["nll_sum"] / pairs == pytest.approx(math.log(2) + SFT_WEIGHT * nll, rel=1e-5)


BAD = {"no-chosen": {"prompt": "a", "rejected": "b"},
       "no-rejected": {"prompt": "a", "chosen": "b"},
       "bad-message": {"prompt": [{"role": "user", "content": "a"}], "chosen": {"content": "b"},
                       "rejected": "c"}}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_preference_file_exits_2_with_one_line(tmp_path, capsys, case):
    good = {"prompt": "x", "chosen": "y", "rejected": "z"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(BAD[case]) + "\n")
    run = tmp_path / "run"
    code = main(["train", f"run.dir={run}", "train.objective=dpo", f"data.files={path}",
                 "train.steps=1", "run.quiet=true", *TINY_MODEL])
    err = capsys.readouterr().err
    assert code == 2
    assert "line 2" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run.exists() or not any(run.iterdir())


def test_dpo_config_mismatches_exit_2(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "x", "chosen": "y", "rejected": "z"}) + "\n")
    for extra, needle in ((["data.format=text"], "data.format"), (["dpo.beta=0"], "dpo.beta"),
                          (["data.pack=true"], "data.pack"),
                          (["dpo.sft_weight=-0.5"], "dpo.sft_weight")):
        code = main(["train", f"run.dir={tmp_path / 'run'}", "train.objective=dpo",
                     f"data.files={path}", "run.quiet=true", *extra, *TINY_MODEL])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


def test_preference_batch_shards_like_other_batches(tiny):
    setup, _, host = tiny
    global_batch = sharding.host_batch_to_global(host, setup.mesh)
    assert isinstance(global_batch, PreferenceBatch)
    assert isinstance(global_batch.chosen, LMBatch)
    assert global_batch.chosen.inputs.sharding.is_equivalent_to(
        sharding.batch_sharding(setup.mesh), 2)


def test_with_lora_the_reference_is_the_base_without_adapters(tiny):
    """No second copy of the weights: the state holds no ref_params, the reference is the
    base (adapters' B zeroed), so the first step's loss is log 2, and it stays the same model
    while the adapters train."""
    from jaxlm import lora

    _, _, host = tiny
    cfg = config_lib.load(None, [*TINY_MODEL, "train.objective=dpo", "data.files=p.jsonl",
                                 f"dpo.beta={BETA}", "optim.lr=1e-2", "optim.warmup_steps=1",
                                 "lora.rank=2"])
    setup = build(cfg)
    assert not hasattr(setup.state_shardings, "ref_params")
    state = setup.init_state()
    assert lora.has_adapters(state.params)

    @jax.jit
    def reference_and_policy_logps(state, batch):
        """The chosen responses' log-probabilities under the run's own reference
        (setup.reference, as its train step reads it) and under the policy."""
        ref = dpo.with_reference_logps(setup.model.apply, setup.reference(state), batch)
        return ref.ref_chosen_logp, dpo.response_logps(setup.model.apply, state.params,
                                                       batch.chosen)

    with jax.set_mesh(setup.mesh):
        batch = sharding.host_batch_to_global(host, setup.mesh)
        ref_before, policy_before = jax.device_get(reference_and_policy_logps(state, batch))
        losses = []
        for _ in range(3):
            state, metrics = setup.train_step(state, batch)
            losses.append(float(metrics["loss"]))
        ref_after, policy_after = jax.device_get(reference_and_policy_logps(state, batch))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
    np.testing.assert_array_equal(ref_after, ref_before)
    # The adapters (B zero at the start) moved the policy and only the policy.
    np.testing.assert_array_equal(policy_before, ref_before)
    assert np.abs(policy_after - ref_after).max() > 1e-4
