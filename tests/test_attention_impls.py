"""Every attention implementation against `reference`, forward and gradient, for each mask
kind; Pallas TPU kernels in interpret mode; errors where an implementation can't apply a
mask or bias; mixed precision and rematerialisation at the model level."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

from jaxlm.config import ConfigError, ModelConfig
from jaxlm.data.batch import LMBatch
from jaxlm.families.registry import build_model
from jaxlm.models import attention as attn
from jaxlm.models.kernels.chunked import chunked_attention
from jaxlm.models.kernels.flash import flash_attention
from jaxlm.models.kernels.splash import splash_attention
from jaxlm.models.kernels.triangular import triangular_attention
from jaxlm.objectives import causal_lm_loss

RTOL = 1e-5
N, K, H = 4, 2, 16  # grouped-query: two query heads per key/value head


def _qkv(B, T, S, seed=0, kv_heads=K):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, kv_heads, H)), jnp.float32) for _ in range(2))
    return q, k, v


def _masks(B, T):
    """Structured masks of each kind; every query row keeps at least one key."""
    valid = np.ones((B, T), bool)
    valid[-1, T - T // 6:] = False  # right padding in the last example
    seg = np.repeat(np.arange(T)[None] * 3 // T, B, 0)  # three packed documents
    seg[0] += 1
    return {
        "causal": attn.MaskSpec(causal=True),
        "padding": attn.MaskSpec(causal=True, kv_valid_BS=jnp.asarray(valid)),
        "segments": attn.MaskSpec(causal=True, q_segment_BT=jnp.asarray(seg),
                                  kv_segment_BS=jnp.asarray(seg)),
        "window": attn.MaskSpec(causal=True, window=T // 4),
        "bidirectional_padding": attn.MaskSpec(kv_valid_BS=jnp.asarray(valid)),
        "all": attn.MaskSpec(causal=True, window=T // 4, kv_valid_BS=jnp.asarray(valid),
                             q_segment_BT=jnp.asarray(seg), kv_segment_BS=jnp.asarray(seg)),
    }


def _bias(T, S, seed=3):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(1, N, T, S)), jnp.float32)


def _rel_err(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def _check_against_reference(fn, q, k, v, mask, bias=None):
    """fn(q, k, v, mask, bias) against the reference: outputs and d/dq, d/dk, d/dv (and
    d/dbias) of a random linear function of the output, relative error <= 1e-5."""
    dense = mask.dense(q.shape[1], k.shape[1]) if isinstance(mask, attn.MaskSpec) else mask
    ref = lambda q, k, v, b: attn.attention(q, k, v, dense, b, impl="reference")
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums))(q, k, v, bias)

    assert _rel_err(jax.jit(fn)(q, k, v, bias), ref(q, k, v, bias)) <= RTOL
    for got, want in zip(grads(fn), grads(ref)):
        assert _rel_err(got, want) <= RTOL


def _check_with_bias(fn, ref, q, k, v, bias):
    """fn(q, k, v, bias) against ref: outputs and the gradients (bias included) of
    sum(sin(output)), relative error <= 1e-5."""
    assert _rel_err(jax.jit(fn)(q, k, v, bias), ref(q, k, v, bias)) <= RTOL
    g = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), (0, 1, 2, 3)))(
        q, k, v, bias)
    for got, want in zip(g(fn), g(ref)):
        assert _rel_err(got, want) <= RTOL


# ---------------------------------------------------------------- pure-JAX implementations

@pytest.mark.parametrize("impl,kind", [
    *[(impl, kind) for impl in ("chunked", "triangular")
      for kind in ("causal", "padding", "segments", "window", "bidirectional_padding", "all")],
    ("xla", "all"), ("xla", "bidirectional_padding")])
def test_matches_reference_for_each_mask(impl, kind):
    q, k, v = _qkv(2, 24, 24)
    mask = _masks(2, 24)[kind]
    _check_against_reference(
        lambda q, k, v, b: attn.attention(q, k, v, mask, b, impl=impl), q, k, v, mask)


@pytest.mark.parametrize("kind", ["causal", "all"])
def test_chunked_with_many_tiles_matches_reference(kind):
    """Small tiles that don't divide the lengths: tile skipping, padding and the online
    softmax across tiles all take part."""
    q, k, v = _qkv(2, 37, 37)
    mask = _masks(2, 37)[kind]
    _check_against_reference(
        lambda q, k, v, b: chunked_attention(q, k, v, mask, b, scale=H ** -0.5, q_block=8,
                                             kv_block=16), q, k, v, mask)


@pytest.mark.parametrize("slices", [1, 3, 5])
@pytest.mark.parametrize("cap", [0.0, 2.0])
def test_triangular_slices_bias_and_softcap_match_reference(slices, cap):
    """Uneven slices (37 queries), a learned bias with its gradient, a soft-cap, MQA."""
    q, _, _ = _qkv(2, 37, 37)
    _, k, v = _qkv(2, 37, 37, seed=1, kv_heads=1)
    mask = _masks(2, 37)["all"]
    dense = mask.dense(37, 37)
    fn = lambda q, k, v, b: triangular_attention(q, k, v, mask, b, scale=0.3, cap=cap,
                                                 slices=slices)
    ref = lambda q, k, v, b: attn.attention(q, k, v, dense, b, scale=0.3, cap=cap)
    bias = _bias(37, 37)
    _check_with_bias(fn, ref, q, k, v, bias)


@pytest.mark.parametrize("impl", ["xla", "triangular", "triangular3"])
def test_queries_without_keys_match_reference(impl):
    """Left padding under a causal mask leaves the first queries no key: their output is the
    mean of all values (the reference's softmax of all-masked logits), and no gradient
    reaches q or k through them (triangular in three slices)."""
    q, k, v = _qkv(2, 40, 40)
    valid = np.ones((2, 40), bool)
    valid[0, :7] = False
    mask = attn.MaskSpec(causal=True, kv_valid_BS=jnp.asarray(valid))
    fn = ((lambda q, k, v, b: attn.attention(q, k, v, mask, b, impl=impl))
          if impl != "triangular3" else
          lambda q, k, v, b: triangular_attention(q, k, v, mask, b, scale=H ** -0.5, slices=3))
    _check_against_reference(fn, q, k, v, mask)


@pytest.mark.parametrize("shape", [(1, N, 1, 40), (2, N, 1, 40)])
def test_triangular_bias_broadcast_over_queries(shape):
    q, k, v = _qkv(2, 40, 40)
    bias = jnp.asarray(np.random.default_rng(7).normal(size=shape), jnp.float32)
    mask = _masks(2, 40)["causal"]
    _check_against_reference(
        lambda q, k, v, b: triangular_attention(q, k, v, mask, b, scale=H ** -0.5, slices=3),
        q, k, v, mask, bias)


def test_triangular_computes_only_the_visible_keys():
    """Four causal slices of 256 queries: the forward's products (scores and values) read
    the first 64, 128, 192 and 256 keys, 10 of 16 key tiles."""
    q, k, v = _qkv(1, 256, 256)
    jaxpr = jax.make_jaxpr(lambda q, k, v: triangular_attention(
        q, k, v, attn.MaskSpec(causal=True), scale=0.25, slices=4))(q, k, v)
    key_lengths = [a.shape[1] for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"
                   for a in (e.invars[0].aval, e.invars[1].aval) if a.shape[2:] == (K, H)]
    assert sorted(key_lengths) == [64, 64, 128, 128, 192, 192, 256, 256]


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_bias_dense_mask_and_cross_attention(impl):
    """A learned bias (T5) with its gradient, a dense mask, and T != S, MQA (one kv head)."""
    q, _, _ = _qkv(2, 19, 29)
    _, k, v = _qkv(2, 19, 29, seed=1, kv_heads=1)
    dense = jnp.asarray(np.random.default_rng(4).random((2, 19, 29)) < 0.7).at[:, :, 0].set(True)
    fn = lambda q, k, v, b: (chunked_attention(q, k, v, dense, b, scale=0.3, q_block=8,
                                               kv_block=8) if impl == "chunked" else
                             attn.attention(q, k, v, dense, b, scale=0.3, impl=impl))
    ref = lambda q, k, v, b: attn.attention(q, k, v, dense, b, scale=0.3)
    bias = _bias(19, 29)
    _check_with_bias(fn, ref, q, k, v, bias)


@pytest.mark.parametrize("impl", ["chunked", "splash", "flash"])
def test_cross_attention_with_key_padding(impl):
    """Encoder-decoder cross-attention as the models build it: T != S, a MaskSpec with only
    the source's padding (kernels in interpret mode off TPU)."""
    q, _, _ = _qkv(2, 20, 33)
    _, k, v = _qkv(2, 20, 33, seed=1)
    valid = np.ones((2, 33), bool)
    valid[1, 21:] = False
    mask = attn.MaskSpec(kv_valid_BS=jnp.asarray(valid))
    _check_against_reference(
        lambda q, k, v, b: attn.attention(q, k, v, mask, b, impl=impl), q, k, v, mask)


def test_window_switch_and_query_offset():
    """select_mask's traced per-layer switch, and queries placed after a KV cache."""
    q, k, v = _qkv(1, 5, 21)
    local = attn.MaskSpec(causal=True, window=4, q_offset=jnp.asarray(16))
    for on in (True, False):
        spec = attn.select_mask(jnp.asarray(on), local, None)
        dense = (attn.local_window_mask(5, 21, 4, 16) if on else attn.causal_mask(5, 21, 16))
        np.testing.assert_array_equal(spec.dense(5, 21)[0], dense)
        got = jax.jit(lambda q, k, v, s: chunked_attention(q, k, v, s, scale=0.25, q_block=2,
                                                           kv_block=4))(q, k, v, spec)
        want = attn.attention(q, k, v, dense[None], scale=0.25)
        assert _rel_err(got, want) <= RTOL


@pytest.mark.parametrize("impl", ["chunked", "splash", "flash"])
def test_rows_without_any_key_stay_finite(impl):
    q, k, v = _qkv(1, 8, 8)
    mask = attn.MaskSpec(kv_valid_BS=jnp.zeros((1, 8), bool))
    if impl == "flash":  # a dense mask: the flash wrapper folds it into the bias
        mask = jnp.zeros((1, 8, 8), bool)
    out, grads = jax.value_and_grad(
        lambda q: jnp.sum(attn.attention(q, k, v, mask, impl=impl)))(q)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(grads)).all()


