"""Mixture of experts (Mixtral): the grouped-matmul routing against a naive per-token
reference, expert parallelism on simulated meshes, the router losses and HF parity (logits,
conversion both ways, HF's aux_loss and loss), FLOPs of the active experts, config errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from jaxlm import config as config_lib
from jaxlm import perf, setup, sharding
from jaxlm.config import ConfigError, MeshConfig, ModelConfig, preset_fields
from jaxlm.convert import ConversionError
from jaxlm.convert.hf import load_hf, save_hf
from jaxlm.data.batch import LMBatch
from jaxlm.families import registry
from jaxlm.families.registry import build_model
from jaxlm.models import moe
from jaxlm.models.layers import ACTIVATIONS

E, K, D, F = 4, 2, 16, 24
V, B, T = 96, 3, 12
VALID = np.array([T, 7, 10])  # valid length of each row: the rest is right padding


def _kernels(rng, gated: bool, experts: int = E):
    w = lambda *s: rng.normal(0, 0.3, s)
    ins = (w(experts, D, F), w(experts, D, F)) if gated else (w(experts, D, F),)
    return (*ins, w(experts, F, D))


NP_ACTIVATIONS = {
    "silu": lambda h: h / (1 + np.exp(-h)),
    "gelu_tanh": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
}


def dense_reference(x, logits, kernels, activation, k):
    """Every token through its top-k experts one by one, in float64 numpy: softmax over the
    k largest logits as weights."""
    act = NP_ACTIVATIONS[activation]
    out = np.zeros_like(x)
    for n in range(len(x)):
        top = np.argsort(-logits[n])[:k]
        w = np.exp(logits[n, top] - logits[n, top].max())
        w /= w.sum()
        for e, weight in zip(top, w):
            h = act(x[n] @ kernels[0][e])
            if len(kernels) == 3:
                h = h * (x[n] @ kernels[1][e])
            out[n] += weight * (h @ kernels[-1][e])
    return out


@pytest.mark.parametrize("gated, activation", [(True, "silu"), (False, "gelu_tanh")])
def test_grouped_matmul_routing_equals_the_dense_per_token_reference(gated, activation):
    rng = np.random.default_rng(0)
    x, logits = rng.normal(size=(40, D)), rng.normal(size=(40, E))
    kernels = _kernels(rng, gated)
    act = ACTIVATIONS[activation]
    ref = dense_reference(x, logits, kernels, activation, K)
    weights, experts = moe.route(jnp.asarray(logits, jnp.float32), K)
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    out = moe.grouped_mlp(as32(x), experts, weights, tuple(map(as32, kernels)), act,
                          num_experts=E)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
    # Expert parallelism's local step: each half of the experts, given the same tokens, adds
    # up to the whole; copies routed to the other half contribute nothing.
    halves = [moe.grouped_mlp(as32(x), experts, weights, tuple(as32(k[i:i + 2]) for k in
                                                               kernels), act, num_experts=E,
                              first_expert=i) for i in (0, 2)]
    np.testing.assert_allclose(np.asarray(halves[0] + halves[1]), ref, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(halves[0])).max() > 1e-2 and np.abs(np.asarray(halves[1])).max() > 1e-2


def test_router_losses_give_the_router_logits_a_gradient():
    """Both losses reach the router logits (through the probabilities; the top-k counts
    are constants)."""
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(64, E)), jnp.float32)

    def losses(lg):
        stats = moe.router_stats(lg, moe.route(lg, K)[1])
        return moe.load_balancing_loss(stats, E), moe.z_loss(stats)

    for i in range(2):
        grad = jax.grad(lambda lg, i=i: losses(lg)[i])(logits)
        assert float(jnp.abs(grad).max()) > 1e-4


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**preset_fields("mixtral-tiny"), "d_model": 32, "d_ff": 48,
                          "vocab_size": V, "max_seq_len": 32, **kw})


@functools.lru_cache
def tiny_moe():
    """(model, boxed abstract params, params, tokens, its logits on one device)."""
    model = build_model(_tiny())
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (8, 16)))
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
    return model, boxed, params, tokens, np.asarray(logits)


@pytest.mark.parametrize("mesh_cfg, rules", [
    (MeshConfig(data=1, fsdp=2, expert=4, tensor=1), []),  # one expert per expert shard
    (MeshConfig(data=2, fsdp=1, expert=2, tensor=2), []),  # experts' hidden width split
    (MeshConfig(data=4, fsdp=1, expert=2, tensor=1), ["batch=data"]),  # experts not on batch
])
def test_expert_parallel_forward_equals_one_device(mesh_cfg, rules):
    model, boxed, params, tokens, want = tiny_moe()
    mesh = sharding.make_mesh(mesh_cfg)
    table = sharding.logical_rules(dataclasses.replace(mesh_cfg, rules=rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(table):
        shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, table)
        placed = jax.device_put(params, shardings)
        apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
        got = apply(placed, tokens)
        assert "shard_map" in str(jax.make_jaxpr(apply)(placed, tokens))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- HF Mixtral

def mixtral_config(**kw):
    return transformers.MixtralConfig(**{**dict(
        vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32,
        intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, num_local_experts=E,
        num_experts_per_tok=K, router_aux_loss_coef=0.02, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}), **kw})


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so that a transposed or swapped expert
    cannot hide behind HF's initialisation."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    model = randomise(transformers.MixtralForCausalLM(mixtral_config()))
    model.save_pretrained(path)
    return path, model


def _padded_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), np.arange(T)[None, :] < VALID[:, None]


@pytest.mark.parametrize("scan", [True, False])
def test_hf_mixtral_parity_and_conversion_both_ways(hf_mixtral, scan, tmp_path):
    path, hf = hf_mixtral
    tokens, mask = _padded_inputs()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens),
                 attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    cfg, params = load_hf(path, scan_layers=scan)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.router_aux_loss) == (E, K, 0.02)
    apply = jax.jit(lambda p, t, m: build_model(cfg).apply({"params": p}, t, padding_mask_BT=m))
    ours = np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(mask)))
    diff = float(np.abs(ours - ref)[mask].max())
    print(f"mixtral scan={scan}: max |logits(jaxlm) - logits(HF)| = {diff:.2e}")
    assert diff <= 1e-4, diff

    # Back to HF (the hub's per-expert layout): the very same tensors.
    save_hf(cfg, params, tmp_path / "back")
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back").eval()
    sa, sb = hf.state_dict(), again.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_router_losses_equal_hf(hf_mixtral):
    """HF's aux_loss (load_balancing_loss_func over all layers) and its training loss
    (cross entropy + router_aux_loss_coef × aux_loss) equal jaxlm's; the z-loss equals a numpy
    computation on HF's router logits."""
    path, hf = hf_mixtral
    tokens = np.random.default_rng(3).integers(0, V, (B, T))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), labels=torch.tensor(tokens),
                 output_router_logits=True)
    cfg, params = load_hf(path, scan_layers=True)
    run_cfg = dataclasses.replace(config_lib.Config(), model=dataclasses.replace(
        cfg, router_z_loss=0.5))
    loss_fn = registry.of(cfg).loss_fn(run_cfg)
    last = np.arange(T) < T - 1  # HF shifts the labels: the last position predicts nothing
    batch = LMBatch(inputs=jnp.asarray(tokens), targets=jnp.asarray(np.roll(tokens, -1, 1)),
                    loss_mask=jnp.asarray(np.broadcast_to(last, (B, T)), jnp.float32))
    loss, sums = jax.jit(lambda p, b: loss_fn(build_model(cfg).apply, p, b))(params, batch)
    means = {k[:-4]: float(v / sums["num_tokens"]) for k, v in sums.items() if k != "nll_sum"
             and k.endswith("_sum")}
    np.testing.assert_allclose(means["moe_aux_loss"], out.aux_loss.item(), rtol=1e-5)
    logits = np.concatenate([r.numpy().astype(np.float64) for r in out.router_logits])
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(means["moe_z_loss"], np.mean(lse**2), rtol=1e-5)
    np.testing.assert_allclose(float(loss), out.loss.item() + 0.5 * np.mean(lse**2), rtol=1e-5)


