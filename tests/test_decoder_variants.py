"""The parts of today's decoders on their own: RoPE frequencies against transformers'
ROPE_INIT_FUNCTIONS, the attention-logit soft-cap in every kernel that takes it (and a
ConfigError from those that cannot), the local/global layer pattern and its FLOPs, config
validation of the new fields, and exports refused where the HF class cannot hold a part."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_MODEL
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxlm import config as config_lib
from jaxlm import perf, setup
from jaxlm.config import ConfigError, ModelConfig, preset_fields
from jaxlm.convert import ConversionError
from jaxlm.convert.hf import save_hf
from jaxlm.models import attention as attn
from jaxlm.models.kernels.chunked import chunked_attention
from jaxlm.models.kernels.splash import splash_attention

# ---------------------------------------------------------------- RoPE frequencies

# Llama 3.1's published RoPE: head width 128, base 500000, llama3 scaling.
LLAMA31 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=8192)


def _hf_inv_freq(rope: dict, seq_len=None, max_pos=131072) -> np.ndarray:
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128,
                                   max_position_embeddings=max_pos, rope_parameters=dict(rope))
    if rope["rope_type"] == "default":
        inv, _ = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
            .compute_default_rope_parameters(cfg)
    else:
        kw = {} if seq_len is None else {"seq_len": torch.tensor(seq_len)}
        inv, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu", **kw)
    return inv.numpy()


@pytest.mark.parametrize("rope, ours, seq_len", [
    (dict(rope_type="default", rope_theta=500000.0), dict(scaling="none"), None),
    (LLAMA31, dict(scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_len=8192), None),
    (dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
     dict(scaling="linear", factor=4.0), None),
    # dynamic NTK: unchanged up to max_position_embeddings, a larger base past it.
    (dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
     dict(scaling="dynamic", factor=2.0), 4096),
    (dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
     dict(scaling="dynamic", factor=2.0), 20000),
])
def test_rope_frequencies_match_transformers(rope, ours, seq_len):
    max_pos = 8192 if rope["rope_type"] == "dynamic" else 131072
    want = _hf_inv_freq(rope, seq_len, max_pos)
    got = attn.rope_frequencies(128, rope["rope_theta"], max_len=max_pos, seq_len=seq_len,
                                **ours)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)
    if ours["scaling"] != "none" and (seq_len or max_pos) > 8192:
        assert not np.allclose(got, attn.rope_frequencies(128, rope["rope_theta"]))


def test_llama3_scaling_keeps_short_wavelengths_and_stretches_long_ones():
    plain = np.asarray(attn.rope_frequencies(128, 500000.0))
    scaled = np.asarray(attn.rope_frequencies(128, 500000.0, "llama3", factor=8.0,
                                              original_max_len=8192))
    wavelen = 2 * np.pi / plain
    np.testing.assert_array_equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-6)


# ---------------------------------------------------------------- soft-capped attention

def _qkv(T=24, seed=0):
    rng = np.random.default_rng(seed)
    # Large logits, so a cap of 5 bites hard.
    q = jnp.asarray(3 * rng.normal(size=(2, T, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(3 * rng.normal(size=(2, T, 2, 16)), jnp.float32) for _ in range(2))
    return q, k, v


def _softcapped_numpy(q, k, v, mask, cap, scale):
    """float64 numpy: softmax(cap·tanh(q·k·scale / cap), masked) v, heads grouped 2 per kv."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    logits = cap * np.tanh(np.einsum("btnh,bsnh->bnts", q, k) * scale / cap)
    logits = np.where(mask[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("impl", ["reference", "xla", "chunked"])
def test_softcap_in_the_kernels_picked_on_cpu(impl):
    q, k, v = _qkv()
    spec = attn.MaskSpec(causal=True, window=7)
    want = _softcapped_numpy(q, k, v, np.asarray(spec.dense(24, 24)), 5.0, 0.25)
    fn = lambda q, k, v: attn.attention(q, k, v, spec, scale=0.25, impl=impl, cap=5.0)
    if impl == "chunked":  # small tiles, so several are visited and skipped
        fn = lambda q, k, v: chunked_attention(q, k, v, spec, scale=0.25, cap=5.0, q_block=8,
                                               kv_block=8)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v)), want, atol=2e-5)
    uncapped = attn.attention(q, k, v, spec, scale=0.25)
    assert float(jnp.abs(uncapped - want).max()) > 0.1  # the cap acts