# ---------------------------------------------------------------- Pallas TPU kernels

@pytest.mark.parametrize("kind", ["causal", "all"])
def test_splash_interpret_matches_reference(kind):
    """Splash with interpret=True, 128-blocks, lengths padded from 200 to 256; "all" is
    causal, local window, packed segments and key padding at once."""
    q, k, v = _qkv(1, 200, 200)
    mask = _masks(1, 200)[kind]
    _check_against_reference(
        lambda q, k, v, b: splash_attention(q, k, v, mask, scale=H ** -0.5, block=128,
                                            interpret=True), q, k, v, mask)


def test_flash_wrapper_interpret_matches_reference():
    """Our wrapper of the TPU flash kernel: causal, packed segments, key padding and a
    bias with its gradient; forward and backward traced in interpret mode on their own."""
    q, k, v = _qkv(1, 200, 200)
    mask = _masks(1, 200)["all"].replace(window=0)
    _check_against_reference(
        lambda q, k, v, b: flash_attention(q, k, v, mask, b, scale=H ** -0.5, block=128),
        q, k, v, mask, bias=_bias(200, 200))


def test_tpu_flash_kernel_under_force_tpu_interpret_mode():
    """The raw Pallas TPU flash kernel, 128-blocks, causal with segment ids, inside
    pltpu.force_tpu_interpret_mode() — forward and backward."""
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 1, 256, 32)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 156], 1, 0))
    ids = tpu_flash.SegmentIds(seg, seg)
    blocks = tpu_flash.BlockSizes(
        block_q=128, block_k_major=128, block_k=128, block_b=1, block_q_major_dkv=128,
        block_k_major_dkv=128, block_k_dkv=128, block_q_dkv=128, block_k_major_dq=128,
        block_k_dq=128, block_q_dq=128)
    mask = (np.tril(np.ones((256, 256), bool)) & (seg[0][:, None] == seg[0][None, :]))
    to_btnh = lambda x: x.transpose(0, 2, 1, 3)

    def kernel(q, k, v):
        return tpu_flash.flash_attention(q, k, v, None, ids, causal=True, sm_scale=0.125,
                                         block_sizes=blocks)

    def ref(q, k, v):
        out = attn.attention(to_btnh(q), to_btnh(k), to_btnh(v), jnp.asarray(mask)[None],
                             scale=0.125)
        return to_btnh(out)

    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    with pltpu.force_tpu_interpret_mode():
        out = kernel(q, k, v)
        grads = jax.grad(loss(kernel), (0, 1, 2))(q, k, v)
    assert _rel_err(out, ref(q, k, v)) <= RTOL
    for got, want in zip(grads, jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        assert _rel_err(got, want) <= RTOL


# ---------------------------------------------------------------- choice and errors

def test_auto_on_cpu_and_cudnn_asks_for_a_gpu():
    """On CPU: triangular for causal self-attention of two slices or more, else xla."""
    q, k, v = _qkv(1, 8, 8)
    long_q = jnp.zeros((1, 128, N, H))
    causal = attn.MaskSpec(causal=True)
    assert attn.resolve_impl("auto", q, None, None) == "xla"
    assert attn.resolve_impl("auto", q, causal, None) == "xla"  # one slice: nothing skipped
    assert attn.resolve_impl("auto", long_q, causal, None) == "triangular"
    assert attn.resolve_impl("auto", long_q, attn.MaskSpec(), None) == "xla"
    decoding = attn.MaskSpec(causal=True, q_offset=jnp.asarray(3))
    assert attn.resolve_impl("auto", long_q, decoding, None) == "xla"
    with pytest.raises(ConfigError, match="NVIDIA GPU.*'cpu'.*xla or chunked"):
        attn.attention(q, k, v, impl="cudnn")


@pytest.mark.parametrize("impl,mask,bias,match", [
    ("splash", None, True, "bias"),
    ("splash", "dense", False, "dense"),
    ("flash", "window", False, "window"),
])
def test_clear_error_where_a_kernel_cannot_apply_mask_or_bias(impl, mask, bias, match):
    q, k, v = _qkv(1, 8, 8)
    masks = {None: None, "dense": jnp.ones((1, 8, 8), bool),
             "window": attn.MaskSpec(causal=True, window=3)}
    with pytest.raises(ConfigError, match=f"model.attention={impl}.*{match}"):
        attn.attention(q, k, v, masks[mask], _bias(8, 8) if bias else None, impl=impl)


@pytest.mark.parametrize("impl", ["splash", "flash", "triangular"])
def test_kv_cache_decoding_steps_fall_back_to_xla(impl):
    """Queries after a KV cache (a query offset) are beyond the TPU kernels and the causal
    slices: XLA serves."""
    q, k, v = _qkv(1, 2, 8)
    spec = attn.MaskSpec(causal=True, q_offset=jnp.asarray(5))
    want = attn.attention(q, k, v, spec.dense(2, 8))
    assert _rel_err(attn.attention(q, k, v, spec, impl=impl), want) <= RTOL


def test_flash_off_tpu_refuses_a_multi_device_mesh():
    """TPU interpret mode simulates one chip: across simulated devices it would deadlock."""
    from jaxlm import sharding
    from jaxlm.config import MeshConfig

    q, k, v = _qkv(8, 8, 8)
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=-1))):
        with pytest.raises(ConfigError, match="model.attention=flash.*one device"):
            attn.attention(q, k, v, attn.MaskSpec(causal=True), impl="flash")