def test_export_refuses_what_mixtral_cannot_hold(hf_mixtral, tmp_path):
    cfg, params = load_hf(hf_mixtral[0])
    with pytest.raises(ConversionError, match="SwiGLU"):
        save_hf(dataclasses.replace(cfg, activation="gelu_tanh"), params, tmp_path / "o")
    with pytest.raises(ConversionError, match="local_every"):
        save_hf(dataclasses.replace(cfg, local_window=4, local_every=2), params, tmp_path / "o")
    with pytest.raises(ConversionError, match="local_every"):  # a pattern with global layers
        save_hf(dataclasses.replace(cfg, local_window=4, local_pattern="LG"), params,
                tmp_path / "o")
    with pytest.raises(ConversionError, match="qkv_bias"):  # HF Mixtral has no biases
        save_hf(dataclasses.replace(cfg, qkv_bias=True), params, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- FLOPs and config

MOE_RUN = ["model.preset=mixtral-tiny", "model.d_model=32", "model.d_ff=48",
           "model.vocab_size=96", "model.max_seq_len=32", "train.seq_len=16",
           "train.batch_size=2"]


def test_flops_count_the_router_and_the_active_experts_only():
    """Model FLOPs with dense attention equal the traced step's matmul FLOPs, the experts'
    grouped matmuls counted (k = 2 of 4 experts per token): 6·k·(3·D·F) per token and layer
    for the experts, not 6·E·(3·D·F)."""
    cfg = config_lib.load(None, MOE_RUN)
    s = setup.build(cfg, devices=jax.devices()[:1])
    traced = perf.jaxpr_matmul_flops(s.train_step, s.abstract_state, s.abstract_batch())
    tokens = cfg.train.batch_size * cfg.train.seq_len
    assert traced == pytest.approx(s.flops_per_token(causal_halved=False) * tokens, rel=1e-9)
    one = setup.build(config_lib.load(None, [*MOE_RUN, "model.experts_per_token=1"]),
                      devices=jax.devices()[:1])
    per_expert = 6 * 3 * 32 * 48 * cfg.model.num_layers
    assert s.flops_per_token() - one.flops_per_token() == pytest.approx(per_expert, rel=1e-9)


@pytest.mark.parametrize("overrides, needle", [
    (["model.experts_per_token=5"], "model.experts_per_token=5 must be between 1 and"),
    (["model.use_bias=true"], "set model.use_bias=false"),
    (["model.router_aux_loss=-1"], "model.router_aux_loss must be >= 0"),
    (["model.num_experts=-2"], "model.num_experts must be >= 0"),
    (["model.preset=bert", "model.num_experts=4"], "model.num_experts does not apply"),
])
def test_bad_moe_config_is_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        config_lib.load(None, [*MOE_RUN, *overrides])


def test_experts_must_divide_the_expert_axis():
    cfg = config_lib.load(None, MOE_RUN)
    mesh = sharding.make_mesh(MeshConfig(data=1, expert=8))
    with pytest.raises(ConfigError, match="model.num_experts=4 is not divisible by "
                                          "mesh.expert=8"):
        sharding.check_model_fits_mesh(cfg.model, mesh)


def test_router_losses_reach_the_step_metrics_through_remat_and_accumulation():
    """The sown router stats survive nn.remat and the accumulation scan: the step reports
    moe_aux_loss and moe_z_loss."""
    cfg = config_lib.load(None, [*MOE_RUN, "model.remat=full", "optim.grad_accum_steps=2",
                                 "model.router_z_loss=0.5", "model.router_aux_loss=0.5"])
    s = setup.build(cfg, devices=jax.devices()[:1])
    state = s.init_state()
    batch = s.synthetic_batch(np.random.default_rng(0))
    with jax.set_mesh(s.mesh):
        _, metrics = s.train_step(state, sharding.host_batch_to_global(batch, s.mesh))
    metrics = jax.device_get(metrics)
    assert 1.5 < metrics["moe_aux_loss"] < E and metrics["moe_z_loss"] > 0
    assert metrics["bad_step"] == 0
