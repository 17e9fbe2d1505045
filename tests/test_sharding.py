"""One train step, every mesh: the same losses and parameters on 1 device and on 8 simulated
devices split as data, fsdp, tensor and mixes; FSDP memory; gradient accumulation; errors."""

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import setup, sharding
from jaxlm.config import ConfigError, MeshConfig
from jaxlm.data.pipeline import LMBatches

SHAPE = ["model.num_layers=2", "model.d_model=64", "model.num_heads=8", "model.d_ff=128",
         "model.vocab_size=128", "model.max_seq_len=32", "train.seq_len=32",
         "train.batch_size=16", "optim.warmup_steps=2", "optim.lr=3e-3",
         "optim.schedule=cosine"]  # the tolerances below were set with it
STEPS = 20


def _tokens():
    """A learnable stream: t[i+1] = 3 t[i] + 1 (mod 128), with 10% random tokens."""
    rng = np.random.default_rng(0)
    t = np.zeros(40_000, np.int64)
    for i in range(1, len(t)):
        t[i] = (3 * t[i - 1] + 1) % 128 if rng.random() > 0.1 else rng.integers(128)
    return t.astype(np.int32)


def train(mesh_shape, extra=(), steps=STEPS, devices=None, loss_mask=None):
    """`steps` train steps on `mesh_shape`; `loss_mask` [batch, seq_len], if given, replaces
    the all-ones loss mask of every batch."""
    data, fsdp, tensor = mesh_shape
    cfg = config_lib.load(None, [*SHAPE, *extra, f"train.steps={steps}", f"mesh.data={data}",
                                 f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"])
    s = setup.build(cfg, devices=devices)
    batches = LMBatches(_tokens(), cfg.train.seq_len, cfg.train.batch_size, seed=0)
    state, step = s.init_state(), s.train_step
    with jax.set_mesh(s.mesh):
        losses = []
        for i in range(steps):
            batch = batches.batch(i)
            if loss_mask is not None:
                batch = batch.replace(loss_mask=loss_mask)
            state, m = step(state, sharding.host_batch_to_global(batch, s.mesh))
            losses.append(m["loss"])
        params = jax.device_get(state.params)
    return np.array(jax.device_get(losses)), params, step, state


@pytest.fixture(scope="module")
def single_device():
    losses, params, _, _ = train((1, 1, 1), devices=jax.devices()[:1])
    return losses, params


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)])
def test_every_mesh_gives_the_same_run(single_device, mesh_shape):
    ref_losses, ref_params = single_device
    losses, params, _, state = train(mesh_shape)
    assert ref_losses[-1] < ref_losses[0] - 0.3  # it trains
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if mesh_shape[2] > 1:  # tensor parallel: heads split over `tensor`
        q = state.params["decoder"]["layers_0"]["attn"]["query"]["kernel"]
        assert q.sharding.spec[1] == "tensor"


def test_fsdp_shards_params_and_optimizer_state():
    def state_bytes(mesh_shape, devices):
        data, fsdp, tensor = mesh_shape
        cfg = config_lib.load(None, [*SHAPE, "train.steps=10", f"mesh.data={data}",
                                     f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"])
        s = setup.build(cfg, devices=devices)
        batch = s.abstract_batch()
        compiled = s.lower().compile()
        batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) / (
            data * fsdp)
        return compiled.memory_analysis().argument_size_in_bytes - batch_bytes

    one = state_bytes((1, 1, 1), jax.devices()[:1])
    fsdp = state_bytes((1, 8, 1), jax.devices())
    tensor = state_bytes((1, 1, 8), jax.devices())
    assert fsdp <= one / 8 * 1.05 + 4096, (one, fsdp)
    assert tensor < one / 4, (one, tensor)


def test_grad_accumulation_equals_one_big_batch():
    """Four micro-batches of 4 rows counting 32, 16, 4 and 1 tokens per row: the accumulated
    gradient is that of the mean over all counted tokens of the batch (a token weighs the
    same in every micro-batch), as one big batch computes it, not a mean of the
    micro-batches' means (which would weigh a token of the last one 32 times more)."""
    counted = np.repeat([32, 16, 4, 1], 4)
    mask = (np.arange(32)[None, :] < counted[:, None]).astype(np.float32)
    big, big_params, _, _ = train((8, 1, 1), steps=3, loss_mask=mask)
    acc, acc_params, _, _ = train((2, 1, 1), ["optim.grad_accum_steps=4"], steps=3,
                                  devices=jax.devices()[:2], loss_mask=mask)
    np.testing.assert_allclose(acc, big, rtol=1e-5)
    # atol: the attention key bias has a zero gradient, and Adam turns the summation-order
    # noise in it into steps of ~1e-6; every other parameter agrees to rtol.
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(big_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_cfg, model_extra, needle", [
    (MeshConfig(3, 1, 1), [], "3×1×1×1×1 = 3 but there are 8 devices"),
    (MeshConfig(-1, 3, 1), [], "does not divide the 8 devices"),
    (MeshConfig(1, 1, 8), ["model.num_heads=4", "model.d_model=64"], "model.num_heads=4"),
    (MeshConfig(1, 1, 8), ["model.num_kv_heads=2", "model.preset=llama"], "num_kv_heads=2"),
    (MeshConfig(1, 1, 8), ["model.d_ff=100"], "model.d_ff=100"),
    (MeshConfig(1, 1, 8), ["model.vocab_size=260"], "model.vocab_size=260"),
])
def test_mesh_errors_name_the_problem(mesh_cfg, model_extra, needle):
    cfg = config_lib.load(None, SHAPE + model_extra)
    with pytest.raises(ConfigError) as e:
        mesh = sharding.make_mesh(mesh_cfg)
        sharding.check_model_fits_mesh(cfg.model, mesh)
    assert needle in str(e.value)


@pytest.mark.parametrize("preset", ["llama3-tiny", "qwen2-tiny", "qwen3-tiny", "gemma2-tiny",
                                    "gemma3-tiny", "mistral-tiny", "mixtral-tiny"])
def test_every_parameter_of_the_new_decoders_has_logical_axes(preset):
    """q/k norms, q/k/v biases, sandwich norms, routers and stacked experts are named like
    every other weight (one name per dimension), so the rules table shards them; the experts
    go to the `expert` mesh axis."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxlm.config import ModelConfig, preset_fields
    from jaxlm.families.registry import build_model

    cfg = ModelConfig(**preset_fields(preset))
    boxed = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 8), jnp.int32))["params"]
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box):
        name = jax.tree_util.keystr(path)
        assert is_box(leaf) and len(leaf.names) == leaf.value.ndim, name
    if cfg.num_experts:
        mesh_cfg = MeshConfig(data=1, fsdp=2, expert=4)
        specs = sharding.logical_to_sharding(nn.get_partition_spec(boxed),
                                             sharding.make_mesh(mesh_cfg),
                                             sharding.logical_rules(mesh_cfg))
        experts = specs["decoder"]["layers"]["mlp"]["experts"]
        assert {s.spec[1] for s in jax.tree.leaves(experts)} == {"expert"}  # after layers
