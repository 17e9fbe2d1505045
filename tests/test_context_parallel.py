"""Context parallelism (mesh.context): sequences split over devices. Ring and all-gather
attention equal the reference attention (output and gradients) under causal, packed and
sliding-window masks, in zig-zag and contiguous order; five train steps on meshes with
context 2, 4 and 8 (alone and with data, fsdp, tensor) equal one device's; the zig-zag order
evens out the shards' work; bad settings are one-line config errors."""

import jax
import numpy as np
import pytest
from conftest import TINY_SHAPE, corpus

from jaxlm import config as config_lib
from jaxlm import setup, sharding
from jaxlm.cli import main
from jaxlm.config import ConfigError, MeshConfig
from jaxlm.data.batch import LMBatch
from jaxlm.models import attention as attn
from jaxlm.models import context
from jaxlm.models.kernels import chunked, ring
from jaxlm.train import rundir

B, T, N, K, H = 2, 32, 4, 2, 8
WINDOW = 6


def _segments(rng, rows: int, length: int) -> np.ndarray:
    """Packed rows: documents 1, 2, ... of random lengths, then padding (segment 0)."""
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, length - 2), 3, replace=False))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, length - 2])):
            seg[r, a:b] = i + 1
    return seg


def _mask(kind: str, segments, zigzag: int = 0) -> attn.MaskSpec:
    return attn.MaskSpec(q_segment_BT=segments if kind == "packed" else None,
                         kv_segment_BS=segments if kind == "packed" else None, causal=True,
                         window=WINDOW if kind == "window" else 0, zigzag=zigzag)


def _exact_attention(q, k, v, kind: str, seg) -> np.ndarray:
    """float64 numpy: softmax(q kᵀ / √H) v under the causal mask and `kind`'s extra part,
    query head n reading key/value head n // (N / K)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, N // K, axis=2) for x in (k, v))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = np.broadcast_to(j <= i, (B, T, T))
    if kind == "window":
        allowed = allowed & (j > i - WINDOW)
    if kind == "packed":
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def _attention_case(strategy: str, kind: str, n: int, zigzag: bool):
    """(context output and q/k/v gradients, reference ones, the float64 numpy output), all
    in token order."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, T, K, H)).astype(np.float32) for _ in range(2))
    do = rng.normal(size=(B, T, N, H)).astype(np.float32)
    seg = _segments(rng, B, T)

    def ref(q, k, v):
        return attn.attention(q, k, v, _mask(kind, seg), impl="reference")

    out, vjp = jax.vjp(ref, q, k, v)
    want = (out, *vjp(do))
    order = ring.Layout(n, 2 if zigzag else 1).order(T)
    perm = lambda x: x[:, order]
    mesh = sharding.make_mesh(MeshConfig(data=1, context=n), jax.devices()[:n])

    @jax.jit
    def split(q, k, v, do):
        mask = _mask(kind, perm(seg), n if zigzag else 0)
        out, vjp = jax.vjp(lambda *x: context.attention(*x, mask, impl="chunked",
                                                        strategy=strategy), q, k, v)
        return (out, *vjp(do))

    with jax.set_mesh(mesh):
        got = split(perm(q), perm(k), perm(v), perm(do))
    back = np.argsort(order)
    return [np.asarray(x)[:, back] for x in got], want, _exact_attention(q, k, v, kind, seg)


@pytest.mark.parametrize("strategy, kind, n, zigzag", [
    ("ring", "causal", 4, True), ("ring", "packed", 4, True), ("ring", "window", 4, True),
    ("ring", "packed", 8, False), ("ring", "window", 2, False),
    ("allgather", "causal", 4, True), ("allgather", "packed", 2, True),
    ("allgather", "window", 8, True),
])
def test_context_attention_equals_the_reference(strategy, kind, n, zigzag):
    got, want, exact = _attention_case(strategy, kind, n, zigzag)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)
    np.testing.assert_allclose(got[0], exact, rtol=1e-5, atol=1e-5)  # not our reference's