# ---------------------------------------------------------------- model level

def _tiny(**kw):
    base = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                       vocab_size=50, max_seq_len=32, local_window=6)
    return dataclasses.replace(base, **kw)


def _loss_and_grads(cfg, params, tokens, segs):
    model = build_model(cfg)
    batch = LMBatch(inputs=tokens, targets=jnp.roll(tokens, -1, 1),
                    loss_mask=jnp.ones(tokens.shape), segment_ids=segs)
    fn = lambda p: causal_lm_loss(model.apply, p, batch)[0]
    return jax.jit(jax.value_and_grad(fn))(params)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = _tiny()
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 32)))
    segs = jnp.asarray(np.repeat([[1] * 12 + [2] * 20], 2, 0))
    params = build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"]
    return cfg, params, tokens, segs, _loss_and_grads(cfg, params, tokens, segs)


@pytest.mark.parametrize("change", [dict(attention="chunked", remat="dots_saveable"),
                                    dict(attention="splash", remat="offload"),
                                    dict(attention="triangular")])
def test_model_with_each_kernel_and_remat_matches_reference(tiny_model, change):
    """Scanned layers with GPT-3 local layers (a traced per-layer window switch) and packed
    documents: the loss and every gradient agree with the reference attention."""
    cfg, params, tokens, segs, (loss0, grads0) = tiny_model
    loss, grads = _loss_and_grads(dataclasses.replace(cfg, **change), params, tokens, segs)
    assert abs(float(loss - loss0)) <= RTOL * abs(float(loss0))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads0))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        assert float(jnp.max(jnp.abs(got - want))) <= RTOL * scale