def test_chunked_softcap_gradients_equal_the_reference():
    """The chunked kernel's own backward pass goes through the tanh and leaves the bias's
    gradient uncapped."""
    q, k, v = _qkv(20, seed=1)
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 20, 20)), jnp.float32)
    spec = attn.MaskSpec(causal=True)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)))
    ref = lambda q, k, v, b: attn.attention(q, k, v, spec, b, scale=0.25, cap=4.0)
    ours = lambda q, k, v, b: chunked_attention(q, k, v, spec, b, scale=0.25, cap=4.0,
                                                q_block=8, kv_block=8)
    for got, want in zip(jax.grad(loss(ours), (0, 1, 2, 3))(q, k, v, bias),
                         jax.grad(loss(ref), (0, 1, 2, 3))(q, k, v, bias)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_splash_softcap_in_interpret_mode():
    q, k, v = _qkv(128, seed=3)
    spec = attn.MaskSpec(causal=True)
    want = _softcapped_numpy(q, k, v, np.asarray(spec.dense(128, 128)), 5.0, 0.25)
    got = splash_attention(q, k, v, spec, scale=0.25, cap=5.0, block=128, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.parametrize("impl", ["cudnn", "flash"])
def test_kernels_without_softcap_refuse_it(impl):
    q, k, v = _qkv(8)
    with pytest.raises(ConfigError, match=f"model.attention={impl} cannot soft-cap"):
        attn.attention(q, k, v, attn.MaskSpec(causal=True), impl=impl, cap=5.0)
    with pytest.raises(ConfigError, match=f"model.attention={impl} cannot soft-cap"):
        config_lib.load("tiny", [f"model.attention={impl}", "model.attention_softcap=50"])


# ---------------------------------------------------------------- layer pattern and FLOPs

def test_layer_patterns():
    cfg = lambda **kw: ModelConfig(num_layers=8, **kw)
    assert attn.local_layers(cfg(local_window=4)) == (False, True) * 4  # GPT-3: every 2nd
    assert attn.local_layers(cfg(local_window=4, local_every=3)) == (
        False, False, True, False, False, True, False, False)
    assert attn.local_layers(cfg(local_window=4, local_pattern="LG")) == (True, False) * 4
    assert attn.local_layers(cfg(local_window=4, local_pattern="LLLLLG")) == (
        True,) * 5 + (False, True, True)
    assert attn.local_layers(cfg(local_pattern="LG")) == (False,) * 8  # no window, no local
    for pattern in ("LG", "GL", "LLLLLG", "L", "G", "GGGLL"):
        flags = attn.local_layers(cfg(local_window=4, local_pattern=pattern))
        assert attn.local_layers(cfg(local_window=4, local_pattern=attn.pattern_of(
            flags))) == flags


def _pairs(T, window):
    """Query-key pairs a causal (banded) layer attends to, the diagonal counted half."""
    q, k = np.arange(T)[:, None], np.arange(T)[None, :]
    return ((k <= q) & (k > q - window)).sum() - T / 2


@pytest.mark.parametrize("pattern, local", [("LG", 3), ("LLLLLG", 5), ("GGGGGL", 1)])
def test_flops_count_the_pattern_local_layers(pattern, local):
    cfg = config_lib.load("tiny", [*TINY_MODEL, "model.num_layers=6", "model.local_window=8",
                                   f"model.local_pattern={pattern}"])
    s = setup.build(cfg)
    T, width = cfg.train.seq_len, 32
    pairs = (6 - local) * _pairs(T, T) + local * _pairs(T, 8)
    dense, halved = s.flops_per_token(causal_halved=False), s.flops_per_token()
    assert (dense - halved) * T == pytest.approx(12 * width * (6 * T * T - pairs))


def test_gemma_like_flops_equal_the_traced_matmuls():
    """q/k norms, sandwich norms, soft-caps and a pattern add no matmul the count misses."""
    cfg = config_lib.load("tiny", ["model.preset=gemma3-tiny", "train.seq_len=32",
                                   "train.batch_size=8", "model.max_seq_len=32"])
    s = setup.build(cfg)
    with jax.set_mesh(s.mesh):
        traced = perf.jaxpr_matmul_flops(s.train_step, s.abstract_state, s.abstract_batch())
    assert traced == pytest.approx(s.flops_per_token(causal_halved=False) * 8 * 32, rel=1e-9)


# ---------------------------------------------------------------- config and export errors

@pytest.mark.parametrize("overrides, match", [
    (["model.preset=llama-tiny", "model.rope_scaling=yarn"], "rope_scaling='yarn'"),
    (["model.preset=llama-tiny", "model.rope_scaling=linear", "model.rope_factor=0.5"],
     "rope_factor must be >= 1"),
    (["model.preset=llama-tiny", "model.rope_scaling=llama3", "model.rope_factor=8",
      "model.rope_low_freq_factor=4", "model.rope_high_freq_factor=1"], "low_freq_factor <"),
    (["model.rope_scaling=linear", "model.rope_factor=2"], "model.position=learned"),
    (["model.local_window=8", "model.local_pattern=LX"], "local_pattern='LX'"),
    (["model.local_pattern=LG"], "needs .* model.local_window > 0"),
    (["model.sandwich_norm=true", "model.norm_position=post"], "norm_position=pre"),
    (["model.attention_softcap=-1"], "attention_softcap must be >= 0"),
])
def test_bad_values_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.load("tiny", overrides)


@pytest.mark.parametrize("preset, change, match", [
    ("gpt2", dict(attention_softcap=30.0), "gpt2.*attention_softcap"),
    ("llama-tiny", dict(sandwich_norm=True), "llama.*sandwich_norm"),
    ("qwen2-tiny", dict(use_bias=True), "qwen2.*use_bias"),
    ("qwen3-tiny", dict(qkv_bias=True), "qwen3.*qkv_bias"),
    ("gemma2-tiny", dict(norm="rmsnorm"), "gemma2.*rmsnorm_plus1"),
    ("gemma2-tiny", dict(rope_local_theta=50.0), "gemma2.*rope_local_theta"),
    ("gemma3-tiny", dict(attention_softcap=50.0), "gemma3_text.*soft-cap"),
])
def test_export_refuses_what_the_hf_class_cannot_hold(preset, change, match, tmp_path):
    cfg = dataclasses.replace(ModelConfig(**preset_fields(preset)), **change)
    with pytest.raises(ConversionError, match=match):
        save_hf(cfg, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_hub_style_configs_read_as_transformers_5_ones():
    """Checkpoints saved by transformers 4 keep RoPE in rope_theta + rope_scaling (and Gemma
    3's local base in rope_local_base_freq, its pattern in sliding_window_pattern)."""
    from jaxlm.convert import gemma, llama

    shape = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
                 max_position_embeddings=131072)
    llama31 = llama.config_from_hf(dict(shape, model_type="llama", rope_theta=500000.0,
                                        rope_scaling=dict(LLAMA31, rope_theta=None)))
    assert (llama31["rope_scaling"], llama31["rope_theta"], llama31["rope_factor"],
            llama31["rope_original_max_len"]) == ("llama3", 500000.0, 8.0, 8192)
    g3 = gemma.config_from_hf(dict(shape, model_type="gemma3_text", num_hidden_layers=12,
                                   head_dim=256, query_pre_attn_scalar=256, rope_theta=1e6,
                                   rope_local_base_freq=10000.0, sliding_window=1024,
                                   sliding_window_pattern=6,
                                   rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert (g3["local_pattern"], g3["local_window"], g3["rope_local_theta"], g3["rope_theta"],
            g3["rope_scaling"], g3["rope_factor"]) == ("LLLLLG", 1024, 1e4, 1e6, "linear", 8.0)
    with pytest.raises(ConversionError, match="'yarn' is not supported"):
        llama.config_from_hf(dict(shape, model_type="llama", rope_scaling={"rope_type": "yarn",
                                                                          "factor": 4.0}))