def test_ring_block_kernel_pads_chunks_that_are_not_whole_tiles():
    """The ring's per-block kernel at a length its tile does not divide (12 tokens, tiles of
    5) equals the reference attention over that block: output and gradients."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(B, 12, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, 12, K, H)).astype(np.float32) for _ in range(2))
    do = rng.normal(size=(B, 12, N, H)).astype(np.float32)
    seg = _segments(rng, B, 12)
    spec = attn.MaskSpec(q_segment_BT=seg, kv_segment_BS=seg, causal=True)
    out, vjp = jax.vjp(lambda *x: attn.attention(*x, spec, impl="reference"), q, k, v)
    kw = dict(scale=H ** -0.5, block=5)
    got, lse = chunked.block_attention(q, k, v, spec, **kw)
    grads = chunked.block_attention_grads(q, k, v, spec, got, lse, do, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got, *grads), (out, *vjp(do))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)


def test_zigzag_order_and_its_inverse():
    """Shard i holds chunks i and 2n-1-i; the batch's fields move together, positions with
    them; an all-gather of the shards goes back to token order."""
    assert ring.Layout(2, 2).order(8).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert ring.Layout(4, 2).order(8).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
    assert ring.Layout(4, 1).order(8).tolist() == list(range(8))
    tokens = np.arange(10, 18, dtype=np.int32)[None]
    batch = context.zigzag_batch(LMBatch(inputs=tokens, targets=tokens + 1,
                                         loss_mask=np.ones((1, 8), np.float32)), 2)
    assert np.asarray(batch.positions).tolist() == [[0, 1, 6, 7, 2, 3, 4, 5]]
    np.testing.assert_array_equal(batch.inputs, 10 + batch.positions)
    np.testing.assert_array_equal(batch.targets, 11 + batch.positions)
    for layout in (ring.Layout(4, 2), ring.Layout(3, 1)):
        x = np.arange(24).reshape(1, 24)
        np.testing.assert_array_equal(layout.to_tokens(x[:, layout.order(24)]), x)


def test_zigzag_gives_every_shard_the_same_causal_work():
    settings = lambda chunks: ring.Ring(axis=("context",), layout=ring.Layout(8, chunks),
                                        causal=True, window=0, scale=1.0, cap=0.0, block=64)
    contiguous = ring.pairs_computed(settings(1), 8192)
    zigzag = ring.pairs_computed(settings(2), 8192)
    assert contiguous.sum() == zigzag.sum()  # the same causal triangle in all
    assert contiguous[-1] > 10 * contiguous[0]  # the last shard sees every key
    assert zigzag.max() == zigzag.min()


# ------------------------------------------------------------------ training on meshes

# No biases: the attention key bias has no gradient (softmax ignores a shift), and Adam turns
# the summation-order noise in it into steps of ~1e-6, as in test_sharding.
MODEL = [*TINY_SHAPE, "model.vocab_size=64", "model.use_bias=false", "train.steps=5",
         "optim.lr=3e-3", "optim.warmup_steps=1"]
KINDS = {  # learned positions; RoPE with grouped-query heads; every other layer windowed
    "causal": [],
    "packed": ["model.position=rope", "model.num_kv_heads=2"],
    "window": ["model.position=rope", "model.num_kv_heads=2", f"model.local_window={WINDOW}",
               "model.local_every=2"],
}


def _batches(kind: str, steps: int = 5, rows: int = 8, length: int = 32) -> list[LMBatch]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(steps):
        tokens = rng.integers(0, 64, size=(rows, length + 1), dtype=np.int32)
        batch = LMBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                        loss_mask=np.ones((rows, length), np.float32))
        if kind == "packed":
            seg = _segments(rng, rows, length)
            starts = np.maximum.accumulate(np.where(
                np.diff(seg, prepend=-1, axis=1) != 0, np.arange(length), 0), axis=1)
            batch = batch.replace(segment_ids=seg, positions=np.arange(length) - starts,
                                  loss_mask=(seg > 0).astype(np.float32))
        out.append(batch)
    return out


def _train(kind: str, mesh: dict[str, int], extra=(), lowered: bool = False):
    """(losses, final parameters) of five steps; with `lowered`, also the step's StableHLO."""
    cfg = config_lib.load(None, [*MODEL, *KINDS[kind], *extra,
                                 *(f"mesh.{a}={mesh.get(a, 1)}" for a in
                                   ("data", "fsdp", "tensor", "context"))])
    size = int(np.prod(list(mesh.values()) or [1]))
    s = setup.build(cfg, devices=jax.devices()[:size])
    state, losses = s.init_state(), []
    with jax.set_mesh(s.mesh):
        for batch in _batches(kind):
            state, m = s.train_step(state, sharding.host_batch_to_global(batch, s.mesh))
            losses.append(m["loss"])
        out = np.array(jax.device_get(losses)), jax.device_get(state.params)
    return (*out, s.lower().as_text()) if lowered else out