def test_model_with_triangular_slices_matches_reference():
    """128 tokens (two slices) with scanned layers, local windows and packed documents."""
    cfg = _tiny(max_seq_len=128)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 128)))
    segs = jnp.asarray(np.repeat([[1] * 50 + [2] * 78], 2, 0))
    params = build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"]
    loss0, grads0 = _loss_and_grads(cfg, params, tokens, segs)
    tri = dataclasses.replace(cfg, attention="triangular")
    loss, grads = _loss_and_grads(tri, params, tokens, segs)
    assert abs(float(loss - loss0)) <= RTOL * abs(float(loss0))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads0))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        assert float(jnp.max(jnp.abs(got - want))) <= RTOL * scale


def test_bfloat16_compute_keeps_params_softmax_logits_and_loss_in_float32(tiny_model):
    cfg, params, tokens, segs, (loss32, _) = tiny_model
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    logits = jax.eval_shape(lambda p: build_model(cfg16).apply({"params": p}, tokens), params)
    assert logits.dtype == jnp.float32
    loss, grads = _loss_and_grads(cfg16, params, tokens, segs)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert abs(float(loss) - float(loss32)) < 0.02 * float(loss32)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    # Inside attention, the exponentials (softmax) run in float32 on bfloat16 inputs.
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 8, 8))
    for impl in ("reference", "chunked", "triangular"):
        fn = lambda q, k, v, impl=impl: attn.attention(q, k, v, attn.MaskSpec(causal=True),
                                                       impl=impl)
        jaxpr = jax.make_jaxpr(fn)(q, k, v)
        exps = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "exp"]
        assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps), impl


def _eqns(jaxpr):
    """All equations, those of nested jaxprs (loops, custom VJPs) included."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def test_offload_remat_needs_pinned_host_memory(monkeypatch):
    from jaxlm.models import transformer

    class Memory:
        kind = "device"

    class Device:
        def addressable_memories(self):
            return [Memory()]

    monkeypatch.setattr(transformer.jax, "devices", lambda: [Device()])
    with pytest.raises(ConfigError, match="model.remat=offload needs pinned host memory"):
        transformer.remat_policy("offload")