@pytest.fixture(scope="module")
def one_device():
    return {kind: _train(kind, {}) for kind in KINDS}


# Each context size alone and with data / fsdp / tensor; each mask with ring and allgather.
@pytest.mark.slow
@pytest.mark.parametrize("kind, mesh, strategy, extra", [
    ("causal", {"context": 8}, "ring", []),
    ("causal", {"context": 2, "data": 2, "fsdp": 2}, "allgather", []),
    ("causal", {"context": 4}, "ring", ["mesh.context_zigzag=false"]),
    ("packed", {"context": 4, "tensor": 2}, "ring", []),
    ("packed", {"context": 8}, "allgather", ["model.attention=chunked"]),
    ("window", {"context": 2}, "ring", []),
    ("window", {"context": 4, "fsdp": 2}, "allgather", []),
], ids=lambda x: "_".join(f"{k}{v}" for k, v in x.items()) if isinstance(x, dict)
    else "+".join(e.split(".")[-1] for e in x) if isinstance(x, list) else x)
def test_context_meshes_train_as_one_device(one_device, kind, mesh, strategy, extra):
    ref_losses, ref_params = one_device[kind]
    losses, params, hlo = _train(kind, mesh, [f"model.context_attention={strategy}", *extra],
                                 lowered=True)
    # The sequence stays split: the shards trade keys and values themselves (before XLA adds
    # the collectives its own sharding needs, e.g. fsdp's).
    if strategy == "ring":
        assert "collective_permute" in hlo and "all_gather" not in hlo
    else:
        assert "all_gather" in hlo and "collective_permute" not in hlo
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # atol: at init the query kernel's gradient is ~1e-4 of the others'; Adam normalises it,
    # so its summation-order noise (~1e-11) moves a few of its elements by up to ~2e-6.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)


@pytest.mark.slow
def test_cli_trains_with_context_parallelism(tmp_path):
    """The user's path: `jaxlm train mesh.context=4` on the 8 devices (data 2) trains and
    records the mesh (the numbers are the one-device run's: see the tests above)."""
    run = tmp_path / "run"
    assert main(["train", f"run.dir={run}", f"data.files={corpus(tmp_path)}", "train.steps=3",
                 "train.log_every=1", "train.eval_every=0", "run.quiet=true", *TINY_SHAPE,
                 "mesh.data=2", "mesh.context=4", "model.context_attention=allgather"]) == 0
    losses = [r["loss"] for r in rundir.read_metrics(run) if "loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all()
    saved = rundir.load_config(run)
    assert (saved.mesh.context, saved.model.context_attention) == (4, "allgather")


@pytest.mark.parametrize("overrides, needle", [
    (["mesh.context=3"], "train.seq_len=32 does not split into 6 equal chunks"),
    (["mesh.context=4", "mesh.context_zigzag=false", "train.seq_len=30"],
     "does not split into 4 equal chunks"),
    (["mesh.context=0"], "mesh.context must be a positive size"),
    (["mesh.context=2", "model.preset=bert"], "the encoder family trains with mesh.context=1"),
    (["model.context_attention=star"], "choose one of ring, allgather"),
])
def test_bad_context_settings_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        config_lib.load(None, [*TINY_SHAPE, *overrides])


def test_cli_refuses_a_context_that_does_not_divide(tmp_path, capsys):
    code = main(["train", f"run.dir={tmp_path / 'run'}", *TINY_SHAPE, "mesh.context=5"])
    err = capsys.readouterr().err
    assert code == 2 and "mesh.context=5" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
